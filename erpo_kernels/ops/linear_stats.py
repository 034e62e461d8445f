"""Fused linear + online softmax: per-token log-prob of the target, entropy and logsumexp from hidden
states, never materializing the [N, V] logits.

torch: ``z = (hidden @ weight.T + bias).float() / T; lse = z.logsumexp(-1);``
``logprobs = z[n, y_n] - lse`` (0 where ``y_n == ignore_index``); ``entropy = lse - (z.softmax(-1) * z).sum(-1)``.

One grid axis of ``token_blocks * splits`` programs, each one (token block, vocab split) in the grouped
order of ``_grouped_program`` (tile_config.launch_plan picks the split count and the group size so the
programs resident at one time share their hidden blocks in L2).  Each program streams the vocab tiles of
its split, keeping per token, in log2 units, the running max ``m``, ``s = sum 2^(z - m)`` and
``t = sum 2^(z - m) * (z - m)``; ``m`` starts at -inf (never 0: rows of very negative logits).  Keeping
``t`` relative to the running max, not ``sum p z``, avoids the cancellation of ``lse - sum p z`` when |z| is
large; then ``H = log s - t / s`` (>= 0 term by term: t <= 0, s >= 1).  Partials leave in natural units.
``_linear_stats_merge_kernel`` merges the splits flash-decoding style: with M = max_k m_k and
``w_k = exp(m_k - M)``: ``S = sum w_k s_k``, ``T = sum w_k (t_k + s_k (m_k - M))``, ``lse = M + log S``.
The target logit is a separate dot product ``hidden[n] . weight[y_n]`` taken once per token by the
programs of split 0 before their vocab loop: picking it out of every logit tile costs a compare, a select
and an add per logit, and the registers: compiled offline for sm_90a, the 128x256 tile spilled 60 bytes
with that pick in the loop and none without.  It is rounded differently from the tile's copy of the same
logit, so ``logprobs`` is clamped to <= 0 (log p <= 0 exactly).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from erpo_kernels.ops import tile_config
from erpo_kernels.ops._jit_helpers import (LN2, LOG2E, _grouped_program, _logits_tile,
                                            _online_softmax_step, dot_meta)
from erpo_kernels.validation import fail

Tensor = torch.Tensor
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def _linear_stats_fwd_kernel(
        # pointers
        hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
        part_max_ptr, part_sumexp_ptr, part_sumzexp_ptr, target_logit_ptr,
        # sizes
        N, V, H, split_cols, num_splits, group_size,
        # strides
        stride_hn, stride_hh, stride_wv, stride_wh,
        # scalars
        temperature, ignore_index,
        # meta-parameters
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    pid_n, pid_split = _grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, group_size)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=ignore_index)
    if pid_split == 0:
        _target_logit(hidden_ptr, weight_ptr, bias_ptr, target_logit_ptr, targets, offs_n, mask_n, V, H,
                      stride_hn, stride_hh, stride_wv, stride_wh, temperature, ignore_index,
                      HAS_BIAS, BLOCK_N, BLOCK_H)
    v_begin = pid_split * split_cols
    v_end = tl.minimum(v_begin + split_cols, V)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_sumzexp = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum 2^(z - m) * (z - m), <= 0
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, mask_n, mask_v, H,
                         stride_hn, stride_hh, stride_wv, stride_wh, LOG2E / temperature,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, DOT_UPCAST)
        run_max, run_sumexp, run_sumzexp = _online_softmax_step(run_max, run_sumexp, run_sumzexp, z)

    part = offs_n.to(tl.int64) * num_splits + pid_split
    tl.store(part_max_ptr + part, run_max * LN2, mask=mask_n)
    tl.store(part_sumexp_ptr + part, run_sumexp, mask=mask_n)
    tl.store(part_sumzexp_ptr + part, run_sumzexp * LN2, mask=mask_n)


@triton.jit
def _target_logit(hidden_ptr, weight_ptr, bias_ptr, target_logit_ptr, targets, offs_n, mask_n, V, H,
                  stride_hn, stride_hh, stride_wv, stride_wh, temperature, ignore_index,
                  HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr):
    """target_logit[n] = (hidden[n] . weight[y_n] + bias[y_n]) / T in fp32 (CUDA cores; N*H gathered
    weight elements, noise next to the N*H*V of the tiles); NaN for a target outside [0, V)."""
    in_range = (targets >= 0) & (targets < V)
    rows = mask_n & in_range
    h_rows = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = weight_ptr + tl.where(rows, targets, 0)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = rows[:, None] & (offs_h < H)[None, :]
        h = tl.load(h_rows + offs_h[None, :] * stride_hh, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_h[None, :] * stride_wh, mask=mask, other=0.0).to(tl.float32)
        acc += h * w
    logit = tl.sum(acc, axis=1)
    if HAS_BIAS:
        logit += tl.load(bias_ptr + targets, mask=rows, other=0.0).to(tl.float32)
    logit = tl.where(in_range, logit / temperature, float("nan"))
    tl.store(target_logit_ptr + offs_n, logit, mask=mask_n & (targets != ignore_index))


@triton.jit
def _linear_stats_merge_kernel(
        # pointers
        part_max_ptr, part_sumexp_ptr, part_sumzexp_ptr, target_logit_ptr, targets_ptr,
        logprobs_ptr, entropy_ptr, lse_ptr,
        # sizes
        N, num_splits,
        # scalars
        ignore_index,
        # meta-parameters
        BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_s[None, :] < num_splits)
    part = offs_n.to(tl.int64)[:, None] * num_splits + offs_s[None, :]
    m = tl.load(part_max_ptr + part, mask=mask, other=float("-inf"))
    s = tl.load(part_sumexp_ptr + part, mask=mask, other=0.0)
    t = tl.load(part_sumzexp_ptr + part, mask=mask, other=0.0)
    top = tl.max(m, axis=1)
    shift = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - shift[:, None])
    sumexp = tl.sum(w * s, axis=1)
    moved = tl.where(s > 0, t + s * (m - shift[:, None]), 0.0)
    sumzexp = tl.sum(w * moved, axis=1)
    log_sumexp = tl.log(sumexp)
    lse = top + log_sumexp
    entropy = tl.where(sumexp > 0, log_sumexp - sumzexp / sumexp, 0.0)

    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=ignore_index)
    valid = mask_n & (targets != ignore_index)
    target_logit = tl.load(target_logit_ptr + offs_n, mask=valid, other=0.0)
    logprobs = target_logit - lse
    # log p <= 0; the target logit and lse are rounded apart (see the module docstring); NaN stays NaN
    logprobs = tl.where(valid, tl.where(logprobs > 0, 0.0, logprobs), 0.0)
    tl.store(logprobs_ptr + offs_n, logprobs, mask=mask_n)
    tl.store(entropy_ptr + offs_n, entropy, mask=mask_n)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)


def check_linear_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor
                        ) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Validate the operands shared by the forward and backward launchers; return them contiguous."""
    if not isinstance(hidden, Tensor) or hidden.ndim != 2 or hidden.dtype not in INPUT_DTYPES:
        fail("hidden", hidden, "a 2-D [N, H] tensor of dtype float16, bfloat16 or float32")
    n_tokens, dim = hidden.shape
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[1] != dim or weight.shape[0] < 1:
        fail("weight", weight, f"a 2-D [V, H] tensor with V >= 1 and H = {dim} (hidden's last dim)")
    if weight.dtype != hidden.dtype:
        fail("weight", weight, f"dtype {hidden.dtype} (hidden's dtype)")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or not bias.is_floating_point()):
        fail("bias", bias, f"None or a floating-point [V] = [{weight.shape[0]}] tensor")
    if not isinstance(targets, Tensor) or tuple(targets.shape) != (n_tokens,) or targets.dtype != torch.int64:
        fail("targets", targets, f"an int64 [N] = [{n_tokens}] tensor")
    for name, x in (("weight", weight), ("bias", bias), ("targets", targets)):
        if x is not None and x.device != hidden.device:
            fail(name, x, f"a tensor on {hidden.device} (hidden's device)")
    contiguous = [x.contiguous() if x is not None else None for x in (hidden, weight, bias, targets)]
    return tuple(contiguous)


def check_launch_scalars(temperature: float, num_splits: Optional[int], group_size: Optional[int] = None) -> None:
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        fail("temperature", temperature, "a float > 0")
    for name, value in (("num_splits", num_splits), ("group_size", group_size)):
        if value is not None and not (isinstance(value, int) and value >= 1):
            fail(name, value, "None (automatic) or an int >= 1")


def linear_stats_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                     temperature: float = 1.0, ignore_index: int = -100, num_splits: Optional[int] = None,
                     group_size: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logprobs, entropy, lse)``, each fp32 [N], for hidden [N, H], weight [V, H], bias [V] or None,
    targets int64 [N].  ``num_splits`` (vocab splits per token block) and ``group_size`` (token blocks per
    launch group) default to tile_config.split_plan's choice for the device.
    A target outside [0, V) other than ``ignore_index`` gives a NaN log-prob (no device sync to check)."""
    hidden, weight, bias, targets = check_linear_inputs(hidden, weight, bias, targets)
    check_launch_scalars(temperature, num_splits, group_size)
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    if n_tokens == 0:
        return tuple(torch.empty(0, dtype=torch.float32, device=hidden.device) for _ in range(3))

    spec = tile_config.device_spec(hidden.device)
    dots = dot_meta(hidden.dtype, hidden.device)
    kernel, meta = tile_config.launch_params("linear_stats_fwd", _linear_stats_fwd_kernel,
                                             dict(N=n_tokens, V=vocab, H=dim), hidden.dtype,
                                             dots["DOT_PRECISION"], spec)
    _, plan = tile_config.launch_plan("linear_stats_fwd", hidden.dtype, dots["DOT_PRECISION"], spec, n_tokens, vocab,
                                      dim, splits=num_splits, group_size=group_size)
    partials = torch.empty(3, n_tokens, plan.splits, dtype=torch.float32, device=hidden.device)
    target_logit = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)  # read where written

    def grid(META):
        return (triton.cdiv(n_tokens, META["BLOCK_N"]) * plan.splits,)

    kernel[grid](
        hidden, weight, bias, targets, partials[0], partials[1], partials[2], target_logit,
        n_tokens, vocab, dim, plan.split_len, plan.splits, plan.group_size,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(temperature), int(ignore_index),
        **dots, **meta)

    return _merge_partials(partials, target_logit, targets, plan.splits, ignore_index)


def _merge_partials(partials: Tensor, target_logit: Tensor, targets: Tensor, splits: int, ignore_index: int
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logprobs, entropy, lse)`` from per-split partials [3, N, splits] and the target logits [N]."""
    n_tokens = targets.shape[0]
    logprobs, entropy, lse = (torch.empty(n_tokens, dtype=torch.float32, device=targets.device) for _ in range(3))
    spec = tile_config.device_spec(targets.device)
    merge = tile_config.default_config("linear_stats_merge", spec=spec)
    block_n = tile_config.merge_block_n(splits, spec)
    _linear_stats_merge_kernel[(triton.cdiv(n_tokens, block_n),)](
        partials[0], partials[1], partials[2], target_logit, targets, logprobs, entropy, lse,
        n_tokens, splits, int(ignore_index),
        BLOCK_N=block_n, BLOCK_S=max(triton.next_power_of_2(splits), 2), num_warps=merge.num_warps)
    return logprobs, entropy, lse

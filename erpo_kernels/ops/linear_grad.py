"""Backward of the fused linear stats, design (b): grads of ``sum(g_lp * logprobs + g_H * entropy)`` wrt
hidden, weight and bias, recomputing the logits tile by tile in registers, with no [N, V] or [chunk, V] buffer.

With z = (h W^T + b) / T (fp32) and p = exp(z - lse) (ERPO_SPEC.md, "Gradient of the fused part"):
``dz = g_lp * (onehot(y) - p) - g_H * p * (z - lse + H)``; ``grad_hidden = dz @ W / T``,
``grad_weight = dz^T @ h / T``, ``grad_bias = dz.sum(0) / T``.  Grads accumulate in fp32 buffers and are
cast to the input dtype once at the end.

``linear_grad_fused``: ``_linear_grad_fused_kernel``, one program per (outer block, inner split), on one grid
axis in the grouped order of ``_grouped_program`` (tile_config.split_plan sizes splits and groups), that streams
the inner tiles; per [BLOCK_N, BLOCK_V] tile it recomputes z (a K-loop over H), forms dz in registers, then
loops over H again for ``dz @ W[v]`` and ``dz^T @ h[n]``.  4 GEMMs of work in total with the forward.
Cost: the fp32 grad tiles are read-modified-written once per inner tile, i.e. N·H·8·V/BLOCK_V bytes for
grad_hidden and V·H·8·N/BLOCK_N for grad_weight (L2 atomics on a GPU); larger tiles cut that traffic.
Loop orders:
  - token-major (default): outer = token blocks, inner = vocab tiles.  grad_hidden rows belong to one
    program when there is one vocab split (plain read-modify-write), else atomics; grad_weight and
    grad_bias take fp32 atomics from every token block (order varies run to run: not bitwise stable).
  - ``deterministic=True``: token-major with one split for grad_hidden only, then vocab-major
    (outer = vocab blocks, inner = token tiles) for grad_weight / grad_bias, each owned by one program.
    No atomics, bitwise reproducible, at the price of recomputing the logits once more (5 GEMMs) and
    fewer programs when N (resp. V) is small.

Design (a), vendor GEMMs around a Triton dz epilogue, is :mod:`erpo_kernels.ops.linear_grad_chunked`; the
input checks and gradient buffers here serve both.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from erpo_kernels.ops import tile_config
from erpo_kernels.ops._jit_helpers import (_dz_tile, _grouped_program, _logits_tile, _mma, _token_coefficients,
                                            dot_meta)
from erpo_kernels.ops.linear_stats import check_launch_scalars, check_linear_inputs
from erpo_kernels.validation import fail

Tensor = torch.Tensor
_HEURISTICS = {
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "HAS_GRAD_LOGPROBS": lambda args: args["grad_logprobs_ptr"] is not None,
    "HAS_GRAD_ENTROPY": lambda args: args["grad_entropy_ptr"] is not None,
}


@triton.heuristics({**_HEURISTICS,
                    "COMPUTE_HIDDEN": lambda args: args["grad_hidden_ptr"] is not None,
                    "COMPUTE_WEIGHT": lambda args: args["grad_weight_ptr"] is not None,
                    "COMPUTE_BIAS": lambda args: args["grad_bias_ptr"] is not None})
@triton.jit
def _linear_grad_fused_kernel(
        # pointers
        hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr,
        grad_logprobs_ptr, grad_entropy_ptr, grad_hidden_ptr, grad_weight_ptr, grad_bias_ptr,
        # sizes
        N, V, H, split_len, num_splits, group_size,
        # strides (grad buffers are contiguous fp32 [N, H] / [V, H])
        stride_hn, stride_hh, stride_wv, stride_wh,
        # scalars
        temperature, ignore_index,
        # meta-parameters
        HAS_BIAS: tl.constexpr, HAS_GRAD_LOGPROBS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
        COMPUTE_HIDDEN: tl.constexpr, COMPUTE_WEIGHT: tl.constexpr, COMPUTE_BIAS: tl.constexpr,
        VOCAB_MAJOR: tl.constexpr, HIDDEN_ATOMIC: tl.constexpr, WEIGHT_ATOMIC: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    num_outer = tl.cdiv(V, BLOCK_V) if VOCAB_MAJOR else tl.cdiv(N, BLOCK_N)
    pid_outer, pid_split = _grouped_program(tl.program_id(0), num_outer, num_splits, group_size)
    inner_begin = pid_split * split_len
    if VOCAB_MAJOR:
        offs_v = pid_outer * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        inner_end = tl.minimum(inner_begin + split_len, N)
        inner_step: tl.constexpr = BLOCK_N
    else:
        offs_n = pid_outer * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        targets, lse, entropy, g_logprob, g_entropy = _token_coefficients(
            offs_n, mask_n, targets_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
            ignore_index, HAS_GRAD_LOGPROBS, HAS_GRAD_ENTROPY)
        inner_end = tl.minimum(inner_begin + split_len, V)
        inner_step: tl.constexpr = BLOCK_V

    for i0 in range(inner_begin, inner_end, inner_step):
        if VOCAB_MAJOR:
            offs_n = i0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < inner_end
            targets, lse, entropy, g_logprob, g_entropy = _token_coefficients(
                offs_n, mask_n, targets_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
                ignore_index, HAS_GRAD_LOGPROBS, HAS_GRAD_ENTROPY)
        else:
            offs_v = i0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < inner_end
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, mask_n, mask_v, H,
                         stride_hn, stride_hh, stride_wv, stride_wh, 1.0 / temperature,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, DOT_UPCAST)
        # int32 targets: the one-hot compare over the tile in 32-bit (valid targets are < V < 2^31)
        dz = _dz_tile(z, offs_v, mask_n, lse, entropy, g_logprob, g_entropy, targets.to(tl.int32),
                      HAS_GRAD_LOGPROBS, HAS_GRAD_ENTROPY) / temperature
        dz_op = dz.to(hidden_ptr.dtype.element_ty)  # tensor-core operand; accumulation stays fp32
        if COMPUTE_BIAS:
            grad_b = tl.sum(dz, axis=0)
            if WEIGHT_ATOMIC:
                tl.atomic_add(grad_bias_ptr + offs_v, grad_b, mask=mask_v, sem="relaxed")
            else:
                tl.store(grad_bias_ptr + offs_v, tl.load(grad_bias_ptr + offs_v, mask=mask_v) + grad_b,
                         mask=mask_v)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            if COMPUTE_HIDDEN:
                w = tl.load(weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv + offs_h[None, :] * stride_wh,
                            mask=mask_v[:, None] & mask_h[None, :], other=0.0)
                grad_h = _mma(dz_op, w, tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32), DOT_PRECISION, DOT_UPCAST)
                ptrs = grad_hidden_ptr + offs_n.to(tl.int64)[:, None] * H + offs_h[None, :]
                mask = mask_n[:, None] & mask_h[None, :]
                if HIDDEN_ATOMIC:
                    tl.atomic_add(ptrs, grad_h, mask=mask, sem="relaxed")
                else:
                    tl.store(ptrs, tl.load(ptrs, mask=mask) + grad_h, mask=mask)
            if COMPUTE_WEIGHT:
                h = tl.load(hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn + offs_h[None, :] * stride_hh,
                            mask=mask_n[:, None] & mask_h[None, :], other=0.0)
                grad_w = _mma(tl.trans(dz_op), h, tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32),
                              DOT_PRECISION, DOT_UPCAST)
                ptrs = grad_weight_ptr + offs_v.to(tl.int64)[:, None] * H + offs_h[None, :]
                mask = mask_v[:, None] & mask_h[None, :]
                if WEIGHT_ATOMIC:
                    tl.atomic_add(ptrs, grad_w, mask=mask, sem="relaxed")
                else:
                    tl.store(ptrs, tl.load(ptrs, mask=mask) + grad_w, mask=mask)


def _check_grad_inputs(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                       temperature, needs_input_grad, num_splits=None, group_size=None):
    hidden, weight, bias, targets = check_linear_inputs(hidden, weight, bias, targets)
    check_launch_scalars(temperature, num_splits, group_size)
    n_tokens = hidden.shape[0]
    if len(tuple(needs_input_grad)) != 3:
        fail("needs_input_grad", str(needs_input_grad), "3 booleans (hidden, weight, bias)")
    checked = []
    for name, x, required in (("lse", lse, True), ("entropy", entropy, grad_entropy is not None),
                              ("grad_logprobs", grad_logprobs, False), ("grad_entropy", grad_entropy, False)):
        if x is None:
            if required:
                fail(name, "None", f"a floating-point [N] = [{n_tokens}] tensor")
        elif (not isinstance(x, Tensor) or tuple(x.shape) != (n_tokens,) or not x.is_floating_point()
              or x.device != hidden.device):
            fail(name, x, f"a floating-point [N] = [{n_tokens}] tensor on {hidden.device}")
        checked.append(x.contiguous() if x is not None else None)
    return (hidden, weight, bias, targets, *checked)


def _grad_buffers(hidden, weight, bias, needs_input_grad):
    """Zeroed fp32 accumulators (grad_hidden, grad_weight, grad_bias), None where not needed."""
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    wanted = (needs_input_grad[0], needs_input_grad[1], needs_input_grad[2] and bias is not None)
    return tuple(torch.zeros(shape, dtype=torch.float32, device=hidden.device) if want else None
                 for shape, want in zip(shapes, wanted))


def cast_grads(grads, hidden, weight, bias):
    """Each grad in its input's dtype: the one rounding of the fp32 accumulation."""
    return tuple(g.to(x.dtype) if g is not None else None for g, x in zip(grads, (hidden, weight, bias)))


def linear_grad_fused(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                      entropy: Optional[Tensor], grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor],
                      *, temperature: float = 1.0, ignore_index: int = -100,
                      needs_input_grad: Tuple[bool, bool, bool] = (True, True, True),
                      deterministic: bool = False, num_splits: Optional[int] = None,
                      group_size: Optional[int] = None
                      ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Design (b): ``(grad_hidden, grad_weight, grad_bias)`` (None where not needed, or bias is None),
    each in its input's dtype.  Shapes: hidden [N, H], weight [V, H], bias [V], targets/lse/entropy/grads [N].
    ``deterministic=True`` uses no atomics (bitwise reproducible, one more logits recompute).
    ``num_splits`` / ``group_size``: vocab splits and outer blocks per launch group (None: tile_config's)."""
    (hidden, weight, bias, targets, lse, entropy, grad_logprobs,
     grad_entropy) = _check_grad_inputs(hidden, weight, bias, targets, lse, entropy, grad_logprobs,
                                        grad_entropy, temperature, needs_input_grad, num_splits, group_size)
    grads = _grad_buffers(hidden, weight, bias, needs_input_grad)
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    if n_tokens == 0 or all(g is None for g in grads) or (grad_logprobs is None and grad_entropy is None):
        return cast_grads(grads, hidden, weight, bias)

    spec = tile_config.device_spec(hidden.device)
    dots = dot_meta(hidden.dtype, hidden.device)
    kernel, meta = tile_config.launch_params(
        "linear_grad_fused", _linear_grad_fused_kernel, dict(N=n_tokens, V=vocab, H=dim), hidden.dtype,
        dots["DOT_PRECISION"], spec, reset_to_zero=("grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr"))

    def launch(vocab_major, splits, grad_hidden, grad_weight, grad_bias):
        outer, inner = (vocab, n_tokens) if vocab_major else (n_tokens, vocab)
        _, plan = tile_config.launch_plan("linear_grad_fused", hidden.dtype, dots["DOT_PRECISION"], spec, outer,
                                          inner, dim, vocab_major, splits, group_size)

        def grid(META):
            return (triton.cdiv(outer, META["BLOCK_V" if vocab_major else "BLOCK_N"]) * plan.splits,)

        kernel[grid](
            hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
            grad_hidden, grad_weight, grad_bias,
            n_tokens, vocab, dim, plan.split_len, plan.splits, plan.group_size,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            float(temperature), int(ignore_index),
            VOCAB_MAJOR=vocab_major, HIDDEN_ATOMIC=vocab_major or plan.splits > 1,
            WEIGHT_ATOMIC=not vocab_major or plan.splits > 1, **dots, **meta)

    grad_hidden, grad_weight, grad_bias = grads
    if deterministic:
        if grad_hidden is not None:
            launch(False, 1, grad_hidden, None, None)
        if grad_weight is not None or grad_bias is not None:
            launch(True, 1, None, grad_weight, grad_bias)
    else:
        launch(False, num_splits, grad_hidden, grad_weight, grad_bias)
    return cast_grads(grads, hidden, weight, bias)

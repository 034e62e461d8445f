"""``@triton.jit`` helpers shared by the linear kernels: the launch order, one fp32 logits tile, its dz, the
online-softmax step and the per-token coefficients both backward designs read.

Dot precision (``dot_meta``): ``DOT_PRECISION`` is "tf32" for fp32 operands on CUDA when torch allows TF32
for fp32 matmuls (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, or on older torch
``torch.get_float32_matmul_precision() != "highest"``: the same switch that lets cuBLAS use TF32), else
"ieee"; always "ieee" under the interpreter and for 16-bit operands (where it is ignored).  ``DOT_UPCAST``
casts bf16 operands to fp32 before the dot: the Triton CPU interpreter (3.x) multiplies bf16 tiles as raw
16-bit integers, so the launchers set it under ``TRITON_INTERPRET=1`` only.

Logits in the kernels are in log2 units (``z * log2(e)``) so every exponential is one ``exp2`` (the MUFU
instruction itself; ``exp`` is a multiply plus ``exp2``); statistics leave the kernels in natural units.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from erpo_kernels.ops import tile_config


LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): natural -> log2 units
LN2 = tl.constexpr(0.6931471805599453)     # ln(2):   log2 -> natural units


def dot_meta(dtype: torch.dtype, device: torch.device) -> dict:
    """The DOT_PRECISION / DOT_UPCAST meta-parameters for operands of ``dtype`` on ``device``."""
    interpreted = tile_config.interpreter_enabled()
    tf32 = dtype == torch.float32 and device.type == "cuda" and not interpreted and tile_config.tf32_allowed()
    return {"DOT_PRECISION": "tf32" if tf32 else "ieee", "DOT_UPCAST": dtype == torch.bfloat16 and interpreted}


@triton.jit
def _grouped_program(pid, num_outer, num_inner, group_size):
    """(outer block, inner split) of program ``pid`` in a 1-D grid of ``num_outer * num_inner`` programs.

    Programs come in groups of ``group_size`` outer blocks x all inner splits, outer block fastest.  The
    programs resident at one time thus cover a compact patch: few outer blocks (each program re-reads its
    outer operand block, [BLOCK_N, H] of hidden, once per inner tile: those blocks stay in L2) and, per
    split, ``group_size`` programs walking the same inner tiles in step (each inner tile comes from HBM
    once per group, not once per program).  The last group may hold fewer outer blocks.  One grid axis:
    axis 0 takes 2^31 - 1 programs (axes 1 and 2 only 65535).
    """
    per_group = group_size * num_inner
    group = pid // per_group
    first = group * group_size
    rows = tl.minimum(num_outer - first, group_size)
    local = pid - group * per_group
    return first + local % rows, local // rows


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in fp32."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr,
                 offs_n, offs_v, mask_n, mask_v, H,
                 stride_hn, stride_hh, stride_wv, stride_wh,
                 scale,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """z = (hidden[offs_n] @ weight[offs_v].T + bias[offs_v]) * scale as fp32 [BLOCK_N, BLOCK_V] (scale =
    log2(e) / temperature for log2 units); columns outside ``mask_v`` are -inf (they drop out of every
    softmax sum)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # int64 row offsets: N*H and V*H may exceed 2^31
    h_rows = hidden_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = weight_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        h = tl.load(h_rows + offs_h[None, :] * stride_hh, mask=mask_n[:, None] & mask_h[None, :], other=0.0)
        w = tl.load(w_rows + offs_h[None, :] * stride_wh, mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        acc = _mma(h, tl.trans(w), acc, DOT_PRECISION, DOT_UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return tl.where(mask_v[None, :], acc * scale, float("-inf"))


@triton.jit
def _online_softmax_step(run_max, run_sumexp, run_sumzexp, z):
    """Fold one fp32 tile z [BLOCK_N, BLOCK_V] in log2 units (-inf where masked) into the per-row running
    ``max``, ``sum 2^(z - max)`` and ``sum 2^(z - max) * (z - max)``, all in log2 units (see linear_stats.py).

    Per element: a max, a subtract, an exp2, a clamp, an add and a multiply-add; the rest is per row.
    """
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    # a row with every logit -inf so far keeps max -inf; shift by 0 there so no inf - inf appears
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp2(run_max - shift)
    moved = tl.where(run_sumexp > 0, run_sumexp * (run_max - shift), 0.0)
    zc = z - shift[:, None]
    e = tl.exp2(zc)
    # -inf columns give e = 0 and e * zc = nan: the clamp keeps their product 0 and changes no term with
    # e > 0 (those have zc > -150)
    run_sumzexp = rescale * (run_sumzexp + moved) + tl.sum(e * tl.maximum(zc, -1e30), axis=1)
    run_sumexp = run_sumexp * rescale + tl.sum(e, axis=1)
    return new_max, run_sumexp, run_sumzexp


@triton.jit
def _dz_tile(z, offs_v, mask_n, lse, entropy, g_logprob, g_entropy, targets,
             HAS_GRAD_LOGPROBS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr):
    """dz = g_lp * (onehot(y) - p) - g_H * p * (z - lse + H) with p = exp(z - lse), fp32 [BLOCK_N, BLOCK_V].

    ``g_logprob`` must already be 0 for ignored targets.  -inf columns (p = 0) and rows outside
    ``mask_n`` give exactly 0, never 0 * inf = nan (a NaN there would poison grad_weight via dz^T @ h).
    """
    p = tl.exp(z - lse[:, None])
    dz = tl.zeros_like(z)
    if HAS_GRAD_ENTROPY:
        dlogp = z - lse[:, None] + entropy[:, None]
        dz -= g_entropy[:, None] * tl.where(p > 0, p * dlogp, 0.0)
    if HAS_GRAD_LOGPROBS:
        onehot = tl.where(offs_v[None, :] == targets[:, None], 1.0, 0.0)
        dz += g_logprob[:, None] * (onehot - p)
    return tl.where(mask_n[:, None], dz, 0.0)


@triton.jit
def _token_coefficients(offs_n, mask_n, targets_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
                        ignore_index, HAS_GRAD_LOGPROBS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr):
    """Per-token (targets, lse, entropy, g_lp, g_H) in fp32; g_lp is 0 for ignored targets."""
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=ignore_index)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    g_logprob = tl.zeros_like(lse)
    g_entropy = tl.zeros_like(lse)
    entropy = tl.zeros_like(lse)
    if HAS_GRAD_LOGPROBS:
        g_logprob = tl.load(grad_logprobs_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        g_logprob = tl.where(targets != ignore_index, g_logprob, 0.0)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        entropy = tl.load(entropy_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return targets, lse, entropy, g_logprob, g_entropy

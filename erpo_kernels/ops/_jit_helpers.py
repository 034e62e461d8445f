"""``@triton.jit`` helpers shared by the linear kernels: one fp32 logits tile, its dz, and the per-token
coefficients both backward designs read.

Dot precision: ``DOT_PRECISION`` is "ieee" for fp32 inputs (tl.dot defaults to tf32 on NVIDIA, ~1e-3
relative error) and "tf32" otherwise (ignored for bf16/fp16).  ``DOT_UPCAST`` casts bf16 operands to fp32
before the dot: the Triton CPU interpreter (3.x) multiplies bf16 tiles as raw 16-bit integers, so the
launchers set it under ``TRITON_INTERPRET=1`` only (see ``dot_meta``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from erpo_kernels.ops import tile_config


def dot_meta(dtype: torch.dtype) -> dict:
    """The DOT_PRECISION / DOT_UPCAST meta-parameters for operands of ``dtype``."""
    upcast = dtype == torch.bfloat16 and tile_config.interpreter_enabled()
    precision = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return {"DOT_PRECISION": precision, "DOT_UPCAST": upcast}


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
                 temperature,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """z = (hidden[offs_n] @ weight[offs_v].T + bias[offs_v]) / temperature as fp32 [BLOCK_N, BLOCK_V];
    columns outside ``mask_v`` are -inf (they drop out of every softmax sum)."""
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
    z = acc / temperature
    return tl.where(mask_v[None, :], z, float("-inf"))


@triton.jit
def _online_softmax_step(run_max, run_sumexp, run_sumzexp, z):
    """Fold one fp32 tile z [BLOCK_N, BLOCK_V] (-inf where masked) into the per-row running
    ``max``, ``sum exp(z - max)`` and ``sum exp(z - max) * (z - max)`` (see linear_stats.py)."""
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    # a row with every logit -inf so far keeps max -inf; shift by 0 there so no inf - inf appears
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(run_max - shift)
    moved = tl.where(run_sumexp > 0, run_sumexp * (run_max - shift), 0.0)
    zc = z - shift[:, None]
    e = tl.exp(zc)
    run_sumzexp = rescale * (run_sumzexp + moved) + tl.sum(tl.where(e > 0, e * zc, 0.0), axis=1)
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

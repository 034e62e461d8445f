"""Triton kernels for the per-token gated clipped surrogate (ERPO_SPEC.md "Loss"), and its autograd Function.

``surrogate_triton`` has the signature, outputs and gradients of
:func:`erpo_kernels.reference.per_token_loss`:

    ratio = exp(lp - lp_old)                       (lp_old = lp.detach() when not given)
    L = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    L = -c * A where A < 0 and L > -c * A          (dual clip, when dual_clip_c is set)
    L += kl_beta * (exp(lp_ref - lp) - (lp_ref - lp) - 1)      (when kl_beta > 0 and lp_ref given)
    L -= entropy_coef * H                          (when entropy_coef > 0)

One elementwise forward kernel writes L, the coefficient dL/dlp, the ratio and the clip indicators;
dL/dH is the constant -entropy_coef.  Analytic dL/dlp, exactly as torch autograd differentiates the
reference: d(ratio * A)/dlp = A * ratio, d(clip(ratio) * A)/dlp = A * ratio where lo <= ratio <= hi
(torch.clamp passes the gradient on the bounds) else 0, and -min takes the smaller branch's, or half
of each at a tie (torch.minimum splits ties evenly).  The branches tie whenever the ratio lies in the
clip range (then clip(ratio) == ratio: full unclipped gradient, e.g. always without old log-probs),
and where rounding makes ratio * A == bound * A just outside it (half the gradient, as in torch).
Dual-clipped tokens get 0; the KL adds kl_beta * (1 - exp(lp_ref - lp)).
Only ``logprobs`` and ``entropy`` receive gradients: advantages, old and reference log-probs are
constants (the library passes them detached).  Computes in fp32 (fp64 for fp64 log-probs); outputs
have the dtype of ``logprobs``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from erpo_kernels.config import ERPOConfig
from erpo_kernels.ops.tile_config import interpreter_enabled

Tensor = torch.Tensor

# Tokens per program, forward and backward; small under TRITON_INTERPRET=1 so test shapes span programs.
GPU_BLOCK, INTERPRETER_BLOCK = 1024, 64


def _block() -> int:
    return INTERPRETER_BLOCK if interpreter_enabled() else GPU_BLOCK


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.heuristics({"HAS_OLD": lambda args: args["old_ptr"] is not None,
                    "HAS_DUAL": lambda args: args["dual_clip_c"] is not None,
                    "HAS_KL": lambda args: args["ref_ptr"] is not None and args["kl_beta"] > 0,
                    "HAS_ENTROPY": lambda args: args["entropy_coef"] > 0,
                    "HAS_VALID": lambda args: args["valid_ptr"] is not None,
                    "HAS_WEIGHTS": lambda args: args["weights_ptr"] is not None,
                    "HAS_GRAD_ENTROPY": lambda args: args["grad_entropy_ptr"] is not None})
@triton.jit
def _surrogate_forward_kernel(
        # pointers: inputs, then per-token outputs (every array is indexed at row0 + offset)
        lp_ptr, entropy_ptr, adv_ptr, old_ptr, ref_ptr, valid_ptr, weights_ptr,
        loss_ptr, coef_ptr, grad_entropy_ptr, ratio_ptr, clip_low_ptr, clip_high_ptr, dual_ptr,
        # sizes
        N, row0,
        # scalars
        ratio_low, ratio_high, dual_clip_c, kl_beta, entropy_coef,
        # meta-parameters
        HAS_OLD: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_KL: tl.constexpr, HAS_ENTROPY: tl.constexpr,
        HAS_VALID: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
        BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Per token: L, coef = w * dL/dlp (w = 1 without weights), grad_entropy = -entropy_coef * w, the ratio and
    the clip indicators.  With ``valid``, old/ref log-probs off the mask are replaced by lp (ratio 1, KL 0)."""
    offs = row0 + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < row0 + N
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(ACC)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0).to(ACC)
    valid = inb
    if HAS_VALID:
        valid = inb & (tl.load(valid_ptr + offs, mask=inb, other=0) != 0)
    old = lp                                    # no old log-probs: ratio = exp(lp - lp.detach())
    if HAS_OLD:
        old = tl.where(valid, tl.load(old_ptr + offs, mask=inb, other=0.0).to(ACC), lp)
    ratio = tl.exp(lp - old)
    clipped_ratio = tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
    unclipped_obj = ratio * adv
    clipped_obj = clipped_ratio * adv
    loss = -tl.minimum(unclipped_obj, clipped_obj)
    clipped = clipped_obj < unclipped_obj       # the clipped branch is taken
    # torch.minimum's gradient: all to the smaller operand, half to each at a tie; clamp's: inside [lo, hi]
    unclipped_share = tl.where(unclipped_obj < clipped_obj, 1.0, tl.where(clipped, 0.0, 0.5))
    in_range = ((ratio >= ratio_low) & (ratio <= ratio_high)).to(ACC)
    coef = -(unclipped_share + (1.0 - unclipped_share) * in_range) * unclipped_obj
    dual = tl.zeros((BLOCK,), tl.int1)
    if HAS_DUAL:
        bound = -dual_clip_c * adv
        dual = (adv < 0) & (loss > bound)
        loss = tl.where(dual, bound, loss)
        coef = tl.where(dual, 0.0, coef)
    if HAS_KL:
        ref = tl.where(valid, tl.load(ref_ptr + offs, mask=inb, other=0.0).to(ACC), lp)
        delta = ref - lp
        exp_delta = tl.exp(delta)
        loss = loss + kl_beta * (exp_delta - delta - 1.0)
        coef = coef + kl_beta * (1.0 - exp_delta)
    if HAS_ENTROPY:
        loss = loss - entropy_coef * tl.load(entropy_ptr + offs, mask=inb, other=0.0).to(ACC)
    weight = tl.full((BLOCK,), 1.0, ACC)
    if HAS_WEIGHTS:
        weight = tl.load(weights_ptr + offs, mask=inb, other=0.0).to(ACC)
    tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=inb)
    tl.store(coef_ptr + offs, (weight * coef).to(coef_ptr.dtype.element_ty), mask=inb)
    if HAS_GRAD_ENTROPY:
        tl.store(grad_entropy_ptr + offs, (-entropy_coef * weight).to(grad_entropy_ptr.dtype.element_ty), mask=inb)
    tl.store(ratio_ptr + offs, ratio.to(ratio_ptr.dtype.element_ty), mask=inb)
    tl.store(clip_low_ptr + offs, clipped & (ratio < 1.0), mask=inb)
    tl.store(clip_high_ptr + offs, clipped & (ratio > 1.0), mask=inb)
    tl.store(dual_ptr + offs, dual, mask=inb)


def _launch_forward(lp, entropy, adv, old, ref, valid, weights, loss, coef, grad_entropy, ratio, clip_low, clip_high,
                    dual, n_rows: int, row0: int, config: ERPOConfig) -> None:
    if n_rows:
        block = _block()
        _surrogate_forward_kernel[(triton.cdiv(n_rows, block),)](
            lp, entropy, adv, old, ref, valid, weights, loss, coef, grad_entropy, ratio, clip_low, clip_high, dual,
            n_rows, row0,
            1.0 - config.eps_low, 1.0 + config.eps_high, config.dual_clip_c, config.kl_beta, config.entropy_coef,
            BLOCK=block, ACC=_acc_dtype(lp.dtype))


def surrogate_forward(logprobs: Tensor, entropy: Tensor, advantages: Tensor, old_logprobs: Optional[Tensor],
                      ref_logprobs: Optional[Tensor], config: ERPOConfig):
    """Per-token loss, dL/dlp, ratio, clip_low, clip_high, dual_clip; every input [...] of one shape."""
    shape = logprobs.shape
    for name, x in (("entropy", entropy), ("advantages", advantages), ("old_logprobs", old_logprobs),
                    ("ref_logprobs", ref_logprobs)):
        if x is not None and x.shape != shape:
            raise ValueError(f"surrogate: {name} {tuple(x.shape)} != logprobs {tuple(shape)}")
        if x is not None and x.device != logprobs.device:
            raise ValueError(f"surrogate: {name} is on {x.device}, logprobs on {logprobs.device}")
    flat = lambda x: None if x is None else x.detach().contiguous().reshape(-1)  # noqa: E731
    lp, h, adv, old, ref = map(flat, (logprobs, entropy, advantages, old_logprobs, ref_logprobs))
    loss = torch.empty_like(lp)
    coef = torch.empty(lp.shape, dtype=torch.promote_types(lp.dtype, torch.float32), device=lp.device)
    ratio = torch.empty_like(lp)
    clip_low, clip_high, dual = (torch.empty(lp.shape, dtype=torch.bool, device=lp.device) for _ in range(3))
    _launch_forward(lp, h, adv, old, ref, None, None, loss, coef, None, ratio, clip_low, clip_high, dual, lp.numel(), 0,
                    config)
    return tuple(x.reshape(shape) for x in (loss, coef, ratio, clip_low, clip_high, dual))


@triton.heuristics({"HAS_ENTROPY_GRAD": lambda args: args["grad_entropy_ptr"] is not None})
@triton.jit
def _surrogate_backward_kernel(grad_loss_ptr, coef_ptr, grad_lp_ptr, grad_entropy_ptr,
                               N, entropy_coef,
                               HAS_ENTROPY_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    grad = tl.load(grad_loss_ptr + offs, mask=inb, other=0.0)
    coef = tl.load(coef_ptr + offs, mask=inb, other=0.0)
    tl.store(grad_lp_ptr + offs, (grad * coef).to(grad_lp_ptr.dtype.element_ty), mask=inb)
    if HAS_ENTROPY_GRAD:
        tl.store(grad_entropy_ptr + offs, (-entropy_coef * grad).to(grad_entropy_ptr.dtype.element_ty), mask=inb)


def surrogate_backward(grad_loss: Tensor, coef: Tensor, lp_dtype: torch.dtype, entropy_dtype: Optional[torch.dtype],
                       entropy_coef: float) -> Tuple[Tensor, Optional[Tensor]]:
    """grad_lp = grad_loss * dL/dlp; grad_entropy = -entropy_coef * grad_loss (None when entropy_dtype is None)."""
    shape = coef.shape
    grad = grad_loss.contiguous().reshape(-1)
    grad_lp = torch.empty(grad.shape, dtype=lp_dtype, device=grad.device)
    grad_entropy = None if entropy_dtype is None else torch.empty(grad.shape, dtype=entropy_dtype, device=grad.device)
    N = grad.numel()
    if N:
        block = _block()
        _surrogate_backward_kernel[(triton.cdiv(N, block),)](grad, coef.reshape(-1), grad_lp, grad_entropy,
                                                             N, entropy_coef, BLOCK=block)
    return grad_lp.reshape(shape), None if grad_entropy is None else grad_entropy.reshape(shape)


class SurrogateFunction(torch.autograd.Function):
    """(logprobs, entropy, advantages, old, ref, config) -> (loss, ratio, clip_low, clip_high, dual_clip)."""

    @staticmethod
    def forward(ctx, logprobs, entropy, advantages, old_logprobs, ref_logprobs, config):
        loss, coef, ratio, clip_low, clip_high, dual = surrogate_forward(
            logprobs, entropy, advantages, old_logprobs, ref_logprobs, config)
        ctx.save_for_backward(coef)
        ctx.entropy_coef = config.entropy_coef
        ctx.dtypes = (logprobs.dtype, entropy.dtype)
        ctx.mark_non_differentiable(ratio, clip_low, clip_high, dual)
        return loss, ratio, clip_low, clip_high, dual

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (coef,) = ctx.saved_tensors
        entropy_grad = ctx.needs_input_grad[1] and ctx.entropy_coef > 0
        grad_lp, grad_entropy = surrogate_backward(grad_loss, coef, ctx.dtypes[0],
                                                   ctx.dtypes[1] if entropy_grad else None, ctx.entropy_coef)
        return (grad_lp if ctx.needs_input_grad[0] else None), grad_entropy, None, None, None, None


def surrogate_triton(logprobs: Tensor, entropy: Tensor, advantages: Tensor, old_logprobs: Optional[Tensor],
                     ref_logprobs: Optional[Tensor], config: ERPOConfig) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Drop-in for :func:`erpo_kernels.reference.per_token_loss`: (token_loss, info), info holding
    ratio (detached) and the bool tensors clip_low, clip_high, dual_clip; all shaped like ``logprobs``."""
    loss, ratio, clip_low, clip_high, dual = SurrogateFunction.apply(
        logprobs, entropy, advantages, old_logprobs, ref_logprobs, config)
    return loss, dict(ratio=ratio, clip_low=clip_low, clip_high=clip_high, dual_clip=dual)


def sweep_coefficients(terms, row0: int, n_rows: int, logprobs: Tensor, entropy: Tensor) -> None:
    """The 3-GEMM sweep's per-token coefficients for rows [row0, row0 + n_rows), one launch: reads the chunk's
    fresh ``logprobs`` / ``entropy`` [N] and the detached inputs of ``terms``
    (:class:`erpo_kernels.fused.SweepTerms`), writes ``terms.grad_logprobs`` (w * dL/dlp), ``terms.grad_entropy``
    (-entropy_coef * w, when the entropy bonus is on) and the per-token records (L, ratio, clip indicators)."""
    rec = terms.recorded
    _launch_forward(logprobs, entropy, terms.advantages, terms.old_logprobs, terms.ref_logprobs, terms.valid,
                    terms.weights, rec.loss, terms.grad_logprobs, terms.grad_entropy, rec.ratio, rec.clip_low,
                    rec.clip_high, rec.dual_clip, n_rows, row0, terms.config)

"""The clipped surrogate per token with its analytic derivatives, and the aggregation (ERPO_SPEC.md "Loss").

This is the library's torch path.  The oracle (:mod:`erpo_kernels.reference`) writes the same formulas for
reading and lets autograd differentiate them; nothing here calls it, so tests comparing the two (and both with
the hand-written twins in ``tests/twins.py``) check something.  Per token, with A the advantage:

    ratio = exp(lp - lp_old)                         (lp_old = lp when not given: ratio 1, gradient of lp)
    L     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    L     = -c * A  where A < 0 and L > -c * A       (dual clip, when dual_clip_c is set)
    L    += kl_beta * (exp(lp_ref - lp) - (lp_ref - lp) - 1)     (k3, when kl_beta > 0 and lp_ref given)
    L    -= entropy_coef * H                         (when entropy_coef > 0)

dL/dlp is the derivative torch autograd takes of those formulas: ratio * A through the unclipped branch, the
same through the clipped one where lo <= ratio <= hi (clamp passes the gradient on its bounds), none outside;
``-min`` takes the smaller branch's, half of each at a tie (``torch.minimum`` splits ties; they happen whenever
the ratio is inside the clip range, and by rounding on its edges); 0 for dual-clipped tokens;
kl_beta * (1 - exp(lp_ref - lp)) for the KL.  dL/dH = -entropy_coef.  ``ops/surrogate.py`` is the Triton twin.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from erpo_kernels.config import ERPOConfig

Tensor = torch.Tensor


class TokenTerms(NamedTuple):
    """Per-token results of :func:`token_terms`, each shaped like the log-probs (detached)."""
    loss: Tensor            # L
    grad_logprobs: Tensor   # dL/dlp
    ratio: Tensor
    clip_low: Tensor        # bool: the clipped branch is taken below 1 - eps_low
    clip_high: Tensor       # bool: ... above 1 + eps_high
    dual_clip: Tensor       # bool: the dual-clip bound replaced L


def token_terms(logprobs: Tensor, advantages: Tensor, old_logprobs: Optional[Tensor],
                ref_logprobs: Optional[Tensor], config: ERPOConfig, entropy: Optional[Tensor] = None) -> TokenTerms:
    """L and dL/dlp per token (see the module docstring); ``entropy`` enters L only through the entropy bonus."""
    lp = logprobs.detach()
    ratio = torch.exp(lp - old_logprobs) if old_logprobs is not None else torch.ones_like(lp)
    low, high = 1.0 - config.eps_low, 1.0 + config.eps_high
    unclipped = ratio * advantages
    clipped = ratio.clamp(low, high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    takes_clip = clipped < unclipped
    # share of the gradient that goes through the unclipped branch: all, none, or half at a tie
    share = torch.where(unclipped < clipped, 1.0, torch.where(takes_clip, 0.0, 0.5))
    inside = ((ratio >= low) & (ratio <= high)).to(lp.dtype)
    grad = -(share + (1.0 - share) * inside) * unclipped
    dual = torch.zeros_like(takes_clip)
    if config.dual_clip_c is not None:
        bound = -config.dual_clip_c * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        grad = torch.where(dual, 0.0, grad)
    if config.kl_beta > 0 and ref_logprobs is not None:
        ref_ratio = torch.exp(ref_logprobs - lp)
        loss = loss + config.kl_beta * (ref_ratio - (ref_logprobs - lp) - 1.0)
        grad = grad + config.kl_beta * (1.0 - ref_ratio)
    if config.entropy_coef > 0 and entropy is not None:
        loss = loss - config.entropy_coef * entropy.detach()
    return TokenTerms(loss, grad, ratio, takes_clip & (ratio < 1.0), takes_clip & (ratio > 1.0), dual)


class _Surrogate(torch.autograd.Function):
    """(logprobs, entropy, advantages, old, ref, config) -> (L, ratio, clip_low, clip_high, dual_clip) per token;
    only L is differentiable, and its backward is the analytic dL/dlp (and dL/dH = -entropy_coef)."""

    @staticmethod
    def forward(ctx, logprobs, entropy, advantages, old_logprobs, ref_logprobs, config):
        terms = token_terms(logprobs, advantages, old_logprobs, ref_logprobs, config, entropy)
        ctx.save_for_backward(terms.grad_logprobs)
        ctx.entropy_coef = config.entropy_coef
        ctx.mark_non_differentiable(*terms[2:])
        return (terms.loss, *terms[2:])

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        (grad_logprobs,) = ctx.saved_tensors
        grad_entropy = -ctx.entropy_coef * grad_loss if ctx.entropy_coef > 0 and ctx.needs_input_grad[1] else None
        return grad_loss * grad_logprobs, grad_entropy, None, None, None, None


def per_token_loss(logprobs: Tensor, entropy: Tensor, advantages: Tensor, old_logprobs: Optional[Tensor],
                   ref_logprobs: Optional[Tensor], config: ERPOConfig) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Differentiable per-token L (gradients to ``logprobs`` and ``entropy``) and its info (ratio, clip
    indicators); the signature of :func:`erpo_kernels.reference.per_token_loss` and of the backends'
    ``per_token_loss`` hook."""
    loss, ratio, clip_low, clip_high, dual = _Surrogate.apply(logprobs, entropy, advantages, old_logprobs,
                                                              ref_logprobs, config)
    return loss, dict(ratio=ratio, clip_low=clip_low, clip_high=clip_high, dual_clip=dual)


def fill_off_mask(values: Optional[Tensor], valid: Tensor, logprobs: Tensor) -> Optional[Tensor]:
    """Old/ref log-probs with the tokens off the mask replaced by the current (detached) ones: ratio 1 and
    KL 0 there, so padding garbage (-1e4, NaN) cannot become inf * 0 = NaN in the loss or its gradient."""
    return None if values is None else torch.where(valid, values, logprobs.detach())


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------
def is_linear(config: ERPOConfig) -> bool:
    """Whether the loss is a weighted sum of token losses (every aggregation but holder with p != 1)."""
    return config.aggregation != "holder" or config.holder_p == 1.0


def aggregation_weights(valid: Tensor, config: ERPOConfig, dtype: torch.dtype = torch.float32,
                        normalizer=None) -> Tensor:
    """w [B, T] with loss = sum(L * w) for the linear aggregations (valid: [B, T] completion tokens).

    token_mean (and holder p = 1): 1 / n_total;  seq_mean_token_mean: 1 / (B * max(n_i, 1)), so a fully
    masked row still counts in B, as TRL computes it;  seq_mean_token_sum: 1 / B;
    constant (Dr.GRPO): 1 / (B * L_max), L_max = config.max_length or the padded T.
    ``normalizer`` (a number or a 0-dim tensor) replaces n_total, resp. B: the count over everything the
    caller sums (micro-batches, ranks), so that the partial losses add up to the whole batch's.
    """
    rows, length = valid.shape
    m = valid.to(dtype)
    count = normalizer
    if config.aggregation in ("token_mean", "holder"):
        denominator = count if count is not None else m.sum().clamp_min(1.0)
    elif config.aggregation == "seq_mean_token_mean":
        denominator = m.sum(-1, keepdim=True).clamp_min(1.0) * (count if count is not None else rows)
    elif config.aggregation == "seq_mean_token_sum":
        denominator = count if count is not None else float(rows)
    else:
        denominator = (count if count is not None else rows) * (config.max_length or length)
    return m / denominator


def aggregate(token_loss: Tensor, valid: Tensor, config: ERPOConfig, normalizer=None) -> Tensor:
    """The scalar loss from per-token L [B, T] over the ``valid`` tokens.

    Linear aggregations: ``sum(L * aggregation_weights)`` (``normalizer`` as there).  holder with p != 1
    (HoelderPO): the signed power mean ``sign(S) * max(|S|, eps) ** (1 / p)`` of
    ``S = mean over valid tokens of sign(L) |L| ** p``.
    """
    if is_linear(config):
        return (token_loss * aggregation_weights(valid, config, token_loss.dtype, normalizer)).sum()
    p = config.holder_p
    m = valid.to(token_loss.dtype)
    signed_power = torch.sign(token_loss) * token_loss.abs().clamp_min(1e-30).pow(p)
    mean = (signed_power * m).sum() / m.sum().clamp_min(1.0)
    return torch.sign(mean) * mean.abs().clamp_min(config.eps).pow(1.0 / p)

"""``erpo_loss`` / ``ERPOLoss``: the whole ERPO objective from hidden states.

Data flows one way (DESIGN.md): stats pass (log-prob and entropy per token, from hidden states,
never an [N, V] tensor) -> token advantages ([B, T], detached) -> clipped surrogate and
aggregation ([B, T] torch ops, whose autograd yields the per-token coefficients d loss / d lp and
d loss / d H) -> the stats Function's backward (logits recomputed chunk by chunk).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from erpo_kernels import surrogate
from erpo_kernels import validation as v
from erpo_kernels.advantages import compute_advantages
from erpo_kernels.backends import get_backend
from erpo_kernels.config import ERPOConfig
from erpo_kernels.fused import FusedLinearLoss, SweepTerms, fused_path_applies
from erpo_kernels.stats import StatsOptions, linear_token_stats

Tensor = torch.Tensor


@dataclass
class ERPOOutput:
    """loss: scalar; metrics: plain floats; advantages, logprobs, entropy: [B, T] (detached)."""
    loss: Tensor
    metrics: Dict[str, float] = field(default_factory=dict)
    advantages: Optional[Tensor] = None
    logprobs: Optional[Tensor] = None
    entropy: Optional[Tensor] = None


def _masked_mean(x: Tensor, mask: Tensor) -> float:
    return float(torch.where(mask > 0, x, torch.zeros_like(x)).sum() / mask.sum().clamp_min(1))


def loss_metrics(loss: Tensor, valid: Tensor, logprobs: Tensor, entropy: Tensor, old_entropy: Tensor,
                 adv, info: Dict[str, Tensor], ref_logprobs: Optional[Tensor], group_ids: Tensor) -> Dict[str, float]:
    """Plain-float training metrics, each a mean over the completion tokens unless named otherwise."""
    m = valid.to(entropy.dtype)
    gate_on = adv.gate[valid]
    metrics = {
        "loss": float(loss.detach()),
        "num_tokens": float(m.sum()),
        "entropy": _masked_mean(entropy.detach(), m),
        "old_entropy": _masked_mean(old_entropy, m),
        "logprob": _masked_mean(logprobs.detach(), m),
        "ratio": _masked_mean(info["ratio"], m),
        "clip_frac": _masked_mean((info["clip_low"] | info["clip_high"]).to(m.dtype), m),
        "clip_frac_low": _masked_mean(info["clip_low"].to(m.dtype), m),
        "clip_frac_high": _masked_mean(info["clip_high"].to(m.dtype), m),
        "dual_clip_frac": _masked_mean(info["dual_clip"].to(m.dtype), m),
        "gate_mean": float(gate_on.mean()) if gate_on.numel() else 0.0,
        "gate_frac_above_half": float((gate_on > 0.5).float().mean()) if gate_on.numel() else 0.0,
        "adv_mean": _masked_mean(adv.advantages, m),
        "adv_abs_mean": _masked_mean(adv.advantages.abs(), m),
        "progress_signal_abs_mean": _masked_mean(adv.signal.abs(), m),
        "zero_var_groups": float(torch.unique(group_ids[adv.zero_var]).numel()),
        "num_groups": float(torch.unique(group_ids).numel()),
    }
    if ref_logprobs is not None:
        delta = (ref_logprobs - logprobs.detach())
        metrics["kl"] = _masked_mean(torch.exp(delta) - delta - 1.0, m)
    return metrics


def erpo_loss(hidden: Tensor, lm_head, targets: Tensor, mask: Tensor, rewards, *,
              group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
              old_logprobs: Optional[Tensor] = None, ref_logprobs: Optional[Tensor] = None,
              old_entropy: Optional[Tensor] = None, token_weights: Optional[Tensor] = None,
              gates: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              config: Optional[ERPOConfig] = None, backend: str = "auto") -> ERPOOutput:
    """The ERPO (or GRPO / DAPO / Dr.GRPO / EP-GRPO, by ``config.mode``) loss from hidden states.

    hidden [B, T, H] (or [B*T, H]); lm_head an nn.Linear or weight [V, H]; targets [B, T] sampled ids
    (``config.ignore_index`` allowed); mask [B, T] completion mask; rewards [B]; group_size or
    group_ids [B]; old_logprobs / ref_logprobs / old_entropy / token_weights / gates [B, T].
    Without ``old_entropy`` the current policy's entropy (detached) is used: exact on the first
    update of an on-policy batch, and free (the same stats pass provides it).  With it (and a
    linear aggregation), loss and gradients come from one 3-matmul sweep (:mod:`erpo_kernels.fused`).
    """
    config = config or ERPOConfig()
    if not isinstance(config, ERPOConfig):
        v.fail("config", config, "an ERPOConfig")
    weight, bias = v.unpack_lm_head(lm_head, bias)
    v.check_linear_inputs(hidden, weight, bias, targets, config.ignore_index)
    if targets.dim() != 2:
        v.fail("targets", targets, "[B, T] (one row per sampled response)")
    shape, device = tuple(targets.shape), hidden.device
    mask = v.check_mask(mask, shape, device)
    valid = mask & (targets != config.ignore_index)
    if not bool(valid.any()):
        v.fail("mask", mask, "at least one completion token (not ignore_index) in the batch")
    rewards = v.check_rewards(rewards, shape[0], device)
    group_ids = v.resolve_groups(shape[0], device, group_size, group_ids)
    v.check_token_inputs(shape, device, valid, old_entropy=old_entropy, old_logprobs=old_logprobs,
                         ref_logprobs=ref_logprobs, token_weights=token_weights, gates=gates)

    options = StatsOptions(get_backend(backend, device), config.temperature, config.ignore_index,
                           config.chunk_size)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    as_stats = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    old_lp, ref_lp = as_stats(old_logprobs), as_stats(ref_logprobs)
    wants_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if wants_grad and config.fused_train and fused_path_applies(config, old_entropy, old_lp, ref_lp,
                                                                 options.backend):
        # advantages first (they need only old statistics), then one sweep: loss and grads
        stats_entropy = as_stats(old_entropy)
        adv = compute_advantages(rewards, valid, group_ids, stats_entropy, old_lp, ref_lp, config,
                                 token_weights, gates, options.backend)
        flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
        terms = SweepTerms(flat(adv.advantages), flat(surrogate.aggregation_weights(valid, config, dtype)),
                           flat(valid), flat(old_lp), flat(ref_lp), config)
        flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        loss, logprobs, entropy = FusedLinearLoss.apply(flat_hidden, weight, bias, targets.reshape(-1), terms,
                                                        options)
        logprobs, entropy = logprobs.view(shape), entropy.view(shape)
        recorded = terms.recorded
        info = dict(ratio=recorded.ratio.view(shape), clip_low=recorded.clip_low.view(shape),
                    clip_high=recorded.clip_high.view(shape), dual_clip=recorded.dual_clip.view(shape))
        ref_lp = surrogate.fill_off_mask(ref_lp, valid, logprobs)
    else:
        stats = linear_token_stats(hidden, weight, bias, targets, options)
        logprobs, entropy = stats.logprobs, stats.entropy
        stats_entropy = as_stats(old_entropy) if old_entropy is not None else entropy.detach()
        stats_logprobs = old_lp if old_lp is not None else logprobs.detach()
        adv = compute_advantages(rewards, valid, group_ids, stats_entropy, stats_logprobs, ref_lp, config,
                                 token_weights, gates, options.backend)
        old_lp = surrogate.fill_off_mask(old_lp, valid, logprobs)
        ref_lp = surrogate.fill_off_mask(ref_lp, valid, logprobs)
        per_token_loss = getattr(options.backend, "per_token_loss", surrogate.per_token_loss)
        token_loss, info = per_token_loss(logprobs, entropy, adv.advantages, old_lp, ref_lp, config)
        loss = surrogate.aggregate(token_loss, valid, config)
    metrics = loss_metrics(loss, valid, logprobs, entropy, stats_entropy, adv, info, ref_lp, group_ids)
    return ERPOOutput(loss, metrics, adv.advantages, logprobs.detach(), entropy.detach())


class ERPOLoss(nn.Module):
    """nn.Module form: ``ERPOLoss(config)(hidden, lm_head, targets, mask, rewards, group_size=8, ...)``."""

    def __init__(self, config: Optional[ERPOConfig] = None, backend: str = "auto"):
        super().__init__()
        self.config = config or ERPOConfig()
        self.backend = backend

    def forward(self, hidden, lm_head, targets, mask, rewards, **kwargs) -> ERPOOutput:
        kwargs.setdefault("config", self.config)
        kwargs.setdefault("backend", self.backend)
        return erpo_loss(hidden, lm_head, targets, mask, rewards, **kwargs)

    def extra_repr(self) -> str:
        return f"mode={self.config.mode!r}, backend={self.backend!r}"

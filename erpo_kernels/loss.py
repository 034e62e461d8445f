"""``erpo_loss`` / ``ERPOLoss``: the whole ERPO objective from hidden states.

Data flows one way (DESIGN.md): stats pass (log-prob and entropy per token, from hidden states,
never an [N, V] tensor) -> token advantages ([B, T], detached) -> clipped surrogate and
aggregation ([B, T] torch ops, whose autograd yields the per-token coefficients d loss / d lp and
d loss / d H) -> the stats Function's backward (logits recomputed chunk by chunk).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from erpo_kernels import surrogate
from erpo_kernels import validation as v
from erpo_kernels.advantages import compute_advantages
from erpo_kernels.backends import get_backend
from erpo_kernels.config import ERPOConfig
from erpo_kernels.fused import FusedLinearLoss, SweepTerms, fused_path_applies
from erpo_kernels.metrics import Metrics, loss_metrics
from erpo_kernels.stats import StatsOptions, linear_token_stats

Tensor = torch.Tensor


@dataclass
class ERPOOutput:
    """loss: scalar; metrics: a mapping of floats over 0-dim device tensors, read from the device (all at once)
    only when a value is first read (:class:`erpo_kernels.metrics.Metrics`); advantages, logprobs, entropy:
    [B, T] (detached)."""
    loss: Tensor
    metrics: Metrics = field(default_factory=lambda: Metrics({}))
    advantages: Optional[Tensor] = None
    logprobs: Optional[Tensor] = None
    entropy: Optional[Tensor] = None


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

    Device reads: the value checks of the inputs, all in one read (none with
    ``ERPOConfig(check_values=False)``); none for the groups when ``group_size`` is given (``group_ids``
    cost one torch.unique); metrics stay on the device until read.
    """
    config = config or ERPOConfig()
    if not isinstance(config, ERPOConfig):
        v.fail("config", config, "an ERPOConfig")
    checks = v.ValueChecks(config.check_values)
    weight, bias = v.unpack_lm_head(lm_head, bias)
    v.check_linear_inputs(hidden, weight, bias, targets, config.ignore_index, checks)
    if targets.dim() != 2:
        v.fail("targets", targets, "[B, T] (one row per sampled response)")
    shape, device = tuple(targets.shape), hidden.device
    mask = v.check_mask(mask, shape, device, checks)
    valid = mask & (targets != config.ignore_index)
    v.check_some_tokens(valid, mask, checks, "at least one completion token (not ignore_index) in the batch")
    rewards = v.check_rewards(rewards, shape[0], device, checks)
    groups = v.resolve_groups(shape[0], device, group_size, group_ids)
    v.check_token_inputs(shape, device, valid, checks, old_entropy=old_entropy, old_logprobs=old_logprobs,
                         ref_logprobs=ref_logprobs, token_weights=token_weights, gates=gates)
    checks.run()

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
        adv = compute_advantages(rewards, valid, groups, stats_entropy, old_lp, ref_lp, config,
                                 token_weights, gates, options.backend)
        flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
        terms = SweepTerms(flat(adv.advantages), flat(surrogate.aggregation_weights(valid, config, dtype)),
                           flat(valid), flat(old_lp), flat(ref_lp), config)
        flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        loss, logprobs, entropy = FusedLinearLoss.apply(flat_hidden, weight, bias, targets.reshape(-1), terms,
                                                        options)
        logprobs, entropy = logprobs.view(shape), entropy.view(shape)
        info = {name: getattr(terms.recorded, name).view(shape)
                for name in ("ratio", "clip_low", "clip_high", "dual_clip")}
        ref_lp = surrogate.fill_off_mask(ref_lp, valid, logprobs)
    else:
        stats = linear_token_stats(hidden, weight, bias, targets, options)
        logprobs, entropy = stats.logprobs, stats.entropy
        stats_entropy = as_stats(old_entropy) if old_entropy is not None else entropy.detach()
        stats_logprobs = old_lp if old_lp is not None else logprobs.detach()
        adv = compute_advantages(rewards, valid, groups, stats_entropy, stats_logprobs, ref_lp, config,
                                 token_weights, gates, options.backend)
        old_lp = surrogate.fill_off_mask(old_lp, valid, logprobs)
        ref_lp = surrogate.fill_off_mask(ref_lp, valid, logprobs)
        per_token_loss = getattr(options.backend, "per_token_loss", surrogate.per_token_loss)
        token_loss, info = per_token_loss(logprobs, entropy, adv.advantages, old_lp, ref_lp, config)
        loss = surrogate.aggregate(token_loss, valid, config)
    metrics = loss_metrics(loss, valid, logprobs, entropy, stats_entropy, adv, info, ref_lp, groups)
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

"""``erpo_loss`` / ``ERPOLoss``: the whole ERPO objective from hidden states.

Data flows one way (DESIGN.md): stats pass (log-prob and entropy per token, from hidden states,
never an [N, V] tensor) -> token advantages ([rows, T], detached) -> clipped surrogate and
aggregation -> gradients (logits recomputed chunk by chunk), or, when every token's coefficient is
known up front (old entropy or precomputed advantages given), all of it in one 3-GEMM sweep.

Inside a trainer (DESIGN.md): groups rarely sit whole in one micro-batch or on one rank, so the
advantages are computed once on the whole generation batch (``erpo_advantages``) and each
micro-batch calls ``erpo_loss(..., advantages=A[rows], normalizer=global_count)``: the sum over
micro-batches (and ranks) then equals one full-batch call.  Packed inputs (``cu_seqlens``) work the
same as padded ones (:mod:`erpo_kernels.packing`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import nn

from erpo_kernels import surrogate
from erpo_kernels import validation as v
from erpo_kernels.advantages import Advantages, compute_advantages
from erpo_kernels.backends import get_backend
from erpo_kernels.config import ERPOConfig
from erpo_kernels.compaction import Compaction
from erpo_kernels.fused import FusedLinearLoss, SweepTerms, advantages_need_current_stats, fused_path_applies
from erpo_kernels.metrics import Metrics, loss_metrics
from erpo_kernels.packing import Layout, packed_layout
from erpo_kernels.stats import StatsOptions, LinearTokenStats

Tensor = torch.Tensor


@dataclass
class ERPOOutput:
    """loss: scalar; metrics: a mapping of floats over 0-dim device tensors, read from the device (all at once)
    only when a value is first read (:class:`erpo_kernels.metrics.Metrics`); advantages, logprobs, entropy:
    per token, in the caller's layout ([B, T], or [N] for packed inputs), detached."""
    loss: Tensor
    metrics: Metrics = field(default_factory=lambda: Metrics({}))
    advantages: Optional[Tensor] = None
    logprobs: Optional[Tensor] = None
    entropy: Optional[Tensor] = None


def resolve_layout(hidden: Tensor, targets: Tensor, cu_seqlens, max_seqlen: Optional[int],
                   checks: v.ValueChecks) -> Layout:
    """Padded ([B, T, H] / [B*T, H] hidden with [B, T] targets) or packed ([N, H], [N], cu_seqlens)."""
    if cu_seqlens is None:
        if targets.dim() != 2:
            v.fail("targets", targets, "[B, T] (one row per sampled response), or [N] with cu_seqlens")
        return Layout(tuple(targets.shape))
    if hidden.dim() != 2 or targets.dim() != 1:
        v.fail("hidden", hidden, "packed [N, H] hidden states with [N] targets when cu_seqlens is given")
    return packed_layout(cu_seqlens, targets.shape[0], hidden.device, max_seqlen, checks)


def check_normalizer(normalizer, config: ERPOConfig) -> None:
    """The aggregation's denominator given by the caller: a number > 0 or a 0-dim tensor."""
    if normalizer is None:
        return
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1 or not (normalizer.is_floating_point() or not normalizer.is_complex()):
            v.fail("normalizer", normalizer, "a number > 0 or a 0-dim tensor")
    elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not normalizer > 0:
        v.fail("normalizer", normalizer, "a number > 0 or a 0-dim tensor")
    if not surrogate.is_linear(config):
        v.fail("normalizer", "a normalizer with aggregation='holder', holder_p != 1",
               "a linear aggregation (a power mean of micro-batches is not the power mean of the batch)")
    if config.aggregation == "constant" and config.max_length is None:
        v.fail("normalizer", "a normalizer with aggregation='constant' and max_length=None",
               "ERPOConfig.max_length set (micro-batches differ in padded length)")


def erpo_loss(hidden: Tensor, lm_head, targets: Tensor, mask: Tensor, rewards=None, *,
              group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
              advantages: Optional[Tensor] = None, normalizer=None,
              cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
              old_logprobs: Optional[Tensor] = None, ref_logprobs: Optional[Tensor] = None,
              old_entropy: Optional[Tensor] = None, token_weights: Optional[Tensor] = None,
              gates: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              config: Optional[ERPOConfig] = None, backend: str = "auto", vocab_group=None) -> ERPOOutput:
    """The ERPO (or GRPO / DAPO / Dr.GRPO / EP-GRPO, by ``config.mode``) loss from hidden states.

    Padded: hidden [B, T, H] (or [B*T, H]); targets, mask and the per-token inputs [B, T]; rewards [B].
    Packed: hidden [N, H]; targets, mask and per-token inputs [N]; ``cu_seqlens`` [S+1]; rewards [S]
    (``max_seqlen``, the longest sequence, spares a device read of the lengths).
    lm_head: an nn.Linear or its weight [V, H] (a DTensor weight, e.g. FSDP2's, is gathered and its gradient
    returned to the shards averaged over the mesh); targets: sampled ids (``config.ignore_index`` allowed);
    mask: the completion mask; group_size (consecutive rows) or group_ids [rows]; old_logprobs /
    ref_logprobs / old_entropy / token_weights / gates per token.

    ``advantages`` (per token, e.g. from ``erpo_advantages`` on the whole generation batch): used as they
    are, and then rewards, groups, gates and token_weights are not needed (the loss is one 3-GEMM sweep).
    ``normalizer``: the aggregation's denominator over everything the caller sums (micro-batches, ranks):
    the number of completion tokens for token_mean, of sequences for seq_mean_token_mean /
    seq_mean_token_sum, and of sequences for constant (times ``config.max_length``, which it requires).

    Without ``old_entropy`` (and without ``advantages``) the current policy's entropy (detached) stands in
    for the old one: exact on the first update of an on-policy batch.

    ``vocab_group`` (a torch.distributed process group): ``lm_head`` is this rank's contiguous block of
    vocabulary rows (Megatron's split, rank order); the statistics are reduced across the group, grad_hidden
    is all-reduced and the weight grad stays with its shard (:mod:`erpo_kernels.vocab_parallel`; the
    stats-then-backward path, 4 GEMMs).

    Device reads: the value checks of the inputs, all in one read (none with
    ``ERPOConfig(check_values=False)``); none for the groups when ``group_size`` is given (``group_ids``
    cost one torch.unique) nor for packed lengths when ``max_seqlen`` is given; metrics stay on the device
    until read.
    """
    config = config or ERPOConfig()
    if not isinstance(config, ERPOConfig):
        v.fail("config", config, "an ERPOConfig")
    checks = v.ValueChecks(config.check_values)
    weight, bias = v.unpack_lm_head(lm_head, bias, vocab_group)
    shard = None
    if vocab_group is not None:
        from erpo_kernels.vocab_parallel import resolve_vocab_shard
        shard = resolve_vocab_shard(weight, vocab_group)
    v.check_linear_inputs(hidden, weight, bias, targets, config.ignore_index, checks,
                          vocab=None if shard is None else shard.total)
    layout = resolve_layout(hidden, targets, cu_seqlens, max_seqlen, checks)
    shape, device = layout.token_shape, hidden.device
    mask = v.check_mask(mask, shape, device, checks)
    valid = mask & (targets != config.ignore_index)
    v.check_some_tokens(valid, mask, checks, "at least one completion token (not ignore_index) in the batch")
    rows = layout.shape[0]
    groups = None
    if advantages is None:
        if rewards is None:
            v.fail("rewards", "None", f"[{rows}] outcome rewards (or precomputed advantages=)")
        rewards = v.check_rewards(rewards, rows, device, checks)
        groups = v.resolve_groups(rows, device, group_size, group_ids)
    v.check_token_inputs(shape, device, valid, checks, old_entropy=old_entropy, old_logprobs=old_logprobs,
                         ref_logprobs=ref_logprobs, token_weights=token_weights, gates=gates)
    v.check_token_tensor("advantages", advantages, shape, device, valid, checks)
    check_normalizer(normalizer, config)

    options = StatsOptions(get_backend(backend, device), config.temperature, config.ignore_index,
                           config.chunk_size)
    if shard is not None:
        from erpo_kernels.vocab_parallel import check_backend
        check_backend(options.backend)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    on_grid = lambda x: None if x is None else layout.pad(x.detach().to(dtype))  # noqa: E731
    old_lp, ref_lp, valid_grid = on_grid(old_logprobs), on_grid(ref_logprobs), layout.pad(valid, False)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    extras = (on_grid(token_weights), on_grid(gates), options.backend, layout, dtype)

    # advantages first when they need only old statistics (then the dead tokens are known before any GEMM)
    adv, stats_entropy = None, on_grid(old_entropy)
    adv_first = not advantages_need_current_stats(config, old_entropy is not None, advantages is not None,
                                                  old_lp, ref_lp)
    if adv_first:
        adv = _advantages(advantages, rewards, valid_grid, groups, stats_entropy, old_lp, ref_lp, config, *extras)
    live_grid = valid_grid
    if adv is not None and config.kl_beta == 0 and config.entropy_coef == 0:
        live_grid = valid_grid & (adv.advantages != 0)   # A = 0: the token's loss and gradients are exactly 0
    compaction = None
    if config.skip_dead_tokens and shard is None:        # one device read: the checks and the live count
        compaction = Compaction(layout.flatten(live_grid), checks.run(live=live_grid.sum())["live"])
    else:
        checks.run()
    widen = (lambda x, fill=0.0: x) if compaction is None else compaction.scatter  # noqa: E731

    wants_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    if wants_grad and shard is None and config.fused_train and fused_path_applies(config, adv_first,
                                                                                   options.backend):
        # one sweep: loss and grads (3 GEMMs, on the live tokens)
        flat = (lambda g: layout.flatten(g)) if compaction is None else (  # noqa: E731
            lambda g: None if g is None else compaction.rows(layout.flatten(g)))
        terms = SweepTerms(flat(adv.advantages), flat(surrogate.aggregation_weights(valid_grid, config, dtype,
                                                                                     normalizer)),
                           flat(valid_grid), flat(old_lp), flat(ref_lp), config)
        loss, logprobs, entropy = FusedLinearLoss.apply(flat_hidden.contiguous(), weight, bias, flat_targets, terms,
                                                        options, compaction)
        logprobs, entropy = layout.to_grid(widen(logprobs)), layout.to_grid(widen(entropy))
        info = {name: layout.to_grid(widen(getattr(terms.recorded, name), fill), fill)
                for name, fill in (("ratio", 1.0), ("clip_low", False), ("clip_high", False), ("dual_clip", False))}
        ref_lp = surrogate.fill_off_mask(ref_lp, live_grid, logprobs)
    else:
        if not flat_hidden.is_contiguous():
            flat_hidden = flat_hidden.contiguous()
        if shard is None:
            flat_lp, flat_entropy, _ = LinearTokenStats.apply(flat_hidden, weight, bias, flat_targets, options,
                                                              compaction)
        else:
            from erpo_kernels.vocab_parallel import VocabParallelTokenStats
            flat_lp, flat_entropy, _ = VocabParallelTokenStats.apply(flat_hidden, weight, bias, flat_targets,
                                                                     options, shard)
        logprobs, entropy = layout.to_grid(flat_lp), layout.to_grid(flat_entropy)
        if adv is None:
            stats_entropy = stats_entropy if stats_entropy is not None else entropy.detach()
            stats_logprobs = old_lp if old_lp is not None else logprobs.detach()
            adv = _advantages(advantages, rewards, valid_grid, groups, stats_entropy, stats_logprobs, ref_lp,
                              config, *extras)
        old_lp = surrogate.fill_off_mask(old_lp, live_grid, logprobs)
        ref_lp = surrogate.fill_off_mask(ref_lp, live_grid, logprobs)
        per_token_loss = getattr(options.backend, "per_token_loss", surrogate.per_token_loss)
        token_loss, info = per_token_loss(logprobs, entropy, adv.advantages, old_lp, ref_lp, config)
        loss = surrogate.aggregate(token_loss, valid_grid, config, normalizer)
    metrics = loss_metrics(loss, valid_grid, live_grid, logprobs, entropy, stats_entropy, adv, info, ref_lp,
                           groups)
    back = layout.unpad
    return ERPOOutput(loss, metrics, back(adv.advantages), back(logprobs.detach()), back(entropy.detach()))


def _advantages(given: Optional[Tensor], rewards, valid: Tensor, groups, entropy: Tensor, old_logprobs,
                ref_logprobs, config: ERPOConfig, token_weights, gates, backend, layout: Layout,
                dtype: torch.dtype) -> Advantages:
    """The token advantages on the [rows, T] grid: the caller's (masked), or synthesized."""
    if given is None:
        return compute_advantages(rewards, valid, groups, entropy, old_logprobs, ref_logprobs, config,
                                  token_weights, gates, backend)
    grid = layout.pad(given.detach().to(dtype))
    return Advantages(torch.where(valid, grid, 0.0), None, None, None, None, None)


class ERPOLoss(nn.Module):
    """nn.Module form: ``ERPOLoss(config)(hidden, lm_head, targets, mask, rewards, group_size=8, ...)``."""

    def __init__(self, config: Optional[ERPOConfig] = None, backend: str = "auto"):
        super().__init__()
        self.config = config or ERPOConfig()
        self.backend = backend

    def forward(self, hidden, lm_head, targets, mask, rewards=None, **kwargs) -> ERPOOutput:
        kwargs.setdefault("config", self.config)
        kwargs.setdefault("backend", self.backend)
        return erpo_loss(hidden, lm_head, targets, mask, rewards, **kwargs)

    def extra_repr(self) -> str:
        return f"mode={self.config.mode!r}, backend={self.backend!r}"


__all__: Tuple[str, ...] = ("erpo_loss", "ERPOLoss", "ERPOOutput")

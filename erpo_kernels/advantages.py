"""Token advantage synthesis (ERPO_SPEC.md (i)-(iii)), vectorized torch, and dispatch to the kernel.

Same results as :func:`erpo_kernels.reference.token_advantages` (which loops over groups and
buckets for readability); here every per-cell statistic is one ``scatter_add`` over the tokens.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from erpo_kernels import reference
from erpo_kernels.backends import get_backend
from erpo_kernels.config import ERPOConfig
from erpo_kernels.validation import as_groups

Tensor = torch.Tensor


class Advantages(NamedTuple):
    """Outputs of :func:`erpo_advantages`; every tensor is detached.

    advantages [B, T]: A[i, t];  gate [B, T]: W;  seq_advantage [B]: A_seq;  bucket [B, T]: b;
    signal [B, T]: s_tilde (bucket-normalized progress signal);  zero_var [B]: the row's group has
    all rewards equal.
    """
    advantages: Tensor
    gate: Tensor
    seq_advantage: Tensor
    bucket: Tensor
    signal: Tensor
    zero_var: Tensor


def segment_mean_std(values: Tensor, cells: Tensor, valid: Tensor, num_cells: int,
                     all_reduce: Optional[Callable[[Tensor], None]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-element mean, population std and count of its cell, over the ``valid`` elements.

    values, cells (int64 in [0, num_cells)), valid (bool): same shape.  Two passes (mean, then
    squared deviations) so the variance never suffers the E[x^2] - E[x]^2 cancellation.
    ``all_reduce`` (an in-place sum over ranks) makes the statistics span every rank's elements.
    """
    reduce = all_reduce or (lambda x: None)
    flat_values, flat_cells = values.reshape(-1), cells.reshape(-1)
    weights = valid.reshape(-1).to(values.dtype)
    count = torch.zeros(num_cells, dtype=values.dtype, device=values.device).index_add_(0, flat_cells, weights)
    total = torch.zeros_like(count).index_add_(0, flat_cells, flat_values * weights)
    sums = torch.stack([count, total])
    reduce(sums)
    count, total = sums[0], sums[1]
    mean = total / count.clamp_min(1.0)
    deviation = (flat_values - mean[flat_cells]) * weights
    squares = torch.zeros_like(count).index_add_(0, flat_cells, deviation * deviation)
    reduce(squares)
    var = squares / count.clamp_min(1.0)
    shape = values.shape
    return mean[flat_cells].reshape(shape), var.sqrt()[flat_cells].reshape(shape), count[flat_cells].reshape(shape)


def global_sum(x: Tensor) -> None:
    """In-place sum over the ranks of torch.distributed's default group (a no-op when not initialized)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)


def _gate_cells(group_index: Tensor, num_groups: int, shape, scope: str) -> Tuple[Tensor, int]:
    B, T = shape
    if scope == "group":
        return group_index[:, None].expand(B, T), num_groups
    if scope in ("batch", "global"):
        return torch.zeros(B, T, dtype=torch.long, device=group_index.device), 1
    return torch.arange(B, device=group_index.device)[:, None].expand(B, T), B


def _topk_gate(entropy: Tensor, mask: Tensor, cells: Tensor, num_cells: int, frac: float) -> Tensor:
    """Hard gate: 1 where entropy >= the k-th largest of its cell (k = ceil(frac * n_cell)).

    One segmented sort finds every cell's threshold at once: by entropy descending with the tokens off the
    mask last (-inf), then stably by cell, so each cell's completion tokens lead its segment, largest first.
    No torch.quantile (it fails past 2^24 elements), no boolean indexing (a device sync).
    """
    flat_mask, flat_cells = mask.reshape(-1), cells.reshape(-1)
    flat_h = torch.where(flat_mask, entropy.reshape(-1), -math.inf)
    order = torch.sort(flat_h, descending=True, stable=True).indices
    order = order[torch.sort(flat_cells[order], stable=True).indices]
    sorted_h = flat_h[order]
    per_cell = lambda x: torch.zeros(num_cells, dtype=torch.long, device=x.device).index_add_(  # noqa: E731
        0, flat_cells, x.long())
    count, size = per_cell(flat_mask), per_cell(torch.ones_like(flat_mask))
    start = torch.cumsum(size, 0) - size
    k = torch.ceil(count.to(torch.float64) * frac).long().clamp_min(1)
    position = (start + k - 1).clamp_max(max(flat_h.numel() - 1, 0))
    threshold = torch.where(count > 0, sorted_h[position], math.inf)
    return ((flat_h >= threshold[flat_cells]) & flat_mask).to(entropy.dtype).reshape(entropy.shape)


def entropy_gate(entropy: Tensor, mask: Tensor, group_index: Tensor, num_groups: int,
                 config: ERPOConfig) -> Tensor:
    """W [B, T]: see :func:`erpo_kernels.reference.entropy_gate`."""
    if config.gate == "none":
        return mask.to(entropy.dtype)
    cells, num_cells = _gate_cells(group_index, num_groups, mask.shape, config.gate_scope)
    if config.gate == "sigmoid":
        reduce = global_sum if config.gate_scope == "global" else None
        mu, sigma, _ = segment_mean_std(entropy, cells, mask, num_cells, reduce)
        z = torch.where(sigma > config.eps, (entropy - mu) / (sigma + config.eps), torch.zeros_like(entropy))
        gate = torch.sigmoid(config.gate_gamma * z) * mask
    else:
        gate = _topk_gate(entropy, mask, cells, num_cells, config.gate_top_frac)
    if config.gate_normalize:
        m = mask.to(entropy.dtype)
        seq_mean = (gate * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)
        gate = torch.where(seq_mean > config.eps, gate / seq_mean.clamp_min(config.eps), gate)
    return gate


def bucket_index(mask: Tensor, entropy: Tensor, config: ERPOConfig) -> Tensor:
    """b [B, T] int64: see :func:`erpo_kernels.reference.bucket_index`.

    position: ``ceil(c * K / n) - 1`` in integer arithmetic, ``(c * K + n - 1) // n - 1`` with c the running
    count of completion tokens; cum_entropy: ``ceil(cumsum(H * mask) * K / sum(H * mask)) - 1`` where the
    sum exceeds eps (the last completion token's cumsum is the total itself, so it lands in bucket K - 1).
    """
    K = config.num_buckets
    count = mask.long().cumsum(-1)
    total = count[:, -1:].clamp_min(1)
    bucket = (count * K + total - 1) // total - 1
    if config.progress == "cum_entropy":
        cum = (entropy * mask).cumsum(-1)
        total_h = cum[:, -1:]
        by_entropy = torch.ceil(cum * K / total_h.clamp_min(config.eps)).long() - 1
        bucket = torch.where(total_h > config.eps, by_entropy, bucket)
    return bucket.clamp(0, K - 1)


def token_advantages(rewards: Tensor, mask: Tensor, group_ids: Tensor, old_entropy: Tensor,
                     old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor], config: ERPOConfig,
                     token_weights: Optional[Tensor] = None, gates: Optional[Tensor] = None) -> Advantages:
    """Vectorized twin of :func:`erpo_kernels.reference.token_advantages` (same arguments; ``group_ids`` may
    be a resolved :class:`erpo_kernels.validation.Groups`, then nothing here reads from the device)."""
    mask = mask.bool()
    dtype = old_entropy.dtype
    rewards = rewards.to(dtype)
    group_index, num_groups, _ = as_groups(group_ids)
    every_row = torch.ones_like(rewards, dtype=torch.bool)
    r_mean, r_std, r_count = segment_mean_std(rewards, group_index, every_row, num_groups)
    if config.reward_std == "unbiased":   # Bessel's correction, as TRL and verl (one-row groups: zero variance)
        r_std = r_std * (r_count / (r_count - 1).clamp_min(1)).sqrt()
    r_max = torch.full((num_groups,), -math.inf, dtype=dtype, device=rewards.device).scatter_reduce(
        0, group_index, rewards, "amax")
    r_min = torch.full((num_groups,), math.inf, dtype=dtype, device=rewards.device).scatter_reduce(
        0, group_index, rewards, "amin")
    zero_var = (r_max == r_min)[group_index]
    seq_adv = rewards - r_mean
    if config.std_normalize:
        seq_adv = seq_adv / (r_std + config.reward_eps)
    seq_adv = torch.where(zero_var, torch.zeros_like(seq_adv), seq_adv)

    gate = gates.to(dtype) * mask if gates is not None else entropy_gate(
        old_entropy, mask, group_index, num_groups, config)
    adv = gate * seq_adv[:, None]
    bucket = bucket_index(mask, old_entropy, config)
    signal = torch.zeros_like(old_entropy)
    if config.progress_term and old_logprobs is not None and ref_logprobs is not None:
        raw = config.progress_lambda * (old_logprobs.to(dtype) - ref_logprobs.to(dtype))
        if config.bucket_normalize:
            cells = group_index[:, None] * config.num_buckets + bucket
            mu, sigma, count = segment_mean_std(raw, cells, mask, num_groups * config.num_buckets)
            usable = mask & (count >= 2) & (sigma > config.eps)
            signal = torch.where(usable, (raw - mu) / (sigma + config.eps), torch.zeros_like(raw))
        else:
            signal = raw * mask
        direction = torch.sign(seq_adv)
        if config.polarity == "ep_grpo":
            direction = torch.where(zero_var, torch.sign(rewards - config.reward_threshold), direction)
        progress = config.progress_eta * gate * direction[:, None] * signal
        if config.progress_cap_kappa is not None:  # only where an outcome sign exists
            cap = adv.abs() / config.progress_cap_kappa
            capped = torch.maximum(torch.minimum(progress, cap), -cap)
            progress = torch.where(seq_adv[:, None] != 0, capped, progress)
        adv = adv + progress
    adv = adv * mask
    if token_weights is not None:
        adv = adv * token_weights.to(dtype)
    return Advantages(adv.detach(), gate.detach(), seq_adv.detach(), bucket, signal.detach(), zero_var)


def reference_token_advantages(rewards, mask, group_ids, *args) -> Advantages:
    """:func:`erpo_kernels.reference.token_advantages` (same arguments) as an :class:`Advantages`."""
    out = reference.token_advantages(rewards, mask, as_groups(group_ids).index, *args)
    return Advantages(out["advantages"], out["gate"], out["seq_advantage"], out["bucket"], out["signal"],
                      out["zero_var"])


def compute_advantages(rewards: Tensor, mask: Tensor, group_ids: Tensor, old_entropy: Tensor,
                       old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor], config: ERPOConfig,
                       token_weights: Optional[Tensor] = None, gates: Optional[Tensor] = None,
                       backend="auto") -> Advantages:
    """Dispatch the (already validated) advantage synthesis to a backend: a name, or a backend module
    from :func:`erpo_kernels.backends.get_backend` (its ``token_advantages``, else this module's).

    Values off the mask are zeroed first: padding may hold NaN or inf, and 0 * NaN is NaN.
    """
    module = get_backend(backend, old_entropy.device) if isinstance(backend, str) else backend
    synthesize = getattr(module, "token_advantages", token_advantages)
    mask = mask.bool()
    on_mask = lambda x: None if x is None else torch.where(mask, x, torch.zeros_like(x))  # noqa: E731
    old_entropy, old_logprobs, ref_logprobs = on_mask(old_entropy), on_mask(old_logprobs), on_mask(ref_logprobs)
    token_weights, gates = on_mask(token_weights), on_mask(gates)
    return synthesize(rewards, mask, group_ids, old_entropy, old_logprobs, ref_logprobs, config, token_weights, gates)


def erpo_advantages(rewards, mask: Tensor, old_entropy: Tensor, old_logprobs: Optional[Tensor] = None,
                    ref_logprobs: Optional[Tensor] = None, *, group_size: Optional[int] = None,
                    group_ids: Optional[Tensor] = None, config: Optional[ERPOConfig] = None,
                    token_weights: Optional[Tensor] = None, gates: Optional[Tensor] = None,
                    cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
                    backend: str = "auto") -> Advantages:
    """Token advantages alone, for trainers that already have log-probs and entropy, and for computing them once
    on a whole generation batch before it is split into micro-batches (then ``erpo_loss(..., advantages=A)``).

    rewards [B]; mask [B, T] completion mask; old_entropy [B, T] (entropy of the sampling policy);
    old_logprobs / ref_logprobs [B, T] (both needed for the progress term); one of group_size
    (consecutive rows) or group_ids [B]; gates [B, T] replaces the entropy gate W; token_weights
    [B, T] multiplies A.  Packed: every per-token tensor [N] with ``cu_seqlens`` [S+1], rewards [S].
    Returns :class:`Advantages` (detached), per-token fields in the caller's layout.
    """
    from erpo_kernels import validation as v
    from erpo_kernels.packing import Layout, packed_layout
    config = config or ERPOConfig()
    checks = v.ValueChecks(config.check_values)
    v.check_float("old_entropy", old_entropy, ndim=1 if cu_seqlens is not None else 2)
    shape, device = tuple(old_entropy.shape), old_entropy.device
    layout = Layout(shape) if cu_seqlens is None else packed_layout(cu_seqlens, shape[0], device, max_seqlen, checks)
    mask = v.check_mask(mask, shape, device, checks)
    v.check_some_tokens(mask, mask, checks, "at least one completion token in the batch")
    rows = layout.shape[0]
    rewards = v.check_rewards(rewards, rows, device, checks)
    groups = v.resolve_groups(rows, device, group_size, group_ids)
    v.check_token_inputs(shape, device, mask, checks, old_entropy=old_entropy, old_logprobs=old_logprobs,
                         ref_logprobs=ref_logprobs, token_weights=token_weights, gates=gates)
    checks.run()
    pad = layout.pad
    out = compute_advantages(rewards, pad(mask, False), groups, pad(old_entropy), pad(old_logprobs),
                             pad(ref_logprobs), config, pad(token_weights), pad(gates), backend)
    back = layout.unpad
    return Advantages(back(out.advantages), back(out.gate), out.seq_advantage, back(out.bucket), back(out.signal),
                      out.zero_var)

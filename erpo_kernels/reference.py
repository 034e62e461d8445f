"""The oracle: every formula of ERPO_SPEC.md in plain PyTorch, written for reading, not speed.

It materializes the full [N, V] logits, loops over groups and buckets in Python, and works in
float64 when given float64 tensors.  Every other path of the library is tested against it;
``backend="torch"`` and the benchmarks import it.  Shapes: B sequences, T positions, H hidden,
V vocabulary; ``mask`` is the completion mask [B, T] (prompt and padding are 0).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from erpo_kernels.config import ERPOConfig

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# 1. token statistics from hidden states (full logits)
# ----------------------------------------------------------------------------------------------
def token_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                temperature: float = 1.0, ignore_index: int = -100) -> Tuple[Tensor, Tensor, Tensor]:
    """logprob of ``targets``, entropy and logsumexp of softmax((h W^T + b) / T); differentiable.

    hidden [..., H], weight [V, H], bias [V] or None, targets [...] -> three tensors shaped like
    ``targets``, in float32 (float64 if the inputs are float64).  Ignored targets get logprob 0.
    """
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    log_probs = logits - lse[..., None]
    probs = log_probs.exp()
    entropy = -(probs * torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))).sum(-1)
    valid = targets != ignore_index
    picked = log_probs.gather(-1, torch.where(valid, targets, 0)[..., None]).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked)), entropy, lse


# ----------------------------------------------------------------------------------------------
# 2. token advantages
# ----------------------------------------------------------------------------------------------
def _mean_std(values: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and population std (unbiased=False) of a 1-D tensor."""
    mean = values.mean()
    return mean, ((values - mean) ** 2).mean().sqrt()


def group_reward_stats(rewards: Tensor, group_ids: Tensor, unbiased: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-sequence group mean, group std (population, or with Bessel's correction) and a zero-variance flag
    (all rewards of the group equal)."""
    mean, std = torch.zeros_like(rewards), torch.zeros_like(rewards)
    zero_var = torch.zeros_like(rewards, dtype=torch.bool)
    for g in group_ids.unique():
        rows = group_ids == g
        values = rewards[rows]
        mean[rows], std[rows] = _mean_std(values)
        if unbiased and values.numel() > 1:
            std[rows] = values.std(unbiased=True)
        zero_var[rows] = bool(values.max() == values.min())
    return mean, std, zero_var


def outcome_advantage(rewards: Tensor, group_ids: Tensor, config: ERPOConfig) -> Tensor:
    """A_seq[i] = (r_i - mean_g r) / (std_g r + eps), without the std for Dr.GRPO; 0 in zero-variance groups.
    config.reward_std picks the std (population, or unbiased as TRL / verl), config.reward_eps the eps."""
    mean, std, zero_var = group_reward_stats(rewards, group_ids, config.reward_std == "unbiased")
    adv = rewards - mean
    if config.std_normalize:
        adv = adv / (std + config.reward_eps)
    return torch.where(zero_var, torch.zeros_like(adv), adv)


def _scope_cells(mask: Tensor, group_ids: Tensor, scope: str):
    """Yield boolean [B, T] masks, one per statistics cell of the gate scope."""
    B = mask.shape[0]
    if scope in ("batch", "global"):  # the oracle is one process: global is its whole batch
        yield mask
    elif scope == "group":
        for g in group_ids.unique():
            yield mask & (group_ids == g)[:, None]
    else:  # sequence
        for i in range(B):
            cell = torch.zeros_like(mask)
            cell[i] = mask[i]
            yield cell


def entropy_gate(entropy: Tensor, mask: Tensor, group_ids: Tensor, config: ERPOConfig) -> Tensor:
    """W[i, t]: sigmoid(gamma * z-scored entropy), or the hard top-fraction gate, or 1; 0 off the mask.

    sigmoid: z = (H - mu_H) / (sigma_H + eps) with mu_H, sigma_H over the masked tokens of the scope
    cell; z = 0 where sigma_H <= eps.  topk: W = 1 for tokens whose entropy is >= the k-th largest
    of their cell, k = ceil(gate_top_frac * tokens in the cell).  gate_normalize rescales W to mean 1
    over each sequence's masked tokens.
    """
    if config.gate == "none":
        return mask.to(entropy.dtype)
    gate = torch.zeros_like(entropy)
    for cell in _scope_cells(mask, group_ids, config.gate_scope):
        values = entropy[cell]
        if values.numel() == 0:
            continue
        if config.gate == "sigmoid":
            mu, sigma = _mean_std(values)
            z = (values - mu) / (sigma + config.eps) if sigma > config.eps else torch.zeros_like(values)
            gate[cell] = torch.sigmoid(config.gate_gamma * z)
        else:  # topk
            k = max(1, math.ceil(config.gate_top_frac * values.numel()))
            threshold = values.sort(descending=True).values[k - 1]
            gate[cell] = (values >= threshold).to(entropy.dtype)
    if config.gate_normalize:
        for i in range(mask.shape[0]):
            if mask[i].any():
                mean = gate[i][mask[i]].mean()
                if mean > config.eps:
                    gate[i] = gate[i] / mean
    return gate


def bucket_index(mask: Tensor, entropy: Tensor, config: ERPOConfig) -> Tensor:
    """b[i, t] = clamp(ceil(tau * K) - 1, 0, K - 1) from the progress coordinate tau in (0, 1].

    position: tau = cumsum(mask) / n_i, in exact rational arithmetic (no float rounding moves a token
    across a bucket edge); cum_entropy: tau = cumsum(H * mask) / sum(H * mask), falling back to position
    when that sum <= eps.  Off-mask positions get the bucket of the last completion token before them.
    """
    from fractions import Fraction

    K = config.num_buckets
    bucket = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    for i in range(mask.shape[0]):
        row_mask = mask[i].tolist()
        row_entropy = entropy[i].tolist()
        n = max(sum(row_mask), 1)
        total_h = sum(h for h, m in zip(row_entropy, row_mask) if m)
        by_entropy = config.progress == "cum_entropy" and total_h > config.eps
        count, cum_h = 0, 0.0
        for t, (m, h) in enumerate(zip(row_mask, row_entropy)):
            if m:
                count += 1
                cum_h += h
            if by_entropy:
                b = math.ceil(cum_h * K / total_h) - 1
            else:
                b = math.ceil(Fraction(count * K, n)) - 1
            bucket[i, t] = min(max(b, 0), K - 1)
    return bucket


def bucket_normalized_signal(signal: Tensor, mask: Tensor, group_ids: Tensor, bucket: Tensor,
                             config: ERPOConfig) -> Tensor:
    """s_tilde: s z-scored inside each (group, bucket) cell of masked tokens; 0 for cells of one token or sigma <= eps."""
    if not config.bucket_normalize:
        return signal * mask
    out = torch.zeros_like(signal)
    for g in group_ids.unique():
        for b in range(config.num_buckets):
            cell = mask & (group_ids == g)[:, None] & (bucket == b)
            values = signal[cell]
            if values.numel() < 2:
                continue
            mu, sigma = _mean_std(values)
            if sigma > config.eps:
                out[cell] = (values - mu) / (sigma + config.eps)
    return out


def token_advantages(rewards: Tensor, mask: Tensor, group_ids: Tensor, old_entropy: Tensor,
                     old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor],
                     config: ERPOConfig, token_weights: Optional[Tensor] = None,
                     gates: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """A[i, t] = (W * A_seq + eta * W * d * s_tilde) * mask (ERPO_SPEC.md (i)-(iii)); detached.

    rewards [B], mask [B, T] (bool or 0/1), group_ids [B], old_entropy/old_logprobs/ref_logprobs [B, T].
    ``gates`` [B, T] replaces the computed W; ``token_weights`` [B, T] multiplies the final A.
    The progress term needs both old and reference log-probs; without them Psi = 0.
    Returns a dict: advantages, gate, seq_advantage, direction, signal, bucket, zero_var.
    """
    mask = mask.bool()
    dtype = old_entropy.dtype
    rewards = rewards.to(dtype)
    seq_adv = outcome_advantage(rewards, group_ids, config)
    gate = gates.to(dtype) * mask if gates is not None else entropy_gate(old_entropy, mask, group_ids, config)
    _, _, zero_var = group_reward_stats(rewards, group_ids)
    direction = torch.sign(seq_adv)
    if config.polarity == "ep_grpo":
        direction = torch.where(zero_var, torch.sign(rewards - config.reward_threshold), direction)
    adv_out = gate * seq_adv[:, None]
    bucket = bucket_index(mask, old_entropy, config)
    signal = torch.zeros_like(old_entropy)
    progress = torch.zeros_like(old_entropy)
    if config.progress_term and old_logprobs is not None and ref_logprobs is not None:
        raw = config.progress_lambda * (old_logprobs.to(dtype) - ref_logprobs.to(dtype))
        signal = bucket_normalized_signal(raw, mask, group_ids, bucket, config)
        progress = config.progress_eta * gate * direction[:, None] * signal
        if config.progress_cap_kappa is not None:
            # |eta Psi| <= |A_out| / kappa keeps the outcome sign dominant.  Rows without an outcome
            # sign (A_seq = 0: EP-GRPO's zero-variance fallback) are not capped: a cap of 0 there
            # would silently switch the fallback off.
            cap = adv_out.abs() / config.progress_cap_kappa
            capped = torch.maximum(torch.minimum(progress, cap), -cap)
            progress = torch.where(seq_adv[:, None] != 0, capped, progress)
    adv = (adv_out + progress) * mask
    if token_weights is not None:
        adv = adv * token_weights.to(dtype)
    return dict(advantages=adv.detach(), gate=gate.detach(), seq_advantage=seq_adv, direction=direction,
                signal=signal, bucket=bucket, zero_var=zero_var)


# ----------------------------------------------------------------------------------------------
# 3. surrogate and aggregation
# ----------------------------------------------------------------------------------------------
def fill_off_mask(values: Optional[Tensor], valid: Tensor, logprobs: Tensor) -> Optional[Tensor]:
    """Replace old/ref log-probs off the mask by the current (detached) ones: ratio 1, KL 0 there.

    Padding may hold anything (-1e4, garbage); exp(lp - old) of it would overflow to inf, and
    inf * 0 = NaN would reach the loss and, through autograd, the gradients.
    """
    return None if values is None else torch.where(valid, values, logprobs.detach())


def per_token_loss(logprobs: Tensor, entropy: Tensor, advantages: Tensor, old_logprobs: Optional[Tensor],
                   ref_logprobs: Optional[Tensor], config: ERPOConfig) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped surrogate (+ dual clip, + k3 KL, - entropy bonus) per token, and boolean clip indicators.

    ratio = exp(lp - lp_old) (lp_old = lp.detach() when not given);
    pg = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A); dual clip: pg = min(pg, -c * A) where A < 0.
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    unclipped_obj, clipped_obj = ratio * advantages, clipped_ratio * advantages
    loss = -torch.minimum(unclipped_obj, clipped_obj)
    clipped = clipped_obj < unclipped_obj          # the clipped branch is the one taken (gradient 0)
    dual = torch.zeros_like(clipped)
    if config.dual_clip_c is not None:
        bound = -config.dual_clip_c * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
    if config.kl_beta > 0 and ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        loss = loss + config.kl_beta * (torch.exp(delta) - delta - 1.0)
    if config.entropy_coef > 0:
        loss = loss - config.entropy_coef * entropy
    info = dict(ratio=ratio.detach(), clip_low=clipped & (ratio < 1.0), clip_high=clipped & (ratio > 1.0),
                dual_clip=dual)
    return loss, info


def aggregate(token_loss: Tensor, mask: Tensor, config: ERPOConfig) -> Tensor:
    """Reduce [B, T] per-token losses over the masked tokens.

    token_mean: mean over every masked token of the batch (DAPO); seq_mean_token_mean: mean over the B rows
    of each row's token mean (a fully masked row counts as 0, as TRL computes it); seq_mean_token_sum: mean
    over rows of each row's token sum; constant: token sum / (B * max_length), max_length = config.max_length
    or T (Dr.GRPO); holder: signed power mean sign(S) * max(|S|, eps)^(1/p), S = mean(sign(L) |L|^p) over
    masked tokens (HoelderPO; p = 1 is token_mean).
    """
    mask = mask.bool()
    B, T = mask.shape
    zero = token_loss.sum() * 0.0
    if config.aggregation == "token_mean" or (config.aggregation == "holder" and config.holder_p == 1.0):
        return token_loss[mask].mean() if mask.any() else zero
    if config.aggregation == "seq_mean_token_mean":
        rows = [token_loss[i][mask[i]].mean() if mask[i].any() else zero for i in range(B)]
        return torch.stack(rows).mean()
    if config.aggregation == "seq_mean_token_sum":
        return torch.stack([token_loss[i][mask[i]].sum() for i in range(B)]).mean()
    if config.aggregation == "constant":
        return token_loss[mask].sum() / (B * (config.max_length or T))
    p = config.holder_p
    values = token_loss[mask]
    s = (torch.sign(values) * values.abs().clamp_min(1e-30) ** p).mean() if values.numel() else zero
    return torch.sign(s) * s.abs().clamp_min(config.eps) ** (1.0 / p)


# ----------------------------------------------------------------------------------------------
# 4. the whole loss
# ----------------------------------------------------------------------------------------------
def erpo_loss(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor, rewards: Tensor,
              group_ids: Tensor, old_logprobs: Optional[Tensor] = None, ref_logprobs: Optional[Tensor] = None,
              old_entropy: Optional[Tensor] = None, config: Optional[ERPOConfig] = None,
              bias: Optional[Tensor] = None, token_weights: Optional[Tensor] = None,
              gates: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Scalar ERPO loss from hidden states [B, T, H] through full logits, and the intermediate tensors.

    Without ``old_entropy`` the current (detached) entropy stands in for it; without ``old_logprobs``
    the ratio is exp(lp - lp.detach()) and the progress signal uses lp.detach().
    """
    config = config or ERPOConfig()
    valid = mask.bool() & (targets != config.ignore_index)
    logprobs, entropy, _ = token_stats(hidden, weight, bias, targets, config.temperature, config.ignore_index)
    stats_entropy = old_entropy if old_entropy is not None else entropy.detach()
    stats_logprobs = old_logprobs if old_logprobs is not None else logprobs.detach()
    adv = token_advantages(rewards, valid, group_ids, stats_entropy.to(logprobs.dtype),
                           stats_logprobs.to(logprobs.dtype),
                           None if ref_logprobs is None else ref_logprobs.to(logprobs.dtype),
                           config, token_weights, gates)
    old = fill_off_mask(None if old_logprobs is None else old_logprobs.to(logprobs.dtype), valid, logprobs)
    ref = fill_off_mask(None if ref_logprobs is None else ref_logprobs.to(logprobs.dtype), valid, logprobs)
    loss_tokens, info = per_token_loss(logprobs, entropy, adv["advantages"], old, ref, config)
    loss = aggregate(loss_tokens, valid, config)
    return loss, dict(adv, logprobs=logprobs, entropy=entropy, token_loss=loss_tokens, valid=valid, **info)

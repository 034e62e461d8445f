"""Hand-written twins of every loss term, aggregation and advantage formula, written from ERPO_SPEC.md.

They share no code with ``erpo_kernels``: a few lines of plain torch each, written the way a paper's appendix
or a minimal trainer writes them (full logits, python loops over groups where that is clearer).  Tests compare
the library (every backend) *and* its oracle ``reference.py`` with them, so a bug planted in either one fails
a test even when the other one calls it.  Conventions are the ones ERPO_SPEC.md pins: population std, eps = 1e-6
added to every std, a zero-variance group has A_seq = 0, a fully masked row counts in B for the seq-means.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-6


# --- per-token statistics ----------------------------------------------------------------------------------
def logprobs_and_entropy(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100):
    """log p(target) (0 for ignored targets) and the entropy of softmax((h W^T + b) / T), in float64."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    safe = targets.clamp_min(0)
    picked = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(targets == ignore_index, torch.zeros_like(picked), picked), entropy


# --- the surrogate, term by term ----------------------------------------------------------------------------
def clipped_surrogate(ratio, adv, eps_low, eps_high):
    """PPO's clipped objective, negated: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)."""
    return -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)


def dual_clip(pg, adv, c):
    """Dual-clip PPO: where A < 0 the loss is capped at -c A, i.e. min(pg, -c A)."""
    return torch.where(adv < 0, torch.min(pg, -c * adv), pg)


def k3(lp, lp_ref):
    """Schulman's k3 estimator of KL(pi || pi_ref): exp(lp_ref - lp) - (lp_ref - lp) - 1 (>= 0)."""
    log_ratio = lp_ref - lp
    return torch.exp(log_ratio) - log_ratio - 1


def token_loss(lp, adv, lp_old=None, lp_ref=None, entropy=None, eps_low=0.2, eps_high=0.28, dual_clip_c=None,
               kl_beta=0.0, entropy_coef=0.0):
    """L[i, t]: clipped surrogate (+ dual clip) + kl_beta * k3 - entropy_coef * H; ratio 1 without lp_old."""
    ratio = torch.exp(lp - (lp_old if lp_old is not None else lp.detach()))
    loss = clipped_surrogate(ratio, adv, eps_low, eps_high)
    if dual_clip_c is not None:
        loss = dual_clip(loss, adv, dual_clip_c)
    if kl_beta and lp_ref is not None:
        loss = loss + kl_beta * k3(lp, lp_ref)
    if entropy_coef:
        loss = loss - entropy_coef * entropy
    return loss


# --- aggregations -------------------------------------------------------------------------------------------
def token_mean(L, m):
    """DAPO: the mean over every completion token of the batch."""
    m = m.double()
    return (L * m).sum() / m.sum()


def seq_mean_token_mean(L, m):
    """GRPO: each sequence's token mean, then the mean over sequences (fully masked ones count as 0)."""
    m = m.double()
    return ((L * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()


def seq_mean_token_sum(L, m):
    """Each sequence's token sum, then the mean over sequences."""
    return (L * m.double()).sum(dim=1).mean()


def constant_length(L, m, max_length):
    """Dr.GRPO: the token sum over (number of sequences x a fixed max length)."""
    return (L * m.double()).sum() / (L.shape[0] * max_length)


def holder_mean(L, m, p):
    """HoelderPO's signed power mean over completion tokens: S = mean(sign(L) |L|^p), sign(S) |S|^(1/p)."""
    values = L[m.bool()]
    s = (torch.sign(values) * values.abs() ** p).mean()
    return torch.sign(s) * s.abs().clamp(min=EPS) ** (1 / p)


def aggregate(L, m, aggregation, max_length=None, holder_p=1.0):
    """Dispatch by name (``max_length`` defaults to the padded T, as ERPO_SPEC.md says for Dr.GRPO)."""
    if aggregation == "token_mean":
        return token_mean(L, m)
    if aggregation == "seq_mean_token_mean":
        return seq_mean_token_mean(L, m)
    if aggregation == "seq_mean_token_sum":
        return seq_mean_token_sum(L, m)
    if aggregation == "constant":
        return constant_length(L, m, max_length or L.shape[1])
    return holder_mean(L, m, holder_p) if holder_p != 1.0 else token_mean(L, m)


# --- advantages ---------------------------------------------------------------------------------------------
def outcome_advantage(rewards, group_size, std_normalize=True, unbiased=False, eps=EPS):
    """A_seq per row, groups of ``group_size`` consecutive rows; 0 in a zero-variance group.  ``unbiased``:
    Bessel's correction, as TRL ((r - mean) / (std + 1e-4)) and verl ((r - mean) / (std + 1e-6)) write it."""
    r = rewards.double().view(-1, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if std_normalize:
        centered = centered / (r.std(dim=1, unbiased=unbiased, keepdim=True) + eps)
    same = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(same, torch.zeros_like(centered), centered).reshape(-1)


def position_buckets(mask, K):
    """b = ceil(K * (index of the completion token, from 1) / n_i) - 1, computed with exact integers."""
    out = torch.zeros(mask.shape, dtype=torch.long)
    for i, row in enumerate(mask.bool().tolist()):
        n, seen = max(sum(row), 1), 0
        for t, on in enumerate(row):
            seen += on
            out[i, t] = min(max(-(-seen * K // n) - 1, 0), K - 1)
    return out


def erpo_advantages(rewards, mask, entropy, lp_old, lp_ref, group_size, K=10, gamma=5.0, lam=0.1, eta=0.2,
                    std_normalize=True, ep_grpo_fallback=False, reward_threshold=0.5):
    """ERPO token advantages with a sigmoid gate over each group and position buckets (ERPO_SPEC.md (i)-(iii)):
    W = sigmoid(gamma z), z the group-z-scored entropy; s = lam (lp_old - lp_ref) z-scored inside each
    (group, bucket) cell (0 for cells of one token or zero spread); A = (W A_seq + eta W d s) * mask."""
    m = mask.bool()
    a_seq = outcome_advantage(rewards, group_size, std_normalize)
    direction = torch.sign(a_seq)
    if ep_grpo_fallback:
        r = rewards.double().view(-1, group_size)
        same = (r == r[:, :1]).all(dim=1, keepdim=True).expand_as(r).reshape(-1)
        direction = torch.where(same, torch.sign(rewards.double() - reward_threshold), direction)
    gate = torch.zeros(m.shape, dtype=torch.float64)
    signal = torch.zeros(m.shape, dtype=torch.float64)
    buckets = position_buckets(m, K)
    s = lam * (lp_old.double() - lp_ref.double())
    for g in range(m.shape[0] // group_size):
        rows = slice(g * group_size, (g + 1) * group_size)
        h = entropy[rows].double()[m[rows]]
        if h.numel():
            mu, sigma = h.mean(), h.std(unbiased=False)
            z = (entropy[rows].double() - mu) / (sigma + EPS) if sigma > EPS else torch.zeros_like(entropy[rows].double())
            gate[rows] = torch.sigmoid(gamma * z) * m[rows]
        for k in range(K):
            cell = m[rows] & (buckets[rows] == k)
            values = s[rows][cell]
            if values.numel() >= 2 and values.std(unbiased=False) > EPS:
                block = signal[rows]
                block[cell] = (values - values.mean()) / (values.std(unbiased=False) + EPS)
                signal[rows] = block
    adv = gate * a_seq[:, None] + eta * gate * direction[:, None] * signal
    return adv * m


def sigmoid_gate_value(h, mu, sigma, gamma=5.0):
    """One token's gate, for hand-computed cases."""
    z = (h - mu) / (sigma + EPS)
    return 1.0 / (1.0 + math.exp(-gamma * z))

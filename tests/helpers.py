"""Shared test helpers, the one place for test inputs: an assert that reports the max error, where it is and
how many mismatch, and the builders of fresh random inputs (never zeros) every test module draws from.

- :func:`make_linear_inputs`: hidden [N, H], weight [V, H], bias [V], targets [N] (the kernels' operands)
- :func:`make_token_inputs`: rewards [B], mask / entropy / old and ref log-probs [B, T], group ids (advantages)
- :func:`make_surrogate_inputs`: log-probs, entropy, advantages, old / ref log-probs, upstream grads (surrogate)
- :func:`make_batch`: everything ``erpo_loss`` takes, old/ref statistics from perturbed hidden states
"""
from __future__ import annotations

import os

import torch

from erpo_kernels import ERPOConfig, token_stats


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6,
                 name: str = "tensor", scaled: bool = False) -> None:
    """torch.testing-style closeness, with a message giving max abs error, its index and mismatch count.

    ``scaled``: atol is relative to max|expected| (for sums whose terms cancel, e.g. gradients).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if scaled and e.numel():
        atol = atol * float(e.abs().max())
    assert bool(torch.isfinite(a).all() == torch.isfinite(e).all()), f"{name}: non-finite values differ"
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bool(bad.any()):
        flat = int(err.reshape(-1).argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatched (rtol={rtol}, atol={atol}); max abs error "
            f"{float(err.max()):.3e} at {index}: got {float(a.reshape(-1)[flat]):.8g}, "
            f"expected {float(e.reshape(-1)[flat]):.8g}")


def triton_device() -> str:
    """Where the "triton" backend runs in a test: the CPU under the interpreter (tests/conftest.py sets it without
    CUDA; spawned ranks inherit the environment), else the GPU (gloo all-reduces CUDA tensors too)."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def make_linear_inputs(n_tokens, dim, vocab, dtype=torch.float32, with_bias=True, seed=0, device="cpu",
                       ignore_index=-100, ignore_every=5, bias_shift=0.0, weight_scale=2.0):
    """Fresh random (hidden [N, H], weight [V, H], bias [V] or None, targets [N]) in ``dtype``: logits of
    order 1-3 (weight ~ weight_scale / sqrt(H)), every ``ignore_every``-th target set to ``ignore_index``,
    bias shifted by ``bias_shift``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * (weight_scale / dim ** 0.5)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.5 + bias_shift if with_bias else None
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen)
    if ignore_every:
        targets[::ignore_every] = ignore_index
    cast = [x.to(device=device, dtype=dtype) if x is not None else None for x in (hidden, weight, bias)]
    return (*cast, targets.to(device))


def make_token_inputs(B=10, T=37, group_sizes=(4, 3, 3), seed=0, mask_frac=0.25, dtype=torch.float32,
                      zero_variance_group=1, odd_rows=True, permute=True):
    """Per-token inputs of the advantage synthesis: rewards [B], mask / old_entropy / old_logprobs /
    ref_logprobs [B, T], group_ids [B].

    Group 0 always has reward variance; group ``zero_variance_group`` (if it exists; None for none) has all
    rewards equal; with ``odd_rows`` row 3 is fully masked and row 5 has one completion token; with
    ``permute`` the rows are shuffled and the group ids are arbitrary non-consecutive integers.
    """
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=gen) > mask_frac
    mask[:, 0] = True
    gid = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    rewards = torch.randint(0, 2, (B,), generator=gen).double() + 0.1 * torch.randn(B, generator=gen, dtype=torch.float64)
    rewards[0], rewards[1 % group_sizes[0]] = 1.0, 0.0          # group 0 has variance
    if zero_variance_group is not None and zero_variance_group < len(group_sizes):
        start = sum(group_sizes[:zero_variance_group])
        rewards[start:start + group_sizes[zero_variance_group]] = 1.0
    if odd_rows and B > 5:
        mask[3] = False
        mask[5] = False
        mask[5, T // 2] = True
    entropy = torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 + 0.01
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 4
    ref = (old - 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    perm = torch.randperm(B, generator=gen) if permute else torch.arange(B)
    ids = gid[perm] * 7 + 3 if permute else gid
    cast = lambda x: x[perm].to(dtype)  # noqa: E731
    return dict(rewards=cast(rewards), mask=mask[perm], group_ids=ids, old_entropy=cast(entropy),
                old_logprobs=cast(old), ref_logprobs=cast(ref))


def make_surrogate_inputs(shape=(7, 23), seed=0, spread=0.8):
    """lp = lp_old + spread * noise (ratios below, inside and above the clip range), A of both signs, and an
    upstream gradient that is not all ones."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(shape, generator=gen) * 4 - 0.01
    lp = old + spread * torch.randn(shape, generator=gen)
    ref = old - 0.3 * torch.randn(shape, generator=gen)
    entropy = torch.rand(shape, generator=gen) * 3
    adv = torch.randn(shape, generator=gen)
    upstream = torch.randn(shape, generator=gen)
    return dict(lp=lp, entropy=entropy, adv=adv, old=old, ref=ref, upstream=upstream)


# Scale of the hidden-state perturbation that makes the old policy of make_batch: 0.05 keeps every ratio
# within ~0.75-1.25 (little clipping); WIDE_DRIFT puts many ratios outside the clip range and past the dual
# clip bound, so tests that claim to exercise clipping, the dual clip or the KL really do.
WIDE_DRIFT = 1.0


def make_batch(B=8, T=12, H=16, V=37, G=4, dtype=torch.float32, seed=0, mask_frac=0.2, with_bias=False,
               ignore_frac=0.0, drift=0.05, ref_drift=0.1):
    """Fresh random inputs for the loss: hidden, weight, bias, targets, mask, rewards, group ids, and old/ref
    statistics from hidden states perturbed by ``drift`` / ``ref_drift`` (so ratios are not all 1).  Every
    group has reward variance (a zero-variance group is a test's explicit choice)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H ** 0.5 * 2
    bias = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5 if with_bias else None
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > mask_frac
    mask[:, 0] = True  # every row has at least one completion token
    if ignore_frac:
        targets[torch.rand(B, T, generator=gen) < ignore_frac] = -100
    rewards = torch.randint(0, 2, (B,), generator=gen).double()
    rewards[::G], rewards[1::G] = 1.0, 0.0
    group_ids = torch.arange(B) // G
    with torch.no_grad():
        old = token_stats(hidden + drift * torch.randn(B, T, H, generator=gen, dtype=torch.float64), weight,
                          targets.clamp_min(0), bias=bias)
        ref = token_stats(hidden + ref_drift * torch.randn(B, T, H, generator=gen, dtype=torch.float64), weight,
                          targets.clamp_min(0), bias=bias)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return dict(hidden=cast(hidden), weight=cast(weight), bias=cast(bias), targets=targets, mask=mask,
                rewards=rewards.float(), group_ids=group_ids, old_logprobs=old.logprobs.float(),
                ref_logprobs=ref.logprobs.float(), old_entropy=old.entropy.float())


def small_config(**overrides) -> ERPOConfig:
    """ERPOConfig with few buckets, so the small test batches fill each (group, bucket) cell."""
    overrides.setdefault("num_buckets", 3)
    return ERPOConfig(**overrides)


# Advantage-synthesis variants every advantage backend is checked on (ids are the keys).
ADVANTAGE_CONFIGS = {
    "erpo": small_config(),
    "ep_grpo": small_config(mode="ep_grpo"),
    "grpo": small_config(mode="grpo"),
    "dapo": small_config(mode="dapo"),
    "dr_grpo": small_config(mode="dr_grpo"),
    "batch_scope": small_config(gate_scope="batch"),
    "sequence_scope_normalize": small_config(gate_scope="sequence", gate_normalize=True),
    "group_scope_normalize": small_config(gate_normalize=True, gate_gamma=2.0),
    "topk_fallback": small_config(gate="topk", gate_top_frac=0.3, gate_normalize=True),
    "no_bucket_normalize": small_config(bucket_normalize=False),
    "cap": small_config(progress_cap_kappa=2.0),
    "ep_grpo_cap_position": small_config(mode="ep_grpo", progress="position", progress_cap_kappa=1.5,
                                         num_buckets=5),
    "erpo_cum_entropy": small_config(progress="cum_entropy", num_buckets=4),
    "one_bucket": small_config(num_buckets=1),
    "many_buckets": small_config(mode="ep_grpo", num_buckets=23),
    "no_progress_term": small_config(progress_term=False),
    "topk_group": small_config(gate="topk", gate_top_frac=0.3),
    "topk_batch": small_config(gate="topk", gate_scope="batch"),
    "ep_grpo_cap": small_config(mode="ep_grpo", progress_cap_kappa=1.5, num_buckets=5),
    "global_scope_one_process": small_config(gate_scope="global"),
    "grpo_trl_std": small_config(mode="grpo", reward_std="unbiased", reward_std_eps=1e-4),
}

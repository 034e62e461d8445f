"""Shared test helpers: one assert that reports the max error, where it is and how many mismatch."""
from __future__ import annotations

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


def make_batch(B=8, T=12, H=16, V=37, G=4, dtype=torch.float32, seed=0, mask_frac=0.2, with_bias=False,
               ignore_frac=0.0):
    """Fresh random inputs (never zeros) for the loss: hidden, weight, bias, targets, mask, rewards,
    group ids, and old/ref statistics from perturbed hidden states (so ratios are not all 1)."""
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
    group_ids = torch.arange(B) // G
    with torch.no_grad():
        old = token_stats(hidden + 0.05 * torch.randn(B, T, H, generator=gen, dtype=torch.float64), weight,
                          targets.clamp_min(0), bias=bias)
        ref = token_stats(hidden + 0.1 * torch.randn(B, T, H, generator=gen, dtype=torch.float64), weight,
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
    "no_progress_term": small_config(progress_term=False),    "topk_group": small_config(gate="topk", gate_top_frac=0.3),
    "topk_batch": small_config(gate="topk", gate_scope="batch"),
    "ep_grpo_cap": small_config(mode="ep_grpo", progress_cap_kappa=1.5, num_buckets=5),
    "global_scope_one_process": small_config(gate_scope="global"),
}

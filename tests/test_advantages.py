"""Advantage synthesis: the properties ERPO_SPEC.md states, and vectorized == reference."""
import pytest
import torch

from erpo_kernels import ERPOConfig, erpo_advantages, reference
from erpo_kernels.advantages import token_advantages
from tests.helpers import ADVANTAGE_CONFIGS as CONFIGS
from tests.helpers import assert_close, make_token_inputs, small_config


def _inputs(B=8, T=16, G=4, seed=0, mask_frac=0.25, dtype=torch.float64):
    """(rewards, mask, group ids, entropy, old, ref) in ``dtype``: B // G consecutive groups of G rows, group 0
    with reward variance, no forced zero-variance group (the tests that want one set it)."""
    x = make_token_inputs(B=B, T=T, group_sizes=(G,) * (B // G), seed=seed, mask_frac=mask_frac, dtype=dtype,
                          zero_variance_group=None, odd_rows=False, permute=False)
    return x["rewards"], x["mask"], x["group_ids"], x["old_entropy"], x["old_logprobs"], x["ref_logprobs"]


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorized_matches_reference(config, seed):
    rewards, mask, gid, ent, old, ref = _inputs(seed=seed)
    gid = gid[torch.randperm(len(gid), generator=torch.Generator().manual_seed(seed))] * 7 + 3  # any ids
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(9), dtype=ent.dtype) + 0.5
    expected = reference.token_advantages(rewards, mask, gid, ent, old, ref, config, weights)
    got = token_advantages(rewards, mask, gid, ent, old, ref, config, weights)
    for name in ("advantages", "gate", "seq_advantage", "signal", "bucket"):
        assert_close(getattr(got, name), expected[name], rtol=1e-10, atol=1e-12, name=name)
    assert torch.equal(got.zero_var, expected["zero_var"])


def test_equal_old_and_ref_gives_gated_outcome_advantage():
    rewards, mask, gid, ent, old, _ = _inputs()
    out = erpo_advantages(rewards, mask, ent, old, old.clone(), group_size=4, config=small_config())
    assert_close(out.advantages, out.gate * out.seq_advantage[:, None] * mask, name="A")


def test_zero_variance_group_erpo_zero_ep_grpo_nonzero():
    rewards, mask, gid, ent, old, ref = _inputs()
    rewards[4:] = 1.0  # group 1 all correct
    erpo = erpo_advantages(rewards, mask, ent, old, ref, group_size=4, config=small_config())
    ep = erpo_advantages(rewards, mask, ent, old, ref, group_size=4, config=small_config(mode="ep_grpo"))
    assert bool((erpo.advantages[4:] == 0).all()) and bool(erpo.zero_var[4:].all())
    assert float(ep.advantages[4:].abs().sum()) > 0
    assert bool((ep.seq_advantage[4:] == 0).all())  # A_seq is 0 in every mode; only Psi flows


def test_bucket_signal_mean0_std1_and_lambda_invariant():
    rewards, mask, gid, ent, old, ref = _inputs(B=8, T=40)
    cfg = small_config(num_buckets=4)
    a = erpo_advantages(rewards, mask, ent, old, ref, group_size=4, config=cfg)
    b = erpo_advantages(rewards, mask, ent, old, ref, group_size=4, config=cfg.replace(progress_lambda=3.7))
    # invariant up to the eps in (sigma + eps): relative effect eps / sigma ~ 1e-4 at lambda = 0.1
    assert_close(a.signal, b.signal, rtol=1e-3, atol=1e-6, name="signal vs lambda")
    assert_close(a.advantages, b.advantages, rtol=1e-3, atol=1e-6, name="A vs lambda")
    checked = 0
    for g in range(2):
        for k in range(4):
            cell = mask & (gid == g)[:, None] & (a.bucket == k)
            if int(cell.sum()) >= 2:
                values = a.signal[cell]
                assert abs(float(values.mean())) < 1e-9
                assert abs(float(values.std(unbiased=False)) - 1.0) < 1e-3
                checked += 1
    assert checked == 8


def test_constant_entropy_gives_half_gate():
    rewards, mask, gid, _, old, ref = _inputs()
    ent = torch.full(mask.shape, 1.3, dtype=torch.float64)
    out = erpo_advantages(rewards, mask, ent, old, ref, group_size=4, config=small_config())
    assert_close(out.gate[mask], torch.full_like(out.gate[mask], 0.5), name="gate")


def test_padding_changes_nothing():
    rewards, mask, gid, ent, old, ref = _inputs(T=12)
    cfg = small_config(mode="ep_grpo")
    base = erpo_advantages(rewards, mask, ent, old, ref, group_size=4, config=cfg)
    pad = lambda x, v: torch.cat([x, torch.full((x.shape[0], 7), v, dtype=x.dtype)], 1)  # noqa: E731
    padded = erpo_advantages(rewards, pad(mask, False), pad(ent, 99.0), pad(old, -50.0), pad(ref, -1.0),
                             group_size=4, config=cfg)
    assert_close(padded.advantages[:, :12], base.advantages, rtol=1e-12, atol=1e-14, name="A")
    assert bool((padded.advantages[:, 12:] == 0).all())
    # masked-out garbage inside the sequence does not matter either
    garbage = ent.clone()
    garbage[~mask] = 1e3
    again = erpo_advantages(rewards, mask, garbage, old, ref, group_size=4, config=cfg)
    assert_close(again.advantages, base.advantages, rtol=1e-12, atol=1e-14, name="A")


@pytest.mark.parametrize("progress", ["position", "cum_entropy"])
def test_buckets_monotone_and_last_token_in_last_bucket(progress):
    rewards, mask, gid, ent, old, ref = _inputs(T=30)
    cfg = small_config(num_buckets=7, progress=progress)
    bucket = reference.bucket_index(mask, ent, cfg)
    for i in range(mask.shape[0]):
        b = bucket[i][mask[i]]
        assert bool((b[1:] >= b[:-1]).all())
        assert int(b[-1]) == 6 and int(b.min()) >= 0


def test_position_buckets_are_exact_fractions():
    mask = torch.ones(1, 10, dtype=torch.bool)
    bucket = reference.bucket_index(mask, torch.ones(1, 10), ERPOConfig(num_buckets=10))
    assert bucket.tolist() == [list(range(10))]  # no float rounding pushes 3/10 * 10 into bucket 3


def test_groups_are_independent():
    rewards, mask, gid, ent, old, ref = _inputs()
    cfg = small_config(mode="ep_grpo")
    full = erpo_advantages(rewards, mask, ent, old, ref, group_size=4, config=cfg)
    rewards2, ent2, old2 = rewards.clone(), ent.clone(), old.clone()
    rewards2[4:] = 1 - rewards2[4:]
    ent2[4:] *= 3
    old2[4:] -= 1
    other = erpo_advantages(rewards2, mask, ent2, old2, ref, group_size=4, config=cfg)
    assert_close(other.advantages[:4], full.advantages[:4], rtol=1e-12, atol=1e-14, name="group 0")


def test_one_token_responses_and_masked_rows_are_finite():
    rewards, mask, gid, ent, old, ref = _inputs(T=1)
    mask[1] = False
    for mode in ("erpo", "ep_grpo"):
        out = erpo_advantages(rewards, mask, ent, old, ref, group_size=4, config=small_config(mode=mode))
        assert bool(torch.isfinite(out.advantages).all())
        assert bool((out.advantages[1] == 0).all())


def test_topk_gate_keeps_top_fraction():
    rewards, mask, gid, ent, old, ref = _inputs(B=4, T=50, G=4, mask_frac=0.0)
    out = erpo_advantages(rewards, mask, ent, old, ref, group_size=4,
                          config=small_config(gate="topk", gate_scope="batch", gate_top_frac=0.2))
    kept = out.gate[mask] > 0
    assert int(kept.sum()) == 40  # 20% of 200 continuous values: no ties
    assert float(ent[mask][kept].min()) >= float(ent[mask][~kept].max())


def test_gates_and_token_weights_given_by_caller():
    rewards, mask, gid, ent, old, ref = _inputs()
    gates = torch.rand(mask.shape, dtype=torch.float64)
    weights = torch.rand(mask.shape, dtype=torch.float64)
    cfg = small_config(progress_term=False)
    out = erpo_advantages(rewards, mask, ent, old, ref, group_size=4, config=cfg, gates=gates,
                          token_weights=weights)
    assert_close(out.advantages, gates * out.seq_advantage[:, None] * weights * mask, name="A")


def test_dr_grpo_outcome_advantage_has_no_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    a = reference.outcome_advantage(rewards, torch.zeros(4, dtype=torch.long), ERPOConfig(mode="dr_grpo"))
    assert_close(a, torch.tensor([0.75, -0.25, -0.25, -0.25]), name="A_seq")
    b = reference.outcome_advantage(rewards, torch.zeros(4, dtype=torch.long), ERPOConfig(mode="grpo"))
    assert_close(b, (rewards - 0.25) / (rewards.std(unbiased=False) + 1e-6), name="A_seq")


def test_cap_bounds_progress_but_keeps_ep_grpo_fallback():
    rewards, mask, gid, ent, old, ref = _inputs()
    rewards[4:] = 1.0  # zero-variance group
    cfg = small_config(mode="ep_grpo", progress_cap_kappa=4.0)
    out = erpo_advantages(rewards, mask, ent, old, ref, group_size=4, config=cfg)
    outcome = out.gate * out.seq_advantage[:, None]
    assert bool(((out.advantages[:4] - outcome[:4]).abs() <= outcome[:4].abs() / 4.0 + 1e-12).all())
    assert float(out.advantages[4:].abs().sum()) > 0

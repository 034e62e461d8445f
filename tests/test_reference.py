"""The oracle everything is compared with: reference.py against hand-computed small cases and the hand-written
twins of tests/twins.py (which share no code with the package)."""
import math

import pytest
import torch

from erpo_kernels import reference
from erpo_kernels.config import AGGREGATIONS, ERPOConfig
from tests import twins
from tests.helpers import assert_close, make_surrogate_inputs, make_token_inputs


# --- token statistics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_stats_hand_computed(temperature):
    """logits [0, ln 2, ln 3] (H = 1): p = [1, 2, 3] / 6 at T = 1 and [1, 4, 9] / 14 at T = 0.5."""
    hidden = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [math.log(2)], [math.log(3)]], dtype=torch.float64)
    targets = torch.tensor([2, -100])
    lp, entropy, lse = reference.token_stats(hidden, weight, None, targets, temperature)
    weights = [1.0, 2.0, 3.0] if temperature == 1.0 else [1.0, 4.0, 9.0]
    p = [w / sum(weights) for w in weights]
    assert lp.tolist() == pytest.approx([math.log(p[2]), 0.0], abs=1e-12)
    assert entropy.tolist() == pytest.approx([-sum(x * math.log(x) for x in p)] * 2, abs=1e-12)
    assert lse.tolist() == pytest.approx([math.log(sum(weights))] * 2, abs=1e-12)


# --- outcome advantage and gate -----------------------------------------------------------------------------
def test_outcome_advantage_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    groups = torch.arange(8) // 4
    std = math.sqrt(0.75 * 0.25)
    expected = [0.75 / (std + 1e-6)] + [-0.25 / (std + 1e-6)] * 3 + [0.0] * 4   # group 1: zero variance
    assert reference.outcome_advantage(rewards, groups, ERPOConfig(mode="grpo")).tolist() == pytest.approx(expected)
    no_std = reference.outcome_advantage(rewards, groups, ERPOConfig(mode="dr_grpo"))
    assert no_std.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_unbiased_reward_std_as_trl_and_verl():
    """TRL: (r - mean) / (std_unbiased + 1e-4); verl: the same with 1e-6 (Bessel's correction both)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    std = math.sqrt(0.75 * 0.25 * 4 / 3)
    config = ERPOConfig(mode="grpo", reward_std="unbiased", reward_std_eps=1e-4)
    got = reference.outcome_advantage(rewards, torch.zeros(4, dtype=torch.long), config)
    assert got.tolist() == pytest.approx([0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3)
    assert_close(got, twins.outcome_advantage(rewards, 4, unbiased=True, eps=1e-4), rtol=1e-12, name="A_seq")


def test_sigmoid_and_topk_gate_hand_computed():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])                 # the 9.0 is padding
    groups = torch.zeros(1, dtype=torch.long)
    gate = reference.entropy_gate(entropy, mask, groups, ERPOConfig())
    sigma = math.sqrt(2 / 3)
    expected = [twins.sigmoid_gate_value(h, 2.0, sigma) for h in (1.0, 2.0, 3.0)] + [0.0]
    assert gate[0].tolist() == pytest.approx(expected, abs=1e-12)
    flat = reference.entropy_gate(torch.full((1, 4), 1.3, dtype=torch.float64), mask, groups, ERPOConfig())
    assert flat[0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.0])   # sigma = 0: z = 0
    values = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.7]], dtype=torch.float64)
    top = reference.entropy_gate(values, torch.ones(1, 5, dtype=torch.bool), groups,
                                 ERPOConfig(gate="topk", gate_top_frac=0.4))
    assert top[0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]              # k = ceil(0.4 * 5) = 2


# --- buckets: hand-computed, on every implementation --------------------------------------------------------
def _bucket_implementations():
    from erpo_kernels.advantages import bucket_index as vectorized

    def triton(mask, entropy, config):
        from erpo_kernels.ops.buckets import buckets_index
        return buckets_index(mask.contiguous(), entropy.contiguous(), config)

    return {"reference": reference.bucket_index, "vectorized": vectorized, "triton": triton}


BUCKET_CASES = {
    # name: (mask row, entropy row, K, progress, expected buckets)
    "exact_tenths": ([1] * 10, [1.0] * 10, 10, "position", list(range(10))),
    "three_tokens_ten_buckets": ([1, 1, 1], [1.0] * 3, 10, "position", [3, 6, 9]),
    "ties_at_edges_go_down": ([1, 1, 1, 1], [1.0] * 4, 2, "position", [0, 0, 1, 1]),
    "masked_gap": ([1, 0, 1, 1], [1.0] * 4, 3, "position", [0, 0, 1, 2]),
    "one_token_response": ([0, 1, 0], [1.0] * 3, 4, "position", [0, 3, 3]),
    "cum_entropy_edges": ([1, 1, 1], [1.0, 1.0, 2.0], 4, "cum_entropy", [0, 1, 3]),
    # tau = 0.098, 0.102, 1: a 5% error in the total moves the first or the second token across 0.1
    "cum_entropy_near_edges": ([1, 1, 1], [0.098, 0.004, 0.898], 10, "cum_entropy", [0, 1, 9]),
    "cum_entropy_ignores_padding": ([1, 0, 1], [1.0, 50.0, 3.0], 4, "cum_entropy", [0, 0, 3]),
    "cum_entropy_zero_falls_back": ([1, 1, 1, 1], [0.0] * 4, 2, "cum_entropy", [0, 0, 1, 1]),
}


@pytest.mark.parametrize("implementation", ["reference", "vectorized", "triton"])
@pytest.mark.parametrize("case", list(BUCKET_CASES), ids=list(BUCKET_CASES))
def test_bucket_index_hand_computed(case, implementation):
    mask, entropy, K, progress, expected = BUCKET_CASES[case]
    config = ERPOConfig(num_buckets=K, progress=progress)
    fn = _bucket_implementations()[implementation]
    got = fn(torch.tensor([mask], dtype=torch.bool), torch.tensor([entropy], dtype=torch.float64), config)
    valid = [e for e, m in zip(expected, mask) if m]
    assert [b for b, m in zip(got[0].tolist(), mask) if m] == valid


def test_bucket_signal_hand_computed():
    """One group of two rows, two buckets: cell 0 holds s = [1, 3] -> z = [-1, 1]; cell 1 a single token -> 0."""
    mask = torch.tensor([[True, True], [True, False]])
    bucket = torch.tensor([[0, 1], [0, 0]])
    signal = torch.tensor([[1.0, 5.0], [3.0, 7.0]], dtype=torch.float64)
    out = reference.bucket_normalized_signal(signal, mask, torch.zeros(2, dtype=torch.long), bucket,
                                             ERPOConfig(num_buckets=2))
    assert out.reshape(-1).tolist() == pytest.approx([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0])


@pytest.mark.parametrize("mode", ["erpo", "ep_grpo", "grpo"])
def test_token_advantages_equal_twin(mode):
    x = make_token_inputs(B=8, T=14, group_sizes=(4, 4), seed=3, permute=False, odd_rows=True, dtype=torch.float64)
    config = ERPOConfig(mode=mode, num_buckets=3, progress="position")
    got = reference.token_advantages(x["rewards"], x["mask"], x["group_ids"], x["old_entropy"], x["old_logprobs"],
                                     x["ref_logprobs"], config)["advantages"]
    if mode == "grpo":
        expected = twins.outcome_advantage(x["rewards"], 4)[:, None] * x["mask"]
    else:
        expected = twins.erpo_advantages(x["rewards"], x["mask"], x["old_entropy"], x["old_logprobs"],
                                         x["ref_logprobs"], group_size=4, K=3, ep_grpo_fallback=mode == "ep_grpo")
    assert float(expected.abs().sum()) > 0
    assert_close(got, expected, rtol=1e-10, atol=1e-12, name="advantages")


# --- surrogate and aggregation -----------------------------------------------------------------------------
SURROGATE_TERMS = {
    "clip_higher": dict(),
    "symmetric_clip": dict(eps_high=0.2),
    "dual_clip": dict(dual_clip_c=3.0),
    "kl": dict(kl_beta=0.1),
    "entropy_bonus": dict(entropy_coef=0.05),
    "everything": dict(dual_clip_c=1.5, kl_beta=0.05, entropy_coef=0.02, eps_low=0.3),
}


@pytest.mark.parametrize("terms", list(SURROGATE_TERMS), ids=list(SURROGATE_TERMS))
def test_per_token_loss_equals_twin(terms):
    x = {k: v.double() for k, v in make_surrogate_inputs(seed=list(SURROGATE_TERMS).index(terms)).items()}
    config = ERPOConfig(**SURROGATE_TERMS[terms])
    lp = x["lp"].clone().requires_grad_()
    entropy = x["entropy"].clone().requires_grad_()
    got, info = reference.per_token_loss(lp, entropy, x["adv"], x["old"], x["ref"], config)
    (got * x["upstream"]).sum().backward()
    lp2, entropy2 = x["lp"].clone().requires_grad_(), x["entropy"].clone().requires_grad_()
    expected = twins.token_loss(lp2, x["adv"], x["old"], x["ref"], entropy2, config.eps_low, config.eps_high,
                                config.dual_clip_c, config.kl_beta, config.entropy_coef)
    (expected * x["upstream"]).sum().backward()
    assert_close(got, expected, rtol=1e-12, atol=1e-12, name="token loss")
    assert_close(lp.grad, lp2.grad, rtol=1e-12, atol=1e-12, name="d/dlp")
    if config.entropy_coef:
        assert_close(entropy.grad, entropy2.grad, rtol=1e-12, atol=1e-12, name="d/dH")
    # the data reaches every branch the case claims to test
    assert bool(info["clip_low"].any()) and bool(info["clip_high"].any())
    if config.dual_clip_c is not None:
        assert bool(info["dual_clip"].any())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("holder_p,max_length", [(2.0, None), (3.0, 40), (1.0, None)], ids=["p2", "p3_L40", "p1"])
def test_aggregate_equals_twin(aggregation, holder_p, max_length):
    gen = torch.Generator().manual_seed(AGGREGATIONS.index(aggregation) + int(10 * holder_p))
    L = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    m = torch.rand(6, 9, generator=gen) > 0.3
    m[2] = False                                                     # a fully masked row counts in B
    m[4] = False
    m[4, 0] = True                                                   # a one-token row
    config = ERPOConfig(aggregation=aggregation, holder_p=holder_p, max_length=max_length)
    got = reference.aggregate(L, m, config)
    expected = twins.aggregate(L, m, aggregation, max_length, holder_p)
    assert float(got) == pytest.approx(float(expected), rel=1e-12, abs=1e-14)


def test_whole_reference_loss_equals_twin():
    """reference.erpo_loss = aggregate(twin token loss on twin log-probs with the twin's ERPO advantages)."""
    from tests.helpers import WIDE_DRIFT, make_batch

    b = make_batch(B=8, T=10, H=12, V=23, G=4, dtype=torch.float64, seed=5, drift=WIDE_DRIFT)
    config = ERPOConfig(mode="erpo", num_buckets=3, kl_beta=0.05, entropy_coef=0.01, dual_clip_c=2.0,
                        aggregation="seq_mean_token_sum")
    d = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in b.items()}
    loss, parts = reference.erpo_loss(d["hidden"], d["weight"], d["targets"], d["mask"], d["rewards"],
                                      d["group_ids"], d["old_logprobs"], d["ref_logprobs"], d["old_entropy"], config)
    lp, entropy = twins.logprobs_and_entropy(d["hidden"], d["weight"], d["targets"])
    adv = twins.erpo_advantages(d["rewards"], d["mask"], d["old_entropy"], d["old_logprobs"], d["ref_logprobs"], 4, K=3)
    L = twins.token_loss(lp, adv, d["old_logprobs"], d["ref_logprobs"], entropy, dual_clip_c=2.0, kl_beta=0.05,
                         entropy_coef=0.01)
    expected = twins.seq_mean_token_sum(L, d["mask"])
    assert float(loss) == pytest.approx(float(expected), rel=1e-10)
    assert bool(parts["dual_clip"].any()) and bool(parts["clip_low"].any()) and bool(parts["clip_high"].any())

"""ops.buckets: the Triton advantage synthesis against the reference oracle (float64) and the torch twin."""
import pytest
import torch

from erpo_kernels import reference
from erpo_kernels.advantages import compute_advantages, token_advantages
from erpo_kernels.ops.buckets import token_advantages_triton
from tests.helpers import ADVANTAGE_CONFIGS as CONFIGS
from tests.helpers import assert_close, make_token_inputs, small_config

FIELDS = ("advantages", "gate", "seq_advantage", "signal")


def _inputs(B=10, T=37, group_sizes=(4, 3, 3), seed=0, mask_frac=0.25):
    """float32 inputs: a zero-variance group, permuted non-consecutive group ids, a fully masked row and a
    one-token row (see tests.helpers.make_token_inputs)."""
    return make_token_inputs(B=B, T=T, group_sizes=group_sizes, seed=seed, mask_frac=mask_frac)


def _check(inputs, config, token_weights=None, gates=None, rtol=1e-5, atol=2e-6, device="cpu"):
    """Triton (on ``device``) against the float64 reference and the float32 twin (both on the CPU)."""
    x = inputs
    args = (x["rewards"], x["mask"], x["group_ids"], x["old_entropy"], x["old_logprobs"], x["ref_logprobs"])
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = token_advantages_triton(*map(on, args), config, on(token_weights), on(gates))
    got = type(got)(*(t.cpu() for t in got))
    d = lambda t: None if t is None or t.dtype == torch.bool or not t.is_floating_point() else t.double()  # noqa
    expected = reference.token_advantages(x["rewards"].double(), x["mask"], x["group_ids"], *map(d, args[3:]),
                                          config, d(token_weights), d(gates))
    for name in FIELDS:
        assert getattr(got, name).dtype == x["old_entropy"].dtype, name
        assert_close(getattr(got, name), expected[name], rtol=rtol, atol=atol, name=name)
    assert torch.equal(got.bucket, expected["bucket"]), "bucket"
    assert torch.equal(got.zero_var, expected["zero_var"]), "zero_var"
    twin = token_advantages(*args, config, token_weights, gates)   # float32 torch twin: same buckets exactly
    assert torch.equal(got.bucket, twin.bucket), "bucket vs twin"
    return got


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_matches_reference(config, device):
    _check(_inputs(seed=list(CONFIGS.values()).index(config) % 3), config, device=device)


@pytest.mark.parametrize("seed", [1, 2])
def test_token_weights_and_given_gates(seed, device):
    x = _inputs(seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    weights = torch.rand(x["mask"].shape, generator=gen) + 0.5
    gates = torch.rand(x["mask"].shape, generator=gen) * 2
    _check(x, small_config(mode="ep_grpo", progress_cap_kappa=3.0), token_weights=weights, gates=gates,
           device=device)


def test_without_reference_logprobs_progress_is_zero(device):
    x = _inputs(seed=3)
    x["ref_logprobs"] = None
    got = _check(x, small_config(), device=device)
    assert bool((got.signal == 0).all())


@pytest.mark.parametrize("shape", [dict(B=1, T=1, group_sizes=(1,)), dict(B=3, T=1, group_sizes=(2, 1)),
                                   dict(B=19, T=5, group_sizes=(17, 2))],
                         ids=["single_token", "T1", "group_larger_than_block"])
def test_odd_shapes(shape, device):
    for config in (small_config(mode="ep_grpo", gate_normalize=True), small_config(gate_scope="batch")):
        _check(_inputs(**shape, seed=4), config, device=device)


def test_float64_inputs_match_reference_tightly(device):
    x = {k: (v.double() if v.is_floating_point() else v) for k, v in _inputs(seed=5).items()}
    got = _check(x, small_config(mode="ep_grpo", gate_normalize=True, progress_cap_kappa=2.0),
                 rtol=1e-10, atol=1e-12, device=device)
    assert got.advantages.dtype == torch.float64


def test_cum_entropy_zero_row_falls_back_to_position(device):
    x = _inputs(seed=6)
    x["old_entropy"][2] = 0.0
    _check(x, small_config(mode="ep_grpo", num_buckets=4), device=device)


def test_compute_advantages_dispatches_to_triton(device):
    x = {k: v.to(device) for k, v in _inputs(seed=7).items()}
    config = small_config(mode="ep_grpo")
    args = (x["rewards"], x["mask"], x["group_ids"], x["old_entropy"], x["old_logprobs"], x["ref_logprobs"], config)
    got = compute_advantages(*args, backend="triton")
    twin = compute_advantages(*args, backend="chunked")
    for name in FIELDS:
        assert_close(getattr(got, name), getattr(twin, name), name=name)
    assert torch.equal(got.bucket, twin.bucket)

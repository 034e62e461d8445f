"""``ops.linear_stats.linear_stats_fwd`` against the float64 full-logits oracle (``reference.token_stats``)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from erpo_kernels import reference
from erpo_kernels.ops._jit_helpers import _grouped_program
from erpo_kernels.ops.linear_stats import linear_stats_fwd
from tests.helpers import assert_close


def reference_stats(hidden, weight, bias, targets, temperature=1.0, ignore_index=-100):
    """Float64 full-logits statistics of the given (possibly bf16-rounded) inputs, on the CPU."""
    up = [x.detach().cpu().double() if x is not None else None for x in (hidden, weight, bias)]
    return reference.token_stats(*up, targets.cpu(), temperature, ignore_index)


def check_stats(got, expected, targets, ignore_index, rtol, atol):
    for name, g, e in zip(("logprobs", "entropy", "lse"), got, expected):
        assert g.dtype == torch.float32, f"{name}: dtype {g.dtype}, expected float32"
        assert_close(g, e, rtol=rtol, atol=atol, name=name)
    logprobs, entropy, _ = got
    assert bool((logprobs <= 0).all()), f"positive log-prob: max {float(logprobs.max())}"
    assert bool((entropy >= 0).all()), f"negative entropy: min {float(entropy.min())}"
    assert bool((logprobs[targets == ignore_index] == 0).all()), "ignored targets must give log-prob 0"


# (N, H, V, dtype, bias, temperature, num_splits): odd sizes, V=1, V below one tile, several H chunks
CASES = [
    pytest.param(37, 24, 101, torch.float32, True, 0.7, None, id="odd-fp32-bias-T0.7"),
    pytest.param(37, 24, 101, torch.float32, False, 1.0, 3, id="odd-fp32-nobias-3splits"),
    pytest.param(19, 16, 1, torch.float32, True, 1.0, None, id="V1"),
    pytest.param(21, 20, 7, torch.float32, False, 1.3, None, id="V-below-tile"),
    pytest.param(20, 72, 40, torch.float32, True, 1.0, 2, id="H-several-chunks-2splits"),
    pytest.param(37, 24, 101, torch.bfloat16, True, 0.7, 2, id="odd-bf16-bias-2splits"),
    pytest.param(33, 16, 50, torch.float16, False, 1.0, None, id="fp16-nobias"),
]


@pytest.mark.parametrize("n_tokens,dim,vocab,dtype,with_bias,temperature,num_splits", CASES)
def test_stats_match_reference(n_tokens, dim, vocab, dtype, with_bias, temperature, num_splits,
                               make_linear_inputs):
    hidden, weight, bias, targets = make_linear_inputs(n_tokens, dim, vocab, dtype=dtype, with_bias=with_bias)
    got = linear_stats_fwd(hidden, weight, bias, targets, temperature=temperature, num_splits=num_splits)
    expected = reference_stats(hidden, weight, bias, targets, temperature)
    # inputs are rounded to ``dtype`` before the reference sees them: only fp32 accumulation differs
    check_stats(got, expected, targets, -100, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_odd_shape_with_masked_tokens(make_linear_inputs):
    """The shape every backend is checked on (N=257, H=96, V=1003), with ignored targets, bias, T != 1."""
    hidden, weight, bias, targets = make_linear_inputs(257, 96, 1003, ignore_every=7)
    got = linear_stats_fwd(hidden, weight, bias, targets, temperature=0.9)
    expected = reference_stats(hidden, weight, bias, targets, 0.9)
    check_stats(got, expected, targets, -100, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("num_splits", [1, 4], ids=["1split", "4splits"])
def test_very_negative_logits(num_splits, make_linear_inputs):
    """Every logit near -1e4: a running max initialised to 0 would underflow every exp to 0 (lse = -inf)."""
    hidden, weight, bias, targets = make_linear_inputs(24, 16, 70, bias_shift=-1e4)
    got = linear_stats_fwd(hidden, weight, bias, targets, num_splits=num_splits)
    expected = reference_stats(hidden, weight, bias, targets)
    assert bool(torch.isfinite(got[2]).all()), "lse must be finite"
    # logits are rounded to fp32 at magnitude 1e4 (ulp ~1e-3): absolute tolerance, lse tight relative
    check_stats(got, expected, targets, -100, rtol=1e-6, atol=5e-3)


def test_custom_ignore_index(make_linear_inputs):
    hidden, weight, bias, targets = make_linear_inputs(17, 16, 30, ignore_index=-1, ignore_every=3)
    got = linear_stats_fwd(hidden, weight, bias, targets, ignore_index=-1)
    expected = reference_stats(hidden, weight, bias, targets, ignore_index=-1)
    check_stats(got, expected, targets, -1, rtol=2e-5, atol=2e-5)


def test_non_contiguous_inputs(make_linear_inputs):
    hidden, weight, bias, targets = make_linear_inputs(18, 16, 33)
    hidden_t = hidden.t().contiguous().t()  # same values, column-major
    weight_t = weight.t().contiguous().t()
    got = linear_stats_fwd(hidden_t, weight_t, bias, targets)
    check_stats(got, reference_stats(hidden, weight, bias, targets), targets, -100, 2e-5, 2e-5)


def test_invalid_inputs_raise(make_linear_inputs):
    hidden, weight, bias, targets = make_linear_inputs(8, 16, 20)
    with pytest.raises(ValueError, match="weight"):
        linear_stats_fwd(hidden, weight[:, :8], bias, targets)
    with pytest.raises(ValueError, match="weight"):
        linear_stats_fwd(hidden, weight.half(), bias, targets)
    with pytest.raises(ValueError, match="hidden"):
        linear_stats_fwd(hidden.double(), weight.double(), bias, targets)
    with pytest.raises(ValueError, match="targets"):
        linear_stats_fwd(hidden, weight, bias, targets.int())
    with pytest.raises(ValueError, match="bias"):
        linear_stats_fwd(hidden, weight, bias[:5], targets)
    with pytest.raises(ValueError, match="temperature"):
        linear_stats_fwd(hidden, weight, bias, targets, temperature=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_stats_realistic_shape(dtype):
    from erpo_kernels.backends import torch_chunked

    gen = torch.Generator(device="cuda").manual_seed(0)
    n_tokens, dim, vocab = 4096, 1024, 32000
    hidden = torch.randn(n_tokens, dim, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(vocab, dim, device="cuda", generator=gen) / dim ** 0.5).to(dtype)
    targets = torch.randint(0, vocab, (n_tokens,), device="cuda", generator=gen)
    got = linear_stats_fwd(hidden, weight, None, targets)
    # fp32 reference on the same (rounded) inputs, chunked to bound memory
    expected = torch_chunked.linear_stats(hidden.float(), weight.float(), None, targets, chunk_size=512)
    for name, g, e in zip(("logprobs", "entropy", "lse"), got, expected):
        assert_close(g, e, rtol=1e-4, atol=1e-3, name=name)


@pytest.mark.gpu
def test_more_tokens_than_a_grid_axis_holds():
    """N > 65535 token blocks' worth would overflow grid axes 1/2; tokens must sit on axis 0."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n_tokens, dim, vocab = 70_000 * 16, 64, 300  # > 65535 blocks even with BLOCK_N = 16
    hidden = torch.randn(n_tokens, dim, device="cuda", generator=gen)
    weight = torch.randn(vocab, dim, device="cuda", generator=gen) / dim ** 0.5
    targets = torch.randint(0, vocab, (n_tokens,), device="cuda", generator=gen)
    got = linear_stats_fwd(hidden, weight, None, targets)
    expected = reference.token_stats(hidden, weight, None, targets)
    for name, g, e in zip(("logprobs", "entropy", "lse"), got, expected):
        assert_close(g, e, rtol=1e-4, atol=1e-4, name=name)


# ---- launch order: the grouped (token block, vocab split) mapping of one grid axis -------------------------
@triton.jit
def _grouped_mapping_kernel(outer_ptr, inner_ptr, num_outer, num_inner, group_size):
    pid = tl.program_id(0)
    outer, inner = _grouped_program(pid, num_outer, num_inner, group_size)
    tl.store(outer_ptr + pid, outer)
    tl.store(inner_ptr + pid, inner)


@pytest.mark.parametrize("num_outer,num_inner,group_size", [(9, 3, 4), (7, 1, 3), (5, 4, 8), (6, 2, 1)],
                         ids=["ragged-last-group", "one-split", "group-larger-than-grid", "group-1"])
def test_grouped_program_is_a_grouped_bijection(num_outer, num_inner, group_size):
    """Every (outer block, split) exactly once; group g's programs are consecutive and cover outer blocks
    [g * group, (g + 1) * group) x all splits, outer block fastest (the last group may be short)."""
    programs = num_outer * num_inner
    outer, inner = (torch.full((programs,), -1, dtype=torch.int32) for _ in range(2))
    _grouped_mapping_kernel[(programs,)](outer, inner, num_outer, num_inner, group_size)
    pairs = list(zip(outer.tolist(), inner.tolist()))
    assert sorted(pairs) == [(o, i) for o in range(num_outer) for i in range(num_inner)], pairs
    start = 0
    for first in range(0, num_outer, group_size):
        rows = min(group_size, num_outer - first)
        expected = [(first + k % rows, k // rows) for k in range(rows * num_inner)]
        assert pairs[start:start + rows * num_inner] == expected, f"group at outer block {first}"
        start += rows * num_inner


@pytest.mark.parametrize("num_splits,group_size", [(3, 3), (1, 2), (5, 1)],
                         ids=["3splits-groups3", "1split-groups2", "5splits-groups1"])
def test_stats_grouped_launch_at_ragged_sizes(num_splits, group_size, make_linear_inputs):
    """N=97 (4 token blocks of 32, the last one ragged, groups ragged), V=203 over splits of 80 / 48
    columns (ragged last split and tile), H=40 (ragged H chunk)."""
    hidden, weight, bias, targets = make_linear_inputs(97, 40, 203, ignore_every=6)
    got = linear_stats_fwd(hidden, weight, bias, targets, temperature=1.1, num_splits=num_splits,
                           group_size=group_size)
    check_stats(got, reference_stats(hidden, weight, bias, targets, 1.1), targets, -100, rtol=2e-5, atol=2e-5)


def test_target_outside_vocab_gives_nan_logprob(make_linear_inputs):
    """The target logit is a separate gather-dot now: a target in [V, inf) must still give NaN, not a read
    past the weight."""
    hidden, weight, bias, targets = make_linear_inputs(12, 16, 30)
    targets[3] = 30
    logprobs, entropy, lse = linear_stats_fwd(hidden, weight, bias, targets)
    assert bool(torch.isnan(logprobs[3])), logprobs
    assert bool(torch.isfinite(logprobs[torch.arange(12) != 3]).all())
    assert bool(torch.isfinite(entropy).all() & torch.isfinite(lse).all())


def test_invalid_group_size_raises(make_linear_inputs):
    hidden, weight, bias, targets = make_linear_inputs(8, 16, 20)
    with pytest.raises(ValueError, match="group_size"):
        linear_stats_fwd(hidden, weight, bias, targets, group_size=0)

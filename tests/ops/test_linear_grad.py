"""``ops.linear_grad`` (fused, deterministic and chunked designs) and the ``"triton"`` backend module against
the float64 full-logits oracle (``reference.token_stats``, differentiated by autograd)."""
from __future__ import annotations

import inspect

import pytest
import torch

from erpo_kernels import reference
from erpo_kernels.backends import torch_chunked
from erpo_kernels.ops.linear_grad import linear_grad_fused
from erpo_kernels.ops.linear_grad_chunked import linear_grad_chunked
from erpo_kernels.ops.linear_stats import linear_stats_fwd
from tests.helpers import assert_close

DESIGNS = {
    "fused": lambda *a, **k: linear_grad_fused(*a, **k),
    "fused-3splits": lambda *a, **k: linear_grad_fused(*a, num_splits=3, **k),
    "deterministic": lambda *a, **k: linear_grad_fused(*a, deterministic=True, **k),
    "chunked": lambda *a, **k: linear_grad_chunked(*a, chunk_size=16, **k),
}


def upstream(n_tokens, which, device, seed=1):
    """Fresh per-token coefficients (grad_logprobs, grad_entropy), None where ``which`` leaves one out."""
    gen = torch.Generator().manual_seed(seed)
    g_lp, g_ent = torch.randn(n_tokens, generator=gen), torch.randn(n_tokens, generator=gen)
    return (g_lp.to(device) if which in ("both", "logprob") else None,
            g_ent.to(device) if which in ("both", "entropy") else None)


def reference_grads(hidden, weight, bias, targets, g_lp, g_ent, temperature=1.0, ignore_index=-100,
                    needs_input_grad=(True, True, True)):
    """Float64 grads of sum(g_lp * logprobs + g_ent * entropy) of the given (possibly bf16-rounded) inputs,
    by autograd through the oracle's full logits; None where not needed (or no bias)."""
    leaves = [None if x is None else x.detach().cpu().double().requires_grad_(need)
              for x, need in zip((hidden, weight, bias), needs_input_grad)]
    logprobs, entropy, _ = reference.token_stats(*leaves, targets.cpu(), temperature, ignore_index)
    objective = sum((out * g.detach().cpu().double()).sum() for out, g in ((logprobs, g_lp), (entropy, g_ent))
                    if g is not None)
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    grads = iter(torch.autograd.grad(objective, wanted, allow_unused=True))
    out = [next(grads) if x is not None and x.requires_grad else None for x in leaves]
    return tuple(g if g is not None or x is None or not x.requires_grad else torch.zeros_like(x)
                 for g, x in zip(out, leaves))


def run_design(design, hidden, weight, bias, targets, g_lp, g_ent, temperature=1.0, **kwargs):
    _, entropy, lse = linear_stats_fwd(hidden, weight, bias, targets, temperature=temperature)
    return DESIGNS[design](hidden, weight, bias, targets, lse, entropy, g_lp, g_ent,
                           temperature=temperature, **kwargs)


def check_grads(got, expected, inputs, tol):
    for name, g, e, x in zip(("grad_hidden", "grad_weight", "grad_bias"), got, expected, inputs):
        if e is None:
            assert g is None, f"{name}: expected None"
            continue
        assert g.dtype == x.dtype, f"{name}: dtype {g.dtype}, expected {x.dtype}"
        # atol relative to the largest entry (entries are sums with cancellation), at least tol: the V=1
        # grads are exactly 0 in exact arithmetic and ~1e-7 in fp32
        assert_close(g, e, rtol=tol, atol=tol * max(float(e.abs().max()), 1.0), name=name)


# (N, H, V, dtype, bias, temperature, upstream grads, tolerance)
CASES = [
    pytest.param(37, 24, 101, torch.float32, True, 0.7, "both", 2e-5, id="odd-fp32-bias-T0.7-both"),
    pytest.param(37, 24, 101, torch.float32, False, 1.0, "entropy", 2e-5, id="odd-fp32-nobias-entropy-only"),
    pytest.param(37, 24, 101, torch.float32, True, 1.0, "logprob", 2e-5, id="odd-fp32-bias-logprob-only"),
    pytest.param(19, 16, 1, torch.float32, True, 1.0, "both", 2e-5, id="V1"),
    pytest.param(21, 40, 7, torch.float32, False, 1.3, "both", 2e-5, id="V-below-tile"),
    # bf16: dz is rounded to bf16 for the grad GEMMs (as torch does); 1e-2 of the largest entry
    pytest.param(37, 24, 101, torch.bfloat16, True, 0.7, "both", 1e-2, id="odd-bf16-bias-both"),
]


@pytest.mark.parametrize("design", list(DESIGNS))
@pytest.mark.parametrize("n_tokens,dim,vocab,dtype,with_bias,temperature,which,tol", CASES)
def test_grads_match_reference(design, n_tokens, dim, vocab, dtype, with_bias, temperature, which, tol,
                               make_linear_inputs, device):
    hidden, weight, bias, targets = make_linear_inputs(n_tokens, dim, vocab, dtype=dtype, with_bias=with_bias)
    g_lp, g_ent = upstream(n_tokens, which, device)
    got = run_design(design, hidden, weight, bias, targets, g_lp, g_ent, temperature)
    expected = reference_grads(hidden, weight, bias, targets, g_lp, g_ent, temperature)
    check_grads(got, expected, (hidden, weight, bias), tol)


@pytest.mark.slow
@pytest.mark.parametrize("design", ["fused", "chunked"])
def test_odd_shape_with_masked_tokens(design, make_linear_inputs, device):
    """The shape every backend is checked on (N=257, H=96, V=1003), with ignored targets, bias, T != 1."""
    hidden, weight, bias, targets = make_linear_inputs(257, 96, 1003, ignore_every=7)
    g_lp, g_ent = upstream(257, "both", device)
    # statistics from the reference (the forward kernel has its own odd-shape test): halves the run time
    _, entropy, lse = reference.token_stats(hidden.double(), weight.double(), bias.double(), targets, 0.9)
    stats = dict(lse=lse.float().to(device), entropy=entropy.float().to(device))
    if design == "chunked":
        got = linear_grad_chunked(hidden, weight, bias, targets, **stats, grad_logprobs=g_lp, grad_entropy=g_ent,
                                  temperature=0.9, chunk_size=128)
    else:
        got = linear_grad_fused(hidden, weight, bias, targets, **stats, grad_logprobs=g_lp, grad_entropy=g_ent,
                                temperature=0.9)
    expected = reference_grads(hidden, weight, bias, targets, g_lp, g_ent, 0.9)
    check_grads(got, expected, (hidden, weight, bias), 2e-5)


@pytest.mark.parametrize("design", ["fused", "chunked"])
def test_entropy_only_gives_weight_grad(design, make_linear_inputs, device):
    """An entropy-only upstream grad must reach the weight (the dropped-entropy-gradient trap)."""
    hidden, weight, bias, targets = make_linear_inputs(24, 16, 45)
    _, g_ent = upstream(24, "entropy", device)
    got = run_design(design, hidden, weight, bias, targets, None, g_ent)
    expected = reference_grads(hidden, weight, bias, targets, None, g_ent)
    assert float(got[1].abs().max()) > 1e-3 * float(expected[1].abs().max()) > 0
    check_grads(got, expected, (hidden, weight, bias), 2e-5)


def test_very_negative_logits(make_linear_inputs, device):
    hidden, weight, bias, targets = make_linear_inputs(24, 16, 45, bias_shift=-1e4)
    g_lp, g_ent = upstream(24, "both", device)
    got = run_design("fused", hidden, weight, bias, targets, g_lp, g_ent)
    expected = reference_grads(hidden, weight, bias, targets, g_lp, g_ent)
    # the kernel sees fp32 logits rounded at magnitude 1e4 (ulp ~1e-3): looser than elsewhere
    check_grads(got, expected, (hidden, weight, bias), 5e-3)


def test_deterministic_equals_atomic_and_chunked(make_linear_inputs, device):
    hidden, weight, bias, targets = make_linear_inputs(37, 24, 101)
    g_lp, g_ent = upstream(37, "both", device)
    atomic = run_design("fused-3splits", hidden, weight, bias, targets, g_lp, g_ent, 0.9)
    deterministic = run_design("deterministic", hidden, weight, bias, targets, g_lp, g_ent, 0.9)
    again = run_design("deterministic", hidden, weight, bias, targets, g_lp, g_ent, 0.9)
    chunked = run_design("chunked", hidden, weight, bias, targets, g_lp, g_ent, 0.9)
    for name, a, d, r, c in zip(("grad_hidden", "grad_weight", "grad_bias"), atomic, deterministic, again,
                                chunked):
        assert torch.equal(d, r), f"{name}: deterministic mode is not bitwise reproducible"
        assert_close(a, d, rtol=1e-6, atol=1e-6, name=f"{name} atomic vs deterministic", scaled=True)
        assert_close(c, d, rtol=1e-5, atol=1e-5, name=f"{name} chunked vs fused", scaled=True)


@pytest.mark.parametrize("design", ["fused", "deterministic", "chunked"])
@pytest.mark.parametrize("needs", [(False, True, False), (True, False, False), (False, False, True)],
                         ids=["weight", "hidden", "bias"])
def test_needs_input_grad(design, needs, make_linear_inputs, device):
    hidden, weight, bias, targets = make_linear_inputs(20, 16, 33)
    g_lp, g_ent = upstream(20, "both", device)
    got = run_design(design, hidden, weight, bias, targets, g_lp, g_ent, needs_input_grad=needs)
    expected = reference_grads(hidden, weight, bias, targets, g_lp, g_ent, needs_input_grad=needs)
    check_grads(got, expected, (hidden, weight, bias), 2e-5)


def test_invalid_grad_inputs_raise(make_linear_inputs, device):
    hidden, weight, bias, targets = make_linear_inputs(8, 16, 20)
    lse, entropy = torch.zeros(8, device=device), torch.ones(8, device=device)
    g = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="lse"):
        linear_grad_fused(hidden, weight, bias, targets, lse[:4], entropy, g, None)
    with pytest.raises(ValueError, match="entropy"):
        linear_grad_fused(hidden, weight, bias, targets, lse, None, None, g)
    with pytest.raises(ValueError, match="grad_logprobs"):
        linear_grad_chunked(hidden, weight, bias, targets, lse, entropy, g[:3], None)


@pytest.mark.parametrize("grad_design", ["fused", "chunked"])
def test_backend_module_matches_torch_chunked(grad_design, monkeypatch, make_linear_inputs, device):
    from erpo_kernels.backends import triton as triton_backend

    def shape_of(fn):  # names, kinds and defaults: what a caller of the interface depends on (torch_chunked's
        # `steps` is its hook for the native backend's per-chunk steps, not part of the backend interface)
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "steps"]

    for fn in ("linear_stats", "linear_stats_backward"):
        assert shape_of(getattr(triton_backend, fn)) == shape_of(getattr(torch_chunked, fn)), fn
    monkeypatch.setenv("ERPO_TRITON_GRAD", grad_design)
    hidden, weight, bias, targets = make_linear_inputs(29, 16, 40)
    g_lp, g_ent = upstream(29, "both", device)
    kwargs = dict(temperature=0.8, ignore_index=-100, chunk_size=8)
    stats = triton_backend.linear_stats(hidden, weight, bias, targets, **kwargs)
    ref_stats = torch_chunked.linear_stats(hidden, weight, bias, targets, **kwargs)
    for name, s, r in zip(("logprobs", "entropy", "lse"), stats, ref_stats):
        assert_close(s, r, rtol=2e-5, atol=2e-5, name=name)
    grads = triton_backend.linear_stats_backward(hidden, weight, bias, targets, stats[2], stats[1], g_lp, g_ent,
                                                 **kwargs)
    ref = torch_chunked.linear_stats_backward(hidden, weight, bias, targets, ref_stats[2], ref_stats[1], g_lp,
                                              g_ent, **kwargs)
    check_grads(grads, ref, (hidden, weight, bias), 2e-5)


@pytest.mark.parametrize("grad_design", ["fused", "chunked"])
def test_token_stats_autograd_through_triton_backend(grad_design, monkeypatch, make_linear_inputs, device):
    """The public autograd path (chunk_size=None) with both outputs used: same grads as backend="torch"."""
    from erpo_kernels import token_stats

    monkeypatch.setenv("ERPO_TRITON_GRAD", grad_design)
    hidden, weight, bias, targets = make_linear_inputs(26, 16, 37)
    g_lp, g_ent = upstream(26, "both", device)
    grads = {}
    for backend in ("triton", "torch"):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        stats = token_stats(leaves[0], leaves[1], targets, 0.8, bias=leaves[2], backend=backend)
        ((stats.logprobs * g_lp).sum() + (stats.entropy * g_ent).sum()).backward()
        grads[backend] = [x.grad for x in leaves]
    check_grads(grads["triton"], grads["torch"], (hidden, weight, bias), 2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("design", ["fused", "chunked"])
def test_grads_realistic_shape(design):
    gen = torch.Generator(device="cuda").manual_seed(0)
    n_tokens, dim, vocab = 4096, 1024, 32000
    hidden = torch.randn(n_tokens, dim, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(vocab, dim, device="cuda", generator=gen) / dim ** 0.5).bfloat16()
    targets = torch.randint(0, vocab, (n_tokens,), device="cuda", generator=gen)
    g_lp = torch.randn(n_tokens, device="cuda", generator=gen)
    g_ent = torch.randn(n_tokens, device="cuda", generator=gen)
    got = run_design(design, hidden, weight, None, targets, g_lp, g_ent)
    # fp32 reference on the same (rounded) inputs, chunked to bound memory
    h, w = hidden.float(), weight.float()
    _, entropy, lse = torch_chunked.linear_stats(h, w, None, targets, chunk_size=512)
    expected = torch_chunked.linear_stats_backward(h, w, None, targets, lse, entropy, g_lp, g_ent, chunk_size=512)
    for name, g, e in zip(("grad_hidden", "grad_weight"), got[:2], expected[:2]):
        assert_close(g, e, rtol=2e-2, atol=1e-2, name=name, scaled=True)


@pytest.mark.parametrize("deterministic,num_splits,group_size", [(False, 3, 3), (True, None, 2)],
                         ids=["atomic-3splits-groups3", "deterministic-groups2"])
def test_fused_grouped_launch_at_ragged_sizes(deterministic, num_splits, group_size, make_linear_inputs, device):
    """Launch groups that do not divide the grid: N=97 is 4 token blocks of 32 (the last ragged; groups of 3
    leave one block alone), V=203 is 7 vocab blocks (vocab-major groups of 2 leave one alone) and 3 splits
    of 80 / 80 / 43 columns; H=40 a ragged H chunk."""
    hidden, weight, bias, targets = make_linear_inputs(97, 40, 203, ignore_every=6)
    g_lp, g_ent = upstream(97, "both", device)
    _, entropy, lse = linear_stats_fwd(hidden, weight, bias, targets, temperature=0.9)
    got = linear_grad_fused(hidden, weight, bias, targets, lse, entropy, g_lp, g_ent, temperature=0.9,
                            deterministic=deterministic, num_splits=num_splits, group_size=group_size)
    expected = reference_grads(hidden, weight, bias, targets, g_lp, g_ent, 0.9)
    check_grads(got, expected, (hidden, weight, bias), 2e-5)


def test_invalid_group_size_raises(make_linear_inputs, device):
    hidden, weight, bias, targets = make_linear_inputs(8, 16, 20)
    lse, g = torch.zeros(8, device=device), torch.ones(8, device=device)
    with pytest.raises(ValueError, match="group_size"):
        linear_grad_fused(hidden, weight, bias, targets, lse, None, g, None, group_size=0)

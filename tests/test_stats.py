"""token_stats (the chunked backend, several chunkings) against the full-logits reference, forward and backward.

(backend="torch" is the reference itself run as a backend, so it is not compared with it here.)"""
import pytest
import torch

from erpo_kernels import reference, token_stats
from tests.helpers import assert_close, make_linear_inputs

CHUNKINGS = {"chunks_of_64": 64, "one_chunk": None}


def _data(N=257, H=96, V=1003, dtype=torch.float32, seed=0, bias=True):
    """The odd shape every backend is checked on, with every 7th target ignored (tests.helpers)."""
    return make_linear_inputs(N, H, V, dtype=dtype, with_bias=bias, seed=seed, ignore_every=7, weight_scale=1.0)


def _grads(fn, hidden, weight, bias, g_lp, g_ent):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    lp, ent, lse = fn(*leaves)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return (lp, ent, lse), [x.grad if x is not None else None for x in leaves]


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fp32_matches_reference(chunking, temperature, bias):
    hidden, weight, b, targets = _data(bias=bias)
    gen = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(len(targets), generator=gen), torch.randn(len(targets), generator=gen)

    def ours(h, w, bb):
        return token_stats(h, w, targets, temperature, bias=bb, backend="chunked", chunk_size=CHUNKINGS[chunking])

    def ref(h, w, bb):
        return reference.token_stats(h.double(), w.double(), None if bb is None else bb.double(), targets,
                                     temperature)

    (lp, ent, lse), grads = _grads(ours, hidden, weight, b, g_lp, g_ent)
    (rlp, rent, rlse), rgrads = _grads(ref, hidden, weight, b, g_lp.double(), g_ent.double())
    for name, a, e in [("logprobs", lp, rlp), ("entropy", ent, rent), ("lse", lse, rlse)]:
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, rgrads):
        if e is not None:
            assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)
    assert float(lp.detach().max()) <= 0 and float(ent.detach().min()) >= 0
    assert bool((lp[targets == -100] == 0).all())


@pytest.mark.parametrize("which", ["logprob_only", "entropy_only"])
def test_single_output_gradient(which):
    """An entropy-only upstream gradient must reach the weight (the trap of dropped entropy grads)."""
    hidden, weight, _, targets = _data(N=64, H=32, V=101, bias=False)
    w = weight.clone().requires_grad_()
    rw = weight.double().clone().requires_grad_()
    st = token_stats(hidden, w, targets, chunk_size=16)
    rlp, rent, _ = reference.token_stats(hidden.double(), rw, None, targets)
    (st.logprobs.sum() if which == "logprob_only" else st.entropy.sum()).backward()
    (rlp.sum() if which == "logprob_only" else rent.sum()).backward()
    assert float(w.grad.abs().max()) > 0
    assert_close(w.grad, rw.grad, rtol=1e-5, atol=1e-6, name="grad_weight")


def test_float64_gradcheck():
    hidden, weight, b, targets = _data(N=6, H=5, V=7, dtype=torch.float64)
    targets = targets.clamp_min(0)
    targets[2] = -100

    def f(h, w, bb):
        st = token_stats(h, w, targets, 0.9, bias=bb, chunk_size=4)
        return st.logprobs, st.entropy

    inputs = tuple(x.clone().requires_grad_() for x in (hidden, weight, b))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_bf16_inputs_within_1e2():
    hidden, weight, b, targets = _data(dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    g_lp = torch.randn(len(targets), generator=gen)
    (lp, ent, _), grads = _grads(lambda h, w, bb: token_stats(h, w, targets, bias=bb, chunk_size=100),
                                 hidden, weight, b, g_lp, 0.5 * g_lp)
    (rlp, rent, _), rgrads = _grads(lambda h, w, bb: reference.token_stats(h.double(), w.double(), bb.double(),
                                                                           targets),
                                    hidden, weight, b, g_lp.double(), 0.5 * g_lp.double())
    assert_close(lp, rlp, rtol=1e-2, atol=1e-2, name="logprobs")
    assert_close(ent, rent, rtol=1e-2, atol=1e-2, name="entropy")
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, rgrads):
        assert a.dtype == torch.bfloat16
        rel = float((a.double() - e).norm() / e.norm())
        assert rel < 1e-2, f"{name}: relative error {rel:.3e}"


def test_very_negative_logits_rows():
    """Rows whose logits are all hugely negative: a running max started at 0 would break here."""
    hidden, weight, _, targets = _data(N=20, H=8, V=50, bias=False)
    bias = torch.full((50,), -1e4)
    bias[3] = -9990.0
    st = token_stats(hidden, weight, targets, bias=bias, chunk_size=8)
    rlp, rent, rlse = reference.token_stats(hidden.double(), weight.double(), bias.double(), targets)
    assert_close(st.lse, rlse, rtol=1e-6, atol=1e-3, name="lse")
    assert_close(st.logprobs, rlp, rtol=1e-4, atol=1e-3, name="logprobs")
    assert bool(torch.isfinite(st.entropy).all())


def test_three_dim_hidden_and_vocab_one():
    hidden = torch.randn(2, 3, 4)
    weight = torch.randn(1, 4)
    st = token_stats(hidden, weight, torch.zeros(2, 3, dtype=torch.long))
    assert st.logprobs.shape == (2, 3)
    assert_close(st.logprobs, torch.zeros(2, 3), atol=1e-6, name="logprobs")
    assert_close(st.entropy, torch.zeros(2, 3), atol=1e-6, name="entropy")


def test_no_grad_pass_saves_nothing():
    hidden, weight, _, targets = _data(N=16, H=8, V=20, bias=False)
    h = hidden.clone().requires_grad_()
    with torch.no_grad():
        st = token_stats(h, weight, targets)
    assert st.logprobs.grad_fn is None

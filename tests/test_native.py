"""The native backend (the chunk loop with csrc/'s compiled kernels) against the full-logits reference and the
hand-written twins, like every backend: token_stats forward and both gradients, every mode and aggregation of
erpo_loss on both training paths (the one-sweep 3-GEMM pass and stats + backward), fp32 / fp64 / bf16, odd
sizes, V = 1, ignore_index, temperature, bias, targets outside a vocabulary shard.

Where a C++ compiler exists the extension must be built (tests/test_native_build.py fails otherwise); only a
machine without one skips these tests."""
import pytest
import torch

from erpo_kernels import erpo_loss, reference, token_stats
from erpo_kernels.backends import native_unavailable
from erpo_kernels.config import AGGREGATIONS, MODES
from tests import twins
from tests.helpers import WIDE_DRIFT, assert_close, make_batch, make_linear_inputs, small_config
from tests.test_native_build import COMPILER

pytestmark = pytest.mark.skipif(COMPILER is None and native_unavailable() is not None,
                                reason="no C++ compiler here, so no native extension (see test_native_build)")
CHUNKINGS = {"chunks_of_64": 64, "one_chunk": None}


def _stats_and_grads(fn, hidden, weight, bias, g_lp, g_ent):
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    lp, ent, lse = fn(*leaves)
    ((lp * g_lp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()).backward()
    return (lp, ent, lse), [None if x is None else x.grad for x in leaves]


def _native(targets, temperature=1.0, chunk_size=None, ignore_index=-100):
    return lambda h, w, b: token_stats(h, w, targets, temperature, bias=b, backend="native", chunk_size=chunk_size,
                                       ignore_index=ignore_index)


def _oracle(targets, temperature=1.0, ignore_index=-100):
    return lambda h, w, b: reference.token_stats(h.double(), w.double(), None if b is None else b.double(), targets,
                                                 temperature, ignore_index)


def _upstream(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["T1", "T0.7"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_token_stats_fp32_match_reference(chunking, temperature, bias):
    hidden, weight, b, targets = make_linear_inputs(257, 96, 1003, with_bias=bias, ignore_every=7, weight_scale=1.0)
    g_lp, g_ent = _upstream(257)
    (lp, ent, lse), grads = _stats_and_grads(_native(targets, temperature, CHUNKINGS[chunking]), hidden, weight, b,
                                             g_lp, g_ent)
    (rlp, rent, rlse), rgrads = _stats_and_grads(_oracle(targets, temperature), hidden, weight, b, g_lp, g_ent)
    for name, a, e in [("logprobs", lp, rlp), ("entropy", ent, rent), ("lse", lse, rlse)]:
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, rgrads):
        if e is not None:
            assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)
    assert bool((lp[targets == -100] == 0).all()) and float(lp.detach().max()) <= 0


def test_float64_gradcheck():
    hidden, weight, b, targets = make_linear_inputs(6, 5, 7, dtype=torch.float64, ignore_every=0)
    targets[2] = -100

    def f(h, w, bb):
        st = token_stats(h, w, targets, 0.9, bias=bb, chunk_size=4, backend="native")
        return st.logprobs, st.entropy

    inputs = tuple(x.clone().requires_grad_() for x in (hidden, weight, b))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def _plain_bf16(targets, temperature=1.0):
    """What a trainer writes: bf16 logits upcast to fp32, log_softmax, gather, entropy (the yardstick)."""
    def run(h, w, b):
        logits = (h @ w.t() + (0 if b is None else b)).float() / temperature
        log_p = torch.log_softmax(logits, -1)
        picked = log_p.gather(-1, targets.clamp_min(0)[:, None]).squeeze(-1)
        return torch.where(targets == -100, 0.0, picked), -(log_p.exp() * log_p).sum(-1), logits.logsumexp(-1)
    return run


@pytest.mark.parametrize("chunk_size", [100, None], ids=["3_chunks", "one_chunk"])
@pytest.mark.parametrize("shape", [(257, 96, 1003), (64, 40, 300)], ids=["V1003", "V300_short_slab"])
def test_bf16_within_twice_plain_torch_error(chunk_size, shape):
    """bf16 statistics and gradients against the fp64 oracle on the same rounded inputs: at most 2x the error of
    plain PyTorch in bf16, plus a small atol (flash-attention's rule).  Several chunks take the fp32 grad_weight
    accumulator (MKL's bf16 GEMM), one chunk writes grad_weight in bf16 directly."""
    n, h_dim, vocab = shape
    hidden, weight, b, targets = make_linear_inputs(n, h_dim, vocab, dtype=torch.bfloat16, ignore_every=7,
                                                    weight_scale=1.0)
    g_lp, g_ent = _upstream(n, seed=3)
    ours, ours_grads = _stats_and_grads(_native(targets, 0.8, chunk_size), hidden, weight, b, g_lp, g_ent)
    plain, plain_grads = _stats_and_grads(_plain_bf16(targets, 0.8), hidden, weight, b, g_lp, g_ent)
    exact, exact_grads = _stats_and_grads(_oracle(targets, 0.8), hidden, weight, b, g_lp, g_ent)
    for name, a, p, e in zip(("logprobs", "entropy", "lse"), ours, plain, exact):
        err, plain_err = float((a.double() - e).abs().max()), float((p.double() - e).abs().max())
        assert err <= 2 * plain_err + 1e-3, f"{name}: error {err:.2e}, plain bf16 torch {plain_err:.2e}"
    for name, a, p, e in zip(("grad_hidden", "grad_weight", "grad_bias"), ours_grads, plain_grads, exact_grads):
        assert a.dtype == torch.bfloat16
        rel = lambda x: float((x.double() - e).norm() / e.norm())  # noqa: E731
        assert rel(a) <= 2 * rel(p) + 1e-3, f"{name}: relative error {rel(a):.2e}, plain bf16 torch {rel(p):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [1, 3, 129], ids=["V1", "V3", "V129"])
def test_tiny_and_odd_vocabularies(dtype, vocab):
    """V = 1 (log-prob and entropy 0), a vocabulary shorter than one vector, and one just past a bf16 slab."""
    hidden, weight, b, targets = make_linear_inputs(9, 5, vocab, dtype=dtype, ignore_every=4)
    g_lp, g_ent = _upstream(9)
    (lp, ent, lse), grads = _stats_and_grads(_native(targets, 1.3, 4), hidden, weight, b, g_lp, g_ent)
    (rlp, rent, rlse), rgrads = _stats_and_grads(_oracle(targets, 1.3), hidden, weight, b, g_lp, g_ent)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, e in [("logprobs", lp, rlp), ("entropy", ent, rent), ("lse", lse, rlse)]:
        assert_close(a, e, rtol=tol, atol=tol, name=name)
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, rgrads):
        assert_close(a, e, rtol=tol, atol=tol, scaled=True, name=name)
    if vocab == 1:
        assert float(lp.abs().max()) == 0 and float(ent.abs().max()) < 1e-6


@pytest.mark.parametrize("backend", ["native", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_live_token_gives_zero_grads_not_garbage(backend, dtype):
    """Every advantage 0 and no KL / entropy term: token skipping leaves no row for the GEMMs, so no chunk runs;
    the weight's gradient must still be exactly 0 (found: the native grad_weight was an unwritten torch.empty,
    whatever the allocator had there, which made a trainer's run depend on its memory history)."""
    batch = make_batch(B=8, T=6, H=16, V=37, dtype=dtype)
    weight = batch["weight"].detach().clone().requires_grad_()
    hidden = batch["hidden"].detach().clone().requires_grad_()
    for _ in range(4):   # leave NaN in freed blocks of the weight's size, where an unwritten buffer would land
        junk = torch.full_like(weight, float("nan"))
        del junk
    out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], advantages=torch.zeros(8, 6),
                    old_logprobs=batch["old_logprobs"], old_entropy=batch["old_entropy"],
                    config=small_config(mode="grpo"), backend=backend)
    out.loss.backward()
    assert float(out.loss) == 0.0
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_custom_ignore_index():
    hidden, weight, b, targets = make_linear_inputs(40, 16, 50, ignore_every=0)
    targets[::3] = 7      # ignore_index inside the vocabulary: those rows count as ignored, not as token 7
    g_lp, g_ent = _upstream(40)
    ours = _stats_and_grads(_native(targets, chunk_size=16, ignore_index=7), hidden, weight, b, g_lp, g_ent)
    exact = _stats_and_grads(_oracle(targets, ignore_index=7), hidden, weight, b, g_lp, g_ent)
    for name, a, e in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), (*ours[0][:2], *ours[1][:2]),
                          (*exact[0][:2], *exact[1][:2])):
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_very_negative_and_minus_inf_logits(dtype):
    """Rows of hugely negative logits (a max started at 0 would break) and a -inf bias column (p = 0 there; its
    entropy term must be 0, not NaN)."""
    hidden, weight, _, targets = make_linear_inputs(20, 8, 50, ignore_every=0)
    targets = targets.clamp_max(48)
    bias = torch.full((50,), -1e4)
    bias[3] = -9990.0
    bias[49] = float("-inf")
    st = token_stats(hidden.to(dtype), weight.to(dtype), targets, bias=bias, chunk_size=8, backend="native")
    rlp, rent, rlse = reference.token_stats(hidden.to(dtype).double(), weight.to(dtype).double(), bias.double(),
                                            targets)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert_close(st.lse, rlse, rtol=1e-6, atol=tol, name="lse")
    assert_close(st.logprobs, rlp, rtol=1e-4, atol=tol, name="logprobs")
    assert bool(torch.isfinite(st.entropy).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_target_outside_the_shard_keeps_its_softmax_term(dtype):
    """The backward of a vocabulary shard: a target outside [0, V) that is not ignore_index has no one-hot column
    but keeps -g_lp * p, exactly as the chunked backend computes it."""
    from erpo_kernels.backends import native, torch_chunked
    hidden, weight, b, targets = make_linear_inputs(33, 12, 70, dtype=dtype, ignore_every=5)
    targets[1::4] = -1
    lse = torch.randn(33, dtype=torch.promote_types(dtype, torch.float32)).abs() + 5
    entropy = torch.rand(33, dtype=lse.dtype)
    g_lp, g_ent = (x.to(lse.dtype) for x in _upstream(33))
    args = (hidden, weight, b, targets, lse, entropy, g_lp, g_ent)
    got = native.linear_stats_backward(*args, temperature=0.9, chunk_size=10)
    expected = torch_chunked.linear_stats_backward(*(x.double() if x.is_floating_point() else x for x in args),
                                                   temperature=0.9, chunk_size=10)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    for name, a, e in zip(("grad_hidden", "grad_weight", "grad_bias"), got, expected):
        assert_close(a, e, rtol=tol, atol=tol, scaled=True, name=name)


# --- erpo_loss: every mode and aggregation, both paths ------------------------------------------------------
def _loss(batch, config, backend, **kwargs):
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], batch["rewards"], group_ids=batch["group_ids"],
                    old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                    old_entropy=batch["old_entropy"], config=config, backend=backend, **kwargs)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def _reference_loss(batch, config):
    hidden = batch["hidden"].double().clone().requires_grad_()
    weight = batch["weight"].double().clone().requires_grad_()
    d = lambda x: x.double()  # noqa: E731
    loss, _ = reference.erpo_loss(hidden, weight, batch["targets"], batch["mask"], d(batch["rewards"]),
                                  batch["group_ids"], d(batch["old_logprobs"]), d(batch["ref_logprobs"]),
                                  d(batch["old_entropy"]), config)
    loss.backward()
    return loss, hidden.grad, weight.grad


@pytest.mark.parametrize("fused", [True, False], ids=["one_sweep", "two_pass"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_erpo_loss_every_mode_matches_reference(mode, aggregation, fused):
    batch = make_batch(seed=MODES.index(mode) * 10 + AGGREGATIONS.index(aggregation), drift=WIDE_DRIFT,
                       ignore_frac=0.1)
    config = small_config(mode=mode, aggregation=aggregation, holder_p=2.0, kl_beta=0.05, entropy_coef=0.01,
                          dual_clip_c=3.0, chunk_size=17, fused_train=fused, temperature=0.9)
    out, gh, gw = _loss(batch, config, "native")
    loss, rgh, rgw = _reference_loss(batch, config)
    assert_close(out.loss, loss, rtol=1e-5, atol=1e-7, name="loss")
    assert_close(gh, rgh, rtol=1e-5, atol=1e-5, scaled=True, name="grad_hidden")
    assert_close(gw, rgw, rtol=1e-5, atol=1e-5, scaled=True, name="grad_weight")


@pytest.mark.parametrize("fused", [True, False], ids=["one_sweep", "two_pass"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "constant"])
def test_every_term_equals_twin(aggregation, fused):
    """ERPO with KL, dual clip and entropy bonus, both clip bounds active, against the twins end to end."""
    batch = make_batch(seed=AGGREGATIONS.index(aggregation), drift=WIDE_DRIFT, ignore_frac=0.1)
    config = small_config(aggregation=aggregation, kl_beta=0.05, entropy_coef=0.02, dual_clip_c=2.0,
                          fused_train=fused, chunk_size=13)
    out, gh, gw = _loss(batch, config, "native")
    valid = batch["mask"] & (batch["targets"] != -100)
    adv = twins.erpo_advantages(batch["rewards"], valid, batch["old_entropy"], batch["old_logprobs"],
                                batch["ref_logprobs"], group_size=4, K=3)
    h, w = batch["hidden"].double().requires_grad_(), batch["weight"].double().requires_grad_()
    lp, entropy = twins.logprobs_and_entropy(h, w, batch["targets"])
    old = torch.where(valid, batch["old_logprobs"].double(), lp.detach())
    ref = torch.where(valid, batch["ref_logprobs"].double(), lp.detach())
    L = twins.token_loss(lp, adv, old, ref, entropy, config.eps_low, config.eps_high, config.dual_clip_c,
                         config.kl_beta, config.entropy_coef)
    loss = twins.aggregate(L, valid, aggregation)
    loss.backward()
    assert_close(out.loss, loss, rtol=1e-5, atol=1e-7, name="loss")
    assert_close(gh, h.grad, rtol=1e-5, atol=1e-5, scaled=True, name="grad_hidden")
    assert_close(gw, w.grad, rtol=1e-5, atol=1e-5, scaled=True, name="grad_weight")
    m = out.metrics
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0 and m["dual_clip_frac"] > 0 and m["kl"] > 1e-3, m


@pytest.mark.parametrize("mode", ["erpo", "grpo"])
def test_one_sweep_equals_two_pass_and_chunked(mode):
    """Same loss, grads and metrics from the native one-sweep pass, its two-pass path and the chunked backend;
    the sweep's gradients scale with the upstream gradient (3 * loss)."""
    batch = make_batch(seed=31, with_bias=True, ignore_frac=0.1)
    results = []
    for backend, fused in (("native", True), ("native", False), ("chunked", True)):
        config = small_config(mode=mode, kl_beta=0.1, entropy_coef=0.02, fused_train=fused, chunk_size=13)
        leaves = [batch[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        out = erpo_loss(*leaves[:2], batch["targets"], batch["mask"], batch["rewards"], group_size=4,
                        bias=leaves[2], old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                        old_entropy=batch["old_entropy"], config=config, backend=backend)
        (3.0 * out.loss).backward()
        results.append((out, [x.grad for x in leaves]))
    (a, ga), *others = results
    for b, gb in others:
        assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-9, name="loss")
        for name, x, y in zip(("grad_hidden", "grad_weight", "grad_bias"), ga, gb):
            assert_close(x, y, rtol=1e-5, atol=1e-6, scaled=True, name=name)
        for key in a.metrics:
            assert abs(a.metrics[key] - b.metrics[key]) <= 1e-5 * max(1.0, abs(b.metrics[key])), key


@pytest.mark.parametrize("fused", [True, False], ids=["one_sweep", "two_pass"])
def test_bf16_loss_within_1e2(fused):
    batch = make_batch(B=8, T=16, H=32, V=97, dtype=torch.bfloat16, seed=4)
    config = small_config(kl_beta=0.05, entropy_coef=0.01, fused_train=fused, chunk_size=48)
    out, gh, gw = _loss(batch, config, "native")
    loss, rgh, rgw = _reference_loss(batch, config)
    assert abs(float(out.loss.detach()) - float(loss.detach())) <= 1e-2 * max(abs(float(loss.detach())), 1e-2)
    for name, a, e in (("grad_hidden", gh, rgh), ("grad_weight", gw, rgw)):
        assert a.dtype == torch.bfloat16
        rel = float((a.double() - e).norm() / e.norm())
        assert rel < 1e-2, f"{name}: relative error {rel:.3e}"

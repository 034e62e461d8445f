"""ops.surrogate: the Triton per-token surrogate against reference.per_token_loss (values, indicators, grads),
and the whole erpo_loss on the "triton" backend against the "chunked" one."""
import pytest
import torch

from erpo_kernels import erpo_loss, reference
from erpo_kernels.backends import triton as triton_backend
from erpo_kernels.ops.surrogate import surrogate_triton
from tests import twins
from tests.helpers import assert_close, make_batch, make_surrogate_inputs, small_config

INDICATORS = ("clip_low", "clip_high", "dual_clip")


def _inputs(shape=(7, 23), seed=0, spread=0.8):
    return make_surrogate_inputs(shape, seed, spread)


def _run(fn, x, config, dtype, use_old=True, use_ref=True, device="cpu"):
    on = lambda t: t.to(device=device, dtype=dtype, copy=True)  # noqa: E731
    lp, entropy = on(x["lp"]).requires_grad_(), on(x["entropy"]).requires_grad_()
    loss, info = fn(lp, entropy, on(x["adv"]), on(x["old"]) if use_old else None,
                    on(x["ref"]) if use_ref else None, config)
    (loss * on(x["upstream"])).sum().backward()
    return loss, info, lp.grad, entropy.grad


def _compare(x, config, use_old=True, use_ref=True, device="cpu", oracle_dtype=torch.float64):
    got = _run(surrogate_triton, x, config, torch.float32, use_old, use_ref, device)
    expected = _run(reference.per_token_loss, x, config, oracle_dtype, use_old, use_ref)
    same_dtype = _run(reference.per_token_loss, x, config, torch.float32, use_old, use_ref)
    loss, info, grad_lp, grad_entropy = got
    assert loss.dtype == torch.float32 and info["ratio"].dtype == torch.float32
    assert not info["ratio"].requires_grad
    assert_close(loss, expected[0], name="token_loss")
    assert_close(info["ratio"], expected[1]["ratio"], name="ratio")
    for name in INDICATORS:
        assert info[name].dtype == torch.bool, name
        assert torch.equal(info[name].cpu(), same_dtype[1][name]), name
    assert_close(grad_lp, expected[2], name="grad_logprobs")
    if expected[3] is None:
        assert grad_entropy is None
    else:
        assert_close(grad_entropy, expected[3], name="grad_entropy")
    return got


CONFIGS = {
    "clip_higher": small_config(),
    "symmetric_clip": small_config(eps_high=0.2),
    "dual_clip": small_config(dual_clip_c=3.0, eps_low=0.3),
    "kl": small_config(kl_beta=0.1),
    "entropy_bonus": small_config(entropy_coef=0.01),
    "everything": small_config(dual_clip_c=1.5, kl_beta=0.05, entropy_coef=0.02),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_matches_reference(config, device):
    seed = list(CONFIGS.values()).index(config)
    got = _compare(_inputs(seed=seed), config, device=device)
    if config.dual_clip_c is None:
        assert bool(got[1]["clip_low"].any()) and bool(got[1]["clip_high"].any())  # every branch is reached
    else:
        assert bool(got[1]["dual_clip"].any())


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_matches_hand_written_twin(config, device):
    """The kernel against tests/twins.py (not the oracle): loss and both gradients."""
    x = _inputs(seed=20 + list(CONFIGS.values()).index(config))
    loss, _, grad_lp, grad_entropy = _run(surrogate_triton, x, config, torch.float32, device=device)
    lp, entropy = x["lp"].double().requires_grad_(), x["entropy"].double().requires_grad_()
    expected = twins.token_loss(lp, x["adv"].double(), x["old"].double(), x["ref"].double(), entropy,
                                config.eps_low, config.eps_high, config.dual_clip_c, config.kl_beta,
                                config.entropy_coef)
    (expected * x["upstream"].double()).sum().backward()
    assert_close(loss, expected, name="token_loss")
    assert_close(grad_lp, lp.grad, name="grad_logprobs")
    if config.entropy_coef:
        assert_close(grad_entropy, entropy.grad, name="grad_entropy")


@pytest.mark.parametrize("use_old,use_ref", [(False, True), (True, False), (False, False)],
                         ids=["no_old", "no_ref", "neither"])
def test_optional_inputs(use_old, use_ref, device):
    config = small_config(dual_clip_c=3.0, kl_beta=0.1, entropy_coef=0.01)
    got = _compare(_inputs(seed=10), config, use_old=use_old, use_ref=use_ref, device=device)
    if not use_old:   # ratio == 1 exactly: a tie of the two min() branches, where torch splits the gradient
        assert bool((got[1]["ratio"] == 1).all())
        assert not bool(got[1]["clip_low"].any() | got[1]["clip_high"].any())


def test_ratio_on_the_clip_bounds_and_zero_advantages(device):
    """Ties of the two branches away from ratio 1: at the clip bounds and where A == 0.  The oracle runs
    in float32 too: a ratio on a bound in float32 is not on it in float64."""
    config = small_config()
    x = _inputs(shape=(4, 16), seed=11)
    old = x["old"]
    bound_hi = torch.tensor(1.0 + config.eps_high, dtype=torch.float32)
    bound_lo = torch.tensor(1.0 - config.eps_low, dtype=torch.float32)
    x["lp"][0] = old[0] + torch.log(bound_hi)
    x["lp"][1] = old[1] + torch.log(bound_lo)
    x["adv"][2] = 0.0
    _compare(x, config, device=device, oracle_dtype=torch.float32)


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (130,), (2, 3, 5)], ids=["1x1", "T1", "flat", "3d"])
def test_odd_shapes(shape, device):
    _compare(_inputs(shape=shape, seed=12), small_config(dual_clip_c=3.0, kl_beta=0.1, entropy_coef=0.01),
             device=device)


def test_float64_matches_reference_tightly(device):
    x = _inputs(seed=13)
    config = small_config(dual_clip_c=3.0, kl_beta=0.1, entropy_coef=0.01)
    got = _run(surrogate_triton, x, config, torch.float64, device=device)
    expected = _run(reference.per_token_loss, x, config, torch.float64)
    for a, e, name in zip((got[0], got[2], got[3]), (expected[0], expected[2], expected[3]), ("loss", "dlp", "dH")):
        assert a.dtype == torch.float64
        assert_close(a, e, rtol=1e-12, atol=1e-14, name=name)


# ----------------------------------------------------------------------------------------------
# end to end: erpo_loss(backend="triton") == erpo_loss(backend="chunked")
# ----------------------------------------------------------------------------------------------
def _erpo(batch, config, backend, device, use_old=True, use_entropy=True):
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    hidden = on(batch["hidden"]).clone().requires_grad_()
    weight = on(batch["weight"]).clone().requires_grad_()
    out = erpo_loss(hidden, weight, on(batch["targets"]), on(batch["mask"]), on(batch["rewards"]),
                    group_ids=on(batch["group_ids"]), config=config, backend=backend,
                    old_logprobs=on(batch["old_logprobs"]) if use_old else None,
                    ref_logprobs=on(batch["ref_logprobs"]),
                    old_entropy=on(batch["old_entropy"]) if use_entropy else None)
    out.loss.backward()
    return out, hidden.grad, weight.grad


@pytest.mark.parametrize("mode,use_old,use_entropy,holder", [("erpo", True, True, False),
                                                              ("ep_grpo", True, False, False),
                                                              ("grpo", False, False, True)],
                         ids=["erpo", "ep_grpo_no_old_entropy", "grpo_no_old_holder"])
def test_erpo_loss_triton_matches_chunked(mode, use_old, use_entropy, holder, device, monkeypatch):
    """Without old entropy (or with a non-linear aggregation) no fused sweep applies: the per-token loss
    must then come from surrogate_triton, which a spy checks."""
    calls = []
    monkeypatch.setattr(triton_backend, "per_token_loss", lambda *args: calls.append(1) or surrogate_triton(*args))
    batch = make_batch(B=6, T=9, H=16, V=37, G=3, seed=20)
    extra = dict(aggregation="holder", holder_p=2.0) if holder else {}
    config = small_config(mode=mode, dual_clip_c=3.0, kl_beta=0.05, entropy_coef=0.01, **extra)
    out, grad_hidden, grad_weight = _erpo(batch, config, "triton", device, use_old, use_entropy)
    ref_out, ref_grad_hidden, ref_grad_weight = _erpo(batch, config, "chunked", "cpu", use_old, use_entropy)
    if not use_entropy or holder:
        assert calls, "erpo_loss(backend='triton') did not call surrogate_triton"
    assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_close(out.advantages, ref_out.advantages, rtol=1e-5, atol=1e-6, name="advantages")
    assert_close(grad_hidden, ref_grad_hidden, rtol=1e-4, atol=1e-5, scaled=True, name="grad_hidden")
    assert_close(grad_weight, ref_grad_weight, rtol=1e-4, atol=1e-5, scaled=True, name="grad_weight")
    for key in ("clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio"):
        assert out.metrics[key] == pytest.approx(ref_out.metrics[key], rel=1e-5, abs=1e-6), key

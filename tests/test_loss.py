"""erpo_loss (chunked backend, both training paths) against the reference and against the hand-written twins of
tests/twins.py, term by term and aggregation by aggregation."""
import pytest
import torch
from torch import nn

from erpo_kernels import ERPOLoss, erpo_loss, reference
from erpo_kernels.config import AGGREGATIONS, MODES
from tests import twins
from tests.helpers import WIDE_DRIFT, assert_close, make_batch, small_config


def _run(batch, config, backend="chunked", use_old=True, use_ref=True, use_entropy=True, **kwargs):
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], batch["rewards"],
                    group_ids=batch["group_ids"], config=config, backend=backend,
                    old_logprobs=batch["old_logprobs"] if use_old else None,
                    ref_logprobs=batch["ref_logprobs"] if use_ref else None,
                    old_entropy=batch["old_entropy"] if use_entropy else None, **kwargs)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def _run_reference(batch, config, use_old=True, use_ref=True, use_entropy=True, **kwargs):
    hidden = batch["hidden"].double().clone().requires_grad_()
    weight = batch["weight"].double().clone().requires_grad_()
    d = lambda x: x.double()  # noqa: E731
    loss, parts = reference.erpo_loss(
        hidden, weight, batch["targets"], batch["mask"], d(batch["rewards"]), batch["group_ids"],
        d(batch["old_logprobs"]) if use_old else None, d(batch["ref_logprobs"]) if use_ref else None,
        d(batch["old_entropy"]) if use_entropy else None, config, **kwargs)
    loss.backward()
    return loss, hidden.grad, weight.grad, parts


def _compare(batch, config, rtol=1e-5, **flags):
    out, gh, gw = _run(batch, config, **flags)
    loss, rgh, rgw, _ = _run_reference(batch, config, **flags)
    assert_close(out.loss, loss, rtol=rtol, atol=1e-7, name="loss")
    assert_close(gh, rgh, rtol=rtol, atol=rtol, scaled=True, name="grad_hidden")
    assert_close(gw, rgw, rtol=rtol, atol=rtol, scaled=True, name="grad_weight")
    return out


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("mode", MODES)
def test_modes_and_aggregations_match_reference(mode, aggregation):
    batch = make_batch(seed=MODES.index(mode) * 10 + AGGREGATIONS.index(aggregation), drift=WIDE_DRIFT)
    config = small_config(mode=mode, aggregation=aggregation, holder_p=2.0, kl_beta=0.05, entropy_coef=0.01,
                          dual_clip_c=3.0, chunk_size=17)
    out = _compare(batch, config)
    m = out.metrics
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0 and m["dual_clip_frac"] > 0 and m["kl"] > 1e-3, m


@pytest.mark.parametrize("flags", [dict(use_old=False), dict(use_ref=False), dict(use_entropy=False),
                                   dict(use_old=False, use_ref=False, use_entropy=False)],
                         ids=["no_old", "no_ref", "no_old_entropy", "nothing"])
@pytest.mark.parametrize("mode", ["erpo", "ep_grpo"])
def test_optional_inputs_match_reference(mode, flags):
    _compare(make_batch(seed=5), small_config(mode=mode, kl_beta=0.1), **flags)


@pytest.mark.parametrize("config", [
    small_config(gate="topk", gate_scope="batch", eps_high=0.2),
    small_config(gate_scope="sequence", gate_normalize=True, progress_cap_kappa=2.0),
    small_config(mode="ep_grpo", bucket_normalize=False, temperature=0.8, max_length=40, aggregation="constant"),
], ids=["topk", "seq_scope_cap", "ep_grpo_unnormalized_T"])
def test_variants_match_reference(config):
    _compare(make_batch(seed=11, with_bias=False), config)


def test_bias_ignore_index_and_nn_linear():
    batch = make_batch(seed=3, with_bias=True, ignore_frac=0.15)
    lin = nn.Linear(batch["weight"].shape[1], batch["weight"].shape[0])
    with torch.no_grad():
        lin.weight.copy_(batch["weight"])
        lin.bias.copy_(batch["bias"])
    config = small_config(kl_beta=0.1)
    hidden = batch["hidden"].clone().requires_grad_()
    out = ERPOLoss(config)(hidden, lin, batch["targets"], batch["mask"], batch["rewards"],
                           group_ids=batch["group_ids"], old_logprobs=batch["old_logprobs"],
                           ref_logprobs=batch["ref_logprobs"], old_entropy=batch["old_entropy"])
    out.loss.backward()
    rh = batch["hidden"].double().clone().requires_grad_()
    rw = batch["weight"].double().clone().requires_grad_()
    rb = batch["bias"].double().clone().requires_grad_()
    loss, _ = reference.erpo_loss(rh, rw, batch["targets"], batch["mask"], batch["rewards"].double(),
                                  batch["group_ids"], batch["old_logprobs"].double(),
                                  batch["ref_logprobs"].double(), batch["old_entropy"].double(), config, bias=rb)
    loss.backward()
    assert_close(out.loss, loss, name="loss")
    assert_close(hidden.grad, rh.grad, atol=1e-7, name="grad_hidden")
    assert_close(lin.weight.grad, rw.grad, atol=1e-7, name="grad_weight")
    assert_close(lin.bias.grad, rb.grad, atol=1e-7, name="grad_bias")


def test_float64_gradcheck_of_whole_loss():
    batch = make_batch(B=4, T=5, H=4, V=6, G=2, dtype=torch.float64, seed=2)
    config = small_config(num_buckets=2, kl_beta=0.1, entropy_coef=0.05, chunk_size=7)

    def f(h, w):
        return erpo_loss(h, w, batch["targets"], batch["mask"], batch["rewards"], group_size=2,
                         old_logprobs=batch["old_logprobs"].double(), ref_logprobs=batch["ref_logprobs"].double(),
                         old_entropy=batch["old_entropy"].double(), config=config).loss

    inputs = (batch["hidden"].clone().requires_grad_(), batch["weight"].clone().requires_grad_())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["erpo", "grpo"])
def test_bf16_inputs_within_1e2(mode):
    batch = make_batch(B=8, T=16, H=32, V=97, dtype=torch.bfloat16, seed=4)
    config = small_config(mode=mode, kl_beta=0.05, entropy_coef=0.01)
    out, gh, gw = _run(batch, config)
    loss, rgh, rgw, _ = _run_reference(batch, config)
    assert abs(float(out.loss.detach()) - float(loss.detach())) <= 1e-2 * max(abs(float(loss.detach())), 1e-2)
    for name, a, e in (("grad_hidden", gh, rgh), ("grad_weight", gw, rgw)):
        assert a.dtype == torch.bfloat16
        rel = float((a.double() - e).norm() / e.norm())
        assert rel < 1e-2, f"{name}: relative error {rel:.3e}"


# --- against the hand-written twins ---------------------------------------------------------------------
def _twin_loss(batch, config, advantages):
    """The twins' loss and grads: full float64 logits, twins.token_loss, twins.aggregate."""
    h, w = batch["hidden"].double().requires_grad_(), batch["weight"].double().requires_grad_()
    lp, entropy = twins.logprobs_and_entropy(h, w, batch["targets"])
    m = batch["mask"] & (batch["targets"] != -100)
    old = torch.where(m, batch["old_logprobs"].double(), lp.detach())     # padding: ratio 1, KL 0
    ref = torch.where(m, batch["ref_logprobs"].double(), lp.detach())
    L = twins.token_loss(lp, advantages, old, ref, entropy, config.eps_low, config.eps_high, config.dual_clip_c,
                         config.kl_beta, config.entropy_coef)
    loss = twins.aggregate(L, m, config.aggregation, config.max_length, config.holder_p)
    loss.backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("fused", [True, False], ids=["one_sweep", "two_pass"])
@pytest.mark.parametrize("aggregation,holder_p,max_length", [
    ("token_mean", 1.0, None), ("seq_mean_token_mean", 1.0, None), ("seq_mean_token_sum", 1.0, None),
    ("constant", 1.0, None), ("constant", 1.0, 20), ("holder", 2.0, None), ("holder", 1.0, None)],
    ids=["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant", "constant_L20", "holder_p2",
         "holder_p1"])
def test_every_term_and_aggregation_equals_twin(aggregation, holder_p, max_length, fused):
    """ERPO with the KL, the dual clip and the entropy bonus on, old log-probs drifted far enough that both clip
    bounds, the dual clip and the KL are active (asserted), against the twins end to end."""
    batch = make_batch(seed=AGGREGATIONS.index(aggregation), drift=WIDE_DRIFT, ignore_frac=0.1)
    config = small_config(aggregation=aggregation, holder_p=holder_p, max_length=max_length, kl_beta=0.05,
                          entropy_coef=0.02, dual_clip_c=2.0, fused_train=fused, chunk_size=13)
    out, gh, gw = _run(batch, config)
    valid = batch["mask"] & (batch["targets"] != -100)
    adv = twins.erpo_advantages(batch["rewards"], valid, batch["old_entropy"], batch["old_logprobs"],
                                batch["ref_logprobs"], group_size=4, K=3)
    loss, rgh, rgw = _twin_loss(batch, config, adv)
    assert_close(out.advantages, adv, rtol=1e-5, atol=1e-6, name="advantages")
    assert_close(out.loss, loss, rtol=1e-5, atol=1e-7, name="loss")
    assert_close(gh, rgh, rtol=1e-5, atol=1e-5, scaled=True, name="grad_hidden")
    assert_close(gw, rgw, rtol=1e-5, atol=1e-5, scaled=True, name="grad_weight")
    m = out.metrics
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0 and m["dual_clip_frac"] > 0 and m["kl"] > 1e-3, m


@pytest.mark.parametrize("mode", ["grpo", "dapo", "dr_grpo"])
def test_grpo_family_equals_twin(mode):
    batch = make_batch(seed=21, drift=WIDE_DRIFT)
    batch["rewards"][4:] = 1.0  # a zero-variance group: A = 0 there in every mode
    config = small_config(mode=mode, kl_beta=0.1, dual_clip_c=3.0)
    out, gh, gw = _run(batch, config)
    adv = twins.outcome_advantage(batch["rewards"], 4, std_normalize=mode != "dr_grpo")[:, None] * batch["mask"]
    loss, rgh, rgw = _twin_loss(batch, config, adv)
    assert_close(out.loss, loss, rtol=1e-5, atol=1e-8, name="loss")
    assert_close(gh, rgh, rtol=1e-5, atol=1e-5, scaled=True, name="grad_hidden")
    assert_close(gw, rgw, rtol=1e-5, atol=1e-5, scaled=True, name="grad_weight")
    assert out.metrics["zero_var_groups"] == 1.0 and out.metrics["dual_clip_frac"] > 0


def test_fully_masked_rows_and_one_token_responses():
    batch = make_batch(B=8, T=1, seed=8)
    batch["mask"][2] = False
    out = _compare(batch, small_config(mode="ep_grpo"))
    assert torch.isfinite(out.loss)


def test_metrics_are_sane():
    batch = make_batch(seed=6)
    out, _, _ = _run(batch, small_config(kl_beta=0.1))
    m = out.metrics
    assert 0.0 <= m["clip_frac"] <= 1.0 and 0.0 < m["gate_mean"] < 1.0
    assert m["entropy"] > 0 and m["kl"] >= 0 and m["num_tokens"] == float(batch["mask"].sum())
    assert abs(m["clip_frac"] - m["clip_frac_low"] - m["clip_frac_high"]) < 1e-12


@pytest.mark.parametrize("mode", ["erpo", "ep_grpo", "grpo", "dr_grpo"])
def test_fused_sweep_equals_two_pass(mode):
    """The 3-matmul sweep (old entropy given) equals stats pass + backward, and scales with the upstream grad."""
    batch = make_batch(seed=31, with_bias=True, ignore_frac=0.1)
    results = []
    for fused in (True, False):
        config = small_config(mode=mode, kl_beta=0.1, entropy_coef=0.02, fused_train=fused, chunk_size=13)
        hidden = batch["hidden"].clone().requires_grad_()
        weight = batch["weight"].clone().requires_grad_()
        bias = batch["bias"].clone().requires_grad_()
        out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], batch["rewards"], group_size=4,
                        bias=bias, old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                        old_entropy=batch["old_entropy"], config=config)
        (3.0 * out.loss).backward()
        results.append((out, hidden.grad, weight.grad, bias.grad))
    (a, *ga), (b, *gb) = results
    assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-9, name="loss")
    for name, x, y in zip(("grad_hidden", "grad_weight", "grad_bias"), ga, gb):
        assert_close(x, y, rtol=1e-5, atol=1e-6, scaled=True, name=name)
    for key in a.metrics:
        assert abs(a.metrics[key] - b.metrics[key]) <= 1e-5 * max(1.0, abs(b.metrics[key])), key

"""Micro-batches that split groups, as TRL and verl make them: advantages computed once on the whole batch
(``erpo_advantages``), each micro-batch calls ``erpo_loss(..., advantages=A[rows], normalizer=global count)``,
and the summed losses and accumulated gradients equal one full-batch call."""
import pytest
import torch

from erpo_kernels import erpo_advantages, erpo_loss, token_stats
from erpo_kernels.config import AGGREGATIONS, MODES
from tests.helpers import WIDE_DRIFT, assert_close, make_batch, small_config

B, T, G = 12, 10, 4
# rows shuffled (TRL does) and cut into micro-batches that split every group
ORDER = torch.randperm(B, generator=torch.Generator().manual_seed(0))
MICRO = [ORDER[:5], ORDER[5:9], ORDER[9:]]


def _config(mode, aggregation, **extra):
    return small_config(mode=mode, aggregation=aggregation, max_length=T, kl_beta=0.05, entropy_coef=0.01,
                        dual_clip_c=3.0, chunk_size=7, **extra)


def _normalizer(batch, config):
    """The aggregation's global denominator: completion tokens for the token means, sequences otherwise."""
    valid = batch["mask"] & (batch["targets"] != -100)
    return float(valid.sum()) if config.aggregation in ("token_mean", "holder") else float(B)


def _full_batch(batch, config, backend, old_entropy):
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], batch["rewards"], group_size=G,
                    old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                    old_entropy=old_entropy, config=config, backend=backend)
    out.loss.backward()
    return out.loss.detach(), hidden.grad, weight.grad, out.advantages


def _micro_batches(batch, config, backend, advantages, pass_old_entropy):
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    total = 0.0
    normalizer = _normalizer(batch, config)
    for rows in MICRO:
        out = erpo_loss(hidden[rows], weight, batch["targets"][rows], batch["mask"][rows], advantages=advantages[rows],
                        normalizer=normalizer, old_logprobs=batch["old_logprobs"][rows],
                        ref_logprobs=batch["ref_logprobs"][rows],
                        old_entropy=batch["old_entropy"][rows] if pass_old_entropy else None,
                        config=config, backend=backend)
        out.loss.backward()
        total = total + out.loss.detach()
    return total, hidden.grad, weight.grad


@pytest.mark.parametrize("old_entropy", [True, False], ids=["old_entropy", "current_entropy"])
@pytest.mark.parametrize("aggregation", [a for a in AGGREGATIONS if a != "holder"] + ["holder_p1"])
@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_equal_one_full_batch(mode, aggregation, old_entropy):
    batch = make_batch(B=B, T=T, G=G, dtype=torch.float64, seed=MODES.index(mode), drift=WIDE_DRIFT, ignore_frac=0.1)
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    aggregation, extra = ("holder", dict(holder_p=1.0)) if aggregation == "holder_p1" else (aggregation, {})
    config = _config(mode, aggregation, **extra)
    entropy = batch["old_entropy"]
    if not old_entropy:      # the full-batch call then gates on the current policy's entropy: so must A
        with torch.no_grad():
            entropy = token_stats(batch["hidden"], batch["weight"], batch["targets"].clamp_min(0)).entropy
    loss, grad_hidden, grad_weight, full_adv = _full_batch(batch, config, "chunked",
                                                           batch["old_entropy"] if old_entropy else None)
    adv = erpo_advantages(batch["rewards"], batch["mask"] & (batch["targets"] != -100), entropy,
                          batch["old_logprobs"], batch["ref_logprobs"], group_size=G, config=config)
    assert_close(adv.advantages, full_adv, rtol=1e-12, atol=1e-14, name="advantages")
    got = _micro_batches(batch, config, "chunked", adv.advantages, old_entropy)
    assert_close(got[0], loss, rtol=1e-12, atol=1e-14, name="loss")
    assert_close(got[1], grad_hidden, rtol=1e-10, atol=1e-12, scaled=True, name="grad_hidden")
    assert_close(got[2], grad_weight, rtol=1e-10, atol=1e-12, scaled=True, name="grad_weight")


@pytest.mark.parametrize("mode,aggregation", [("erpo", "token_mean"), ("grpo", "seq_mean_token_mean"),
                                              ("dr_grpo", "constant")])
def test_micro_batches_on_the_triton_backend(mode, aggregation):
    batch = make_batch(B=B, T=T, G=G, seed=3, drift=WIDE_DRIFT)
    config = _config(mode, aggregation)
    loss, grad_hidden, grad_weight, full_adv = _full_batch(batch, config, "chunked", batch["old_entropy"])
    got = _micro_batches(batch, config, "triton", full_adv, True)
    assert_close(got[0], loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_close(got[1], grad_hidden, rtol=1e-4, atol=1e-5, scaled=True, name="grad_hidden")
    assert_close(got[2], grad_weight, rtol=1e-4, atol=1e-5, scaled=True, name="grad_weight")


def test_advantages_given_take_the_one_sweep(monkeypatch):
    """With advantages= the per-token coefficients are known: the 3-GEMM sweep runs, not the stats pass."""
    from erpo_kernels.backends import torch_chunked
    batch = make_batch(seed=2)
    calls = []
    monkeypatch.setattr(torch_chunked, "linear_stats", lambda *a, **k: calls.append("stats"))
    hidden = batch["hidden"].clone().requires_grad_()
    out = erpo_loss(hidden, batch["weight"], batch["targets"], batch["mask"],
                    advantages=torch.randn(batch["mask"].shape), old_logprobs=batch["old_logprobs"],
                    config=small_config(), backend="chunked")
    out.loss.backward()
    assert calls == [] and hidden.grad is not None and "gate_mean" not in out.metrics


def test_normalizer_errors():
    batch = make_batch(seed=1)
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["mask"])
    adv = torch.randn(batch["mask"].shape)
    with pytest.raises(ValueError, match="^normalizer"):
        erpo_loss(*args, advantages=adv, normalizer=0.0)
    with pytest.raises(ValueError, match="^normalizer: .*holder"):
        erpo_loss(*args, advantages=adv, normalizer=10.0, config=small_config(aggregation="holder", holder_p=2.0))
    with pytest.raises(ValueError, match="^normalizer: .*max_length"):
        erpo_loss(*args, advantages=adv, normalizer=10.0, config=small_config(aggregation="constant"))
    with pytest.raises(ValueError, match="^rewards"):
        erpo_loss(*args, group_size=4)
    with pytest.raises(ValueError, match="^advantages"):
        erpo_loss(*args, advantages=torch.full(batch["mask"].shape, float("nan")))

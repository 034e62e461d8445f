"""Token compaction: only tokens that carry gradient go through the GEMMs (padding and ignored targets never;
with kl_beta = entropy_coef = 0 also no token whose advantage is exactly 0, e.g. every token of an ERPO
zero-variance group), and the loss and gradients equal the dense computation."""
import pytest
import torch

from erpo_kernels import erpo_loss, token_stats
from erpo_kernels.backends import torch_chunked
from erpo_kernels.config import MODES
from tests.helpers import WIDE_DRIFT, assert_close, make_batch, small_config

B, T, G = 16, 10, 4


def _batch(seed):
    """About 40% padding (right-padded rows of random length), 2 of 4 groups with all rewards equal, 10%
    ignored targets inside the completions."""
    batch = make_batch(B=B, T=T, G=G, dtype=torch.float64, seed=seed, drift=WIDE_DRIFT, ignore_frac=0.1,
                       mask_frac=0.0)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    batch["mask"] = torch.arange(T)[None, :] < lengths[:, None]
    batch["rewards"][4:8] = 1.0
    batch["rewards"][8:12] = 0.0
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def _run(batch, config, backend="chunked", old_entropy=True):
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], batch["rewards"], group_size=G,
                    old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                    old_entropy=batch["old_entropy"] if old_entropy else None, config=config, backend=backend)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def _rows_seen(monkeypatch):
    """Record how many token rows reach the chunked backend's GEMM passes."""
    seen = []
    for name in ("linear_fused_train", "linear_stats", "linear_stats_backward"):
        original = getattr(torch_chunked, name)
        monkeypatch.setattr(torch_chunked, name, lambda *a, _f=original, _n=name, **k: seen.append(
            (_n, a[0].shape[0])) or _f(*a, **k))
    return seen


@pytest.mark.parametrize("terms", ["no_kl", "kl"])
@pytest.mark.parametrize("old_entropy", [True, False], ids=["one_sweep", "two_pass"])
@pytest.mark.parametrize("mode", MODES)
def test_skipping_equals_dense(mode, old_entropy, terms, monkeypatch):
    batch = _batch(MODES.index(mode))
    extra = dict(kl_beta=0.05, entropy_coef=0.01) if terms == "kl" else {}
    dense, dense_grad_hidden, dense_grad_weight = _run(batch, small_config(mode=mode, skip_dead_tokens=False,
                                                                           **extra), old_entropy=old_entropy)
    seen = _rows_seen(monkeypatch)
    out, grad_hidden, grad_weight = _run(batch, small_config(mode=mode, **extra), old_entropy=old_entropy)
    assert_close(out.loss, dense.loss, rtol=1e-12, atol=1e-14, name="loss")
    assert_close(grad_hidden, dense_grad_hidden, rtol=1e-10, atol=1e-12, scaled=True, name="grad_hidden")
    assert_close(grad_weight, dense_grad_weight, rtol=1e-10, atol=1e-12, scaled=True, name="grad_weight")
    assert_close(out.advantages, dense.advantages, rtol=1e-12, atol=1e-14, name="advantages")
    # what reached the GEMMs: never padding or ignored targets; no zero-advantage token when it can be skipped
    valid = batch["mask"] & (batch["targets"] != -100)
    live = valid & (dense.advantages != 0) if terms == "no_kl" and old_entropy else valid
    assert {rows for _, rows in seen} == {int(live.sum())}, (seen, int(live.sum()), int(valid.sum()))
    if mode == "ep_grpo":     # the zero-variance fallback gives those groups non-zero advantages: kept
        kept = live[4:12] & valid[4:12]
        assert int(kept.sum()) > 0.5 * int(valid[4:12].sum()), (int(kept.sum()), int(valid[4:12].sum()))
    elif mode != "dr_grpo" or terms == "kl":
        assert int(live.sum()) <= int(valid.sum())
    # the current policy's metrics are means over the tokens that went through the GEMMs
    assert out.metrics["entropy"] == pytest.approx(float(dense.entropy[live].mean()), rel=1e-10)
    assert out.metrics["adv_abs_mean"] == pytest.approx(dense.metrics["adv_abs_mean"], rel=1e-10)


@pytest.mark.parametrize("old_entropy", [True, False], ids=["one_sweep", "two_pass"])
def test_skipping_on_the_triton_backend(old_entropy):
    batch = _batch(7)
    batch = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    dense = _run(batch, small_config(skip_dead_tokens=False, chunk_size=16), "chunked", old_entropy)
    got = _run(batch, small_config(chunk_size=16), "triton", old_entropy)
    assert_close(got[0].loss, dense[0].loss, rtol=1e-5, atol=1e-6, name="loss")
    for name, a, e in zip(("grad_hidden", "grad_weight"), got[1:], dense[1:]):
        assert_close(a, e, rtol=1e-4, atol=1e-5, scaled=True, name=name)


def test_all_tokens_dead_gives_zero_loss_and_grads():
    """Every group zero-variance in ERPO: A = 0 everywhere, nothing reaches the GEMMs, loss and grads are 0."""
    batch = _batch(3)
    batch["rewards"][:] = 1.0
    for backend in ("chunked", "triton"):
        floats = batch if backend == "chunked" else {
            k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        out, grad_hidden, grad_weight = _run(floats, small_config(), backend)
        assert float(out.loss) == 0.0 and bool((grad_hidden == 0).all()) and bool((grad_weight == 0).all())


def test_token_stats_with_a_mask_skips_the_other_tokens(monkeypatch):
    batch = _batch(2)
    seen = _rows_seen(monkeypatch)
    got = token_stats(batch["hidden"], batch["weight"], batch["targets"].clamp_min(0), mask=batch["mask"])
    full = token_stats(batch["hidden"], batch["weight"], batch["targets"].clamp_min(0))
    assert seen[0] == ("linear_stats", int(batch["mask"].sum())) and seen[1] == ("linear_stats", B * T)
    assert_close(got.logprobs[batch["mask"]], full.logprobs[batch["mask"]], rtol=1e-12, atol=1e-14, name="lp")
    assert bool((got.entropy[~batch["mask"]] == 0).all())

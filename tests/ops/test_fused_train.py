"""The Triton 3-GEMM training sweep (design (a)) against the chunked torch sweep and the reference: the stats
block kernel, the per-token coefficient kernel and the epilogue, with the same SweepTerms on both backends."""
import pytest
import torch

from erpo_kernels import erpo_loss, reference
from erpo_kernels.backends import torch_chunked
from erpo_kernels.backends import triton as triton_backend
from erpo_kernels.fused import SweepTerms
from erpo_kernels.ops.linear_grad_chunked import chunk_stats_
from tests.helpers import WIDE_DRIFT, assert_close, make_batch, small_config


@pytest.mark.parametrize("with_bias, temperature", [(False, 1.0), (True, 0.7)], ids=["plain", "bias_T0.7"])
def test_chunk_stats_matches_reference(make_linear_inputs, with_bias, temperature):
    """Rows [row0, row0 + n) of the [N] outputs from that chunk's raw logits; the other rows untouched."""
    hidden, weight, bias, targets = make_linear_inputs(37, 24, 101, with_bias=with_bias)
    row0, n = 10, 19
    logits = (hidden[row0:row0 + n] @ weight.t()).contiguous()
    outputs = [torch.full((37,), 7.0, device=hidden.device) for _ in range(3)]
    chunk_stats_(logits, bias, targets, row0, *outputs, temperature, -100)
    expected = reference.token_stats(hidden.double(), weight.double(), None if bias is None else bias.double(),
                                     targets, temperature)
    for name, got, want in zip(("logprobs", "entropy", "lse"), outputs, expected):
        assert_close(got[row0:row0 + n].cpu(), want[row0:row0 + n], rtol=1e-5, atol=1e-5, name=name)
        assert bool((got[:row0] == 7.0).all()) and bool((got[row0 + n:] == 7.0).all()), name


def _terms(n, device, seed=0, entropy_coef=0.02, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=gen) * 4
    ref = old - 0.3 * torch.randn(n, generator=gen)
    valid = torch.rand(n, generator=gen) > 0.2
    config = small_config(kl_beta=0.05, entropy_coef=entropy_coef, dual_clip_c=2.0)
    on = lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)  # noqa: E731
    return SweepTerms(on(torch.randn(n, generator=gen)), on(torch.rand(n, generator=gen) / n), on(valid),
                      on(old.clamp(max=0)), on(ref.clamp(max=0)), config)


@pytest.mark.parametrize("entropy_coef", [0.02, 0.0], ids=["entropy_bonus", "no_entropy_bonus"])
@pytest.mark.parametrize("chunk_size", [16, 45], ids=["3_chunks", "1_chunk"])
def test_sweep_matches_torch_chunked(make_linear_inputs, entropy_coef, chunk_size, device):
    hidden, weight, bias, targets = make_linear_inputs(45, 32, 97)
    kwargs = dict(temperature=0.9, chunk_size=chunk_size)
    terms = _terms(45, device, entropy_coef=entropy_coef)
    got = triton_backend.linear_fused_train(hidden, weight, bias, targets, terms, **kwargs)
    twin = _terms(45, "cpu", entropy_coef=entropy_coef, dtype=torch.float64)
    expected = torch_chunked.linear_fused_train(hidden.double().cpu(), weight.double().cpu(), bias.double().cpu(),
                                                targets.cpu(), twin, **kwargs)
    names = ("loss", "logprobs", "entropy", "lse", "grad_hidden", "grad_weight", "grad_bias")
    for name, a, e in zip(names, got, expected):
        assert_close(a.cpu(), e, rtol=1e-5, atol=1e-5, scaled=name.startswith("grad"), name=name)
    for name in ("loss", "ratio", "clip_low", "clip_high", "dual_clip"):
        a, e = getattr(terms.recorded, name).cpu(), getattr(twin.recorded, name)
        assert torch.equal(a, e) if a.dtype == torch.bool else bool(torch.allclose(a.double(), e, 1e-5, 1e-6)), name
    assert_close(terms.grad_logprobs.cpu(), twin.grad_logprobs, rtol=1e-5, atol=1e-7, name="grad_logprobs")


@pytest.mark.parametrize("mode", ["erpo", "grpo"])
def test_erpo_loss_triton_sweep_matches_chunked(mode):
    batch = make_batch(B=8, T=10, H=32, V=67, seed=7, with_bias=False, drift=WIDE_DRIFT)
    config = small_config(mode=mode, kl_beta=0.05, entropy_coef=0.01, dual_clip_c=2.0, chunk_size=24)
    results = []
    for backend in ("triton", "chunked"):
        hidden = batch["hidden"].clone().requires_grad_()
        weight = batch["weight"].clone().requires_grad_()
        out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], batch["rewards"], group_size=4,
                        old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                        old_entropy=batch["old_entropy"], config=config, backend=backend)
        out.loss.backward()
        results.append((out, hidden.grad, weight.grad))
    (a, gha, gwa), (b, ghb, gwb) = results
    for name, x, y in (("loss", a.loss, b.loss), ("grad_hidden", gha, ghb), ("grad_weight", gwa, gwb)):
        assert_close(x.detach(), y.detach(), rtol=1e-5, atol=1e-5, scaled=name != "loss", name=name)
    for key in b.metrics:
        assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-5, abs=1e-6), key
    assert a.metrics["dual_clip_frac"] > 0 and a.metrics["clip_frac_high"] > 0

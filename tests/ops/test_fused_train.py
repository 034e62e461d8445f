"""The Triton 3-GEMM training sweep (design (a)) against the chunked torch sweep and the reference."""
import pytest
import torch

from erpo_kernels import erpo_loss, reference
from erpo_kernels.backends import torch_chunked
from erpo_kernels.backends import triton as triton_backend
from erpo_kernels.ops.linear_stats import logits_stats
from tests.helpers import assert_close, make_batch, small_config


@pytest.mark.parametrize("with_bias, temperature", [(False, 1.0), (True, 0.7)], ids=["plain", "bias_T0.7"])
def test_logits_stats_matches_reference(make_linear_inputs, with_bias, temperature):
    hidden, weight, bias, targets = make_linear_inputs(37, 24, 101, with_bias=with_bias)
    logits = (hidden @ weight.t()).contiguous()
    got = logits_stats(logits, bias, targets, temperature)
    expected = reference.token_stats(hidden.double(), weight.double(), None if bias is None else bias.double(),
                                     targets.cpu(), temperature)
    for name, a, e in zip(("logprobs", "entropy", "lse"), got, expected):
        assert_close(a.cpu(), e, rtol=1e-5, atol=1e-5, name=name)


def _coefficients(n, seed=0, entropy_term=True):
    """A per-token loss L = a * lp^2 / 2 + b * H with fixed random a, b: d/dlp = a * lp, d/dH = b."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, generator=gen), torch.randn(n, generator=gen)

    def coefficients(start, stop, logprobs, entropy):
        aa, bb = a[start:stop].to(logprobs.device), b[start:stop].to(logprobs.device)
        loss = (aa * logprobs ** 2 / 2 + bb * entropy).sum()
        return loss, aa * logprobs, bb if entropy_term else None
    return coefficients


@pytest.mark.parametrize("entropy_term", [True, False], ids=["with_entropy", "logprob_only"])
def test_sweep_matches_torch_chunked(make_linear_inputs, entropy_term):
    hidden, weight, bias, targets = make_linear_inputs(45, 32, 97)
    coeff = _coefficients(45, entropy_term=entropy_term)
    kwargs = dict(temperature=0.9, chunk_size=16)
    got = triton_backend.linear_fused_train(hidden, weight, bias, targets, coeff, **kwargs)
    expected = torch_chunked.linear_fused_train(hidden.double(), weight.double(), bias.double(), targets, coeff,
                                                **kwargs)
    names = ("loss", "logprobs", "entropy", "lse", "grad_hidden", "grad_weight", "grad_bias")
    for name, a, e in zip(names, got, expected):
        assert_close(a.cpu(), e.cpu(), rtol=1e-5, atol=1e-5, scaled=name.startswith("grad"), name=name)


@pytest.mark.parametrize("mode", ["erpo", "grpo"])
def test_erpo_loss_triton_sweep_matches_chunked(mode):
    batch = make_batch(B=8, T=10, H=32, V=67, seed=7, with_bias=False)
    config = small_config(mode=mode, kl_beta=0.05, entropy_coef=0.01, chunk_size=24)
    grads = []
    for backend in ("triton", "chunked"):
        hidden = batch["hidden"].clone().requires_grad_()
        weight = batch["weight"].clone().requires_grad_()
        out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], batch["rewards"], group_size=4,
                        old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                        old_entropy=batch["old_entropy"], config=config, backend=backend)
        out.loss.backward()
        grads.append((out.loss.detach(), hidden.grad, weight.grad))
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), *grads):
        assert_close(a, e, rtol=1e-5, atol=1e-5, scaled=name != "loss", name=name)

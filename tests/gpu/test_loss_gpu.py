"""Realistic shapes on a CUDA device (``pytest -m gpu``; skipped without CUDA).

The loss on the Triton backend against the chunked torch backend in fp32 on the same rounded inputs,
both training designs, and the long-context shape that plain PyTorch cannot hold.
"""
import pytest
import torch

from erpo_kernels import ERPOConfig, erpo_loss, token_stats

pytestmark = pytest.mark.gpu


def _batch(B, T, H, V, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(B, T, H, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(V, H, device="cuda", generator=gen) / H ** 0.5).to(dtype)
    targets = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    mask = torch.rand(B, T, device="cuda", generator=gen) > 0.1
    rewards = torch.randint(0, 2, (B,), device="cuda", generator=gen).float()
    with torch.no_grad():
        old = token_stats(hidden, weight, targets)
        ref = token_stats(hidden + 0.05 * torch.randn_like(hidden), weight, targets)
    return hidden, weight, targets, mask, rewards, old, ref


def _loss_and_grads(batch, backend, config, with_old_entropy=True):
    hidden, weight, targets, mask, rewards, old, ref = batch
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = erpo_loss(h, w, targets, mask, rewards, group_size=8, old_logprobs=old.logprobs,
                    ref_logprobs=ref.logprobs, old_entropy=old.entropy if with_old_entropy else None,
                    config=config, backend=backend)
    out.loss.backward()
    return out.loss.detach().float(), h.grad.float(), w.grad.float()


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("with_old_entropy", [True, False], ids=["one_sweep", "stats_then_backward"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_matches_chunked_at_realistic_shape(dtype, with_old_entropy):
    batch = _batch(16, 256, 1024, 32000, dtype)
    config = ERPOConfig(mode="erpo", kl_beta=0.02, entropy_coef=0.001)
    got = _loss_and_grads(batch, "triton", config, with_old_entropy)
    fp32 = [x.float() if x.is_floating_point() else x for x in batch[:5]] + list(batch[5:])
    expected = _loss_and_grads(fp32, "chunked", config, with_old_entropy)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), got, expected):
        assert _rel(a, e) < tol, f"{name}: relative error {_rel(a, e):.3e}"


@pytest.mark.parametrize("design", ["fused", "chunked"])
def test_backward_designs_agree(design, monkeypatch):
    monkeypatch.setenv("ERPO_TRITON_GRAD", design)
    batch = _batch(8, 512, 2048, 50000, torch.bfloat16, seed=1)
    config = ERPOConfig(mode="ep_grpo", entropy_coef=0.001)
    got = _loss_and_grads(batch, "triton", config, with_old_entropy=False)
    fp32 = [x.float() if x.is_floating_point() else x for x in batch[:5]] + list(batch[5:])
    expected = _loss_and_grads(fp32, "chunked", config, with_old_entropy=False)
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight"), got, expected):
        assert _rel(a, e) < 2e-2, f"{name}: relative error {_rel(a, e):.3e}"


def test_128k_tokens_fit():
    """N = 131072 tokens, H = 4096, V = 151936, bf16: full logits alone would need 80 GB in fp32."""
    batch = _batch(32, 4096, 4096, 151936, torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, gh, gw = _loss_and_grads(batch, "triton", ERPOConfig(mode="erpo"))
    extra = torch.cuda.max_memory_allocated() - before
    assert torch.isfinite(loss) and bool(torch.isfinite(gh).all()) and bool(torch.isfinite(gw).all())
    assert extra < 24 * 2 ** 30

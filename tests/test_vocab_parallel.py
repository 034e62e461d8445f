"""Vocab (tensor) parallel: the lm_head split by vocabulary rows across 2 and 3 gloo ranks (V not divisible by
the rank count) gives the unsharded statistics, loss and gradients: grad_hidden whole on every rank, each
shard's weight and bias grads its rows of the full ones.  Real torch.distributed (gloo), one process per rank."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from erpo_kernels import erpo_loss, token_stats
from tests.helpers import WIDE_DRIFT, assert_close, make_batch, small_config

V = 37                   # 2 ranks: 19 + 18 rows; 3 ranks: 13 + 12 + 12


def _shards(world):
    sizes = [V // world + (r < V % world) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def _batch():
    batch = make_batch(B=8, T=6, H=16, V=V, G=4, seed=9, drift=WIDE_DRIFT, ignore_frac=0.15, with_bias=True)
    gen = torch.Generator().manual_seed(4)
    batch["g_lp"], batch["g_entropy"] = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    return batch


CONFIG = small_config(kl_beta=0.05, entropy_coef=0.02, dual_clip_c=3.0, chunk_size=11)


def _stats_and_loss(batch, weight, bias, backend, vocab_group=None):
    """token_stats forward + backward of a random upstream, then erpo_loss forward + backward."""
    results = {}
    hidden = batch["hidden"].clone().requires_grad_()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    st = token_stats(hidden, w, batch["targets"], 0.9, bias=b, backend=backend, vocab_group=vocab_group)
    ((st.logprobs * batch["g_lp"]).sum() + (st.entropy * batch["g_entropy"]).sum()).backward()
    results.update(logprobs=st.logprobs.detach(), entropy=st.entropy.detach(), lse=st.lse.detach(),
                   stats_grad_hidden=hidden.grad, stats_grad_weight=w.grad, stats_grad_bias=b.grad)
    hidden = batch["hidden"].clone().requires_grad_()
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    out = erpo_loss(hidden, w, batch["targets"], batch["mask"], batch["rewards"], group_size=4, bias=b,
                    old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"],
                    old_entropy=batch["old_entropy"], config=CONFIG, backend=backend, vocab_group=vocab_group)
    out.loss.backward()
    results.update(loss=out.loss.detach(), advantages=out.advantages, grad_hidden=hidden.grad, grad_weight=w.grad,
                   grad_bias=b.grad)
    return results


def _worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batch = _batch()
        start, stop = _shards(world)[rank]
        for backend in ("chunked", "triton"):
            got = _stats_and_loss(batch, batch["weight"][start:stop], batch["bias"][start:stop], backend,
                                  dist.group.WORLD)
            for key, value in got.items():
                out[f"{world}/{rank}/{backend}/{key}"] = value.clone()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3], ids=["vocab_parallel_2_ranks", "vocab_parallel_3_ranks"])
def test_vocab_parallel_equals_unsharded(world, tmp_path):
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), out), nprocs=world, join=True)
    batch = _batch()
    full = _stats_and_loss(batch, batch["weight"], batch["bias"], "chunked")
    assert full["stats_grad_weight"].abs().sum() > 0 and full["grad_bias"].abs().sum() > 0
    for backend in ("chunked", "triton"):
        for rank, (start, stop) in enumerate(_shards(world)):
            got = {k.rsplit("/", 1)[1]: v for k, v in out.items() if k.startswith(f"{world}/{rank}/{backend}/")}
            tag = f"{backend} rank {rank}/{world}"
            tol = 1e-5 if backend == "chunked" else 1e-4   # Triton: other fp32 summation orders than torch's
            for key in ("logprobs", "entropy", "lse", "loss", "advantages"):
                assert_close(got[key], full[key], rtol=tol, atol=tol / 10, name=f"{tag} {key}")
            for key in ("stats_grad_hidden", "grad_hidden"):
                assert_close(got[key], full[key], rtol=tol, atol=tol / 10, scaled=True, name=f"{tag} {key}")
            for key in ("stats_grad_weight", "stats_grad_bias", "grad_weight", "grad_bias"):
                assert_close(got[key], full[key][start:stop], rtol=tol, atol=tol / 10,
                             scaled=True, name=f"{tag} {key}")


def test_vocab_parallel_errors():
    batch = make_batch(seed=1)
    with pytest.raises(ValueError, match="^vocab_group"):
        token_stats(batch["hidden"], batch["weight"], batch["targets"], vocab_group=object())

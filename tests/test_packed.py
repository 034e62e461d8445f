"""Packed sequences (hidden [N, H], targets [N], cu_seqlens [S+1], no padding) give the numbers of the padded
[B, T] layout: advantages (positions, buckets, gate scopes), loss and gradients, every aggregation."""
import pytest
import torch

from erpo_kernels import erpo_advantages, erpo_loss, token_stats
from erpo_kernels.config import AGGREGATIONS
from tests.helpers import WIDE_DRIFT, assert_close, make_batch, small_config

B, T, G = 8, 11, 4
LENGTHS = [11, 3, 7, 1, 9, 11, 5, 8]          # one row full (the padded T is the longest sequence)


def _batch(seed=0):
    batch = make_batch(B=B, T=T, G=G, dtype=torch.float64, seed=seed, drift=WIDE_DRIFT, ignore_frac=0.1)
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    present = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    batch["mask"] = batch["mask"] & present                       # padding is never a completion token
    batch["present"] = present
    return batch


def _pack(batch):
    """The same batch packed: the first LENGTHS[i] positions of every row, end to end."""
    present = batch["present"]
    packed = {k: (v[present] if torch.is_tensor(v) and v.shape[:2] == (B, T) else v) for k, v in batch.items()}
    packed["cu_seqlens"] = torch.tensor([0] + LENGTHS).cumsum(0)
    return packed


CONFIGS = {
    "erpo": small_config(),
    "ep_grpo_cum_entropy": small_config(mode="ep_grpo"),
    "batch_scope": small_config(gate_scope="batch"),
    "sequence_scope_normalized": small_config(gate_scope="sequence", gate_normalize=True),
    "topk": small_config(gate="topk", gate_top_frac=0.3),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_packed_advantages_equal_padded(config):
    batch = _batch()
    packed = _pack(batch)
    args = ("rewards", "mask", "old_entropy", "old_logprobs", "ref_logprobs")
    padded = erpo_advantages(*(batch[a] for a in args), group_size=G, config=config)
    got = erpo_advantages(*(packed[a] for a in args), group_size=G, config=config, cu_seqlens=packed["cu_seqlens"])
    present = batch["present"]
    for name in ("advantages", "gate", "signal", "bucket"):
        assert_close(getattr(got, name), getattr(padded, name)[present], rtol=1e-12, atol=1e-14, name=name)
    assert_close(got.seq_advantage, padded.seq_advantage, rtol=1e-12, atol=1e-14, name="seq_advantage")


def _loss(batch, config, backend, packed=False, **extra):
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    layout = dict(cu_seqlens=batch["cu_seqlens"]) if packed else {}
    out = erpo_loss(hidden, weight, batch["targets"], batch["mask"], batch["rewards"], group_size=G,
                    old_logprobs=batch["old_logprobs"], ref_logprobs=batch["ref_logprobs"], config=config,
                    backend=backend, **layout, **extra)
    out.loss.backward()
    return out, hidden.grad, weight.grad


@pytest.mark.parametrize("old_entropy", [True, False], ids=["one_sweep", "two_pass"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_packed_loss_equals_padded(aggregation, old_entropy):
    batch = _batch(seed=AGGREGATIONS.index(aggregation))
    packed = _pack(batch)
    config = small_config(aggregation=aggregation, holder_p=2.0, kl_beta=0.05, entropy_coef=0.01, dual_clip_c=3.0,
                          chunk_size=13)
    extra = lambda b: dict(old_entropy=b["old_entropy"]) if old_entropy else {}  # noqa: E731
    padded, grad_hidden, grad_weight = _loss(batch, config, "chunked", **extra(batch))
    got, grad_packed, grad_weight_packed = _loss(packed, config, "chunked", packed=True, **extra(packed))
    present = batch["present"]
    assert_close(got.loss, padded.loss, rtol=1e-12, atol=1e-14, name="loss")
    assert_close(got.advantages, padded.advantages[present], rtol=1e-12, atol=1e-14, name="advantages")
    assert_close(got.logprobs, padded.logprobs[present], rtol=1e-12, atol=1e-14, name="logprobs")
    assert_close(grad_packed, grad_hidden[present], rtol=1e-10, atol=1e-12, scaled=True, name="grad_hidden")
    assert bool((grad_hidden[~present] == 0).all())
    assert_close(grad_weight_packed, grad_weight, rtol=1e-10, atol=1e-12, scaled=True, name="grad_weight")
    for key, value in padded.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_packed_on_the_triton_backend_and_max_seqlen():
    batch = _batch(seed=7)
    batch = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
    packed = _pack(batch)
    config = small_config(kl_beta=0.05, chunk_size=16)
    padded, grad_hidden, grad_weight = _loss(batch, config, "chunked", old_entropy=batch["old_entropy"])
    got, grad_packed, grad_weight_packed = _loss(packed, config, "triton", packed=True,
                                                 old_entropy=packed["old_entropy"], max_seqlen=max(LENGTHS))
    assert_close(got.loss, padded.loss, rtol=1e-5, atol=1e-6, name="loss")
    assert_close(grad_packed, grad_hidden[batch["present"]], rtol=1e-4, atol=1e-5, scaled=True, name="grad_hidden")
    assert_close(grad_weight_packed, grad_weight, rtol=1e-4, atol=1e-5, scaled=True, name="grad_weight")


def test_packed_token_stats_need_nothing_more():
    batch = _batch()
    packed = _pack(batch)
    padded = token_stats(batch["hidden"], batch["weight"], batch["targets"].clamp_min(0))
    got = token_stats(packed["hidden"], packed["weight"], packed["targets"].clamp_min(0))
    assert_close(got.logprobs, padded.logprobs[batch["present"]], rtol=1e-12, atol=1e-14, name="logprobs")


def test_bad_cu_seqlens():
    packed = _pack(_batch())
    args = (packed["hidden"], packed["weight"], packed["targets"], packed["mask"], packed["rewards"])
    with pytest.raises(ValueError, match="^cu_seqlens"):
        erpo_loss(*args, group_size=G, cu_seqlens=packed["cu_seqlens"] + 1)
    with pytest.raises(ValueError, match="^cu_seqlens"):
        erpo_loss(*args, group_size=G, cu_seqlens=packed["cu_seqlens"].float())
    with pytest.raises(ValueError, match="^max_seqlen"):
        erpo_loss(*args, group_size=G, cu_seqlens=packed["cu_seqlens"], max_seqlen=4)
    with pytest.raises(ValueError, match="^hidden: .*packed"):
        erpo_loss(args[0], args[1], args[2][None], *args[3:], group_size=G, cu_seqlens=packed["cu_seqlens"])

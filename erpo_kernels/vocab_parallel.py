"""Vocab (tensor) parallel token statistics: the lm_head split by vocabulary rows across a process group
(Megatron's convention: rank r holds a contiguous block of rows, in rank order; blocks may differ in size).

Each rank runs the ordinary backend on its shard and the partial statistics are reduced across the group:
with lse_r, H_r the logsumexp and entropy of the shard's own softmax and w_r = exp(lse_r - lse),

    lse = log sum_r exp(lse_r)                 (an all-reduce of the max, then of the shifted sums)
    H   = sum_r w_r (H_r + lse - lse_r)        (every term >= 0: no cancellation)
    lp  = z_y - lse,  z_y = lp_r + lse_r on the rank that holds y (an all-reduce sum, 0 elsewhere)

The backward is each shard's ordinary backward with the *global* lse and H (p = exp(z - lse) is then the
global softmax restricted to the shard) and a target that only the owner's one-hot column sees; the ranks'
grad_hidden contributions are all-reduced, each shard's weight (and bias) grad stays local.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from erpo_kernels.stats import StatsOptions
from erpo_kernels.validation import fail

Tensor = torch.Tensor


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows [start, start + size) of a vocabulary of ``total`` rows split across ``group``."""
    group: object
    start: int
    size: int
    total: int


def resolve_vocab_shard(weight: Tensor, group) -> VocabShard:
    """The shard layout from every rank's row count (one all-gather of a [1] tensor, read once)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        fail("vocab_group", group, "a process group of an initialized torch.distributed")
    size = weight.shape[0]
    sizes = [torch.zeros(1, dtype=torch.long, device=weight.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([size], dtype=torch.long, device=weight.device), group=group)
    sizes = [int(s) for s in torch.cat(sizes).tolist()]
    rank = dist.get_rank(group)
    return VocabShard(group, sum(sizes[:rank]), size, sum(sizes))


def _all_reduce(x: Tensor, op, group) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(x, op=op, group=group)
    return x


def _no_target(ignore_index: int) -> int:
    """A target id that no shard holds and that is not ignore_index: its row keeps the -g_lp p term."""
    return -1 if ignore_index != -1 else -2


class VocabParallelTokenStats(torch.autograd.Function):
    """(hidden [N, H], weight shard [V_r, H], bias shard, global targets [N]) -> global (logprobs, entropy,
    lse) [N]; a two-output backward like :class:`erpo_kernels.stats.LinearTokenStats`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options: StatsOptions, shard: VocabShard):
        import torch.distributed as dist

        ignored = targets == options.ignore_index
        owner = ~ignored & (targets >= shard.start) & (targets < shard.start + shard.size)
        local = torch.where(owner, targets - shard.start, options.ignore_index)
        lp_r, entropy_r, lse_r = options.backend.linear_stats(
            hidden, weight, bias, local, temperature=options.temperature, ignore_index=options.ignore_index,
            chunk_size=options.chunk_size)
        top = _all_reduce(lse_r.clone(), dist.ReduceOp.MAX, shard.group)
        lse = top + torch.log(_all_reduce(torch.exp(lse_r - top), dist.ReduceOp.SUM, shard.group))
        weight_r = torch.exp(lse_r - lse)
        entropy = _all_reduce(weight_r * (entropy_r + lse - lse_r), dist.ReduceOp.SUM, shard.group)
        target_logit = _all_reduce(torch.where(owner, lp_r + lse_r, 0.0), dist.ReduceOp.SUM, shard.group)
        logprobs = torch.where(ignored, 0.0, (target_logit - lse).clamp_max(0.0))
        backward_targets = torch.where(owner, local, torch.where(ignored, options.ignore_index,
                                                                  _no_target(options.ignore_index)))
        ctx.save_for_backward(hidden, weight, bias, backward_targets, lse, entropy)
        ctx.options, ctx.shard = options, shard
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return logprobs, entropy, lse

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        import torch.distributed as dist

        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        options = ctx.options
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None
        grad_hidden, grad_weight, grad_bias = options.backend.linear_stats_backward(
            hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
            temperature=options.temperature, ignore_index=options.ignore_index, chunk_size=options.chunk_size,
            needs_input_grad=tuple(ctx.needs_input_grad[:3]))
        if grad_hidden is not None:
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.shard.group)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def vocab_parallel_token_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                               options: StatsOptions, shard: VocabShard) -> Tuple[Tensor, Tensor, Tensor]:
    """Global per-token (logprobs, entropy, lse) shaped like ``targets`` from this rank's shard."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if not flat_hidden.is_contiguous():
        flat_hidden = flat_hidden.contiguous()
    out = VocabParallelTokenStats.apply(flat_hidden, weight, bias, targets.reshape(-1).long(), options, shard)
    return tuple(x.view(targets.shape) for x in out)


def check_backend(module) -> None:
    """The chunked, native and Triton backends treat a target outside the shard as no one-hot column (what the
    backward needs); the full-logits oracle does not."""
    if module.__name__.rsplit(".", 1)[-1] not in ("torch_chunked", "native", "triton"):
        fail("backend", module.__name__, "'chunked', 'native', 'triton' or 'auto' with vocab_group")

"""Per-token log-prob and entropy from hidden states: the autograd Function and ``token_stats``.

``LinearTokenStats`` is a true two-output Function: its backward takes upstream gradients for
both the log-probs and the entropy (either may be absent) and returns grads for hidden, weight
and bias, recomputing logits chunk by chunk (or tile by tile) instead of saving them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from erpo_kernels.backends import get_backend
from erpo_kernels.compaction import Compaction
from erpo_kernels.validation import ValueChecks, check_linear_inputs, unpack_lm_head

Tensor = torch.Tensor


class TokenStats(NamedTuple):
    """logprobs, entropy, lse: each shaped like ``targets``; fp32 (fp64 for fp64 inputs)."""
    logprobs: Tensor
    entropy: Tensor
    lse: Tensor


@dataclass(frozen=True)
class StatsOptions:
    """Everything the Function needs besides tensors: one argument, so backward returns a short tuple."""
    backend: object            # a backend module (erpo_kernels.backends.*)
    temperature: float = 1.0
    ignore_index: int = -100
    chunk_size: Optional[int] = None  # None: the backend's own choice


class LinearTokenStats(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias [V] | None, targets [N]) -> (logprobs, entropy, lse) [N].

    With a :class:`erpo_kernels.compaction.Compaction` only its live tokens go through the GEMMs, forward and
    backward; the dead ones get 0 outputs and a 0 hidden-state gradient (callers pass it for tokens whose
    gradient is 0 anyway: padding, ignored targets)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options: StatsOptions, compaction=None):
        h, t = (hidden, targets) if compaction is None else (compaction.rows(hidden), compaction.rows(targets))
        logprobs, entropy, lse = options.backend.linear_stats(
            h, weight, bias, t, temperature=options.temperature,
            ignore_index=options.ignore_index, chunk_size=options.chunk_size)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.options, ctx.compaction = options, compaction
        if compaction is not None:
            logprobs, entropy, lse = (compaction.scatter(x) for x in (logprobs, entropy, lse))
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)   # an unused output gets None, and its term is skipped
        return logprobs, entropy, lse

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        options, compaction = ctx.options, ctx.compaction
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None
        if compaction is not None:
            hidden, targets = compaction.rows(hidden), compaction.rows(targets)
            grad_logprobs, grad_entropy = compaction.rows(grad_logprobs), compaction.rows(grad_entropy)
        grad_hidden, grad_weight, grad_bias = options.backend.linear_stats_backward(
            hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
            temperature=options.temperature, ignore_index=options.ignore_index,
            chunk_size=options.chunk_size, needs_input_grad=tuple(ctx.needs_input_grad[:3]))
        if compaction is not None and grad_hidden is not None:
            grad_hidden = compaction.scatter(grad_hidden)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_token_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                       options: StatsOptions) -> TokenStats:
    """Run the Function on validated inputs of any leading shape; outputs shaped like ``targets``."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).long()
    if not flat_hidden.is_contiguous():
        flat_hidden = flat_hidden.contiguous()
    logprobs, entropy, lse = LinearTokenStats.apply(flat_hidden, weight, bias, flat_targets, options)
    shape = targets.shape
    return TokenStats(logprobs.view(shape), entropy.view(shape), lse.view(shape))


def token_stats(hidden: Tensor, lm_head, targets: Tensor, temperature: float = 1.0, *,
                bias: Optional[Tensor] = None, ignore_index: int = -100, backend: str = "auto",
                chunk_size: Optional[int] = None, check_values: bool = True, vocab_group=None,
                mask: Optional[Tensor] = None) -> TokenStats:
    """Per-token log-prob of ``targets``, entropy and logsumexp of softmax((hidden @ W.T + b) / temperature).

    hidden [B, T, H] or [N, H]; lm_head an nn.Linear or its weight [V, H] (a DTensor weight is gathered: see
    :func:`erpo_kernels.validation.gather_dtensor`); targets [B, T] / [N] ids
    (``ignore_index`` gives logprob 0).  Never builds [N, V] logits (except backend="torch").
    Differentiable in both logprobs and entropy; under ``torch.no_grad()`` it is the cheap
    old-policy / reference pass.  ``check_values=False`` skips the value checks (finite hidden states,
    targets in the vocabulary): then the call reads nothing back from the device.
    ``mask`` (shaped like ``targets``, e.g. the completion mask): only those tokens go through the GEMMs (the
    others get 0; :mod:`erpo_kernels.compaction`), their count read with the value checks.
    ``vocab_group`` (a torch.distributed process group): ``lm_head`` is this rank's block of vocabulary rows
    (rank order, contiguous; :mod:`erpo_kernels.vocab_parallel`) and the outputs are the whole vocabulary's.
    """
    weight, bias = unpack_lm_head(lm_head, bias, vocab_group)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature: got {temperature!r}, expected a number > 0")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size: got {chunk_size!r}, expected an int >= 1")
    checks = ValueChecks(check_values)
    shard = None
    if vocab_group is not None:
        from erpo_kernels.vocab_parallel import resolve_vocab_shard
        shard = resolve_vocab_shard(weight, vocab_group)
    check_linear_inputs(hidden, weight, bias, targets, ignore_index, checks,
                        vocab=None if shard is None else shard.total)
    compaction = None
    if mask is not None:
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(targets.shape) or mask.device != hidden.device:
            raise ValueError(f"mask: got {mask!r:.80}, expected a tensor shaped like targets {tuple(targets.shape)}")
        if shard is not None:
            raise ValueError("mask: got a mask with vocab_group, expected one of them (not implemented together)")
        live = mask.reshape(-1) != 0
        compaction = Compaction(live, checks.run(live=live.sum())["live"])
    else:
        checks.run()
    options = StatsOptions(get_backend(backend, hidden.device), float(temperature), ignore_index, chunk_size)
    if compaction is not None:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        out = LinearTokenStats.apply(flat_hidden, weight, bias, targets.reshape(-1).long(), options, compaction)
        return TokenStats(*(x.view(targets.shape) for x in out))
    if shard is not None:
        from erpo_kernels.vocab_parallel import check_backend, vocab_parallel_token_stats
        check_backend(options.backend)
        return TokenStats(*vocab_parallel_token_stats(hidden, weight, bias, targets, options, shard))
    return linear_token_stats(hidden, weight, bias, targets, options)

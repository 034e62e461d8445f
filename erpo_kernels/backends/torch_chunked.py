"""Pure-torch chunked backend: [chunk, V] logits at a time, never [N, V].

The CPU default, and the fallback everywhere.  Every backend module exposes the same two functions
(``linear_stats`` and ``linear_stats_backward``) with these signatures.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float) -> Tensor:
    """Logits z = (h W^T + b) / temperature for one token chunk, [n, V], in fp32 (fp64 for fp64 inputs).

    In place after the matmul: each extra [n, V] temporary is memory the chunked path promises not to use.
    """
    dtype = compute_dtype(hidden)
    logits = hidden @ weight.t()
    if logits.dtype != dtype:
        logits = logits.to(dtype)
    if bias is not None:
        logits.add_(bias)
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def compute_dtype(hidden: Tensor) -> torch.dtype:
    """Statistics are fp32 for bf16/fp16/fp32 inputs and fp64 for fp64 inputs."""
    return torch.promote_types(hidden.dtype, torch.float32)


# One [chunk, V] fp32 buffer of about 32 MiB: the chunked path holds a few of these at once.
AUTO_CHUNK_ELEMENTS = 8 * 1024 * 1024


def resolve_chunk_size(chunk_size: Optional[int], vocab: int) -> int:
    """``chunk_size`` tokens, or (None) as many as keep one fp32 [chunk, V] buffer near 32 MiB."""
    if chunk_size is not None:
        return chunk_size
    return max(16, AUTO_CHUNK_ELEMENTS // max(vocab, 1))


def linear_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, *,
                 temperature: float = 1.0, ignore_index: int = -100, chunk_size: Optional[int] = None
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-token log-prob of the target, entropy and logsumexp, each [N] in ``compute_dtype(hidden)``.

    torch: ``z = (hidden @ weight.T + bias) / temperature; lse = z.logsumexp(-1);``
    ``logprobs = z[n, targets] - lse`` (0 where ``targets == ignore_index``);
    ``entropy = lse - (softmax(z) * z).sum(-1)``.
    """
    n_tokens = hidden.shape[0]
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0])
    logprobs = hidden.new_empty(n_tokens, dtype=compute_dtype(hidden))
    entropy = torch.empty_like(logprobs)
    lse = torch.empty_like(logprobs)
    for start in range(0, n_tokens, chunk_size):
        stop = min(start + chunk_size, n_tokens)
        z = _chunk_logits(hidden[start:stop], weight, bias, temperature)
        chunk_lse = torch.logsumexp(z, dim=-1)
        lse[start:stop] = chunk_lse
        tgt = targets[start:stop]
        valid = tgt != ignore_index
        picked = z.gather(1, torch.where(valid, tgt, 0)[:, None]).squeeze(1)
        logprobs[start:stop] = torch.where(valid, picked - chunk_lse, 0.0)
        # H = lse - sum p z; p * z is NaN only for p = 0, z = -inf (a -inf bias), whose term is 0
        p_times_z = torch.sub(z, chunk_lse[:, None]).exp_().mul_(z).nan_to_num_(nan=0.0)
        entropy[start:stop] = chunk_lse - p_times_z.sum(-1)
        del z, p_times_z
    return logprobs, entropy, lse


def linear_stats_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          lse: Tensor, entropy: Tensor, grad_logprobs: Optional[Tensor],
                          grad_entropy: Optional[Tensor], *, temperature: float = 1.0,
                          ignore_index: int = -100, chunk_size: Optional[int] = None,
                          needs_input_grad: Tuple[bool, bool, bool] = (True, True, True)
                          ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``sum(grad_logprobs * logprobs + grad_entropy * entropy)``.

    With z the fp32 logits of one chunk and p = exp(z - lse):
    ``dz = g_lp * (onehot(y) - p) - g_H * p * (z - lse + H)``  (ERPO_SPEC.md, "Gradient of the fused part")
    ``grad_hidden = dz @ W / T``, ``grad_weight = dz.T @ h / T``, ``grad_bias = dz.sum(0) / T``.
    Accumulates grad_weight / grad_bias in fp32 and casts once at the end.
    """
    n_tokens = hidden.shape[0]
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0])
    want_h, want_w, want_b = needs_input_grad
    want_b = want_b and bias is not None
    grad_hidden = torch.empty_like(hidden) if want_h else None
    grad_weight = torch.zeros(weight.shape, dtype=compute_dtype(hidden), device=weight.device) if want_w else None
    grad_bias = torch.zeros(bias.shape, dtype=compute_dtype(hidden), device=bias.device) if want_b else None
    for start in range(0, n_tokens, chunk_size):
        stop = min(start + chunk_size, n_tokens)
        h = hidden[start:stop]
        z = _chunk_logits(h, weight, bias, temperature)
        chunk_lse = lse[start:stop, None]
        probs = torch.sub(z, chunk_lse).exp_()
        if grad_entropy is not None:   # dz = -g_H * p * (z - lse + H), built in z's buffer
            shift = chunk_lse - entropy[start:stop, None]
            dz = z.sub_(shift).mul_(probs).nan_to_num_(nan=0.0).mul_(-grad_entropy[start:stop, None].to(z.dtype))
        else:
            dz = z.zero_()
        if grad_logprobs is not None:  # dz += g_lp * (onehot(y) - p)
            tgt = targets[start:stop]
            valid = tgt != ignore_index
            g_lp = torch.where(valid, grad_logprobs[start:stop].to(dz.dtype), 0.0)
            dz.sub_(probs.mul_(g_lp[:, None]))
            dz.scatter_add_(1, torch.where(valid, tgt, 0)[:, None], g_lp[:, None])
        del probs
        if temperature != 1.0:
            dz.div_(temperature)
        if want_h:
            grad_hidden[start:stop] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
        if want_w:
            grad_weight += dz.t() @ h.to(dz.dtype)
        if want_b:
            grad_bias += dz.sum(0)
    if want_w:
        grad_weight = grad_weight.to(weight.dtype)
    if want_b:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias

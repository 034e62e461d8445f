"""Pure-torch chunked backend: [chunk, V] logits at a time, never [N, V].

The CPU default, and the fallback everywhere.  Every backend module exposes the same two functions
(``linear_stats`` and ``linear_stats_backward``) with these signatures.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


class _Workspace:
    """Two [chunk, V] buffers allocated once per call and reused by every chunk: the logits (turned
    into dz in place) and a scratch buffer.  Allocating fresh [chunk, V] temporaries per chunk lets
    the allocator's free lists fragment, and the process's resident memory creeps past the few
    buffers the algorithm needs."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.logits = torch.empty(rows, vocab, dtype=dtype, device=device)
        self.scratch = torch.empty_like(self.logits)

    def views(self, rows: int) -> Tuple[Tensor, Tensor]:
        return self.logits[:rows], self.scratch[:rows]


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, out: Tensor) -> Tensor:
    """``out`` = (h W^T + b) / temperature for one token chunk, [n, V], in ``out``'s (compute) dtype; ``weight``
    is already in that dtype (:func:`compute_weight`), a 16-bit chunk is upcast (exactly)."""
    torch.mm(hidden.to(out.dtype), weight.t(), out=out)
    if bias is not None:
        out.add_(bias)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def compute_weight(weight: Tensor) -> Tensor:
    """The weight in the compute dtype, once per call: bf16 / fp16 weights are upcast to fp32 (4·V·H bytes) so
    the logits and dz stay fp32 end to end.  Rounding them to 16 bits would cost bf16 logits ~0.4% of their
    magnitude, and fp16 dz (p ~ 1/V times a 1/N coefficient) underflows (13% grad error at V = 32000)."""
    return weight.to(compute_dtype(weight))


def compute_dtype(hidden: Tensor) -> torch.dtype:
    """Statistics are fp32 for bf16/fp16/fp32 inputs and fp64 for fp64 inputs."""
    return torch.promote_types(hidden.dtype, torch.float32)


# Bytes of the [chunk, V] buffers when chunk_size is None.  CPU: one 32 MiB fp32 logits buffer (the chunked
# path holds two such buffers; cache-friendly).  CUDA: the GEMMs of design (a) want >= ~1024 rows (a 55-token
# chunk at V = 151936 starves the tensor cores) and every chunk costs one read-modify-write of the fp32
# [V, H] grad_weight accumulator, so the budget is large: a quarter of the free device memory, at most 4 GiB,
# and at least what 1024 rows take while that fits in half of the free memory.  Not yet measured on a GPU.
CPU_CHUNK_BYTES = 32 * 1024 * 1024
CUDA_CHUNK_BYTES = 4 * 1024 ** 3
MIN_CUDA_ROWS = 1024


def cuda_chunk_rows(vocab: int, free_bytes: int, dz_bytes: int = 0) -> int:
    """Tokens per chunk on a CUDA device with ``free_bytes`` free: the budget rule above, a multiple of 16."""
    row_bytes = max(vocab, 1) * (4 + dz_bytes)
    rows = min(free_bytes // 4, CUDA_CHUNK_BYTES) // row_bytes
    if rows < MIN_CUDA_ROWS and MIN_CUDA_ROWS * row_bytes <= free_bytes // 2:
        rows = MIN_CUDA_ROWS
    return int(max(16, rows // 16 * 16))


def resolve_chunk_size(chunk_size: Optional[int], vocab: int, device: Optional[torch.device] = None,
                       dz_bytes: int = 0) -> int:
    """``chunk_size`` tokens, or (None) as many as fill the device's budget for the [chunk, V] buffers: an fp32
    logits buffer plus ``dz_bytes`` per logit of a separate dz buffer (see the budget notes above)."""
    if chunk_size is not None:
        return chunk_size
    if device is None or device.type != "cuda":
        return max(16, CPU_CHUNK_BYTES // (max(vocab, 1) * 4))
    return cuda_chunk_rows(vocab, torch.cuda.mem_get_info(device)[0], dz_bytes)


def _chunk_stats_(z: Tensor, targets: Tensor, ignore_index: int, scratch: Tensor
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logprobs, entropy, lse, row_max) [n] of one chunk's logits z [n, V].

    Centers z in place (z -= row max) so the entropy is computed without the cancellation of
    ``lse - sum p z`` at large |z|: with zc = z - m, e = exp(zc), s = sum e:
    ``lse = m + log s`` and ``H = log s - sum(e zc) / s``.
    """
    valid = targets != ignore_index
    picked = z.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    row_max = z.amax(-1)
    zc = z.sub_(row_max[:, None])
    e = torch.exp(zc, out=scratch)
    sum_e = e.sum(-1)
    # e * zc is NaN only for e = 0, zc = -inf (a -inf bias), whose term is 0
    sum_e_zc = e.mul_(zc).nan_to_num_(nan=0.0).sum(-1)
    log_sum_e = sum_e.log()
    lse = row_max + log_sum_e
    logprobs = torch.where(valid, picked - lse, 0.0)
    return logprobs, log_sum_e - sum_e_zc / sum_e, lse, row_max


def _chunk_dz_(z: Tensor, lse: Tensor, entropy: Tensor, targets: Tensor, grad_logprobs: Optional[Tensor],
               grad_entropy: Optional[Tensor], ignore_index: int, temperature: float, scratch: Tensor) -> Tensor:
    """Turn one chunk's logits z [n, V] into dz = d(loss)/d(h W^T + b), in z's own buffer.

    ``dz = (g_lp * (onehot(y) - p) - g_H * p * (z - lse + H)) / temperature``, p = exp(z - lse).
    z and lse may share any per-row shift (only z - lse enters).  A target outside [0, V) that is not
    ignore_index has no one-hot column here but keeps its ``-g_lp * p`` term: a vocab shard that does not
    hold the token (:mod:`erpo_kernels.vocab_parallel`), as the Triton kernels treat it.
    """
    probs = torch.sub(z, lse[:, None], out=scratch).exp_()
    if grad_entropy is not None:
        shift = (lse - entropy)[:, None]
        dz = z.sub_(shift).mul_(probs).nan_to_num_(nan=0.0).mul_(-grad_entropy[:, None].to(z.dtype))
    else:
        dz = z.zero_()
    if grad_logprobs is not None:
        valid = targets != ignore_index
        g_lp = torch.where(valid, grad_logprobs.to(dz.dtype), 0.0)
        dz.sub_(probs.mul_(g_lp[:, None]))
        here = valid & (targets >= 0) & (targets < z.shape[1])
        dz.scatter_add_(1, torch.where(here, targets, 0)[:, None], torch.where(here, g_lp, 0.0)[:, None])
    if temperature != 1.0:
        dz.div_(temperature)
    return dz


class _GradAccumulator:
    """grad_hidden rows per chunk; grad_weight / grad_bias summed over chunks in fp32 (fp64 for fp64); every
    product in the compute dtype (``weight``: :func:`compute_weight`), cast to the inputs' dtypes at the end."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], needs_input_grad,
                 input_dtypes: Tuple[torch.dtype, torch.dtype]):
        want_h, want_w, want_b = needs_input_grad
        dtype = compute_dtype(hidden)
        self.weight, self.weight_dtype = weight, input_dtypes[1]
        self.bias_dtype = None if bias is None else bias.dtype
        self.grad_hidden = torch.empty_like(hidden) if want_h else None
        self.grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_w else None
        self.grad_bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if want_b and bias is not None \
            else None

    def add(self, start: int, stop: int, h: Tensor, dz: Tensor) -> None:
        if self.grad_hidden is not None:
            rows = self.grad_hidden[start:stop]
            if rows.dtype == dz.dtype:
                torch.mm(dz, self.weight, out=rows)
            else:
                rows.copy_(dz @ self.weight)
        if self.grad_weight is not None:
            self.grad_weight.addmm_(dz.t(), h.to(dz.dtype))
        if self.grad_bias is not None:
            self.grad_bias += dz.sum(0)

    def result(self) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        grad_weight = None if self.grad_weight is None else self.grad_weight.to(self.weight_dtype)
        grad_bias = None if self.grad_bias is None else self.grad_bias.to(self.bias_dtype)
        return self.grad_hidden, grad_weight, grad_bias


def linear_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, *,
                 temperature: float = 1.0, ignore_index: int = -100, chunk_size: Optional[int] = None
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-token log-prob of the target, entropy and logsumexp, each [N] in ``compute_dtype(hidden)``.

    torch: ``z = (hidden @ weight.T + bias) / temperature; lse = z.logsumexp(-1);``
    ``logprobs = z[n, targets] - lse`` (0 where ``targets == ignore_index``);
    ``entropy = lse - (softmax(z) * z).sum(-1)``.
    """
    n_tokens = hidden.shape[0]
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0], hidden.device)
    outputs = [hidden.new_empty(n_tokens, dtype=compute_dtype(hidden)) for _ in range(3)]
    work = _Workspace(min(chunk_size, n_tokens), weight.shape[0], compute_dtype(hidden), hidden.device)
    weight_c = compute_weight(weight)
    for start in range(0, n_tokens, chunk_size):
        stop = min(start + chunk_size, n_tokens)
        z, scratch = work.views(stop - start)
        _chunk_logits(hidden[start:stop], weight_c, bias, temperature, out=z)
        for out, value in zip(outputs, _chunk_stats_(z, targets[start:stop], ignore_index, scratch)[:3]):
            out[start:stop] = value
    return tuple(outputs)


def linear_stats_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          lse: Tensor, entropy: Tensor, grad_logprobs: Optional[Tensor],
                          grad_entropy: Optional[Tensor], *, temperature: float = 1.0,
                          ignore_index: int = -100, chunk_size: Optional[int] = None,
                          needs_input_grad: Tuple[bool, bool, bool] = (True, True, True)
                          ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``sum(grad_logprobs * logprobs + grad_entropy * entropy)`` wrt hidden, weight, bias.

    ``grad_hidden = dz @ W``, ``grad_weight = dz.T @ h``, ``grad_bias = dz.sum(0)`` with dz of
    :func:`_chunk_dz_` (ERPO_SPEC.md, "Gradient of the fused part"), logits recomputed per chunk.
    """
    n_tokens = hidden.shape[0]
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0], hidden.device)
    weight_c = compute_weight(weight)
    grads = _GradAccumulator(hidden, weight_c, bias, needs_input_grad, (hidden.dtype, weight.dtype))
    work = _Workspace(min(chunk_size, n_tokens), weight.shape[0], compute_dtype(hidden), hidden.device)
    pick = lambda x, a, b: None if x is None else x[a:b]  # noqa: E731
    for start in range(0, n_tokens, chunk_size):
        stop = min(start + chunk_size, n_tokens)
        h = hidden[start:stop]
        z, scratch = work.views(stop - start)
        _chunk_logits(h, weight_c, bias, temperature, out=z)
        dz = _chunk_dz_(z, lse[start:stop], entropy[start:stop], targets[start:stop],
                        pick(grad_logprobs, start, stop), pick(grad_entropy, start, stop), ignore_index, temperature,
                        scratch)
        grads.add(start, stop, h, dz)
    return grads.result()


def linear_fused_train(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, terms, *,
                       temperature: float = 1.0, ignore_index: int = -100, chunk_size: Optional[int] = None,
                       needs_input_grad: Tuple[bool, bool, bool] = (True, True, True)):
    """Forward and backward in one sweep, 3 matmuls instead of 4: while a chunk's logits are live, compute its
    stats, fill its per-token coefficients (``terms``: a :class:`erpo_kernels.fused.SweepTerms`) and turn the
    logits into dz.

    Returns ``(loss, logprobs, entropy, lse, grad_hidden, grad_weight, grad_bias)`` with
    ``loss = sum(L * w)``.  Valid when every token's coefficient depends only on that token (old entropy
    known, linear aggregation).
    """
    n_tokens = hidden.shape[0]
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0], hidden.device)
    weight_c = compute_weight(weight)
    grads = _GradAccumulator(hidden, weight_c, bias, needs_input_grad, (hidden.dtype, weight.dtype))
    stats = [hidden.new_empty(n_tokens, dtype=compute_dtype(hidden)) for _ in range(3)]
    work = _Workspace(min(chunk_size, n_tokens), weight.shape[0], compute_dtype(hidden), hidden.device)
    for start in range(0, n_tokens, chunk_size):
        stop = min(start + chunk_size, n_tokens)
        h, tgt = hidden[start:stop], targets[start:stop]
        z, scratch = work.views(stop - start)
        _chunk_logits(h, weight_c, bias, temperature, out=z)
        logprobs, entropy, lse, row_max = _chunk_stats_(z, tgt, ignore_index, scratch)  # z is now z - row_max
        for out, value in zip(stats, (logprobs, entropy, lse)):
            out[start:stop] = value
        grad_logprobs, grad_entropy = terms.coefficients(start, stop, logprobs, entropy)
        dz = _chunk_dz_(z, lse - row_max, entropy, tgt, grad_logprobs, grad_entropy, ignore_index, temperature,
                        scratch)
        grads.add(start, stop, h, dz)
    return (terms.loss(), *stats, *grads.result())

"""Pure-torch chunked backend: [chunk, V] logits at a time, never [N, V].

The CPU default where the native extension is not built, and the fallback everywhere.  Every backend module
exposes the functions of this one (``linear_stats``, ``linear_stats_backward``, ``linear_fused_train``) with
these signatures.

The chunk loop is written once, here: per token chunk, the logits GEMM, the statistics, (the sweep's
coefficients,) dz and the gradient GEMMs.  What each step does comes from a :class:`TorchSteps` (``steps=``):
plain torch by default; the native backend (:mod:`erpo_kernels.backends.native`) passes its subclass, whose
statistics and dz are one compiled pass each.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor
HOST_BACKEND = True   # the chunk loop runs on the host: on CPU tensors a scalar read costs no device sync


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


# CPU chunk sizing for the native backend (measured: bench/RESULTS.md, "Native CPU backend", chunk sweep).  A
# chunk of R rows gives the three GEMMs M = R (or K = R): at V = 151936 a 32 MiB buffer holds 55 rows, too few.
# So the [R, V] logits buffer gets a share of the memory that is free after the [V, H] accumulator, up to a cap,
# and at least MIN_CPU_ROWS rows while those fit.  ``max_rows`` then caps it where more rows buy no time: at
# H = 896, V = 151936 (fp32, 1 and 2 threads) the training pass is flat from 256-384 rows up and 10-15% slower
# at 128, while its buffer grows linearly with the rows.
CPU_BUFFER_SHARE = 0.25
CPU_BUFFER_MAX_BYTES = 1024 ** 3
MIN_CPU_ROWS = 256


def available_host_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_chunk_rows(vocab: int, hidden_size: int, n_tokens: int, available: Optional[int] = None,
                   element_bytes: int = 4, max_rows: Optional[int] = None) -> int:
    """Tokens per chunk on the CPU for one [rows, V] buffer of ``element_bytes`` per logit, at most ``n_tokens``
    and ``max_rows``: the rule above, with ``available`` host bytes (default: MemAvailable, or 8 GiB where
    unknown)."""
    available = available if available is not None else (available_host_bytes() or 8 * 1024 ** 3)
    row_bytes = max(vocab, 1) * element_bytes
    free = max(available - vocab * hidden_size * 4, 0)
    rows = min(int(CPU_BUFFER_SHARE * free), CPU_BUFFER_MAX_BYTES) // row_bytes
    if rows < MIN_CPU_ROWS and MIN_CPU_ROWS * row_bytes <= free // 2:
        rows = MIN_CPU_ROWS
    if max_rows is not None:
        rows = min(rows, max_rows)
    return int(max(1, min(rows, max(n_tokens, 1))))


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


class TorchSteps:
    """The per-chunk steps of the chunk loop for one call, in plain torch: the weight in the compute dtype
    (:func:`compute_weight`), two [rows, V] buffers allocated once per call and reused by every chunk (the
    logits, turned into dz in place, and a scratch buffer; fresh [chunk, V] temporaries per chunk let the
    allocator's free lists fragment and the resident memory creep up), statistics and dz as a few torch passes
    each, gradients by :class:`_GradAccumulator`.  Subclasses replace the steps, not the loop."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], rows: int, temperature: float,
                 ignore_index: int):
        self.dtype = compute_dtype(hidden)
        self.weight, self.bias = compute_weight(weight), bias
        self.temperature, self.ignore_index = temperature, ignore_index
        self.logits_buffer = torch.empty(rows, weight.shape[0], dtype=self.dtype, device=hidden.device)
        self.scratch = torch.empty_like(self.logits_buffer)

    @staticmethod
    def chunk_rows(chunk_size: Optional[int], hidden: Tensor, weight: Tensor) -> int:
        """Tokens per chunk: ``chunk_size``, or :func:`resolve_chunk_size`'s budget."""
        return resolve_chunk_size(chunk_size, weight.shape[0], hidden.device)

    def logits(self, h: Tensor, lse: Optional[Tensor] = None) -> Tensor:
        """The chunk's logits [rows, V] in the buffer.  ``lse`` (the backward's recompute: the chunk's known
        logsumexp) lets a subclass store them more precisely; plain torch does not need it."""
        return _chunk_logits(h, self.weight, self.bias, self.temperature, out=self.logits_buffer[:h.shape[0]])

    def logits_and_stats(self, h: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(z, logprobs, entropy, lse, lse in the frame z is left in) for the chunk's hidden rows ``h``."""
        z = self.logits(h)
        logprobs, entropy, lse, row_max = _chunk_stats_(z, targets, self.ignore_index, self.scratch[:z.shape[0]])
        return z, logprobs, entropy, lse, lse - row_max     # z is now z - row_max

    def dz(self, z: Tensor, lse_in_z: Tensor, entropy: Tensor, targets: Tensor, grad_logprobs: Optional[Tensor],
           grad_entropy: Optional[Tensor]) -> Tensor:
        return _chunk_dz_(z, lse_in_z, entropy, targets, grad_logprobs, grad_entropy, self.ignore_index,
                          self.temperature, self.scratch[:z.shape[0]])

    def gradients(self, hidden: Tensor, weight: Tensor, needs_input_grad, n_chunks: int):
        """The accumulator of grad_hidden / grad_weight / grad_bias over the chunks (``add``, ``result``)."""
        return _GradAccumulator(hidden, self.weight, self.bias, needs_input_grad, (hidden.dtype, weight.dtype))


def _chunks(n_tokens: int, chunk: int):
    return [(start, min(start + chunk, n_tokens)) for start in range(0, n_tokens, chunk)]


def _setup(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], temperature: float, ignore_index: int,
           chunk_size: Optional[int], steps):
    steps = steps or TorchSteps
    chunk = steps.chunk_rows(chunk_size, hidden, weight)
    rows = min(chunk, hidden.shape[0])
    return steps(hidden, weight, bias, rows, temperature, ignore_index), _chunks(hidden.shape[0], chunk)


def linear_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, *,
                 temperature: float = 1.0, ignore_index: int = -100, chunk_size: Optional[int] = None,
                 steps=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-token log-prob of the target, entropy and logsumexp, each [N] in ``compute_dtype(hidden)``.

    torch: ``z = (hidden @ weight.T + bias) / temperature; lse = z.logsumexp(-1);``
    ``logprobs = z[n, targets] - lse`` (0 where ``targets == ignore_index``);
    ``entropy = lse - (softmax(z) * z).sum(-1)``.
    """
    work, chunks = _setup(hidden, weight, bias, temperature, ignore_index, chunk_size, steps)
    outputs = [hidden.new_empty(hidden.shape[0], dtype=work.dtype) for _ in range(3)]
    for start, stop in chunks:
        for out, value in zip(outputs, work.logits_and_stats(hidden[start:stop], targets[start:stop])[1:4]):
            out[start:stop] = value
    return tuple(outputs)


def linear_stats_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          lse: Tensor, entropy: Tensor, grad_logprobs: Optional[Tensor],
                          grad_entropy: Optional[Tensor], *, temperature: float = 1.0,
                          ignore_index: int = -100, chunk_size: Optional[int] = None,
                          needs_input_grad: Tuple[bool, bool, bool] = (True, True, True), steps=None
                          ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``sum(grad_logprobs * logprobs + grad_entropy * entropy)`` wrt hidden, weight, bias.

    ``grad_hidden = dz @ W``, ``grad_weight = dz.T @ h``, ``grad_bias = dz.sum(0)`` with dz of
    :func:`_chunk_dz_` (ERPO_SPEC.md, "Gradient of the fused part"), logits recomputed per chunk.
    """
    work, chunks = _setup(hidden, weight, bias, temperature, ignore_index, chunk_size, steps)
    grads = work.gradients(hidden, weight, needs_input_grad, len(chunks))
    pick = lambda x, a, b: None if x is None else x[a:b].to(work.dtype)  # noqa: E731
    for start, stop in chunks:
        h, chunk_lse = hidden[start:stop], lse[start:stop].to(work.dtype)
        z = work.logits(h, chunk_lse)
        dz = work.dz(z, chunk_lse, entropy[start:stop].to(work.dtype), targets[start:stop],
                     pick(grad_logprobs, start, stop), pick(grad_entropy, start, stop))
        grads.add(start, stop, h, dz)
    return grads.result()


def linear_fused_train(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, terms, *,
                       temperature: float = 1.0, ignore_index: int = -100, chunk_size: Optional[int] = None,
                       needs_input_grad: Tuple[bool, bool, bool] = (True, True, True), steps=None):
    """Forward and backward in one sweep, 3 matmuls instead of 4: while a chunk's logits are live, compute its
    stats, fill its per-token coefficients (``terms``: a :class:`erpo_kernels.fused.SweepTerms`) and turn the
    logits into dz.

    Returns ``(loss, logprobs, entropy, lse, grad_hidden, grad_weight, grad_bias)`` with
    ``loss = sum(L * w)``.  Valid when every token's coefficient depends only on that token (old entropy
    known, linear aggregation).
    """
    work, chunks = _setup(hidden, weight, bias, temperature, ignore_index, chunk_size, steps)
    grads = work.gradients(hidden, weight, needs_input_grad, len(chunks))
    stats = [hidden.new_empty(hidden.shape[0], dtype=work.dtype) for _ in range(3)]
    to_work = lambda x: None if x is None else x.to(work.dtype)  # noqa: E731
    for start, stop in chunks:
        h, tgt = hidden[start:stop], targets[start:stop]
        z, logprobs, entropy, lse, lse_in_z = work.logits_and_stats(h, tgt)
        for out, value in zip(stats, (logprobs, entropy, lse)):
            out[start:stop] = value
        grad_logprobs, grad_entropy = terms.coefficients(start, stop, logprobs, entropy)
        dz = work.dz(z, lse_in_z, entropy, tgt, to_work(grad_logprobs), to_work(grad_entropy))
        grads.add(start, stop, h, dz)
    return (terms.loss(), *stats, *grads.result())

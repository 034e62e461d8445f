"""Backward of the fused linear stats, design (a): per token chunk, one vendor (cuBLAS-class) GEMM for the fp32
logits [chunk, V], the Triton ``_dz_epilogue_kernel`` turning them into dz in place, and two more vendor GEMMs
for the grads.  Reuses the vendor GEMMs and needs no atomics (deterministic), at the cost of a chunk x V fp32
buffer.  The same pieces (``chunk_logits``, ``dz_epilogue_``, ``accumulate_chunk_grads``) make the 3-GEMM
training sweep of :mod:`erpo_kernels.backends.triton`.

dz as in :mod:`erpo_kernels.ops.linear_grad`: ``dz = g_lp * (onehot(y) - p) - g_H * p * (z - lse + H)``.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from erpo_kernels.ops import tile_config
from erpo_kernels.ops._jit_helpers import _dz_tile, _token_coefficients
from erpo_kernels.ops.linear_grad import _HEURISTICS, _check_grad_inputs, cast_grads, chunked_grad_buffers
from erpo_kernels.validation import fail

Tensor = torch.Tensor


@triton.heuristics(_HEURISTICS)
@triton.jit
def _dz_epilogue_kernel(
        # pointers (logits: raw h @ W^T in fp32, overwritten with dz / T)
        logits_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        # sizes
        N, V,
        # strides
        stride_ln,
        # scalars
        temperature, ignore_index,
        # meta-parameters
        HAS_BIAS: tl.constexpr, HAS_GRAD_LOGPROBS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    mask = mask_n[:, None] & mask_v[None, :]
    ptrs = logits_ptr + offs_n.to(tl.int64)[:, None] * stride_ln + offs_v[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    z = tl.where(mask_v[None, :], acc / temperature, float("-inf"))
    targets, lse, entropy, g_logprob, g_entropy = _token_coefficients(
        offs_n, mask_n, targets_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        ignore_index, HAS_GRAD_LOGPROBS, HAS_GRAD_ENTROPY)
    dz = _dz_tile(z, offs_v, mask_n, lse, entropy, g_logprob, g_entropy, targets,
                  HAS_GRAD_LOGPROBS, HAS_GRAD_ENTROPY) / temperature
    tl.store(ptrs, dz, mask=mask)


@functools.lru_cache(maxsize=None)
def _fp32_out_gemm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` works here (CUDA, torch >= 2.8) and
    accumulates correctly; checked once on a tiny problem."""
    try:
        a = torch.arange(6, device=device).reshape(2, 3).to(dtype)
        acc = torch.ones(2, 2, device=device)
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
        return bool(torch.equal(acc.cpu(), torch.tensor([[6.0, 15.0], [15.0, 51.0]])))
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with fp32 accumulation and no rounding of the product to a 16-bit dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _fp32_out_gemm_ok(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def linear_grad_chunked(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                        entropy: Optional[Tensor], grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor],
                        *, temperature: float = 1.0, ignore_index: int = -100, chunk_size: int = 1024,
                        needs_input_grad: Tuple[bool, bool, bool] = (True, True, True)
                        ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Design (a): same arguments and results as :func:`linear_grad_fused`; a [chunk_size, V] fp32 buffer
    per token chunk, vendor GEMMs, and ``_dz_epilogue_kernel`` in between.  Deterministic."""
    (hidden, weight, bias, targets, lse, entropy, grad_logprobs,
     grad_entropy) = _check_grad_inputs(hidden, weight, bias, targets, lse, entropy, grad_logprobs,
                                        grad_entropy, temperature, needs_input_grad)
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        fail("chunk_size", chunk_size, "a positive int")
    grads = grad_hidden, grad_weight, grad_bias = chunked_grad_buffers(hidden, weight, bias, needs_input_grad)
    n_tokens = hidden.shape[0]
    if n_tokens == 0 or all(g is None for g in grads) or (grad_logprobs is None and grad_entropy is None):
        return cast_grads(grads, hidden, weight, bias)

    for start in range(0, n_tokens, chunk_size):
        stop = min(start + chunk_size, n_tokens)
        h = hidden[start:stop]
        logits = chunk_logits(h, weight)
        rows = slice(start, stop)
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        dz_epilogue_(logits, bias, targets[rows], lse[rows], pick(entropy), pick(grad_logprobs),
                     pick(grad_entropy), temperature, ignore_index)
        accumulate_chunk_grads(logits, h, weight, pick(grad_hidden), grad_weight, grad_bias)
        del logits
    return cast_grads(grads, hidden, weight, bias)


def chunk_logits(h: Tensor, weight: Tensor) -> Tensor:
    """Raw fp32 logits h @ W^T [n, V] of one token chunk (vendor GEMM, fp32 accumulation and output)."""
    logits = torch.zeros(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
    _addmm_fp32_(logits, h, weight.t())
    return logits


def dz_epilogue_(logits: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor, entropy: Optional[Tensor],
                 grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor], temperature: float,
                 ignore_index: int) -> Tensor:
    """Overwrite a chunk's raw fp32 logits [n, V] with dz / temperature (one read, one write); returns it."""
    n_tokens, vocab = logits.shape
    kernel, meta = tile_config.launch_params("dz_epilogue", _dz_epilogue_kernel, dict(N=n_tokens, V=vocab),
                                             spec=tile_config.device_spec(logits.device),
                                             restore_value=("logits_ptr",))

    def grid(META):
        return (triton.cdiv(n_tokens, META["BLOCK_N"]), triton.cdiv(vocab, META["BLOCK_V"]))

    kernel[grid](logits, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                 n_tokens, vocab, logits.stride(0), float(temperature), int(ignore_index), **meta)
    return logits


def accumulate_chunk_grads(dz: Tensor, h: Tensor, weight: Tensor, grad_hidden_rows: Optional[Tensor],
                           grad_weight: Optional[Tensor], grad_bias: Optional[Tensor]) -> None:
    """grad_hidden_rows = dz @ W (written once, hidden's dtype); grad_weight += dz^T @ h and
    grad_bias += dz.sum(0) into fp32 accumulators."""
    dz_op = dz.to(h.dtype)
    if grad_hidden_rows is not None:
        torch.mm(dz_op, weight, out=grad_hidden_rows)
    if grad_weight is not None:
        _addmm_fp32_(grad_weight, dz_op.t(), h)
    if grad_bias is not None:
        grad_bias += dz.sum(0)

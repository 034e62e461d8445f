"""Design (a): vendor (cuBLAS-class) GEMMs around Triton epilogues over a materialized fp32 [chunk, V] logits
block, per token chunk.  The CUDA default for both training paths:

- the 3-GEMM training sweep (:func:`linear_fused_train_chunked`, old entropy given): logits GEMM ->
  ``_chunk_stats_kernel`` (log-prob, entropy, lse: one read of the block) -> the surrogate's per-token
  coefficients (one kernel, :func:`erpo_kernels.ops.surrogate.sweep_coefficients`) -> ``_dz_epilogue_kernel``
  (one read, dz written in the GEMM dtype, bias grad fused) -> grad_hidden and grad_weight GEMMs;
- the backward of the stats pass (:func:`linear_grad_chunked`): the same without the stats and coefficients.

Per chunk that is 3 GEMMs and 3 (resp. 1) Triton launches and a handful of aten ops (views and the GEMMs):
every per-token array is passed whole with a row offset, every buffer is allocated once per call
(:class:`ChunkWorkspace`).  Deterministic: no atomics (the bias grad sums per-row-block partials).
dz as in :mod:`erpo_kernels.ops.linear_grad`: ``dz = g_lp * (onehot(y) - p) - g_H * p * (z - lse + H)``;
GEMM precision by dtype in :mod:`erpo_kernels.ops.chunk_gemms`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from erpo_kernels.ops import tile_config
from erpo_kernels.ops._jit_helpers import LN2, LOG2E, _dz_tile, _online_softmax_step, _token_coefficients
from erpo_kernels.ops.chunk_gemms import ChunkGemms, dz_dtype
from erpo_kernels.ops.linear_grad import _HEURISTICS, _check_grad_inputs, cast_grads
from erpo_kernels.ops.linear_stats import check_linear_inputs
from erpo_kernels.validation import fail

Tensor = torch.Tensor


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def _chunk_stats_kernel(
        # pointers (logits: raw h @ W^T of rows [row0, row0 + n_rows), fp32, read once; outputs [N])
        logits_ptr, bias_ptr, targets_ptr, logprobs_ptr, entropy_ptr, lse_ptr,
        # sizes
        n_rows, V, row0,
        # strides
        stride_ln,
        # scalars
        temperature, ignore_index,
        # meta-parameters
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online softmax over the block's rows (as ``_linear_stats_fwd_kernel`` over recomputed tiles), in log2
    units: running max m, s = sum 2^(z - m) and t = sum 2^(z - m) (z - m); one program owns whole rows, so
    no merge: lse = ln2 m + ln s, H = ln s - ln2 t / s."""
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = local < n_rows
    offs_n = row0 + local
    targets = tl.load(targets_ptr + offs_n, mask=mask_n, other=ignore_index)
    rows = logits_ptr + local.to(tl.int64)[:, None] * stride_ln
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_sumzexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        acc = tl.load(rows + offs_v[None, :], mask=mask_n[:, None] & mask_v[None, :], other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        z2 = tl.where(mask_v[None, :], acc * (LOG2E / temperature), float("-inf"))   # log2 units
        run_max, run_sumexp, run_sumzexp = _online_softmax_step(run_max, run_sumexp, run_sumzexp, z2)
        target_logit += tl.sum(tl.where(offs_v[None, :] == targets[:, None], acc / temperature, 0.0), axis=1)
    log_sumexp = tl.log(run_sumexp)
    lse = run_max * LN2 + log_sumexp
    entropy = log_sumexp - run_sumzexp * LN2 / run_sumexp
    logprobs = tl.where(targets != ignore_index, tl.minimum(target_logit - lse, 0.0), 0.0)
    tl.store(logprobs_ptr + offs_n, logprobs, mask=mask_n)
    tl.store(entropy_ptr + offs_n, entropy, mask=mask_n)
    tl.store(lse_ptr + offs_n, lse, mask=mask_n)


@triton.heuristics({**_HEURISTICS, "COMPUTE_BIAS": lambda args: args["bias_partial_ptr"] is not None})
@triton.jit
def _dz_epilogue_kernel(
        # pointers (logits: raw h @ W^T of rows [row0, row0 + n_rows), fp32; dz: [n_rows, V] in the GEMM dtype,
        # possibly the logits buffer itself; per-token arrays [N]; bias_partial: [row blocks, V] fp32)
        logits_ptr, dz_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        bias_partial_ptr,
        # sizes
        n_rows, V, row0,
        # strides
        stride_ln, stride_dn,
        # scalars
        temperature, ignore_index,
        # meta-parameters
        HAS_BIAS: tl.constexpr, HAS_GRAD_LOGPROBS: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
        COMPUTE_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """dz / T of one [BLOCK_N, BLOCK_V] tile (one read of the logits, one write of dz); with COMPUTE_BIAS, the
    tile's column sums of dz / T go to this row block's partial (summed over row blocks by the caller)."""
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = local < n_rows
    mask_v = offs_v < V
    mask = mask_n[:, None] & mask_v[None, :]
    rows = local.to(tl.int64)[:, None]
    acc = tl.load(logits_ptr + rows * stride_ln + offs_v[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    z = tl.where(mask_v[None, :], acc / temperature, float("-inf"))
    targets, lse, entropy, g_logprob, g_entropy = _token_coefficients(
        row0 + local, mask_n, targets_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr, grad_entropy_ptr,
        ignore_index, HAS_GRAD_LOGPROBS, HAS_GRAD_ENTROPY)
    dz = _dz_tile(z, offs_v, mask_n, lse, entropy, g_logprob, g_entropy, targets,
                  HAS_GRAD_LOGPROBS, HAS_GRAD_ENTROPY) / temperature
    tl.store(dz_ptr + rows * stride_dn + offs_v[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_BIAS:
        tl.store(bias_partial_ptr + tl.program_id(0).to(tl.int64) * V + offs_v, tl.sum(dz, axis=0), mask=mask_v)


class ChunkWorkspace:
    """Everything one call's chunk loop needs, allocated once: the fp32 logits block, the dz block (the same
    buffer unless dz is bf16), the bias-grad partials, the GEMMs, and the fp32 gradient accumulators."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_size: int,
                 needs_input_grad: Tuple[bool, bool, bool], want_grads: bool = True):
        rows = min(chunk_size, hidden.shape[0])
        vocab, device = weight.shape[0], hidden.device
        self.gemms = ChunkGemms(weight, want_grads)
        self.spec = tile_config.device_spec(device)
        self.logits = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        dz = dz_dtype(weight.dtype)
        self.dz = self.logits if dz == torch.float32 else torch.empty(rows, vocab, dtype=dz, device=device)
        want_h, want_w, want_b = needs_input_grad if want_grads else (False, False, False)
        self.epilogue = tile_config.default_config("dz_epilogue", spec=self.spec)
        blocks = triton.cdiv(rows, self.epilogue.block_n)
        self.bias_partial = torch.empty(blocks, vocab, dtype=torch.float32, device=device) \
            if want_b and bias is not None else None
        self.grad_hidden = torch.empty_like(hidden) if want_h else None
        self.grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=device) if want_w else None
        self.grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if self.bias_partial is not None \
            else None

    def views(self, n: int) -> Tuple[Tensor, Tensor]:
        """The logits and dz blocks for a chunk of n rows (no view op unless n is short of a full chunk)."""
        if n == self.logits.shape[0]:
            return self.logits, self.dz
        return self.logits[:n], self.dz[:n]

    def add_grads(self, start: int, h: Tensor, dz: Tensor) -> None:
        if self.grad_hidden is not None:
            self.gemms.grad_hidden(dz, self.grad_hidden[start:start + h.shape[0]])
        if self.grad_weight is not None:
            self.gemms.grad_weight(self.grad_weight, dz, h, first=start == 0)
        if self.grad_bias is not None:
            blocks = triton.cdiv(h.shape[0], self.epilogue.block_n)
            self.grad_bias += self.bias_partial[:blocks].sum(0)

    def result(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
        if hidden.shape[0] == 0 and self.grad_weight is not None:   # no chunk wrote the accumulator
            self.grad_weight.zero_()
        return cast_grads((self.grad_hidden, self.grad_weight, self.grad_bias), hidden, weight, bias)


def chunk_stats_(logits: Tensor, bias: Optional[Tensor], targets: Tensor, row0: int, logprobs: Tensor,
                 entropy: Tensor, lse: Tensor, temperature: float, ignore_index: int) -> None:
    """Write rows [row0, row0 + n) of logprobs / entropy / lse [N] from the chunk's raw fp32 logits [n, V]."""
    n_rows, vocab = logits.shape
    kernel, meta = tile_config.launch_params("logits_stats", _chunk_stats_kernel, dict(N=n_rows, V=vocab),
                                             spec=tile_config.device_spec(logits.device))

    def grid(META):
        return (triton.cdiv(n_rows, META["BLOCK_N"]),)

    kernel[grid](logits, bias, targets, logprobs, entropy, lse, n_rows, vocab, row0, logits.stride(0),
                 float(temperature), int(ignore_index), **meta)


def dz_epilogue_(logits: Tensor, dz: Tensor, bias: Optional[Tensor], targets: Tensor, row0: int, lse: Tensor,
                 entropy: Optional[Tensor], grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor],
                 bias_partial: Optional[Tensor], temperature: float, ignore_index: int) -> Tensor:
    """dz [n, V] (GEMM dtype; may be ``logits`` itself) = dz / temperature of rows [row0, row0 + n) from their
    raw fp32 logits; per-token arrays are [N]; bias_partial [row blocks, V] gets the column sums."""
    n_rows, vocab = logits.shape
    # fixed config, never autotuned: the epilogue writes dz over its input (an autotuner would have to restore
    # the buffer between trials), and its row blocks must match the bias partials' (ChunkWorkspace)
    meta = tile_config.default_config("dz_epilogue", spec=tile_config.device_spec(logits.device)).meta(
        ("BLOCK_N", "BLOCK_V"))
    grid = (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(vocab, meta["BLOCK_V"]))
    _dz_epilogue_kernel[grid](logits, dz, bias, targets, lse, entropy, grad_logprobs, grad_entropy, bias_partial,
                              n_rows, vocab, row0, logits.stride(0), dz.stride(0), float(temperature),
                              int(ignore_index), **meta)
    return dz


def linear_grad_chunked(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                        entropy: Optional[Tensor], grad_logprobs: Optional[Tensor], grad_entropy: Optional[Tensor],
                        *, temperature: float = 1.0, ignore_index: int = -100, chunk_size: int = 1024,
                        needs_input_grad: Tuple[bool, bool, bool] = (True, True, True)
                        ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Design (a) backward of the stats pass: same arguments and results as
    :func:`erpo_kernels.ops.linear_grad.linear_grad_fused`; per chunk of ``chunk_size`` tokens the logits
    GEMM, ``_dz_epilogue_kernel`` and the two grad GEMMs.  Deterministic."""
    (hidden, weight, bias, targets, lse, entropy, grad_logprobs,
     grad_entropy) = _check_grad_inputs(hidden, weight, bias, targets, lse, entropy, grad_logprobs,
                                        grad_entropy, temperature, needs_input_grad)
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        fail("chunk_size", chunk_size, "a positive int")
    n_tokens = hidden.shape[0]
    wanted = (needs_input_grad[0], needs_input_grad[1], needs_input_grad[2] and bias is not None)
    if n_tokens == 0 or not any(wanted) or (grad_logprobs is None and grad_entropy is None):
        zeros = (torch.zeros_like(x) if want else None for x, want in zip((hidden, weight, bias), wanted))
        return tuple(zeros)
    work = ChunkWorkspace(hidden, weight, bias, chunk_size, needs_input_grad)
    for start in range(0, n_tokens, chunk_size):
        h = hidden[start:start + chunk_size]
        logits, dz = work.views(h.shape[0])
        work.gemms.logits(h, out=logits)
        dz_epilogue_(logits, dz, bias, targets, start, lse, entropy, grad_logprobs, grad_entropy, work.bias_partial,
                     temperature, ignore_index)
        work.add_grads(start, h, dz)
    return work.result(hidden, weight, bias)


def linear_fused_train_chunked(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, terms, *,
                               temperature: float = 1.0, ignore_index: int = -100, chunk_size: int = 1024,
                               needs_input_grad: Tuple[bool, bool, bool] = (True, True, True)):
    """The 3-GEMM training sweep (design (a)); the contract of
    :func:`erpo_kernels.backends.torch_chunked.linear_fused_train` (``terms``: a
    :class:`erpo_kernels.fused.SweepTerms`).  Per chunk: the logits GEMM, ``_chunk_stats_kernel``, the
    coefficient kernel, ``_dz_epilogue_kernel``, the two grad GEMMs."""
    from erpo_kernels.ops.surrogate import sweep_coefficients

    hidden, weight, bias, targets = check_linear_inputs(hidden, weight, bias, targets)
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        fail("chunk_size", chunk_size, "a positive int")
    n_tokens = hidden.shape[0]
    logprobs, entropy, lse = torch.empty(3, n_tokens, dtype=torch.float32, device=hidden.device)
    work = ChunkWorkspace(hidden, weight, bias, chunk_size, needs_input_grad)
    for start in range(0, n_tokens, chunk_size):
        h = hidden[start:start + chunk_size]
        logits, dz = work.views(h.shape[0])
        work.gemms.logits(h, out=logits)
        chunk_stats_(logits, bias, targets, start, logprobs, entropy, lse, temperature, ignore_index)
        sweep_coefficients(terms, start, h.shape[0], logprobs, entropy)
        dz_epilogue_(logits, dz, bias, targets, start, lse, entropy, terms.grad_logprobs, terms.grad_entropy,
                     work.bias_partial, temperature, ignore_index)
        work.add_grads(start, h, dz)
    return (terms.loss(), logprobs, entropy, lse, *work.result(hidden, weight, bias))

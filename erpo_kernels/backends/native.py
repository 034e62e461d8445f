"""The "native" backend: the chunk loop of :mod:`erpo_kernels.backends.torch_chunked` with the compiled CPU
kernels of ``csrc/`` for its per-chunk steps.  The only module that imports the compiled extension
``erpo_kernels._native`` (built by ``pip install``, see setup.py); importing this module without it raises a
ValueError that says why it is missing.

Per token chunk (``linear_fused_train``, the one-sweep training pass; the two-pass path uses the same steps):

1. fp32 / fp64 inputs: logits [rows, V] from one GEMM (torch.addmm), ``1 / temperature`` as its alpha and the
   bias as its beta term; then ``chunk_stats``: log-prob, entropy and logsumexp in one pass over the block.
   bf16 inputs: ``chunk_logits_bf16`` (csrc/logits_bf16.cpp) runs MKL's bf16 x bf16 -> fp32 GEMM tile by tile
   (256 rows x 512 vocabulary columns, in L2) and folds each tile into fp32 running statistics while storing
   it as bf16 minus a per-(row, slab) shift: the buffer is bf16, the statistics are as exact as from fp32
   logits, and no fp32 copy of the weight is ever made;
2. the surrogate's per-token coefficients (torch, [rows]-sized: ``SweepTerms.coefficients``);
3. ``chunk_dz_``: dz in one pass, in place, in the buffer's dtype (bf16 for bf16 inputs, so the two gradient
   GEMMs run at bf16 speed through oneDNN);
4. grad_hidden rows = dz @ W; grad_weight = dz^T @ h: written by the first chunk (no zero fill), accumulated
   in fp32 by the others (MKL's mixed GEMM for bf16), written in the weight's dtype directly when there is
   one chunk.

fp16 inputs run as in the chunked backend's precision policy (fp32 weight copy, fp32 dz: fp16 dz underflows).
Chunk size (None): :func:`erpo_kernels.backends.torch_chunked.cpu_chunk_rows`, from V, H and the free memory.
"""
from __future__ import annotations

import shutil
from typing import NamedTuple, Optional, Tuple

import torch

from erpo_kernels.backends import torch_chunked
from erpo_kernels.backends.torch_chunked import TorchSteps, compute_dtype, compute_weight

Tensor = torch.Tensor
HOST_BACKEND = True   # the chunk loop runs on the host: on CPU tensors a scalar read costs no device sync


def _unavailable(error: ImportError) -> ValueError:
    """Why the extension cannot be imported, in words a user can act on."""
    text = str(error)
    if "undefined symbol" in text or "cannot open shared object" in text:
        why = (f"erpo_kernels._native does not load against this torch {torch.__version__} ({text[:160]}); it "
               "was built against another torch: reinstall erpo-kernels (pip install -e .) to rebuild it")
    else:
        compiler = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
        how = ("no C++ compiler (c++, g++, clang++) is on PATH, so `pip install` could not build it; install "
               "one and reinstall erpo-kernels") if compiler is None else (
            f"a C++ compiler ({compiler}) is on PATH now, so it was not built when erpo-kernels was installed: "
            "torch was not installed before it, the build was skipped (ERPO_BUILD_NATIVE=0), or the compile "
            "failed; reinstall with `pip install -v -e .` to see the compiler's output")
        why = f"the compiled extension erpo_kernels._native is not built: {how}"
    return ValueError(f"backend='native': {why}. backend='chunked' runs everywhere without it")


try:
    from erpo_kernels import _native  # type: ignore[attr-defined]  # noqa: F401  (registers torch.ops.erpo_native)
except ImportError as _error:
    raise _unavailable(_error) from _error

_ops = torch.ops.erpo_native
# fp32 / fp64 chunk cap: the training pass at H = 896, V = 151936 is as fast with 384-row chunks as with 1024
# (bench/RESULTS.md, "Native CPU backend") at 229 instead of 449 MiB of buffer.
FP_CHUNK_ROWS = 384
BF16_GEMM = bool(_ops.has_bf16_gemm())   # MKL's bf16 x bf16 -> fp32 GEMM is in this torch


def capability() -> str:
    """The instruction set the row kernels run with here ("AVX512", "AVX2" or "DEFAULT")."""
    return str(_ops.capability())


class _Bf16Logits(NamedTuple):
    """A chunk's bf16 logits as chunk_logits_bf16 stores them: z minus a shift per (row, vocabulary slab)."""
    values: Tensor      # [rows, V] bf16
    shifts: Tensor      # [rows, ceil(V / kSlabCols)] fp32 (kSlabCols = 512, csrc/ops.h)


class NativeSteps(TorchSteps):
    """The chunk loop's steps with the compiled kernels, for one call: one [rows, V] buffer (fp32 / fp64, or bf16
    for bf16 inputs), no scratch buffer."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], rows: int, temperature: float,
                 ignore_index: int):
        self.dtype = compute_dtype(hidden)
        # bf16: GEMMs on the bf16 weight, fp32 statistics, bf16 logits and dz; otherwise the chunked policy
        self.bf16 = weight.dtype == torch.bfloat16 and hidden.dtype == torch.bfloat16 and BF16_GEMM
        self.weight = weight if self.bf16 else compute_weight(weight)
        self.bias = None if bias is None else bias.to(self.dtype)
        self.bias_dtype = None if bias is None else bias.dtype
        self.temperature, self.ignore_index = temperature, ignore_index
        buffer_dtype = torch.bfloat16 if self.bf16 else self.dtype
        self.logits_buffer = torch.empty(rows, weight.shape[0], dtype=buffer_dtype, device=hidden.device)

    @staticmethod
    def chunk_rows(chunk_size: Optional[int], hidden: Tensor, weight: Tensor) -> int:
        """``chunk_size``, or (None) the CPU rule (torch_chunked.cpu_chunk_rows): fp32 / fp64 chunks capped at
        FP_CHUNK_ROWS; bf16 chunks as large as the memory budget allows, so that a batch that fits in one chunk
        has its grad_weight written straight in bf16, without the fp32 accumulator (measured: one 1024-row chunk
        takes 0.77x the time of 384-row chunks at the 0.5B shape, and 230 against 640 MiB)."""
        if chunk_size is not None:
            return chunk_size
        bf16 = weight.dtype == torch.bfloat16 and hidden.dtype == torch.bfloat16 and BF16_GEMM
        return torch_chunked.cpu_chunk_rows(weight.shape[0], weight.shape[1], hidden.shape[0],
                                            element_bytes=2 if bf16 else compute_dtype(hidden).itemsize,
                                            max_rows=None if bf16 else FP_CHUNK_ROWS)

    def logits(self, h: Tensor, lse: Optional[Tensor] = None):
        """(h W^T + b) / temperature in one GEMM call, alpha = 1 / temperature and the bias as its beta term; for
        bf16 the compiled step that stores z - lse per row (``lse`` known: the backward's recompute)."""
        z = self.logits_buffer[:h.shape[0]]
        if self.bf16:
            return _Bf16Logits(z, _ops.chunk_logits_bf16(h.contiguous(), self.weight, self.bias, self._dummy_targets(h),
                                                          self.ignore_index, self.temperature, lse.contiguous(), z)[3])
        scale, beta = 1.0 / self.temperature, 0.0
        if self.bias is not None:
            z.copy_(self.bias.expand_as(z))
            beta = scale
        torch.addmm(z, h.to(z.dtype), self.weight.t(), beta=beta, alpha=scale, out=z)
        return z

    def logits_and_stats(self, h: Tensor, targets: Tensor):
        targets = targets.contiguous()
        if self.bf16:   # the GEMM and the statistics fused per vocabulary slab (csrc/logits_bf16.cpp)
            z = self.logits_buffer[:h.shape[0]]
            logprobs, entropy, lse, shifts = _ops.chunk_logits_bf16(h.contiguous(), self.weight, self.bias, targets,
                                                                    self.ignore_index, self.temperature, None, z)
            return _Bf16Logits(z, shifts), logprobs, entropy, lse, lse
        z = self.logits(h)
        logprobs, entropy, lse = _ops.chunk_stats(z, targets, self.ignore_index)
        return z, logprobs, entropy, lse, lse          # the logits are left as they are

    def _dummy_targets(self, h: Tensor) -> Tensor:
        """Targets for a recompute, which computes no log-prob: every row ignored."""
        return torch.full((h.shape[0],), self.ignore_index, dtype=torch.long, device=h.device)

    def dz(self, z, lse_in_z: Tensor, entropy: Tensor, targets: Tensor, grad_logprobs: Optional[Tensor],
           grad_entropy: Optional[Tensor]) -> Tensor:
        dense = lambda x: None if x is None else x.contiguous()  # noqa: E731  ([rows]: autograd may expand them)
        values, shifts = (z.values, z.shifts) if isinstance(z, _Bf16Logits) else (z, None)
        return _ops.chunk_dz_(values, dense(targets), dense(lse_in_z), dense(entropy), dense(grad_logprobs),
                              dense(grad_entropy), self.ignore_index, self.temperature, shifts)

    def gradients(self, hidden: Tensor, weight: Tensor, needs_input_grad, n_chunks: int):
        return _NativeGrads(self, hidden, weight.dtype, needs_input_grad, n_chunks)


class _NativeGrads:
    """grad_hidden rows per chunk; grad_weight written by the first chunk and accumulated by the others in fp32
    (fp64 for fp64), or written straight in the weight's dtype when there is a single chunk (one GEMM with an
    fp32 accumulator inside: nothing to add up across chunks); grad_bias as dz column sums."""

    def __init__(self, steps: NativeSteps, hidden: Tensor, weight_dtype: torch.dtype, needs_input_grad,
                 n_chunks: int):
        want_h, want_w, want_b = needs_input_grad
        self.steps, self.weight_dtype, self.first = steps, weight_dtype, True
        self.direct = n_chunks == 1 and steps.weight.dtype == weight_dtype
        self.grad_hidden = torch.empty_like(hidden) if want_h else None
        self.grad_weight = torch.empty(steps.weight.shape, dtype=weight_dtype if self.direct else steps.dtype,
                                       device=hidden.device) if want_w else None
        self.grad_bias = torch.zeros(steps.weight.shape[0], dtype=steps.dtype, device=hidden.device) \
            if want_b and steps.bias is not None else None

    def add(self, start: int, stop: int, h: Tensor, dz: Tensor) -> None:
        weight = self.steps.weight
        if self.grad_hidden is not None:
            rows = self.grad_hidden[start:stop]
            if rows.dtype == dz.dtype:
                torch.mm(dz, weight, out=rows)
            else:
                rows.copy_(dz @ weight)
        if self.grad_weight is not None:
            h = h.to(dz.dtype)
            if self.direct:
                torch.mm(dz.t(), h, out=self.grad_weight)
            elif dz.dtype == torch.bfloat16:
                _ops.gemm_bf16_f32(dz.t(), h, self.grad_weight, 1.0, 0.0 if self.first else 1.0)
            elif self.first:
                torch.mm(dz.t(), h, out=self.grad_weight)
            else:
                self.grad_weight.addmm_(dz.t(), h)
        if self.grad_bias is not None:
            self.grad_bias += dz.sum(0, dtype=self.steps.dtype)
        self.first = False

    def result(self) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        if self.first and self.grad_weight is not None:   # no chunk ran (no live token): nothing wrote it
            self.grad_weight.zero_()
        grad_weight = None if self.grad_weight is None else self.grad_weight.to(self.weight_dtype)
        grad_bias = None if self.grad_bias is None else self.grad_bias.to(self.steps.bias_dtype)
        return self.grad_hidden, grad_weight, grad_bias


def linear_stats(hidden, weight, bias, targets, **kwargs):
    """:func:`erpo_kernels.backends.torch_chunked.linear_stats` with the native steps."""
    return torch_chunked.linear_stats(hidden, weight, bias, targets, steps=NativeSteps, **kwargs)


def linear_stats_backward(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, **kwargs):
    """:func:`erpo_kernels.backends.torch_chunked.linear_stats_backward` with the native steps."""
    return torch_chunked.linear_stats_backward(hidden, weight, bias, targets, lse, entropy, grad_logprobs,
                                               grad_entropy, steps=NativeSteps, **kwargs)


def linear_fused_train(hidden, weight, bias, targets, terms, **kwargs):
    """:func:`erpo_kernels.backends.torch_chunked.linear_fused_train` with the native steps."""
    return torch_chunked.linear_fused_train(hidden, weight, bias, targets, terms, steps=NativeSteps, **kwargs)

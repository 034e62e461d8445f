"""The three vendor GEMMs of design (a) for one call (pure torch: cuBLAS on CUDA), and their precision policy.

Per token chunk: fp32 logits ``h @ W^T`` [n, V]; ``grad_hidden[rows] = dz @ W``; ``grad_weight += dz^T @ h``
into an fp32 [V, H] accumulator (the first chunk writes it: no zero-fill pass).  By input dtype:

- fp32: fp32 GEMMs (tensor-core tf32 where ``torch.backends.cuda.matmul.allow_tf32`` allows it); dz is fp32,
  written in place over the logits.
- bf16: bf16 operands with fp32 accumulation, the logits GEMM writing fp32 itself (``out_dtype``); dz is
  written in bf16 (bf16 has fp32's exponent range: p ~ 1/V times a 1/N coefficient is representable).
- fp16: dz stays fp32.  fp16's smallest normal is 6e-5, so p ~ 1/V (7e-6 at V = 151936) times a 1/N
  coefficient underflows to subnormals or 0: 13% error in grad_hidden at V = 32000 (measured).  The grad
  GEMMs then take fp32 operands: the weight is upcast once per call (4·V·H bytes), said once by a warning.

Where torch cannot write fp32 from 16-bit operands (``out_dtype`` needs CUDA and torch >= 2.8), the operands
are upcast instead (the weight once per call) and a warning says so once; under the CPU interpreter (tests)
that is the expected path and nothing is said.  Everything here is allocated once per call, so a chunk costs
only its GEMMs.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from erpo_kernels.ops.tile_config import interpreter_enabled

Tensor = torch.Tensor
_WARNED = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED and not interpreter_enabled():
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def fp32_out_gemm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm`` / ``torch.addmm`` with ``out_dtype=float32`` work here for 16-bit operands and
    accumulate correctly (CUDA with torch >= 2.8); checked once on a tiny problem."""
    if device.type != "cuda":
        return False
    try:
        a = torch.arange(6, device=device).reshape(2, 3).to(dtype)
        out = torch.empty(2, 2, device=device)
        torch.mm(a, a.t(), out_dtype=torch.float32, out=out)
        torch.addmm(out, a, a.t(), out_dtype=torch.float32, out=out)
        return bool(torch.equal(out.cpu(), torch.tensor([[10.0, 28.0], [28.0, 100.0]])))
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def dz_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype dz is written in for inputs of ``dtype`` (bf16 stays bf16; fp16 and fp32 use fp32)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


class ChunkGemms:
    """The GEMMs of one call on ``weight`` [V, H] for hidden states of the same dtype."""

    def __init__(self, weight: Tensor, want_grads: bool = True):
        self.weight = weight
        self.dtype = weight.dtype
        half = self.dtype in (torch.float16, torch.bfloat16)
        self.native = half and fp32_out_gemm_ok(weight.device, self.dtype)
        if half and not self.native:
            _warn_once(f"upcast-{weight.device.type}", "erpo_kernels: this torch cannot write fp32 from "
                       f"{self.dtype} GEMM operands (out_dtype needs CUDA and torch >= 2.8); the weight is upcast "
                       "to fp32 once per call (4*V*H bytes, slower GEMMs)")
        if want_grads and self.dtype == torch.float16:
            _warn_once("fp16", "erpo_kernels: fp16 gradients are computed from fp32 dz (fp16 cannot hold "
                       "p * g without underflow) with an fp32 copy of the weight made once per call; bf16 "
                       "avoids both")
        upcast = half and (not self.native or (want_grads and self.dtype == torch.float16))
        self.weight32: Optional[Tensor] = weight.float() if upcast else None
        self.weight_t = weight.t()
        self.weight32_t = None if self.weight32 is None else self.weight32.t()

    def logits(self, h: Tensor, out: Tensor) -> Tensor:
        """out [n, V] fp32 = h @ W^T (raw: no bias, no temperature)."""
        if self.dtype == torch.float32:
            return torch.mm(h, self.weight_t, out=out)
        if self.native:
            return torch.mm(h, self.weight_t, out_dtype=torch.float32, out=out)
        return torch.mm(h.float(), self.weight32_t, out=out)

    def grad_hidden(self, dz: Tensor, out: Tensor) -> None:
        """out [n, H] (hidden's dtype) = dz @ W, accumulated in fp32."""
        if dz.dtype == self.dtype and (self.dtype == torch.float32 or self.native):
            torch.mm(dz, self.weight, out=out)
        else:
            out.copy_(torch.mm(dz.float(), self.weight32 if self.weight32 is not None else self.weight))

    def grad_weight(self, acc: Tensor, dz: Tensor, h: Tensor, first: bool) -> None:
        """acc [V, H] fp32 (+)= dz^T @ h; ``first`` writes instead of adding."""
        dz_t = dz.t()
        if dz.dtype == torch.float32 or not self.native:
            a, b = dz_t.float(), h.float()
            torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)
        elif first:
            torch.mm(dz_t, h, out_dtype=torch.float32, out=acc)
        else:
            torch.addmm(acc, dz_t, h, out_dtype=torch.float32, out=acc)

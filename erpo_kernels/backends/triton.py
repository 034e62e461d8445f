"""The "triton" backend: ``linear_stats`` / ``linear_stats_backward`` / ``linear_fused_train`` with the
signatures and semantics of :mod:`erpo_kernels.backends.torch_chunked`, plus ``token_advantages`` and
``per_token_loss`` (the advantage and surrogate kernels), all computed by :mod:`erpo_kernels.ops`.

Differences from ``torch_chunked``: inputs must be float16, bfloat16 or float32 (no float64: tl.dot has no
fp64 tensor-core path; use the "torch"/"chunked" backends for fp64 checks), and statistics are always fp32.

Designs (DESIGN.md, "Kernel design notes"):
- the training sweep with known per-token coefficients (old entropy given) is always design (a):
  ``linear_fused_train_chunked``, 3 vendor GEMMs per token chunk around Triton epilogues;
- the backward of the stats pass (``ERPO_TRITON_GRAD``, read per call): ``"chunked"`` (default), design (a),
  ``linear_grad_chunked``: vendor GEMMs, a [chunk, V] fp32 buffer (+ a bf16 dz buffer for bf16 inputs),
  deterministic; or ``"fused"``, design (b), ``linear_grad_fused``: Triton tiles, no [chunk, V] buffer, fp32
  atomics (``ERPO_TRITON_DETERMINISTIC=1`` for the atomic-free variant).  (a) is the default because it runs
  at vendor-GEMM speed where (b) re-reads and re-writes fp32 grad tiles once per vocab tile (the traffic
  model, bench/README.md, estimates 5.9x the 4-GEMM floor for (b) with its default split plan, 3.1x with one
  split, against 1.07x for (a) at N=32768 on an H100); (b) stays for memory-starved cases and
  until a GPU measurement says otherwise.
- chunk size (None): :func:`erpo_kernels.backends.torch_chunked.resolve_chunk_size`, from V, the dz buffer's
  dtype and the free device memory.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from erpo_kernels.backends.torch_chunked import resolve_chunk_size
from erpo_kernels.ops.chunk_gemms import dz_dtype
from erpo_kernels.ops.linear_grad import linear_grad_fused
from erpo_kernels.ops.linear_grad_chunked import linear_fused_train_chunked, linear_grad_chunked
from erpo_kernels.ops.buckets import token_advantages_triton as token_advantages  # noqa: F401
from erpo_kernels.ops.linear_stats import linear_stats_fwd
from erpo_kernels.ops.surrogate import surrogate_triton as per_token_loss  # noqa: F401

Tensor = torch.Tensor
GRAD_DESIGNS = ("chunked", "fused")


def dz_bytes(dtype: torch.dtype) -> int:
    """Bytes per logit of design (a)'s separate dz buffer (0 when dz is written over the fp32 logits)."""
    return 2 if dz_dtype(dtype) == torch.bfloat16 else 0


def linear_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, *,
                 temperature: float = 1.0, ignore_index: int = -100, chunk_size: Optional[int] = None
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-token ``(logprobs, entropy, lse)``, each fp32 [N]; see ``torch_chunked.linear_stats``."""
    return linear_stats_fwd(hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index)


def grad_design() -> str:
    design = os.environ.get("ERPO_TRITON_GRAD", "chunked")
    if design not in GRAD_DESIGNS:
        raise ValueError(f"ERPO_TRITON_GRAD: got {design!r}, expected one of {GRAD_DESIGNS}")
    return design


def linear_stats_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          lse: Tensor, entropy: Tensor, grad_logprobs: Optional[Tensor],
                          grad_entropy: Optional[Tensor], *, temperature: float = 1.0,
                          ignore_index: int = -100, chunk_size: Optional[int] = None,
                          needs_input_grad: Tuple[bool, bool, bool] = (True, True, True)
                          ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``sum(grad_logprobs * logprobs + grad_entropy * entropy)`` wrt (hidden, weight, bias);
    see ``torch_chunked.linear_stats_backward``."""
    common = dict(temperature=temperature, ignore_index=ignore_index, needs_input_grad=needs_input_grad)
    if grad_design() == "chunked":
        chunk_size = resolve_chunk_size(chunk_size, weight.shape[0], hidden.device, dz_bytes(weight.dtype))
        return linear_grad_chunked(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                                   chunk_size=chunk_size, **common)
    deterministic = os.environ.get("ERPO_TRITON_DETERMINISTIC", "0") == "1"
    return linear_grad_fused(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                             deterministic=deterministic, **common)


def linear_fused_train(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, terms, *,
                       temperature: float = 1.0, ignore_index: int = -100, chunk_size: Optional[int] = None,
                       needs_input_grad: Tuple[bool, bool, bool] = (True, True, True)):
    """The 3-GEMM training sweep (design (a)); same contract as ``torch_chunked.linear_fused_train``.  See
    :func:`erpo_kernels.ops.linear_grad_chunked.linear_fused_train_chunked`."""
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0], hidden.device, dz_bytes(weight.dtype))
    return linear_fused_train_chunked(hidden, weight, bias, targets, terms, temperature=temperature,
                                      ignore_index=ignore_index, chunk_size=chunk_size,
                                      needs_input_grad=needs_input_grad)

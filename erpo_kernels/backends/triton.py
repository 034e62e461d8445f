"""The "triton" backend: ``linear_stats`` / ``linear_stats_backward`` / ``linear_fused_train`` with the
signatures and semantics of :mod:`erpo_kernels.backends.torch_chunked`, plus ``token_advantages`` and
``per_token_loss`` (the advantage and surrogate kernels), all computed by :mod:`erpo_kernels.ops`.

Differences from ``torch_chunked``: inputs must be float16, bfloat16 or float32 (no float64: tl.dot has no
fp64 tensor-core path; use the "torch"/"chunked" backends for fp64 checks), and statistics are always fp32.
``chunk_size`` only matters for the chunked backward design (None: ``torch_chunked.resolve_chunk_size``);
the forward and the fused backward never chunk.

Backward design (``ERPO_TRITON_GRAD``, read per call):
- ``"fused"`` (default): design (b), ``linear_grad_fused``: no [chunk, V] buffer, fp32 atomics for
  grad_weight (not bitwise reproducible; ``ERPO_TRITON_DETERMINISTIC=1`` switches to the atomic-free
  variant).  Chosen as default because it holds no logits buffer at all and runs identically under the
  interpreter; whether it beats (a) on an H100 is still to be measured (bench/).
- ``"chunked"``: design (a), ``linear_grad_chunked``: cuBLAS logits per ``chunk_size`` tokens, a Triton
  epilogue forms dz in place, cuBLAS grads.  3 vendor GEMMs, a chunk_size x V fp32 buffer, deterministic.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from erpo_kernels.backends.torch_chunked import resolve_chunk_size
from erpo_kernels.ops.linear_grad import cast_grads, chunked_grad_buffers, linear_grad_fused
from erpo_kernels.ops.linear_grad_chunked import accumulate_chunk_grads, chunk_logits, dz_epilogue_, linear_grad_chunked
from erpo_kernels.ops.buckets import token_advantages_triton as token_advantages  # noqa: F401
from erpo_kernels.ops.linear_stats import check_linear_inputs, linear_stats_fwd, logits_stats
from erpo_kernels.ops.surrogate import surrogate_triton as per_token_loss  # noqa: F401

Tensor = torch.Tensor
GRAD_DESIGNS = ("fused", "chunked")


def linear_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, *,
                 temperature: float = 1.0, ignore_index: int = -100, chunk_size: Optional[int] = None
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-token ``(logprobs, entropy, lse)``, each fp32 [N]; see ``torch_chunked.linear_stats``."""
    return linear_stats_fwd(hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index)


def grad_design() -> str:
    design = os.environ.get("ERPO_TRITON_GRAD", "fused")
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
        return linear_grad_chunked(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                                   chunk_size=resolve_chunk_size(chunk_size, weight.shape[0], hidden.device),
                                   **common)
    deterministic = os.environ.get("ERPO_TRITON_DETERMINISTIC", "0") == "1"
    return linear_grad_fused(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
                             deterministic=deterministic, **common)


def linear_fused_train(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, coefficients, *,
                       temperature: float = 1.0, ignore_index: int = -100, chunk_size: Optional[int] = None,
                       needs_input_grad: Tuple[bool, bool, bool] = (True, True, True)):
    """The 3-GEMM training sweep (design (a)); same contract as ``torch_chunked.linear_fused_train``.

    Per token chunk: cuBLAS fp32 logits, ``logits_stats`` (one read), the caller's per-token
    coefficients, ``dz_epilogue_`` in place (one read, one write), cuBLAS dX and dW.
    """
    hidden, weight, bias, targets = check_linear_inputs(hidden, weight, bias, targets)
    n_tokens = hidden.shape[0]
    chunk_size = resolve_chunk_size(chunk_size, weight.shape[0], hidden.device)
    grads = grad_hidden, grad_weight, grad_bias = chunked_grad_buffers(hidden, weight, bias, needs_input_grad)
    stats = [torch.empty(n_tokens, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, n_tokens))
        h, tgt = hidden[rows], targets[rows]
        logits = chunk_logits(h, weight)
        logprobs, entropy, lse = logits_stats(logits, bias, tgt, temperature, ignore_index)
        for out, value in zip(stats, (logprobs, entropy, lse)):
            out[rows] = value
        chunk_loss, grad_logprobs, grad_entropy = coefficients(rows.start, rows.stop, logprobs, entropy)
        loss += chunk_loss
        dz_epilogue_(logits, bias, tgt, lse, entropy, grad_logprobs, grad_entropy, temperature, ignore_index)
        accumulate_chunk_grads(logits, h, weight, None if grad_hidden is None else grad_hidden[rows],
                               grad_weight, grad_bias)
        del logits
    return (loss, *stats, *cast_grads(grads, hidden, weight, bias))

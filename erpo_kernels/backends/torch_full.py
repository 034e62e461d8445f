"""The "torch" backend: plain PyTorch, the way a trainer without fused kernels computes the loss.

Full [N, V] logits through :func:`erpo_kernels.reference.token_stats`, gradients by autograd through them,
the reference's advantage synthesis and surrogate: the oracle itself run as a backend.  For small shapes and
comparisons only (it holds several [N, V] tensors).  ``chunk_size`` is accepted and ignored.
"""
from __future__ import annotations

import torch

from erpo_kernels import reference
from erpo_kernels.advantages import reference_token_advantages as token_advantages  # noqa: F401
from erpo_kernels.reference import per_token_loss  # noqa: F401


def linear_stats(hidden, weight, bias, targets, *, temperature=1.0, ignore_index=-100, chunk_size=None):
    with torch.no_grad():
        return reference.token_stats(hidden, weight, bias, targets, temperature, ignore_index)


def linear_stats_backward(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, *,
                          temperature=1.0, ignore_index=-100, chunk_size=None,
                          needs_input_grad=(True, True, True)):
    """Autograd through the full logits (lse and entropy are recomputed, not read)."""
    leaves = [None if x is None else x.detach().requires_grad_(bool(need))
              for x, need in zip((hidden, weight, bias), needs_input_grad)]
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    if not wanted:
        return None, None, None
    with torch.enable_grad():
        logprobs, token_entropy, _ = reference.token_stats(*leaves, targets, temperature, ignore_index)
        pairs = [(out, g) for out, g in ((logprobs, grad_logprobs), (token_entropy, grad_entropy)) if g is not None]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g.to(o.dtype) for o, g in pairs],
                                         allow_unused=True))
    result = [next(grads) if x is not None and x.requires_grad else None for x in leaves]
    return tuple(g if g is not None or x is None or not x.requires_grad else torch.zeros_like(x)
                 for g, x in zip(result, leaves))

"""The "torch" backend: the same interface as ``torch_chunked`` with one chunk holding every token.

It builds the full [N, V] logits, like the plain-PyTorch trainers it stands for; use it for
small shapes and comparisons only.  Its advantage synthesis is the reference's (loops, readable).
"""
from __future__ import annotations

from erpo_kernels.advantages import reference_token_advantages as token_advantages  # noqa: F401
from erpo_kernels.backends import torch_chunked


def linear_stats(hidden, weight, bias, targets, *, temperature=1.0, ignore_index=-100, chunk_size=None):
    return torch_chunked.linear_stats(hidden, weight, bias, targets, temperature=temperature,
                                      ignore_index=ignore_index, chunk_size=max(hidden.shape[0], 1))


def linear_stats_backward(hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy, *,
                          temperature=1.0, ignore_index=-100, chunk_size=None,
                          needs_input_grad=(True, True, True)):
    return torch_chunked.linear_stats_backward(
        hidden, weight, bias, targets, lse, entropy, grad_logprobs, grad_entropy,
        temperature=temperature, ignore_index=ignore_index, chunk_size=max(hidden.shape[0], 1),
        needs_input_grad=needs_input_grad)

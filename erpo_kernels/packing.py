"""Packed sequences (the flash-attention / verl convention): S sequences laid end to end as N tokens, with
``cu_seqlens`` [S + 1] their boundaries (0 = cu[0] <= cu[1] <= ... <= cu[S] = N).

The [N, H] hidden states are never padded: the linear work (logits, statistics, gradients) runs on the
flat tokens either way.  Only the [tokens]-sized glue (advantages, surrogate, aggregation, metrics) is
sequence-structured; :class:`Layout` gives it an [S, T] view (T the longest sequence) by one scatter and
takes results back by one gather, so packed and padded inputs give the same numbers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from erpo_kernels.validation import fail

Tensor = torch.Tensor


class Layout:
    """How per-token tensors of the caller map to the [rows, T] grid the advantages work on.

    Padded input: the tensors already are [B, T] (``packed`` False, pad/unpad are identities).
    Packed input: per-token tensors are [N]; ``pad`` scatters them to [S, T] (``fill`` elsewhere) and
    ``unpad`` gathers [S, T] back to [N].  Both are differentiable.
    """

    def __init__(self, shape: Tuple[int, int], index: Optional[Tensor] = None, n_tokens: Optional[int] = None):
        self.shape = shape                   # (rows, T) of the grid
        self.index = index                   # [N] flat grid position of every packed token, or None
        self.n_tokens = n_tokens if n_tokens is not None else shape[0] * shape[1]

    @property
    def packed(self) -> bool:
        return self.index is not None

    @property
    def token_shape(self) -> Tuple[int, ...]:
        """The caller's per-token shape: [B, T] padded, [N] packed."""
        return (self.n_tokens,) if self.packed else self.shape

    def pad(self, x: Optional[Tensor], fill=0) -> Optional[Tensor]:
        if x is None or not self.packed:
            return x
        grid = torch.full((self.shape[0] * self.shape[1],), fill, dtype=x.dtype, device=x.device)
        return grid.scatter(0, self.index, x.reshape(-1)).view(self.shape)

    def unpad(self, x: Optional[Tensor]) -> Optional[Tensor]:
        if x is None or not self.packed:
            return x
        return x.reshape(-1).gather(0, self.index)

    def to_grid(self, flat: Tensor, fill=0) -> Tensor:
        """[N] in the token order of the flattened hidden states -> [rows, T]."""
        return self.pad(flat, fill) if self.packed else flat.view(self.shape)

    def flatten(self, grid: Optional[Tensor]) -> Optional[Tensor]:
        """[rows, T] -> [N] in the token order of the flattened hidden states."""
        if grid is None:
            return None
        return self.unpad(grid) if self.packed else grid.reshape(-1)


def packed_layout(cu_seqlens, n_tokens: int, device: torch.device, max_seqlen: Optional[int] = None,
                  checks=None) -> Layout:
    """The :class:`Layout` of ``n_tokens`` packed tokens with boundaries ``cu_seqlens`` [S + 1] (int).

    ``max_seqlen`` (the longest sequence, as flash-attention takes it) avoids reading it from the device;
    without it the lengths are read once (free when ``cu_seqlens`` is on the CPU).  The boundaries' values
    are checked through ``checks`` (a :class:`erpo_kernels.validation.ValueChecks`) when given.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = torch.as_tensor(cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        fail("cu_seqlens", cu_seqlens, "an int32/int64 tensor [S + 1] of sequence boundaries, S >= 1")
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    if checks is not None and checks.enabled:
        bad = (cu[0] != 0).long() + (cu[-1] != n_tokens).long() + (lengths < 0).sum()
        checks.add("cu_seqlens", cu_seqlens, bad,
                   lambda n, _: f"boundaries 0 = cu[0] <= cu[1] <= ... <= cu[S] = {n_tokens} (the tokens of hidden)")
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    elif not isinstance(max_seqlen, int) or max_seqlen < 0:
        fail("max_seqlen", max_seqlen, "an int >= the longest sequence, or None")
    rows, width = lengths.numel(), max(int(max_seqlen), 1)
    token = torch.arange(n_tokens, device=device)
    seq = torch.searchsorted(cu[1:], token, right=True).clamp_max(rows - 1)
    position = token - cu[seq]
    if checks is not None and checks.enabled:
        checks.add("max_seqlen", torch.tensor(width), (position >= width).sum(),
                   lambda n, _: f"at least the longest sequence of cu_seqlens (got {width})")
    # clamped so that bad boundaries cannot index out of the grid before the checks above are read
    return Layout((rows, width), seq * width + position.clamp(0, width - 1), n_tokens)

"""Token compaction: the GEMMs run on the tokens that carry gradient, gathered into a dense block.

A real RL batch is mostly tokens that carry none: padding, ignore-index targets, and (with no KL term and no
entropy bonus) every token of a zero-variance group, whose advantage is exactly 0 so its loss term and both
gradients are exactly 0.  :class:`Compaction` gathers the live rows of the hidden states into [n_live, H]
(the logits, statistics and gradient GEMMs then cost n_live / N of the dense ones) and scatters results back:
per-token outputs with a fill value, grad_hidden with zeros.  The live count sizes the gathered block, so it
is read from the device once, together with the input checks (:meth:`erpo_kernels.validation.ValueChecks.run`);
the index itself is built without another read.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


class Compaction:
    """The live rows of N tokens: ``index`` [n_live] int64, ascending."""

    def __init__(self, live: Tensor, n_live: int):
        flat = live.reshape(-1)
        self.n_tokens, self.n_live = flat.numel(), int(n_live)
        # position of every live token among the live ones; the dead ones land in a spare slot, dropped below
        slot = torch.where(flat, torch.cumsum(flat, 0) - 1, self.n_live)
        index = torch.empty(self.n_live + 1, dtype=torch.long, device=flat.device)
        self.index = index.scatter_(0, slot, torch.arange(self.n_tokens, device=flat.device))[:self.n_live]

    def rows(self, x: Optional[Tensor]) -> Optional[Tensor]:
        """x[live] for a per-token tensor [N, ...] (a gather: no device read)."""
        return None if x is None else x.index_select(0, self.index)

    def scatter(self, x_live: Tensor, fill=0.0) -> Tensor:
        """[n_live, ...] back to [N, ...], ``fill`` in the dead rows."""
        out = torch.full((self.n_tokens, *x_live.shape[1:]), fill, dtype=x_live.dtype, device=x_live.device)
        return out.index_copy_(0, self.index, x_live)

"""Training metrics of one ``erpo_loss`` call, kept on the device until someone reads them.

``erpo_loss`` computes every metric as a 0-dim tensor (no device read on the hot path).  :class:`Metrics` is
a read-only mapping of floats over them: reading any value materializes all of them with one device->host
transfer, so a trainer that logs every step pays one sync per step, and one that never reads pays none.
``metrics.tensors`` gives the 0-dim tensors themselves (to average over micro-batches on the device).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterator, Optional

import torch

Tensor = torch.Tensor


class Metrics(Mapping):
    """name -> float, materialized from 0-dim tensors on first read (one device read for all of them)."""

    def __init__(self, tensors: Dict[str, Tensor]):
        self.tensors = tensors
        self._values: Optional[Dict[str, float]] = None

    def _materialize(self) -> Dict[str, float]:
        if self._values is None:
            names = list(self.tensors)
            stacked = torch.stack([self.tensors[k].detach().to(torch.float64).reshape(()) for k in names]) \
                if names else torch.zeros(0)
            self._values = dict(zip(names, stacked.tolist()))
        return self._values

    def __getitem__(self, key: str) -> float:
        return self._materialize()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        if self._values is None:
            return f"Metrics({sorted(self.tensors)}, not yet read from the device)"
        return f"Metrics({self._values})"


def loss_metrics(loss: Tensor, valid: Tensor, live: Tensor, logprobs: Tensor, entropy: Tensor,
                 old_entropy: Optional[Tensor], adv, info: Dict[str, Tensor], ref_logprobs: Optional[Tensor],
                 groups) -> Metrics:
    """Means over the completion tokens (``valid``) unless named otherwise; counts of tokens and groups.

    loss, num_tokens, entropy / old_entropy / logprob (current and old policy), ratio, clip fractions (low,
    high, both, dual), adv_mean, adv_abs_mean, kl (k3, when reference log-probs are given); when the
    advantages were synthesized here (not given by the caller): gate_mean and gate_frac_above_half,
    progress_signal_abs_mean, zero_var_groups / num_groups.
    The current policy's quantities (entropy, logprob, ratio, clip fractions, kl) are means over the live
    tokens (``live``: the tokens the GEMMs ran on, :mod:`erpo_kernels.compaction`), the others over every
    completion token.  Every mean comes from one masked reduction over a stack of the per-token quantities.
    """
    dtype = entropy.dtype
    sources = {"entropy": entropy, "logprob": logprobs, "ratio": info["ratio"],
               "clip_frac": info["clip_low"] | info["clip_high"], "clip_frac_low": info["clip_low"],
               "clip_frac_high": info["clip_high"], "dual_clip_frac": info["dual_clip"],
               "adv_mean": adv.advantages, "adv_abs_mean": adv.advantages.abs()}
    if old_entropy is not None:
        sources["old_entropy"] = old_entropy
    if adv.gate is not None:       # synthesized here (not the caller's precomputed advantages)
        sources.update(gate_mean=adv.gate, gate_frac_above_half=adv.gate > 0.5,
                       progress_signal_abs_mean=adv.signal.abs())
    if ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        sources["kl"] = torch.exp(delta) - delta - 1.0
    current = ("entropy", "logprob", "ratio", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "kl")
    with torch.no_grad():
        stacked = torch.stack([x.reshape(valid.shape).to(dtype) for x in sources.values()])
        over = torch.stack([live if name in current else valid for name in sources])
        n = valid.sum()
        # where(), not a product: padding may hold inf (e.g. a ratio of garbage log-probs), and inf * 0 = NaN
        means = torch.where(over, stacked, 0.0).sum((1, 2)) / over.sum((1, 2)).clamp_min(1)
        tensors = dict(zip(sources, means.unbind()))
        tensors.update(loss=loss.detach(), num_tokens=n)
        if groups is not None and adv.zero_var is not None:
            tensors["zero_var_groups"] = torch.zeros(groups.count, dtype=torch.bool, device=valid.device).index_put(
                (groups.index,), adv.zero_var).sum()
            tensors["num_groups"] = torch.full((), float(groups.count), device=valid.device)
    return Metrics(tensors)

"""Input checks at the public entry points: every failure is a ValueError naming the argument, what it got and
what was expected.  Kernels and backends assume validated inputs.

Two kinds of check.  Shapes, dtypes and devices are metadata: free, always done.  Values (finite hidden states
and rewards, targets in the vocabulary, 0/1 masks, log-probs <= 0, entropy >= 0, at least one completion token)
live on the device: each check adds a 0-dim count (and a detail for the message) to a :class:`ValueChecks`,
and ``run()`` reads them all with one device->host transfer, the one sync a call allows itself for its
inputs.  ``ERPOConfig(check_values=False)`` skips the value checks for production runs that trust their
inputs: then a call reads nothing from the device.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Log-probs a hair above 0 come from rounding (lse computed in fp32); more than this is a bug upstream.
LOGPROB_TOLERANCE = 1e-4


def describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return f"{type(x).__name__} {x!r}"


def fail(name: str, got, expected: str):
    raise ValueError(f"{name}: got {describe(got) if not isinstance(got, str) else got}, expected {expected}")


class ValueChecks:
    """Value checks collected as device tensors and read at once.  ``add(name, x, bad, expected, detail)``:
    ``bad`` a 0-dim count of offending entries, ``detail(d)`` words for the message from the 0-dim ``detail``
    tensor's value (e.g. the largest offending value)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._items: List[Tuple[str, Tensor, Tensor, Callable[[float, float], str], Tensor]] = []

    def add(self, name: str, x: Tensor, bad: Tensor, expected: Callable[[float, float], str],
            detail: Optional[Tensor] = None) -> None:
        """Callers build ``bad`` only when ``self.enabled`` (the counts cost device work)."""
        self._items.append((name, x, bad, expected, bad if detail is None else detail))

    def run(self, **reads: Tensor) -> Dict[str, float]:
        """One device read for every check added and every 0-dim tensor in ``reads`` (values the caller needs
        on the host anyway, e.g. a count that sizes a buffer); raise for the first check that fails, else
        return the ``reads`` as floats."""
        items = [torch.stack([bad.double(), detail.double()]) for _, _, bad, _, detail in self._items]
        items += [torch.stack([x.double().reshape(()), x.double().reshape(())]) for x in reads.values()]
        if not items:
            return {}
        values = torch.stack(items).tolist()
        for (name, x, _, expected, _), (count, detail) in zip(self._items, values):
            if count > 0:
                fail(name, x, expected(count, detail))
        self._items.clear()
        return {name: value for name, (value, _) in zip(reads, values[len(values) - len(reads):])}


def unpack_lm_head(lm_head, bias: Optional[Tensor], vocab_group=None) -> Tuple[Tensor, Optional[Tensor]]:
    """Accept an nn.Linear (weight [V, H], optional bias) or its weight tensor; a DTensor weight or bias
    (FSDP2's ``fully_shard``, tensor parallel) is gathered whole, see :func:`gather_dtensor`."""
    if isinstance(lm_head, nn.Linear):
        if bias is not None and lm_head.bias is not None:
            raise ValueError("bias: given both as an argument and as lm_head.bias; expected one of them")
        weight, bias = lm_head.weight, lm_head.bias if bias is None else bias
    elif not isinstance(lm_head, Tensor):
        fail("lm_head", lm_head, "an nn.Linear or a weight tensor [V, H]")
    else:
        weight = lm_head
    if vocab_group is not None and (is_dtensor(weight) or is_dtensor(bias)):
        # gathered, every rank would hold the whole vocabulary and the shard layout would count it world times
        fail("lm_head", "a DTensor weight or bias with vocab_group",
             "this rank's block of vocabulary rows as a plain tensor with vocab_group "
             "(lm_head.weight.to_local() of a Shard(0) DTensor), or the DTensor without vocab_group")
    return gather_dtensor(weight), gather_dtensor(bias)


def is_dtensor(x) -> bool:
    """True for a torch.distributed.tensor.DTensor; no import (a DTensor exists only once its module is loaded)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def gather_dtensor(x: Optional[Tensor]) -> Optional[Tensor]:
    """A DTensor parameter gathered whole (``full_tensor``, differentiable), its gradient returned to the shards
    averaged over the device mesh, as FSDP2 (``fully_shard``) and DDP average data-parallel gradients: every
    rank's loss is its part of the batch, and the model's other parameters get the mean over ranks.  Ranks
    holding the same tokens (tensor parallel) get their common gradient.  Another reduction: pass
    ``weight.full_tensor(grad_placements=...)``, a plain tensor, instead.  Anything else is returned as is."""
    if not is_dtensor(x):
        return x
    from torch.distributed.tensor import Partial
    return x.full_tensor(grad_placements=[Partial("avg")] * x.device_mesh.ndim)


def reject_dtensor(name: str, x) -> None:
    """Per-token inputs are this rank's tokens: a DTensor would leave it open which tokens are meant."""
    if is_dtensor(x):
        fail(name, f"a DTensor (placements {x.placements})", "a plain tensor of this rank's tokens: pass "
             f"{name}.to_local() (with the matching rows of targets and mask) or {name}.full_tensor() (every rank's)")


def check_float(name: str, x, ndim: Optional[int] = None, shape=None, device=None) -> None:
    """Metadata checks of a floating-point tensor (no device read)."""
    if not isinstance(x, Tensor):
        fail(name, x, "a torch.Tensor")
    if x.dtype not in FLOAT_DTYPES:
        fail(name, x, f"a floating dtype in {[str(d) for d in FLOAT_DTYPES]}")
    if ndim is not None and x.dim() != ndim:
        fail(name, x, f"{ndim} dimensions")
    if shape is not None and tuple(x.shape) != tuple(shape):
        fail(name, x, f"shape {tuple(shape)}")
    if device is not None and x.device != device:
        fail(name, x, f"device {device} (the device of hidden)")


def _nonfinite(x: Tensor, where: Optional[Tensor] = None) -> Tensor:
    bad = ~torch.isfinite(x)
    return (bad if where is None else bad & where).sum()


def check_linear_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                        ignore_index: int, checks: ValueChecks, weight_name: str = "lm_head",
                        vocab: Optional[int] = None) -> None:
    """hidden [..., H] float, finite; weight [V, H]; bias [V]; targets [...] int in [0, V) or ignore_index.
    ``weight_name`` is what the caller called the weight argument; ``vocab`` the whole vocabulary when the
    weight is one vocab shard of it (default: the weight's rows)."""
    check_float("hidden", hidden)
    reject_dtensor("hidden", hidden)
    if hidden.dim() not in (2, 3):
        fail("hidden", hidden, "[B, T, H] or [N, H]")
    check_float(weight_name, weight, device=hidden.device)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        fail(weight_name, weight, f"a weight [V, H] with H = {hidden.shape[-1]} (the last dim of hidden)")
    if weight.dtype != hidden.dtype:
        fail(weight_name, weight, f"dtype {hidden.dtype}, the dtype of hidden (hidden is {hidden.dtype}, "
                                  f"{weight_name} is {weight.dtype}: cast one to the other)")
    if bias is not None:
        check_float("bias", bias, shape=(weight.shape[0],), device=hidden.device)
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        fail("targets", targets, "an int64/int32 tensor of token ids")
    if targets.device != hidden.device:
        fail("targets", targets, f"device {hidden.device}")
    if targets.numel() != hidden.numel() // max(hidden.shape[-1], 1) or (
            hidden.dim() == 3 and tuple(targets.shape) != tuple(hidden.shape[:2])):
        fail("targets", targets, f"one id per token of hidden {tuple(hidden.shape)}")
    if not checks.enabled:
        return
    checks.add("hidden", hidden, _nonfinite(hidden), lambda n, _: f"finite values ({n:.0f} NaN/inf entries)")
    vocab = weight.shape[0] if vocab is None else vocab
    flat = targets.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
    # the first offending id, by gather (indexing with a 0-dim tensor would read it back to the host)
    example = flat.gather(0, bad.to(torch.uint8).argmax().reshape(1))[0] if flat.numel() else bad.sum()
    checks.add("targets", targets, bad.sum(),
               lambda n, found: f"ids in [0, {vocab}) or ignore_index={ignore_index} (found {found:.0f})", example)


def check_token_tensor(name: str, x, shape, device, mask: Tensor, checks: ValueChecks,
                       max_value: Optional[float] = None, min_value: Optional[float] = None) -> None:
    """A per-token float tensor [B, T]: finite, and within bounds, on the masked tokens only."""
    if x is None:
        return
    check_float(name, x, shape=shape, device=device)
    if not checks.enabled:
        return
    checks.add(name, x, _nonfinite(x, mask), lambda n, _: "finite values on the completion mask")
    if max_value is not None:
        top = torch.where(mask, x, -math.inf).amax() if x.numel() else x.new_tensor(-math.inf)
        checks.add(name, x, (top > max_value).sum(), lambda _, found: f"values <= {max_value} on the mask (max "
                   f"found {found:.4g}; log-probs cannot be positive)", top)
    if min_value is not None:
        low = torch.where(mask, x, math.inf).amin() if x.numel() else x.new_tensor(math.inf)
        checks.add(name, x, (low < min_value).sum(), lambda _, found: f"values >= {min_value} on the mask (min "
                   f"found {found:.4g}; entropy cannot be negative)", low)


def check_token_inputs(shape, device, mask: Tensor, checks: ValueChecks, *, old_entropy=None, old_logprobs=None,
                       ref_logprobs=None, token_weights=None, gates=None) -> None:
    """The optional per-token inputs [B, T] of the loss and the advantages, bounds checked on ``mask``:
    log-probs <= 0, entropy >= 0, gates >= 0 (each up to rounding), all finite."""
    check_token_tensor("old_entropy", old_entropy, shape, device, mask, checks, min_value=-LOGPROB_TOLERANCE)
    check_token_tensor("old_logprobs", old_logprobs, shape, device, mask, checks, max_value=LOGPROB_TOLERANCE)
    check_token_tensor("ref_logprobs", ref_logprobs, shape, device, mask, checks, max_value=LOGPROB_TOLERANCE)
    check_token_tensor("token_weights", token_weights, shape, device, mask, checks)
    check_token_tensor("gates", gates, shape, device, mask, checks, min_value=0.0)


def check_mask(mask, shape, device, checks: ValueChecks) -> Tensor:
    """mask [B, T], bool or 0/1 numbers -> bool (a non-bool mask's values are checked to be 0/1)."""
    if not isinstance(mask, Tensor):
        fail("mask", mask, f"a bool or 0/1 tensor of shape {tuple(shape)}")
    if tuple(mask.shape) != tuple(shape) or mask.device != device:
        fail("mask", mask, f"shape {tuple(shape)} on {device}")
    if mask.dtype == torch.bool:
        return mask
    if checks.enabled:
        checks.add("mask", mask, ((mask != 0) & (mask != 1)).sum(), lambda n, _: "only 0/1 values")
    return mask != 0


def check_some_tokens(valid: Tensor, mask: Tensor, checks: ValueChecks, what: str) -> None:
    if checks.enabled:
        checks.add("mask", mask, (valid.sum() == 0).to(torch.int64), lambda n, _: what)


class Groups(NamedTuple):
    """The rows' groups: ``index`` [B] int64 in [0, count); ``size`` rows per group when the groups are
    consecutive blocks of ``group_size`` rows (then nothing about them needs a device read), else None."""
    index: Tensor
    count: int
    size: Optional[int] = None


def as_groups(group_ids) -> Groups:
    """Groups from arbitrary group ids [B] (one torch.unique, a device read), or a Groups unchanged."""
    if isinstance(group_ids, Groups):
        return group_ids
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return Groups(inverse, unique.numel())


def resolve_groups(batch: int, device, group_size: Optional[int], group_ids: Optional[Tensor]) -> Groups:
    """Groups from ``group_size`` (consecutive rows; no device read) or explicit ``group_ids`` [B]."""
    if (group_size is None) == (group_ids is None):
        raise ValueError("group_size / group_ids: got "
                         f"{'both' if group_size is not None else 'neither'}, expected exactly one")
    if group_ids is not None:
        if not isinstance(group_ids, Tensor) or group_ids.dtype not in (torch.int64, torch.int32) \
                or tuple(group_ids.shape) != (batch,):
            fail("group_ids", group_ids, f"an int64 tensor of shape ({batch},)")
        return as_groups(group_ids.to(device=device, dtype=torch.long))
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        fail("group_size", group_size, "a positive int")
    if batch % group_size:
        fail("group_size", f"{group_size} with batch size {batch}", "a divisor of the batch size")
    return Groups(torch.arange(batch, device=device) // group_size, batch // group_size, group_size)


def check_rewards(rewards, batch: int, device, checks: ValueChecks) -> Tensor:
    if not isinstance(rewards, Tensor):
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
    elif not rewards.is_floating_point():
        rewards = rewards.float()  # 0/1 integer or bool rewards are fine
    check_float("rewards", rewards, shape=(batch,), device=device)
    if checks.enabled:
        checks.add("rewards", rewards, _nonfinite(rewards), lambda n, _: f"finite values ({n:.0f} NaN/inf entries)")
    return rewards

"""Input checks at the public entry points: every failure is a ValueError naming the argument,
what it got and what was expected.  Kernels and backends assume validated inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

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


def unpack_lm_head(lm_head, bias: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Accept an nn.Linear (weight [V, H], optional bias) or its weight tensor."""
    if isinstance(lm_head, nn.Linear):
        if bias is not None and lm_head.bias is not None:
            raise ValueError("bias: given both as an argument and as lm_head.bias; expected one of them")
        return lm_head.weight, lm_head.bias if bias is None else bias
    if not isinstance(lm_head, Tensor):
        fail("lm_head", lm_head, "an nn.Linear or a weight tensor [V, H]")
    return lm_head, bias


def check_float(name: str, x, ndim: Optional[int] = None, shape=None, device=None, finite: bool = False):
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
    if finite and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        fail(name, x, f"finite values ({bad} NaN/inf entries)")


def check_linear_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                        ignore_index: int) -> None:
    """hidden [..., H] float, finite; weight [V, H]; bias [V]; targets [...] int in [0, V) or ignore_index."""
    check_float("hidden", hidden, finite=True)
    if hidden.dim() not in (2, 3):
        fail("hidden", hidden, "[B, T, H] or [N, H]")
    check_float("weight", weight, ndim=2, device=hidden.device)
    if weight.shape[1] != hidden.shape[-1]:
        fail("weight", weight, f"[V, H] with H = {hidden.shape[-1]} (the last dim of hidden)")
    if weight.dtype != hidden.dtype:
        fail("weight", weight, f"dtype {hidden.dtype} (the dtype of hidden)")
    if bias is not None:
        check_float("bias", bias, shape=(weight.shape[0],), device=hidden.device)
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        fail("targets", targets, "an int64/int32 tensor of token ids")
    if targets.device != hidden.device:
        fail("targets", targets, f"device {hidden.device}")
    if targets.numel() != hidden.numel() // max(hidden.shape[-1], 1) or (
            hidden.dim() == 3 and tuple(targets.shape) != tuple(hidden.shape[:2])):
        fail("targets", targets, f"one id per token of hidden {tuple(hidden.shape)}")
    vocab = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        example = int(targets[bad].reshape(-1)[0])
        fail("targets", targets, f"ids in [0, {vocab}) or ignore_index={ignore_index} (found {example})")


def check_token_tensor(name: str, x, shape, device, mask: Tensor, finite: bool = True,
                       max_value: Optional[float] = None, min_value: Optional[float] = None):
    """A per-token float tensor [B, T]; value bounds are checked on the masked tokens only."""
    if x is None:
        return
    check_float(name, x, shape=shape, device=device)
    values = x[mask]
    if finite and not bool(torch.isfinite(values).all()):
        fail(name, x, "finite values on the completion mask")
    if max_value is not None and values.numel() and float(values.max()) > max_value:
        fail(name, x, f"values <= {max_value} on the mask (max found {float(values.max()):.4g}; "
                      "log-probs cannot be positive)")
    if min_value is not None and values.numel() and float(values.min()) < min_value:
        fail(name, x, f"values >= {min_value} on the mask (min found {float(values.min()):.4g}; "
                      "entropy cannot be negative)")


def check_token_inputs(shape, device, mask: Tensor, *, old_entropy=None, old_logprobs=None, ref_logprobs=None,
                       token_weights=None, gates=None) -> None:
    """The optional per-token inputs [B, T] of the loss and the advantages, bounds checked on ``mask``:
    log-probs <= 0, entropy >= 0, gates >= 0 (each up to rounding), all finite."""
    check_token_tensor("old_entropy", old_entropy, shape, device, mask, min_value=-LOGPROB_TOLERANCE)
    check_token_tensor("old_logprobs", old_logprobs, shape, device, mask, max_value=LOGPROB_TOLERANCE)
    check_token_tensor("ref_logprobs", ref_logprobs, shape, device, mask, max_value=LOGPROB_TOLERANCE)
    check_token_tensor("token_weights", token_weights, shape, device, mask)
    check_token_tensor("gates", gates, shape, device, mask, min_value=0.0)


def check_mask(mask, shape, device) -> Tensor:
    """mask [B, T], bool or 0/1 numbers -> bool."""
    if not isinstance(mask, Tensor):
        fail("mask", mask, f"a bool or 0/1 tensor of shape {tuple(shape)}")
    if tuple(mask.shape) != tuple(shape) or mask.device != device:
        fail("mask", mask, f"shape {tuple(shape)} on {device}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
            fail("mask", mask, "0/1 values")
        if not bool(((mask == 0) | (mask == 1)).all()):
            fail("mask", mask, "only 0/1 values")
        mask = mask != 0
    return mask


def resolve_groups(batch: int, device, group_size: Optional[int], group_ids: Optional[Tensor]) -> Tensor:
    """group_ids [B] int64 from ``group_size`` (consecutive rows) or explicit ``group_ids``."""
    if (group_size is None) == (group_ids is None):
        raise ValueError("group_size / group_ids: got "
                         f"{'both' if group_size is not None else 'neither'}, expected exactly one")
    if group_ids is not None:
        if not isinstance(group_ids, Tensor) or group_ids.dtype not in (torch.int64, torch.int32) \
                or tuple(group_ids.shape) != (batch,):
            fail("group_ids", group_ids, f"an int64 tensor of shape ({batch},)")
        return group_ids.to(device=device, dtype=torch.long)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        fail("group_size", group_size, "a positive int")
    if batch % group_size:
        fail("group_size", f"{group_size} with batch size {batch}", "a divisor of the batch size")
    return torch.arange(batch, device=device) // group_size


def check_rewards(rewards, batch: int, device) -> Tensor:
    if not isinstance(rewards, Tensor):
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=device)
    elif not rewards.is_floating_point():
        rewards = rewards.float()  # 0/1 integer or bool rewards are fine
    check_float("rewards", rewards, shape=(batch,), device=device, finite=True)
    return rewards

"""Correctness before speed: each contender's loss and grads against ``erpo_kernels.reference``.

At :data:`~erpo_kernels.benchmark.common.CHECK_SHAPE`, in the dtype about to be timed, on the device,
a contender's outputs are compared with an fp64 oracle of the formula it claims to compute, fed the
very same (dtype-rounded) inputs:

- ``"erpo"``: ``reference.erpo_loss`` (ERPO mode, with the same old/ref log-probs and old entropy)
- ``"dapo"`` (Liger): ``reference.erpo_loss`` in mode "dapo" (no gate, no progress term, token mean,
  eps 0.2/0.28, no KL), Liger being given the same sequence advantages and old log-probs
- ``"weighted_ce"`` (CCE): fp64 ``cross_entropy(reduction="none")`` times the same per-token weights
- stats pass: ``reference.token_stats`` log-probs (and entropy where the contender gives one)
- ``"gemms"`` (the floor): nothing to check ("n/a")

Error measure: max |got - want| / max |want| per tensor (the loss: / max(|want|, 1)); the check
passes when every one is within :data:`TOLERANCE` of the dtype.  The check inputs use small
log-prob noise (ratios well inside the clip range), so a bf16 rounding cannot flip a token across
a clip boundary and turn a correct kernel into a false alarm; clipping itself is covered by
the unit tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from erpo_kernels import ERPOConfig, reference
from erpo_kernels.benchmark.common import CHECK_SHAPE, DTYPES
from erpo_kernels.benchmark.contenders import BenchInputs, Contender, make_inputs

Tensor = torch.Tensor
TOLERANCE: Dict[str, float] = {"fp32": 1e-4, "bf16": 3e-2}


@dataclass(frozen=True)
class CheckResult:
    """``ok`` is None when there is nothing to check; ``worst`` the largest relative error seen."""
    ok: object
    worst: float = 0.0
    detail: str = ""

    def __str__(self) -> str:
        if self.ok is None:
            return self.detail or "n/a"
        if self.ok:
            return f"ok ({self.worst:.1e})"
        return f"FAIL: {self.detail}"


def relative_error(got: Tensor, want: Tensor, floor: float = 1e-12) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - want).abs().max() / max(float(want.abs().max()), floor))


def _leaf64(tensor: Tensor) -> Tensor:
    return tensor.detach().double().requires_grad_()


def expected_train(loss_kind: str, inp: BenchInputs) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight) of the formula ``loss_kind`` names, in fp64, through full logits."""
    hidden, weight = _leaf64(inp.hidden), _leaf64(inp.weight)
    d = lambda x: x.double()  # noqa: E731
    if loss_kind == "erpo":
        loss, _ = reference.erpo_loss(hidden, weight, inp.targets, inp.mask, d(inp.rewards), inp.group_ids,
                                      d(inp.old_logprobs), d(inp.ref_logprobs), d(inp.old_entropy), inp.config)
    elif loss_kind == "dapo":
        loss, _ = reference.erpo_loss(hidden, weight, inp.targets, inp.mask, d(inp.rewards), inp.group_ids,
                                      d(inp.old_logprobs), None, d(inp.old_entropy), ERPOConfig(mode="dapo"))
    elif loss_kind == "weighted_ce":
        logits = hidden @ weight.t()
        per_token = F.cross_entropy(logits.flatten(0, 1), inp.targets.flatten(), reduction="none")
        weights = d(inp.token_advantages * inp.mask).flatten()
        loss = (per_token * weights).sum() / inp.mask.sum().clamp_min(1)
    else:
        raise ValueError(f"no reference formula for loss kind {loss_kind!r}")
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _verdict(errors: List[Tuple[str, float]], tolerance: float) -> CheckResult:
    worst_name, worst = max(errors, key=lambda item: item[1])
    if worst <= tolerance:
        return CheckResult(True, worst)
    return CheckResult(False, worst, f"{worst_name} rel err {worst:.2e} > {tolerance:.0e}")


def check_contender(contender: Contender, pass_name: str, dtype_name: str, device: torch.device,
                    seed: int = 1234) -> CheckResult:
    """Run ``contender``'s ``pass_name`` once at the check shape and compare it with the oracle."""
    if contender.loss == "gemms":
        return CheckResult(None, detail="n/a (GEMMs only)")
    builder = contender.builder(pass_name)
    if builder is None:
        return CheckResult(None, detail="n/a (no such pass)")
    inp = make_inputs(CHECK_SHAPE, DTYPES[dtype_name], device, seed=seed, logprob_noise=0.02)
    tolerance = TOLERANCE[dtype_name]
    if pass_name == "stats":
        logprobs, entropy = builder(inp)()
        with torch.no_grad():
            want_lp, want_entropy, _ = reference.token_stats(inp.hidden.double(), inp.weight.double(), None,
                                                             inp.targets)
        errors = [("logprobs", relative_error(logprobs, want_lp))]
        if entropy is not None:
            errors.append(("entropy", relative_error(entropy, want_entropy)))
        return _verdict(errors, tolerance)
    loss = builder(inp)()
    got_hidden, got_weight = inp.hidden.grad, inp.weight.grad
    want_loss, want_hidden, want_weight = expected_train(contender.loss, inp)
    if got_hidden is None or got_weight is None:
        return CheckResult(False, float("inf"), "no gradient for hidden or weight")
    errors = [("loss", float((loss.double().cpu() - want_loss.cpu()).abs()) / max(float(want_loss.abs()), 1.0)),
              ("grad_hidden", relative_error(got_hidden, want_hidden)),
              ("grad_weight", relative_error(got_weight, want_weight))]
    return _verdict(errors, tolerance)

"""The 3-matmul training pass: loss and gradients in one sweep over the vocabulary.

When every token's gradient coefficient d loss / d lp (and d loss / d H) depends on that token
alone, dz can be formed while a chunk's logits are live, so the logits are computed once
(DESIGN.md "GEMM accounting": 3 GEMMs instead of 4).  That holds when the advantages need no
current-policy statistic (old entropy given; old log-probs given or no progress term) and the
aggregation is a weighted token sum.  The gradients are computed in forward and scaled by the
upstream gradient in backward (the way Liger's and CCE's fused losses do it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from erpo_kernels.config import ERPOConfig
from erpo_kernels.stats import StatsOptions
from erpo_kernels.surrogate import fill_off_mask, is_linear, token_terms

Tensor = torch.Tensor


class SweepRecord(NamedTuple):
    """Per-token results the sweep records chunk by chunk, [N] each: the metrics read them afterwards."""
    loss: Tensor            # L (unweighted)
    ratio: Tensor
    clip_low: Tensor        # bool
    clip_high: Tensor       # bool
    dual_clip: Tensor       # bool


@dataclass
class SweepTerms:
    """Detached per-token inputs of the surrogate, flattened to [N], and the buffers the sweep fills: the
    gradient coefficients ``grad_logprobs`` = w * dL/dlp and ``grad_entropy`` = -entropy_coef * w (None
    without an entropy bonus), and the :class:`SweepRecord`.  A backend fills rows [start, stop) once the
    chunk's log-probs and entropy are known: the torch backend with :meth:`coefficients`, the Triton one with
    one kernel (:func:`erpo_kernels.ops.surrogate.sweep_coefficients`)."""
    advantages: Tensor
    weights: Tensor                 # aggregation weights: loss = sum(L * weights)
    valid: Tensor                   # completion tokens; off them old/ref are replaced by lp
    old_logprobs: Optional[Tensor]
    ref_logprobs: Optional[Tensor]
    config: ERPOConfig
    grad_logprobs: Optional[Tensor] = None
    grad_entropy: Optional[Tensor] = None
    recorded: Optional[SweepRecord] = None

    def __post_init__(self):
        like = self.advantages
        empty_bool = lambda: torch.empty(like.shape, dtype=torch.bool, device=like.device)  # noqa: E731
        self.grad_logprobs = torch.empty_like(like)
        self.grad_entropy = torch.empty_like(like) if self.config.entropy_coef > 0 else None
        self.recorded = SweepRecord(torch.empty_like(like), torch.empty_like(like), empty_bool(), empty_bool(),
                                    empty_bool())

    def coefficients(self, start: int, stop: int, logprobs: Tensor, entropy: Tensor):
        """Torch: fill rows [start, stop) from the chunk's ``logprobs`` / ``entropy`` [stop - start]; returns
        the chunk's (grad_logprobs, grad_entropy or None)."""
        rows = slice(start, stop)
        pick = lambda x: None if x is None else fill_off_mask(x[rows], self.valid[rows], logprobs)  # noqa: E731
        terms = token_terms(logprobs, self.advantages[rows], pick(self.old_logprobs), pick(self.ref_logprobs),
                            self.config, entropy)
        for out, value in zip(self.recorded, (terms.loss, terms.ratio, terms.clip_low, terms.clip_high,
                                              terms.dual_clip)):
            out[rows] = value
        weights = self.weights[rows]
        torch.mul(terms.grad_logprobs, weights, out=self.grad_logprobs[rows])
        if self.grad_entropy is None:
            return self.grad_logprobs[rows], None
        torch.mul(weights, -self.config.entropy_coef, out=self.grad_entropy[rows])
        return self.grad_logprobs[rows], self.grad_entropy[rows]

    def loss(self) -> Tensor:
        """sum(L * w) over every token, once the sweep has filled every row."""
        return torch.dot(self.recorded.loss, self.weights)


def advantages_need_current_stats(config: ERPOConfig, old_entropy_given: bool, advantages_given: bool,
                                  old_logprobs, ref_logprobs) -> bool:
    """Whether the token advantages need the current policy's statistics: no advantages given and either no
    old entropy (the gate uses the current one) or a progress term without old log-probs."""
    if advantages_given:
        return False
    return not old_entropy_given or (old_logprobs is None and config.progress_term and ref_logprobs is not None)


def fused_path_applies(config: ERPOConfig, coefficients_known: bool, backend_module) -> bool:
    """True when every token's coefficient is known up front (``coefficients_known``: the advantages need no
    current statistic) and the loss is a weighted token sum, and the backend has a fused sweep."""
    return coefficients_known and is_linear(config) and hasattr(backend_module, "linear_fused_train")


class FusedLinearLoss(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias, targets [N]) -> (loss, logprobs [N], entropy [N]).

    Only ``loss`` is differentiable; logprobs and entropy come out for metrics.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, terms: SweepTerms, options: StatsOptions, compaction=None):
        """``terms`` holds the live tokens' inputs when a :class:`erpo_kernels.compaction.Compaction` is given;
        logprobs and entropy come back for the live tokens only ([n_live])."""
        h, t = (hidden, targets) if compaction is None else (compaction.rows(hidden), compaction.rows(targets))
        loss, logprobs, entropy, _lse, grad_hidden, grad_weight, grad_bias = options.backend.linear_fused_train(
            h, weight, bias, t, terms, temperature=options.temperature,
            ignore_index=options.ignore_index, chunk_size=options.chunk_size,
            needs_input_grad=tuple(ctx.needs_input_grad[:3]))
        if compaction is not None and grad_hidden is not None:
            grad_hidden = compaction.scatter(grad_hidden)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(logprobs, entropy)
        # a host backend on CPU tensors may read grad_loss for free (no device sync); see backward
        ctx.host_read = hidden.device.type == "cpu" and getattr(options.backend, "HOST_BACKEND", False)
        return loss, logprobs, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs, _grad_entropy):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        # loss.backward() passes exactly 1: then the gradients are already right, and multiplying a [V, H]
        # grad_weight by 1 would be a whole extra pass (4% of the 3-GEMM floor at Qwen2.5-0.5B's lm_head on a CPU)
        if ctx.host_read and float(grad_loss) == 1.0:
            return grad_hidden, grad_weight, grad_bias, None, None, None, None
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_weight), scale(grad_bias), None, None, None, None

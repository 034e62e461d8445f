"""TRL's GRPO options in ERPO's terms: the ERPOConfig a GRPOConfig means, and TRL's loss normalizations as
``erpo_loss`` normalizers.  Plain Python on attribute values: this module does not import TRL.

Facts from TRL 1.16 (``GRPOTrainer._generate_and_score_completions`` and ``_compute_loss``), read, not copied:

- advantage: ``(r - mean_g r) / (std_g r + 1e-4)`` with Bessel's std (``scale_rewards="group"``), or
  ``r - mean_g r`` (``"none"``)  ->  ``reward_std="unbiased"``, ``reward_std_eps=1e-4``, ``std_normalize``;
- surrogate ``-min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A)``, plus ``beta * k3`` when ``beta > 0``;
- per micro-batch loss, with M the loss mask, GA the current gradient accumulation steps, P processes:

  ============  ===============================================  ===================================
  loss_type     TRL                                              ERPO aggregation, normalizer
  ============  ===============================================  ===================================
  grpo          ``mean_rows(sum_t L M / max(n_i, 1)) / GA``      seq_mean_token_mean, rows * GA
  bnpo          ``sum L M / max(sum M, 1) / GA``                 token_mean, max(sum M, 1) * GA
  dr_grpo       ``sum L M / (rows * max_completion_length) / GA``  constant (max_length), rows * GA
  dapo          ``sum L M / (num_items_in_batch / P * GA / steps_per_generation)``  token_mean, the same
  ============  ===============================================  ===================================

  (in evaluation GA and steps_per_generation count as 1: nothing is accumulated).  ``num_items_in_batch`` counts
  the loss tokens of the whole generation batch of every process, so dapo is the global token mean.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

from erpo_kernels.config import ERPOConfig

# TRL loss_type -> ERPO aggregation; the other loss types have surrogates ERPO does not compute
AGGREGATIONS = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dr_grpo": "constant", "dapo": "token_mean"}

# what erpo_mode may be: "grpo" is ERPO with its gate and progress term off, i.e. TRL's own loss for the loss_type
MODES = ("erpo", "ep_grpo", "grpo")

# ERPOConfig fields a trainer config carries as ``erpo_<name>`` (the algorithm's knobs and the plumbing); every
# other ERPOConfig field follows from TRL's own options (:func:`erpo_config`)
ERPO_FIELDS = ("gate", "gate_gamma", "gate_scope", "gate_normalize", "gate_top_frac", "progress_term", "progress",
               "num_buckets", "progress_lambda", "progress_eta", "bucket_normalize", "progress_cap_kappa",
               "reward_threshold", "dual_clip_c", "chunk_size", "check_values")

TRL_STD_EPS = 1e-4   # TRL adds this to the group's (Bessel) reward std


def erpo_defaults() -> Dict[str, Any]:
    """ERPOConfig's default of every field in :data:`ERPO_FIELDS` (one truth for the trainer config's defaults)."""
    return {f.name: f.default for f in dataclasses.fields(ERPOConfig) if f.name in ERPO_FIELDS}


def _unsupported(option: str, value, why: str) -> ValueError:
    return ValueError(f"GRPOConfig.{option}: got {value!r}; the ERPO trainer does not support it ({why})")


def check_supported(args) -> None:
    """Raise ValueError naming the first TRL option whose value ERPO cannot express."""
    if args.loss_type not in AGGREGATIONS:
        raise _unsupported("loss_type", args.loss_type, f"expected one of {tuple(AGGREGATIONS)}; sapo, cispo, vespo "
                           "and luspo use surrogates that erpo_loss does not compute")
    if args.scale_rewards not in ("group", "none"):
        raise _unsupported("scale_rewards", args.scale_rewards, "expected 'group' or 'none'; ERPO normalizes rewards "
                           "within each group only")
    if args.multi_objective_aggregation != "sum_then_normalize":
        raise _unsupported("multi_objective_aggregation", args.multi_objective_aggregation,
                           "expected 'sum_then_normalize': ERPO's advantages start from one reward per completion")
    if args.importance_sampling_level != "token":
        raise _unsupported("importance_sampling_level", args.importance_sampling_level, "expected 'token'; "
                           "ERPO's ratio is per token")
    if args.delta is not None:
        raise _unsupported("delta", args.delta, "a two-sided ratio cap; use erpo_dual_clip_c for ERPO's dual clip")
    if args.top_entropy_quantile != 1.0:
        raise _unsupported("top_entropy_quantile", args.top_entropy_quantile,
                           "expected 1.0; ERPO's hard entropy gate is erpo_gate='topk' with erpo_gate_top_frac")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        option = "use_adaptive_entropy" if args.use_adaptive_entropy else "entropy_coef"
        raise _unsupported(option, getattr(args, option), "TRL's entropy bonus is a per-micro-batch token mean "
                           "whatever the loss_type; ERPO would normalize it like the policy term")
    if args.off_policy_mask_threshold is not None:
        raise _unsupported("off_policy_mask_threshold", args.off_policy_mask_threshold, "expected None")
    if args.beta != 0.0 and args.use_bias_correction_kl:
        raise _unsupported("use_bias_correction_kl", True, "with beta > 0 set it to False: ERPO's KL is plain k3, "
                           "TRL's default multiplies it by the ratio")
    if getattr(args, "erpo_mode", "erpo") not in MODES:
        raise ValueError(f"ERPOGRPOConfig.erpo_mode: got {args.erpo_mode!r}, expected one of {MODES} (loss_type "
                         "picks the aggregation and scale_rewards the std, so 'dapo' / 'dr_grpo' are "
                         "erpo_mode='grpo' with loss_type='dapo' / 'dr_grpo')")


def erpo_config(args) -> ERPOConfig:
    """The ERPOConfig of a TRL GRPOConfig ``args`` that carries ``erpo_mode`` and ``erpo_<field>`` values.

    TRL's options decide everything TRL computes too (std convention, clip range, KL weight, temperature,
    aggregation), so ``erpo_mode="grpo"`` reproduces TRL's loss; the ``erpo_*`` fields add ERPO's parts.
    """
    check_supported(args)
    knobs = {name: getattr(args, f"erpo_{name}") for name in ERPO_FIELDS}
    if knobs["gate_scope"] == "global":
        knobs["gate_scope"] = "batch"   # the advantages see the generation batch gathered from every process
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    return ERPOConfig(
        mode=args.erpo_mode, std_normalize=args.scale_rewards != "none", reward_std="unbiased",
        reward_std_eps=TRL_STD_EPS, eps_low=args.epsilon, eps_high=epsilon_high, kl_beta=args.beta,
        temperature=args.temperature, aggregation=AGGREGATIONS[args.loss_type],
        max_length=args.max_completion_length if args.loss_type == "dr_grpo" else None, **knobs)


def loss_normalizer(loss_type: str, rows: int, loss_tokens, num_items_in_batch, num_processes: int,
                    accumulation_steps: int, steps_per_generation: int, training: bool) -> Any:
    """The ``erpo_loss`` normalizer that makes one micro-batch's loss equal TRL's (table in the module docstring).

    rows: the micro-batch's rows; loss_tokens: its loss-mask token count (a 0-dim tensor); num_items_in_batch:
    TRL's count over the generation batch of every process.  The result is a number or a 0-dim tensor.
    """
    accumulation = accumulation_steps if training else 1
    if loss_type == "dapo":
        normalizer = num_items_in_batch.float().clamp(min=1.0) / num_processes
        return normalizer * accumulation_steps / steps_per_generation if training else normalizer
    if loss_type == "bnpo":
        return loss_tokens.float().clamp(min=1.0) * accumulation
    return rows * accumulation   # grpo, dr_grpo: the rows (times max_length for dr_grpo, inside erpo_loss)

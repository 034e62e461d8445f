"""verl (>= 0.9.1, < 0.10) adapter: ERPO's token advantages and clipped surrogate inside verl's PPO trainer.

Importing this module registers, in verl's process-local registries:

- ``register_adv_est("erpo")`` and ``("ep_grpo")``: token advantages (ERPO_SPEC.md (i)-(iii)) from the
  token-level rewards, response mask, uid index, and, when given, old log-probs, reference log-probs and the
  old policy's entropy;
- ``register_policy_loss("erpo")``: the library's per-token clipped surrogate with verl's dual clip
  (``clip_ratio_c``) and verl's ``loss_agg_mode`` with its global-batch normalization.

verl's Ray workers are separate processes; the ``verl.plugins`` entry point in pyproject.toml imports this
module in each of them on ``import verl`` (verl ignores a plugin that fails to load, logging it at debug level
only: ``python -c "import verl; from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY as R;
print('erpo' in R)"`` checks it).

What verl hands each hook (verl 0.9.1), and so what each piece can do:

- A registered estimator is called by ``ray_trainer.compute_advantage`` with token_level_rewards,
  response_mask, config (``algorithm``) and index (the uid strings) only: no old or reference log-probs and
  no entropy.  That is enough for the GRPO / DAPO / Dr.GRPO modes (no gate, no progress term), not for ERPO's
  gate (old entropy) or progress term (old and reference log-probs), which then raise a ValueError saying so.
  For those, :func:`compute_advantage` (a drop-in for verl's, routing only "erpo" / "ep_grpo") reads the whole
  batch, and :func:`install_trainer_hooks` puts it into verl's legacy trainer together with a hook that keeps
  the old entropy, which verl computes with the old log-probs and drops before the advantages
  (``RayPPOTrainer.fit`` pops ``"entropys"``).  Import :mod:`erpo_kernels.integrations.verl_hooks` (e.g.
  through ``VERL_USE_EXTERNAL_MODULES``) to install them in the process that runs the trainer.
- The policy loss sees padded log-probs [B, R] (never hidden states) with the advantages the estimator wrote,
  so it is the surrogate and aggregation alone; verl adds its own entropy bonus and KL loss after it.

ERPO knobs come from an optional ``algorithm.erpo`` mapping of :class:`ERPOConfig` advantage fields (see
:func:`erpo_config`); the clip ranges and aggregation come from verl's actor config.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Tuple

import torch

from erpo_kernels import surrogate
from erpo_kernels.advantages import erpo_advantages
from erpo_kernels.config import ERPOConfig

try:
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("erpo_kernels.integrations.verl needs verl >= 0.9.1: pip install 'erpo-kernels[verl]'") from error

Tensor = torch.Tensor

ESTIMATORS = ("erpo", "ep_grpo")
# where the old policy's per-token entropy may sit in a batch: ours (kept by install_trainer_hooks), then
# the name verl's old-log-prob pass gives it
OLD_ENTROPY_KEYS = ("old_entropy", "entropys")
# ERPOConfig fields that shape the advantages; the surrogate's and the aggregation's come from verl's actor
# config (clip_ratio_low/high/c, loss_agg_mode), so naming them under algorithm.erpo is an error, not a no-op
ADVANTAGE_FIELDS = ("mode", "eps", "std_normalize", "reward_std", "reward_std_eps", "gate", "gate_gamma",
                    "gate_scope", "gate_normalize", "gate_top_frac", "progress_term", "progress", "num_buckets",
                    "progress_lambda", "progress_eta", "bucket_normalize", "progress_cap_kappa", "polarity",
                    "reward_threshold", "check_values")
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                  "seq-mean-token-sum-norm")
MAX_LOG_RATIO = 20.0   # verl clamps log(ratio) to +-20 before exp; the surrogate here sees the same ratio


# ----------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------
def erpo_config(algorithm_config: Optional[Mapping] = None, estimator: str = "erpo",
                norm_adv_by_std_in_grpo: Optional[bool] = None) -> ERPOConfig:
    """The :class:`ERPOConfig` of an estimator ("erpo" or "ep_grpo") under verl's ``algorithm`` config.

    Defaults follow verl's group statistics (``reward_std="unbiased"``, ``reward_std_eps=1e-6``, as
    ``compute_grpo_outcome_advantage``); ``algorithm.erpo`` (a mapping of :data:`ADVANTAGE_FIELDS`) overrides
    any of them, ``mode`` included (``mode: grpo`` runs verl's GRPO advantage through this estimator).
    ``norm_adv_by_std_in_grpo=False`` (argument, else the algorithm config's) drops the std as it does for
    verl's grpo, unless ``algorithm.erpo.std_normalize`` is given; True leaves the mode's preset.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator: got {estimator!r}, expected one of {ESTIMATORS}")
    section = dict(_get(algorithm_config, "erpo", None) or {})
    unknown = sorted(set(section) - set(ADVANTAGE_FIELDS))
    if unknown:
        raise ValueError(f"algorithm.erpo: got {unknown}, expected only advantage fields {ADVANTAGE_FIELDS} (the clip "
                         "ranges and the aggregation come from actor_rollout_ref.actor: clip_ratio_low, "
                         "clip_ratio_high, clip_ratio_c, loss_agg_mode)")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = _get(algorithm_config, "norm_adv_by_std_in_grpo", True)
    fields = dict(mode=estimator, reward_std="unbiased", reward_std_eps=1e-6)
    if not norm_adv_by_std_in_grpo:
        fields["std_normalize"] = False
    fields.update(section)
    return ERPOConfig(**fields)


def group_ids_from_uids(index, device=None) -> Tensor:
    """int64 group ids [B] from verl's uid index (``non_tensor_batch["uid"]``: one id per row, rows of one
    prompt share it; strings or any hashable), numbered in order of first appearance."""
    if index is None:
        raise ValueError("index: got None, expected the uid of each row's prompt (verl's non_tensor_batch['uid']); "
                         "ERPO compares the responses to one prompt")
    numbers: dict = {}
    ids = [numbers.setdefault(uid, len(numbers)) for uid in _as_list(index)]
    return torch.tensor(ids, dtype=torch.long, device=device)


def token_advantages(token_level_rewards: Tensor, response_mask: Tensor, index, config: ERPOConfig,
                     old_log_probs: Optional[Tensor] = None, ref_log_prob: Optional[Tensor] = None,
                     old_entropy: Optional[Tensor] = None) -> Tensor:
    """A [B, R] (zero off the mask, in token_level_rewards' dtype) from verl's batch fields.

    The outcome reward of a row is ``token_level_rewards.sum(-1)``, as verl's GRPO takes it.  A group of one
    row gets A = 0 here (no other response to compare with); verl's grpo gives it A = r / (1 + 1e-6).
    Raises a ValueError when the config needs an input verl did not give: the old entropy for the gate (or
    cumulative-entropy buckets), old and reference log-probs for the progress term.
    """
    needs_entropy = config.gate != "none" or (config.progress_term and config.progress == "cum_entropy")
    if old_entropy is None and needs_entropy:
        raise ValueError(
            f"old_entropy: got None, expected the old policy's per-token entropy [B, R] for mode {config.mode!r} "
            f"(gate {config.gate!r}, progress {config.progress!r}).  verl's compute_advantage passes a registered "
            "estimator only token_level_rewards, response_mask, index and config: use "
            "erpo_kernels.integrations.verl.compute_advantage / install_trainer_hooks (which keep the entropy "
            "verl's old-log-prob pass computes), or a mode without the gate (algorithm.erpo.mode: grpo | dapo | "
            "dr_grpo)")
    missing = [name for name, x in (("old_log_probs", old_log_probs), ("ref_log_prob", ref_log_prob)) if x is None]
    if config.progress_term and missing:
        raise ValueError(
            f"{', '.join(missing)}: got None, expected [B, R] log-probs for ERPO's progress term (old minus "
            "reference).  verl computes ref_log_prob only with a reference policy (actor_rollout_ref.actor."
            "use_kl_loss=True, kl_loss_coef may be 0); or set algorithm.erpo.progress_term: false")
    dtype = torch.promote_types(token_level_rewards.dtype, torch.float32)
    if old_entropy is None:   # read by nothing: no gate and position buckets
        old_entropy = torch.zeros(response_mask.shape, dtype=dtype, device=response_mask.device)
    rewards = token_level_rewards.sum(-1).to(dtype)
    groups = group_ids_from_uids(index, rewards.device)
    if groups.numel() != rewards.numel():
        raise ValueError(f"index: got {groups.numel()} uids, expected one per row of token_level_rewards "
                         f"({rewards.numel()})")
    out = erpo_advantages(rewards, response_mask, old_entropy.to(dtype), _float(old_log_probs, dtype),
                          _float(ref_log_prob, dtype), group_ids=groups, config=config)
    return out.advantages.to(token_level_rewards.dtype)


def _estimator(estimator: str, token_level_rewards, response_mask, index, config, old_log_probs, ref_log_prob,
               old_entropy) -> Tuple[Tensor, Tensor]:
    advantages = token_advantages(token_level_rewards, response_mask, index, erpo_config(config, estimator),
                                  old_log_probs, ref_log_prob, old_entropy)
    return advantages, advantages   # (advantages, returns), as verl's outcome estimators return them


@register_adv_est("erpo")
def erpo_estimator(token_level_rewards: Tensor, response_mask: Tensor, index=None, config=None,
                   old_log_probs: Optional[Tensor] = None, ref_log_prob: Optional[Tensor] = None,
                   old_entropy: Optional[Tensor] = None, reward_baselines=None) -> Tuple[Tensor, Tensor]:
    """verl's advantage-estimator interface (``algorithm.adv_estimator=erpo``); see :func:`token_advantages`.
    ``reward_baselines`` (REMAX's, passed by verl when present) is not used."""
    return _estimator("erpo", token_level_rewards, response_mask, index, config, old_log_probs, ref_log_prob,
                      old_entropy)


@register_adv_est("ep_grpo")
def ep_grpo_estimator(token_level_rewards: Tensor, response_mask: Tensor, index=None, config=None,
                      old_log_probs: Optional[Tensor] = None, ref_log_prob: Optional[Tensor] = None,
                      old_entropy: Optional[Tensor] = None, reward_baselines=None) -> Tuple[Tensor, Tensor]:
    """As :func:`erpo_estimator`, with EP-GRPO's preset (cumulative-entropy buckets, zero-variance fallback)."""
    return _estimator("ep_grpo", token_level_rewards, response_mask, index, config, old_log_probs, ref_log_prob,
                      old_entropy)


def compute_erpo_advantage(data, config: Optional[ERPOConfig] = None):
    """Write ``advantages`` and ``returns`` [B, R] into a verl batch and return it (as verl's compute_advantage).

    data: a ``verl.DataProto`` (or a dict of tensors with a ``"uid"`` entry) carrying token_level_rewards,
    response_mask, the uid index, old_log_probs, ref_log_prob (for the progress term) and the old entropy under
    ``"old_entropy"`` (or ``"entropys"``, the name verl's old-log-prob pass gives it).
    config: an :class:`ERPOConfig`; None = ``erpo_config()`` (mode erpo with verl's group std).
    """
    tensors, non_tensors = _batch_parts(data)
    config = config or erpo_config()
    old_entropy = next((tensors[key] for key in OLD_ENTROPY_KEYS if key in tensors.keys()), None)
    advantages = token_advantages(tensors["token_level_rewards"], tensors["response_mask"], non_tensors.get("uid"),
                                  config, tensors.get("old_log_probs"), tensors.get("ref_log_prob"), old_entropy)
    tensors["advantages"] = advantages
    tensors["returns"] = advantages
    return data


# ----------------------------------------------------------------------------------------------
# the driver: verl's compute_advantage routed, the old entropy kept
# ----------------------------------------------------------------------------------------------
def _route(verl_compute_advantage, data, adv_estimator, gamma: float = 1.0, lam: float = 1.0, num_repeat: int = 1,
           norm_adv_by_std_in_grpo: bool = True, config=None):
    name = getattr(adv_estimator, "value", adv_estimator)
    if name not in ESTIMATORS:
        return verl_compute_advantage(data, adv_estimator, gamma, lam, num_repeat, norm_adv_by_std_in_grpo, config)
    data = compute_erpo_advantage(data, erpo_config(config, name, norm_adv_by_std_in_grpo))
    # the kept entropy has served: the actor update never reads it, so it need not travel to the workers
    _batch_parts(data)[0].pop(OLD_ENTROPY_KEYS[0], None)
    return data


def compute_advantage(data, adv_estimator, gamma: float = 1.0, lam: float = 1.0, num_repeat: int = 1,
                      norm_adv_by_std_in_grpo: bool = True, config=None):
    """Drop-in for ``verl.trainer.ppo.ray_trainer.compute_advantage`` (same arguments and return): "erpo" and
    "ep_grpo" read the whole batch (:func:`compute_erpo_advantage` with :func:`erpo_config` of ``config``, verl's
    ``algorithm``); every other estimator goes to verl's function unchanged."""
    from verl.trainer.ppo import ray_trainer
    current = ray_trainer.compute_advantage
    verl_compute_advantage = current.args[0] if _is_route(current) else current
    return _route(verl_compute_advantage, data, adv_estimator, gamma, lam, num_repeat, norm_adv_by_std_in_grpo,
                  config)


def install_trainer_hooks() -> None:
    """Make verl's legacy trainer (``trainer.use_v1=false``, ``RayPPOTrainer``) run the ERPO estimators on the
    whole batch: ``ray_trainer.compute_advantage`` becomes the router of :func:`compute_advantage`, and
    ``RayPPOTrainer._compute_old_log_prob`` also stores the old entropy as ``"old_entropy"`` when the estimator
    is erpo / ep_grpo (``fit`` pops ``"entropys"`` before the advantages).  Idempotent.  Run it in the process
    that runs the trainer (verl's TaskRunner actor): import :mod:`erpo_kernels.integrations.verl_hooks` there.

    verl's V1 trainer (``trainer.use_v1=true``) is not covered: its ``_compute_advantage`` fetches a fixed
    field list without the entropy from TransferQueue (v1/trainer_base.py); there only the modes without the
    gate run (through the registered estimators).
    """
    from verl.trainer.ppo import ray_trainer
    if not _is_route(ray_trainer.compute_advantage):
        ray_trainer.compute_advantage = functools.partial(_route, ray_trainer.compute_advantage)
    trainer = ray_trainer.RayPPOTrainer
    if not getattr(trainer._compute_old_log_prob, "keeps_old_entropy", False):
        trainer._compute_old_log_prob = _keeping_old_entropy(trainer._compute_old_log_prob)


def _keeping_old_entropy(compute_old_log_prob):
    @functools.wraps(compute_old_log_prob)
    def wrapper(self, batch, *args, **kwargs):
        result = compute_old_log_prob(self, batch, *args, **kwargs)
        output = result[0] if isinstance(result, tuple) else result
        estimator = getattr(self.config.algorithm.adv_estimator, "value", self.config.algorithm.adv_estimator)
        if estimator in ESTIMATORS and "entropys" in output.batch.keys():
            output.batch[OLD_ENTROPY_KEYS[0]] = output.batch["entropys"]
        return result

    wrapper.keeps_old_entropy = True
    return wrapper


def _is_route(fn) -> bool:
    return isinstance(fn, functools.partial) and fn.func is _route


# ----------------------------------------------------------------------------------------------
# policy loss
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _loss_config(eps_low: float, eps_high: float, dual_clip_c: float, aggregation: str,
                 max_length: Optional[int]) -> ERPOConfig:
    # the surrogate alone: verl adds its entropy bonus and KL loss itself (entropy_coeff, use_kl_loss)
    return ERPOConfig(mode="dapo", eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c,
                      aggregation=aggregation, max_length=max_length, check_values=False)


def verl_aggregation(loss_agg_mode: str, valid: Tensor, global_batch_info: Optional[Mapping] = None):
    """verl's ``agg_loss`` as ERPO's: (aggregation, max_length, normalizer, scale) with
    ``loss = surrogate.aggregate(L, valid, config, normalizer) * scale``.

    verl's global counts are the normalizer (batch_num_tokens: tokens, global_batch_size: sequences, each over
    the mini-batch on every rank), and ``scale = dp_size``, because FSDP averages the ranks' gradients.
    token-sum is token_mean over a normalizer of 1; seq-mean-token-sum-norm is "constant" (Dr.GRPO) with the
    horizon ``loss_scale_factor`` (else the padded width).  Without global_batch_size, verl counts the local
    rows that have a token, so fully masked rows drop out of the denominator; so does this.
    """
    info = global_batch_info or {}
    dp_size = info.get("dp_size") or 1
    if loss_agg_mode in ("token-mean", "token-sum"):
        tokens = 1 if loss_agg_mode == "token-sum" else info.get("batch_num_tokens")
        if tokens is None and dp_size > 1:
            raise ValueError(f"global_batch_info: got dp_size={dp_size} without batch_num_tokens, expected the "
                             "global token count (loss_agg_mode 'token-mean')")
        return "token_mean", None, tokens, dp_size
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: got {loss_agg_mode!r}, expected one of {LOSS_AGG_MODES}")
    sequences = info.get("global_batch_size")
    if sequences is None:
        if dp_size > 1:
            raise ValueError(f"global_batch_info: got dp_size={dp_size} without global_batch_size, expected the "
                             f"global sequence count (loss_agg_mode {loss_agg_mode!r})")
        sequences = (valid.sum(-1) > 0).sum().clamp_min(1)
    if loss_agg_mode == "seq-mean-token-sum":
        return "seq_mean_token_sum", None, sequences, dp_size
    if loss_agg_mode == "seq-mean-token-mean":
        return "seq_mean_token_mean", None, sequences, dp_size
    horizon = info.get("loss_scale_factor")
    horizon = valid.shape[-1] if horizon is None else horizon
    if isinstance(horizon, bool) or not float(horizon).is_integer() or horizon < 1:
        raise ValueError(f"loss_scale_factor: got {horizon!r}, expected a whole number >= 1 (the horizon of "
                         "'seq-mean-token-sum-norm')")
    return "constant", int(horizon), sequences, dp_size


@register_policy_loss("erpo")
def erpo_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                     loss_agg_mode: str = "token-mean", config=None,
                     rollout_is_weights: Optional[Tensor] = None) -> Tuple[Tensor, dict]:
    """verl's policy-loss interface (``actor_rollout_ref.actor.policy_loss.loss_mode=erpo``): all [B, R].

    Per token, :func:`erpo_kernels.surrogate.per_token_loss` with eps_low / eps_high = ``clip_ratio_low`` /
    ``clip_ratio_high`` (each falling back to ``clip_ratio``) and ``dual_clip_c = clip_ratio_c`` (verl's
    vanilla loss always dual-clips, c = 3 by default), times ``rollout_is_weights`` when given; aggregated by
    :func:`verl_aggregation` from ``loss_agg_mode`` and ``config.global_batch_info``.  Metrics: verl's
    vanilla names (pg_clipfrac, ppo_kl, pg_clipfrac_lower) as floats, read in one transfer.
    """
    if config is None:
        raise ValueError("config: got None, expected verl's actor config (clip_ratio_low / high / c, "
                         "global_batch_info)")
    clip_ratio = _get(config, "clip_ratio", 0.2)
    eps_low, eps_high = (_get(config, name, None) for name in ("clip_ratio_low", "clip_ratio_high"))
    valid = response_mask.bool()
    aggregation, max_length, normalizer, scale = verl_aggregation(loss_agg_mode, valid,
                                                                  _get(config, "global_batch_info", None))
    loss_config = _loss_config(float(clip_ratio if eps_low is None else eps_low),
                               float(clip_ratio if eps_high is None else eps_high),
                               float(_get(config, "clip_ratio_c", 3.0)), aggregation, max_length)
    # fp32 at least, as verl's products with fp32 advantages come out; autograd takes the grad back to log_prob
    log_prob = log_prob.to(torch.promote_types(log_prob.dtype, torch.float32))
    current = log_prob.detach()
    old = old_log_prob.detach().to(current.dtype)
    # the ratio verl uses: log(ratio) clamped to +-20 (old moved within 20 nats of the current log-prob)
    shift = current - old
    old = torch.where(shift.abs() > MAX_LOG_RATIO, current - shift.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO), old)
    old = surrogate.fill_off_mask(old, valid, log_prob)
    advantages = torch.where(valid, advantages.detach().to(current.dtype), 0.0)
    token_loss, info = surrogate.per_token_loss(log_prob, None, advantages, old, None, loss_config)
    if rollout_is_weights is not None:
        token_loss = token_loss * torch.where(valid, rollout_is_weights.detach().to(current.dtype), 0.0)
    loss = surrogate.aggregate(token_loss, valid, loss_config, normalizer) * scale

    count = valid.sum().clamp_min(1)
    masked_mean = lambda x: torch.where(valid, x.to(current.dtype), 0.0).sum() / count  # noqa: E731
    values = torch.stack([masked_mean(info["clip_low"] | info["clip_high"]), masked_mean(old - current),
                          masked_mean(info["dual_clip"])]).tolist()
    metrics = dict(zip(("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"), values))
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _get(config, key: str, default: Any) -> Any:
    """A key of a verl config (OmegaConf DictConfig, verl's BaseConfig dataclasses, a dict) or None."""
    if config is None:
        return default
    if isinstance(config, Mapping) or hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def _as_list(index) -> list:
    if isinstance(index, Tensor):
        return index.tolist()
    return list(index.tolist() if hasattr(index, "tolist") else index)


def _float(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if x is None else x.to(dtype)


def _batch_parts(data) -> Tuple[Any, Mapping]:
    """(tensors, non-tensors) of a verl DataProto (its TensorDict and numpy dict), or a dict twice."""
    if hasattr(data, "batch") and hasattr(data, "non_tensor_batch"):
        return data.batch, data.non_tensor_batch
    if isinstance(data, dict):
        return data, data
    raise ValueError(f"data: got {type(data).__name__}, expected a verl DataProto or a dict of batch fields")


__all__ = ["erpo_config", "group_ids_from_uids", "token_advantages", "erpo_estimator", "ep_grpo_estimator",
           "compute_erpo_advantage", "compute_advantage", "install_trainer_hooks", "verl_aggregation",
           "erpo_policy_loss", "ESTIMATORS", "LOSS_AGG_MODES"]

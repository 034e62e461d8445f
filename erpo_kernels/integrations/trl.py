"""ERPO inside TRL (>= 1.16): ``ERPOGRPOTrainer``, a ``GRPOTrainer`` whose advantages and loss come from this library.

    from erpo_kernels.integrations import ERPOGRPOConfig, ERPOGRPOTrainer
    args = ERPOGRPOConfig(output_dir="out", erpo_mode="erpo", loss_type="dapo", num_generations=8, ...)
    ERPOGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data).train()

What changes against ``GRPOTrainer`` (generation, reward functions, batching, logging stay TRL's own):

1. Rewards: the raw reward of every completion (TRL's weighted sum of its reward functions, gathered from every
   process) is kept; TRL's own output keeps only its sequence advantages.
2. After generation, on the whole generation batch and before TRL shuffles and splits it into micro-batches: the
   old policy's log-probs and entropy (no grad, ``token_stats`` on the last hidden states, never full logits) when
   the gate or the progress term needs them, and the reference log-probs when the progress term needs them; all
   gathered across processes, then ``erpo_advantages`` on the whole batch, and each process keeps its rows as the
   ``[B, C]`` ``advantages`` that TRL's shuffle and split carry along with the rows.
3. The loss of each micro-batch: ``erpo_loss`` on the policy's last hidden state (taken through the wrapped
   model, so DDP sees the forward; ``logits_to_keep=1`` computes no full logits) and the lm_head, with the
   precomputed advantages and a normalizer equal to TRL's for the loss_type (see :mod:`.trl_mapping`), so the
   accumulated gradient is TRL's normalization of ERPO's loss.

The reference for ERPO's progress term: TRL's ``ref_per_token_logps`` when ``beta > 0`` (TRL's reference model);
with ``beta == 0`` TRL has none, so this trainer keeps its own: the base model with the adapters switched off for
a PEFT model (TRL's convention), otherwise a frozen copy of the policy taken when the trainer is built (it costs
one model's memory; ``erpo_progress_term=False`` or ``erpo_mode="grpo"`` needs no reference).

``erpo_mode="grpo"`` is ERPO with its gate and progress term off: the same loss and gradients as TRL's own
``GRPOTrainer`` for loss_type grpo, bnpo, dr_grpo and dapo.  TRL options ERPO cannot express raise ValueError at
config time, naming the option (:func:`erpo_kernels.integrations.trl_mapping.check_supported`).
"""
import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from erpo_kernels.advantages import erpo_advantages
from erpo_kernels.integrations.trl_mapping import erpo_config, erpo_defaults, loss_normalizer
from erpo_kernels.loss import erpo_loss
from erpo_kernels.stats import token_stats

_DEFAULTS = erpo_defaults()
# inputs of vision-language models: the hidden-state forward here passes token ids and the attention mask only
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images")


def _erpo(name: str, help: str):
    """A trainer-config field for ERPOConfig's ``name``, with ERPOConfig's default."""
    return field(default=_DEFAULTS[name], metadata={"help": help})


@dataclass
class ERPOGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus ERPO's fields (``erpo_*``; their meaning and defaults are ERPOConfig's).

    TRL's own options keep their meaning: ``loss_type`` picks the aggregation, ``scale_rewards`` the std
    normalization, ``epsilon`` / ``epsilon_high`` the clip range, ``beta`` the KL weight, ``temperature`` the
    softmax temperature.  Unsupported TRL options raise ValueError here, before any model is loaded.
    """
    erpo_mode: str = field(default="erpo", metadata={
        "help": "'erpo' | 'ep_grpo' | 'grpo' (ERPO's gate and progress term off: TRL's own loss for the loss_type)"})
    erpo_gate: Optional[str] = _erpo("gate", "'sigmoid' | 'topk' | 'none'; None: the mode's preset")
    erpo_gate_gamma: float = _erpo("gate_gamma", "steepness of the sigmoid entropy gate")
    erpo_gate_scope: str = _erpo("gate_scope", "entropy statistics over each 'group', the generation 'batch' (of "
                                               "every process), or each 'sequence'")
    erpo_gate_normalize: bool = _erpo("gate_normalize", "rescale the gate to mean 1 over each sequence")
    erpo_gate_top_frac: float = _erpo("gate_top_frac", "fraction of tokens the 'topk' gate keeps")
    erpo_progress_term: Optional[bool] = _erpo("progress_term", "add the bucketed progress term; None: the preset")
    erpo_progress: Optional[str] = _erpo("progress", "'position' | 'cum_entropy' buckets; None: the preset")
    erpo_num_buckets: int = _erpo("num_buckets", "progress buckets K")
    erpo_progress_lambda: float = _erpo("progress_lambda", "scale of the implicit signal lambda * (lp_old - lp_ref)")
    erpo_progress_eta: float = _erpo("progress_eta", "weight eta of the progress term")
    erpo_bucket_normalize: bool = _erpo("bucket_normalize", "z-score the signal in each (group, bucket) cell")
    erpo_progress_cap_kappa: Optional[float] = _erpo("progress_cap_kappa", "cap |eta * Psi| <= |A_out| / kappa")
    erpo_reward_threshold: float = _erpo("reward_threshold", "EP-GRPO's zero-variance fallback threshold")
    erpo_dual_clip_c: Optional[float] = _erpo("dual_clip_c", "dual clip bound c (> 1) for negative advantages")
    erpo_chunk_size: Optional[int] = _erpo("chunk_size", "tokens per [chunk, V] logits block; None: automatic")
    erpo_check_values: bool = _erpo("check_values", "value checks of the loss inputs (one device read per call)")
    erpo_backend: str = field(default="auto", metadata={"help": "'auto' | 'triton' | 'chunked' | 'torch' | 'native'"})

    def __post_init__(self):
        super().__post_init__()
        erpo_config(self)   # unsupported TRL options and bad ERPO values fail here, naming the option


class ERPOGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with ERPO's token advantages and ``erpo_loss`` (module docstring); ``args`` an ERPOGRPOConfig."""

    def __init__(self, model, reward_funcs, args=None, *rest, **kwargs):
        if not isinstance(args, ERPOGRPOConfig):
            raise ValueError(f"args: got {type(args).__name__}, expected an ERPOGRPOConfig (GRPOConfig with ERPO's "
                             "fields)")
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self.erpo_config = erpo_config(args)
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef: the ERPO trainer does not add an MoE router loss; set "
                             "router_aux_loss_coef=0.0")
        # logits = h W^T / temperature in erpo_loss: no soft-capping or scaling (TRL's fused head applies them)
        text_config = self.model.config.get_text_config()
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                     "lm_head_multiplier"):
            value = getattr(text_config, name, None)
            if value is not None and (name == "final_logit_softcapping" or value != 1.0):
                raise ValueError(f"model.config.{name}: got {value!r}; the ERPO trainer's logits are h W^T / "
                                 "temperature, without logit soft-capping or scaling")
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_fsdp_enabled or (deepspeed is not None and deepspeed.zero_stage == 3):
            raise ValueError("fsdp / deepspeed ZeRO-3: the ERPO trainer needs the whole lm_head weight on each "
                             "process (a sharded lm_head is not supported)")
        self._erpo_rewards = None
        self._erpo_reference = None
        if self.erpo_config.progress_term and self.beta == 0.0 and not is_peft_model(self.model):
            self._erpo_reference = self._frozen_copy(self.model)

    # ---------------------------------------------------------------------------------------------- generation
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        if bool(unscorable.any()):
            raise ValueError(f"reward_funcs: every reward function returned None for {int(unscorable.sum())} "
                             "completions; ERPO's group statistics need a reward for each completion")
        # TRL's reward of a completion (the weighted sum of its reward functions), for every process's rows
        weights = self.reward_weights.to(rewards_per_func.device)
        self._erpo_rewards = (rewards_per_func * weights).nansum(dim=1)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        # still the whole local generation batch, unshuffled: TRL splits it into micro-batches after this returns
        batch["advantages"] = self._erpo_token_advantages(batch, self._erpo_rewards)
        return batch

    def _erpo_token_advantages(self, batch, rewards):
        """ERPO's advantages [B_local, C] of this process's rows of a generation ``batch`` (TRL's output keys)
        from ``rewards`` [B_global], the reward of every process's completions in process order."""
        config = self.erpo_config
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        mask = self._loss_mask(batch)
        old_logprobs = old_entropy = ref_logprobs = None
        if config.uses_gate or config.progress_term:
            old_logprobs, old_entropy = self._sequence_stats(self.model, batch)
        if config.progress_term:
            ref_logprobs = batch.get("ref_per_token_logps")
            if ref_logprobs is None:
                ref_logprobs = self._reference_logprobs(batch)
        if old_entropy is None:   # neither gate nor progress term: A = A_seq, which reads no entropy
            old_entropy = torch.zeros(mask.shape, device=mask.device)
        # groups straddle processes: every process computes the advantages of the whole gathered batch
        mask, old_entropy, old_logprobs, ref_logprobs = (self._gather_tokens(x) for x in (
            mask, old_entropy, old_logprobs, ref_logprobs))
        rows, width = batch["completion_ids"].shape
        first = self.accelerator.process_index * rows
        if not bool(mask.any()):   # e.g. every completion truncated under mask_truncated_completions
            return torch.zeros(rows, width, device=mask.device)
        adv = erpo_advantages(rewards.float(), mask.bool(), old_entropy.float(), _float(old_logprobs),
                              _float(ref_logprobs), group_size=group_size, config=config,
                              backend=self.args.erpo_backend)
        self._log_advantage_metrics(adv, mask.bool())
        return adv.advantages[first:first + rows, :width].float()

    # ---------------------------------------------------------------------------------------------- loss
    def _compute_loss(self, model, inputs):
        present = [key for key in _MULTIMODAL_KEYS if inputs.get(key) is not None]
        if present:
            raise ValueError(f"inputs: {present} given; the ERPO trainer supports text-only models")
        training = self.model.training
        mask = self._loss_mask(inputs)
        lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        hidden = self._completion_hidden(model, inputs, lm_head.weight.dtype)
        mode = "train" if training else "eval"
        if not bool(mask.any()):
            # no loss token in this micro-batch: a zero that still reaches every parameter, so DDP's reducer
            # hears from each one as on the other processes (and the metrics' gather runs as on them)
            self._log_loss_metrics(None, mode)
            return (hidden.sum() + lm_head.weight.sum()) * 0.0
        advantages = inputs["advantages"]
        if advantages.dim() == 1:   # TRL's own sequence advantages, e.g. a batch built by hand
            advantages = advantages[:, None].expand(mask.shape)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            # TRL multiplies the policy term by vLLM's importance ratio (>= 0, [B, C] or [B, 1]): the same as
            # multiplying both branches of the clipped surrogate, i.e. A; the KL term is added unweighted in both
            advantages = advantages * inputs["importance_sampling_ratio"]
        accumulation = self.current_gradient_accumulation_steps if training else 1
        normalizer = loss_normalizer(self.loss_type, mask.shape[0], mask.sum(), inputs["num_items_in_batch"],
                                     self.accelerator.num_processes, accumulation, self.args.steps_per_generation,
                                     training)
        out = erpo_loss(hidden, lm_head, inputs["completion_ids"], mask, advantages=advantages,
                        normalizer=normalizer, old_logprobs=inputs.get("old_per_token_logps"),
                        ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                        config=self.erpo_config, backend=self.args.erpo_backend)
        self._log_loss_metrics(out.metrics.tensors, mode)
        return out.loss

    # ---------------------------------------------------------------------------------------------- helpers
    def _loss_mask(self, batch):
        mask = batch["completion_mask"]
        return mask * batch["tool_mask"] if batch.get("tool_mask") is not None else mask

    def _completion_hidden(self, model, batch, dtype, rows=slice(None), backbone_only=False):
        """Last hidden states [B, C, H] at the positions that predict the C completion tokens (``[:, -C-1:-1]``).

        With gradients: through ``model`` as the training loop wrapped it (DDP's reducer must see the forward),
        ``hidden_states[-1]`` with ``logits_to_keep=1`` (no full logits; the layer outputs it keeps are saved for
        backward anyway).  ``backbone_only`` (no-grad passes): the decoder alone, which keeps no layer outputs.
        """
        width = batch["completion_ids"].shape[1]
        inputs = dict(input_ids=torch.cat([batch["prompt_ids"][rows], batch["completion_ids"][rows]], dim=1),
                      attention_mask=torch.cat([batch["prompt_mask"][rows], batch["completion_mask"][rows]], dim=1),
                      use_cache=False)
        with self.accelerator.autocast():
            if backbone_only:
                hidden = self.accelerator.unwrap_model(model).get_decoder()(**inputs).last_hidden_state
            else:
                hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        # the loss runs in the lm_head's dtype (with fp32 statistics); autocast may leave the hidden states in another
        return hidden[:, -width - 1:-1].to(dtype)

    def _sequence_stats(self, model, batch):
        """(log-probs, entropy) [B, C] of the completion tokens under ``model``, no grad, ``token_stats`` on hidden
        states in micro-batch-sized chunks (as TRL's own old/ref passes)."""
        lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        targets = batch["completion_ids"]
        step = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        logprobs, entropy = [], []
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for start in range(0, targets.shape[0], step):
                rows = slice(start, start + step)
                hidden = self._completion_hidden(model, batch, lm_head.weight.dtype, rows, backbone_only=True)
                stats = token_stats(hidden, lm_head, targets[rows], self.erpo_config.temperature,
                                    backend=self.args.erpo_backend, chunk_size=self.erpo_config.chunk_size,
                                    check_values=self.erpo_config.check_values)
                logprobs.append(stats.logprobs)
                entropy.append(stats.entropy)
        return torch.cat(logprobs), torch.cat(entropy)

    def _reference_logprobs(self, batch):
        if self._erpo_reference is not None:
            return self._sequence_stats(self._erpo_reference, batch)[0]
        # PEFT: the reference is the base model, the adapters switched off (TRL's convention; an adapter named
        # "ref" is TRL's initial copy of a re-trained adapter)
        unwrapped = self.accelerator.unwrap_model(self.model)
        with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
            return self._sequence_stats(self.model, batch)[0]

    def _frozen_copy(self, model):
        reference = copy.deepcopy(self.accelerator.unwrap_model(model))
        # TRL's fused-head patch of `forward` is a closure over the *policy's* original forward: the copy drops it,
        # or calling the copy would run the policy's weights (the passes here call its decoder, which is not patched)
        reference.__dict__.pop("forward", None)
        reference.eval().requires_grad_(False)
        return self.accelerator.prepare_model(reference, evaluation_mode=True)

    def _gather_tokens(self, x):
        """[B_local, C_local] -> [B_global, C_max] over processes (completion widths differ; padded with 0)."""
        if x is None:
            return None
        return self.accelerator.gather(self.accelerator.pad_across_processes(x, dim=1, pad_index=0))

    def _log_advantage_metrics(self, adv, mask):
        mode = "train" if self.model.training else "eval"
        names = {"erpo/advantage_abs_mean": adv.advantages.abs()}
        if self.erpo_config.uses_gate:
            names["erpo/gate_mean"] = adv.gate
        if self.erpo_config.progress_term:
            names["erpo/progress_signal_abs_mean"] = adv.signal.abs()
        stacked = torch.stack([torch.where(mask, x.float(), 0.0).sum() for x in names.values()])
        for name, value in zip(names, (stacked / mask.sum().clamp(min=1)).tolist()):
            self._metrics[mode][name].append(value)

    def _log_loss_metrics(self, tensors, mode):
        """TRL's names for ERPO's metrics of one micro-batch (``tensors`` None: it had no loss token); per-process
        means averaged over the processes that had tokens.  Every process gathers, so the collectives line up."""
        names = {"entropy": "entropy", "clip_ratio/low_mean": "clip_frac_low", "clip_ratio/high_mean": "clip_frac_high",
                 "clip_ratio/region_mean": "clip_frac"}
        if self.beta != 0.0:
            names["kl"] = "kl"
        device = self.accelerator.device
        values = (torch.full((len(names),), float("nan"), device=device) if tensors is None else
                  torch.stack([tensors[key].float().reshape(()) for key in names.values()]))
        for name, value in zip(names, self.accelerator.gather(values[None]).nanmean(0).tolist()):
            if value == value:   # not NaN: some process had tokens
                self._metrics[mode][name].append(value)


def _float(x):
    return None if x is None else x.float()


__all__ = ["ERPOGRPOConfig", "ERPOGRPOTrainer"]

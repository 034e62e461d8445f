"""erpo-train: a minimal RL trainer that shows ``erpo_loss`` doing its job on a real model.

    erpo-train                                   # tiny preset, 2-step chains, ERPO; < 5 min on 2 CPU cores
    erpo-train --algo=grpo --steps=100           # any TrainConfig field as --key=value
    erpo-train --compare grpo,erpo               # same seed and budget; table + plots in out_dir
    erpo-train --compare grpo,erpo,erpo+ft2 --seeds 3 --jobs 2   # mean +- std across seeds, band plots
    erpo-train --model=/path/to/hf_model --task=data.jsonl --warmup_steps=0
    erpo-train --rollout=vllm                    # vLLM sampling, weights pushed after each update
    erpo-train --out_dir=runs/x --resume         # continue exactly from runs/x/ckpt
    python -m erpo_kernels.trainer.train --steps=10

One step reads top to bottom: rollout -> reward -> old/reference stats -> ``erpo_loss``
(advantages inside) -> optimizer step (NaN-guarded) -> push weights -> log -> eval -> checkpoint.
On a GPU the same command runs the Triton backend of the loss (``backend="auto"``).
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
import torch

from erpo_kernels import ERPOConfig, erpo_advantages, erpo_loss, token_stats
from erpo_kernels.trainer.checkpoint import (MetricsLog, has_checkpoint, load_trainer_state, save_checkpoint,
                                             seed_everything, set_rng_state)
from erpo_kernels.trainer.config import TrainConfig
from erpo_kernels.trainer.evaluate import evaluate
from erpo_kernels.trainer.models import backbone_and_head, load_model, save_model
from erpo_kernels.trainer.rollout import HFRollout, Rollout, VLLMRollout, policy_hidden
from erpo_kernels.trainer.tasks import TaskSource, WarmupSource, is_correct, is_well_formed, reward
from erpo_kernels.trainer.warmup import warmup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def loss_config(cfg: TrainConfig) -> ERPOConfig:
    """The loss's config; Dr.GRPO's constant divisor is the generation length (as in its paper), the same for
    every micro-batch."""
    return ERPOConfig(mode=cfg.algo, temperature=cfg.temperature, kl_beta=cfg.kl_beta,
                      entropy_coef=cfg.entropy_coef, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                      gate_gamma=cfg.gate_gamma, progress_eta=cfg.progress_eta,
                      max_length=cfg.max_new_tokens)


@torch.no_grad()
def sequence_stats(model, rollout: Rollout, temperature: float):
    """Per-token log-prob and entropy [B, C] of ``model`` on the rollout's completions."""
    _, lm_head = backbone_and_head(model)
    return token_stats(policy_hidden(model, rollout), lm_head, rollout.targets, temperature,
                       mask=rollout.completion_mask)    # no logits for prompt padding or after EOS


def guarded_step(model, optimizer, loss_is_finite: bool, grad_clip: float) -> tuple:
    """Clip and step, unless the loss or the gradient norm is NaN/inf: then drop the gradient."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if not (loss_is_finite and torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return False, float(grad_norm)
    optimizer.step()
    return True, float(grad_norm)


def update(model, optimizer, rollout: Rollout, rewards, old, ref, cfg: TrainConfig, config: ERPOConfig) -> dict:
    """One optimizer step on the whole batch, the way a trainer calls the library: token advantages computed
    once on the whole batch (``erpo_advantages``), then ``erpo_loss`` per micro-batch with those advantages and
    the aggregation's global denominator (``normalizer``), so the micro-batch losses and gradients add up to
    the full batch's whatever rows a micro-batch holds (groups may be split)."""
    _, lm_head = backbone_and_head(model)
    mask = rollout.completion_mask
    total_rows = mask.shape[0]
    total_tokens = float(mask.sum())
    adv = erpo_advantages(rewards, mask, old.entropy, old.logprobs, None if ref is None else ref.logprobs,
                          group_size=cfg.group_size, config=config)
    normalizer = total_tokens if config.aggregation in ("token_mean", "holder") else float(total_rows)
    optimizer.zero_grad(set_to_none=True)
    loss_sum, metrics, finite = 0.0, advantage_metrics(adv, mask, cfg.group_size, old.logprobs), True
    for start in range(0, total_rows, cfg.micro_batch):
        rows = slice(start, start + cfg.micro_batch)
        micro = rollout.select(rows)
        tokens = float(micro.completion_mask.sum())
        if tokens == 0:
            continue
        out = erpo_loss(policy_hidden(model, micro), lm_head, micro.targets, micro.completion_mask,
                        advantages=adv.advantages[rows], normalizer=normalizer, old_logprobs=old.logprobs[rows],
                        old_entropy=old.entropy[rows], ref_logprobs=None if ref is None else ref.logprobs[rows],
                        config=config, backend=cfg.backend)
        finite = finite and bool(torch.isfinite(out.loss))
        if finite:
            out.loss.backward()
        loss_sum += out.loss.item()
        for key, value in out.metrics.items():  # token means, weighted by the micro-batch's share of tokens
            if key not in ("loss", "num_tokens"):
                metrics[key] = metrics.get(key, 0.0) + value * tokens / total_tokens
    stepped, grad_norm = guarded_step(model, optimizer, finite, cfg.grad_clip)
    metrics.update(loss=loss_sum, num_tokens=total_tokens, grad_norm=grad_norm, skipped=0.0 if stepped else 1.0)
    return metrics


def advantage_metrics(adv, mask, group_size: int, old_logprobs=None) -> dict:
    """Metrics of the advantage synthesis on the whole batch: gate, progress signal, zero-variance groups, and
    the diagnostics of entropy dynamics:
    - cov_logp_adv: token covariance of the old log-prob and the advantage. To first order a policy-gradient
      step changes the entropy by about minus this covariance (positive: confident tokens reinforced, entropy
      falls); it is how the token advantages of each algorithm push the entropy.
    - outcome_share: sum |gate * A_seq| / sum |A| over tokens (1 without a progress term);
      progress_flip_frac: share of tokens whose advantage sign differs from the outcome's (progress term wins).
    - bucket_cell_tokens: mean masked tokens per non-empty (group, bucket) cell; bucket_thin_frac: share of
      tokens in cells of one token (their normalized signal is 0)."""
    m = mask.to(adv.gate.dtype)
    n = m.sum().clamp_min(1)
    mean = lambda x: float((x * m).sum() / n)  # noqa: E731
    per_group = adv.zero_var.view(-1, group_size)[:, 0]
    out = {"gate_mean": mean(adv.gate), "gate_frac_above_half": mean((adv.gate > 0.5).float()),
           "progress_signal_abs_mean": mean(adv.signal.abs()), "zero_var_groups": float(per_group.sum()),
           "num_groups": float(per_group.numel())}
    outcome = adv.gate * adv.seq_advantage[:, None] * m
    total = adv.advantages * m
    out["outcome_share"] = float(outcome.abs().sum() / total.abs().sum().clamp_min(1e-12)) if bool(
        (total != 0).any()) else 1.0
    live = (total != 0) & (outcome != 0)
    out["progress_flip_frac"] = float(((torch.sign(total) != torch.sign(outcome)) & live).float().sum() /
                                      live.float().sum().clamp_min(1))
    group = (torch.arange(m.shape[0], device=m.device) // group_size)[:, None].expand_as(m)
    cell = (group * (int(adv.bucket.max()) + 1) + adv.bucket.long())[m > 0]
    counts = torch.bincount(cell)
    counts = counts[counts > 0].to(m.dtype)
    out["bucket_cell_tokens"] = float(counts.mean()) if counts.numel() else 0.0
    out["bucket_thin_frac"] = float((counts == 1).sum() / n)  # tokens alone in their cell
    if old_logprobs is not None:
        lp, a = old_logprobs * m, adv.advantages * m
        lp_c, a_c = (lp - (lp.sum() / n)) * m, (a - (a.sum() / n)) * m
        out["cov_logp_adv"] = float((lp_c * a_c).sum() / n)
    return out


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one RL training run; returns the summary (also in out_dir/summary.json)."""
    from tqdm.auto import tqdm

    os.makedirs(cfg.out_dir, exist_ok=True)
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)  # tiny models: extra threads only add sync overhead
    try:
        return _train(cfg, device, tqdm)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, device, tqdm) -> dict:
    t0 = time.time()
    ckpt_dir, ref_dir = os.path.join(cfg.out_dir, "ckpt"), os.path.join(cfg.out_dir, "reference")
    seed_everything(cfg.seed)
    source = TaskSource(cfg.task, cfg.level, cfg.seed, cfg.num_eval)
    config = loss_config(cfg)
    needs_reference = config.progress_term or config.kl_beta > 0
    resume = cfg.resume and has_checkpoint(ckpt_dir)
    if cfg.resume and not resume:
        print(f"--resume: no checkpoint in {ckpt_dir}, starting a new run", flush=True)

    # --- model: a checkpoint to resume, or a preset (+ warm-up) / local model -------------------
    if resume:
        model, tokenizer, _ = load_model(ckpt_dir, dtype=cfg.dtype, device=device)
        state = load_trainer_state(ckpt_dir)
        start_step, warmup_losses = state["step"], state["extra"].get("warmup_losses", [])
    else:
        model, tokenizer, is_preset = load_model(cfg.model, cfg.seed, cfg.dtype, device)
        steps = cfg.warmup_steps if is_preset else 0
        sft_source = WarmupSource(source, cfg.warmup_levels) if cfg.warmup_levels else source
        warmup_losses = warmup(model, tokenizer, sft_source, steps, cfg.warmup_batch, cfg.warmup_lr, cfg.progress)
        start_step, state = 0, None
    reference = None
    if needs_reference:  # frozen copy of the policy as RL starts
        if resume and os.path.isdir(ref_dir):
            reference = load_model(ref_dir, dtype=cfg.dtype, device=device)[0]
        else:
            reference = copy.deepcopy(model)
            save_model(reference, tokenizer, ref_dir)
        reference.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
    if resume:
        optimizer.load_state_dict(state["optimizer"])
    if cfg.rollout == "vllm":
        policy_dir = ckpt_dir if resume else os.path.join(cfg.out_dir, "policy_init")
        if not resume:
            save_model(model, tokenizer, policy_dir)
        engine = VLLMRollout(policy_dir, tokenizer, cfg.dtype, cfg.seed)
    else:
        engine = HFRollout(tokenizer)
    if resume:
        set_rng_state(state["rng"])  # last: nothing above may consume randomness after this
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), start_step if resume else None)
    model.train()

    def run_eval() -> dict:
        return evaluate(engine, model, source.eval_problems, cfg.pass_k, cfg.temperature, cfg.max_new_tokens)

    if not resume:
        log.write({"step": 0, **run_eval()})
    last_step = min(cfg.steps, cfg.stop_after) if cfg.stop_after > 0 else cfg.steps
    bar = tqdm(range(start_step + 1, last_step + 1), desc=f"RL ({cfg.algo})", disable=not cfg.progress,
               dynamic_ncols=True, initial=start_step, total=cfg.steps)
    for step in bar:
        step_start = time.time()
        # 1. rollout: G samples for each prompt, rows of a group consecutive
        problems = source.batch(step, cfg.prompts_per_step)
        explore = dict(first_token_top_n=cfg.first_token_top_n) if cfg.first_token_top_n else {}
        rollout = engine.generate(model, [p.prompt for p in problems], cfg.group_size, cfg.temperature,
                                  cfg.max_new_tokens, **explore)
        # 2. reward: verifiable correctness (+ optional format bonus)
        owners = [problems[row // cfg.group_size] for row in range(len(rollout.completions))]
        rewards = torch.tensor([reward(p, text, cfg.format_reward) for p, text in zip(owners, rollout.completions)],
                               device=device)
        # 3. old-policy log-probs and entropy, reference log-probs: fused, from hidden states
        old = sequence_stats(model, rollout, cfg.temperature)
        ref = sequence_stats(reference, rollout, cfg.temperature) if reference is not None else None
        if cfg.lr_warmup_steps:  # a function of the step alone, so a resumed run gets the same schedule
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, step / cfg.lr_warmup_steps)
        # 4. updates: erpo_loss (token advantages inside) -> backward -> guarded optimizer step
        updates = [update(model, optimizer, rollout, rewards, old, ref, cfg, config)
                   for _ in range(cfg.updates_per_batch)]
        engine.push_weights(model)
        # 5. log
        mask = rollout.completion_mask
        row = {"step": step, "reward": float(rewards.mean()),
               "accuracy": sum(map(is_correct, owners, rollout.completions)) / len(owners),
               "format": sum(map(is_well_formed, rollout.completions)) / len(owners),
               "entropy": float((old.entropy * mask).sum() / mask.sum().clamp_min(1)),
               "response_length": float(rollout.lengths.float().mean()), "lr": optimizer.param_groups[0]["lr"]}
        for key in updates[0]:  # the loss's metrics, averaged over the updates (rollout stats win)
            row.setdefault(key, sum(u[key] for u in updates) / len(updates))
        row["skipped"] = sum(u["skipped"] for u in updates)
        if rollout.engine_logprobs is not None:  # the engine's log-probs vs the trainer's (vLLM)
            row["engine_logprob_max_err"] = float(((old.logprobs - rollout.engine_logprobs).abs() * mask).max())
        row["step_time"] = time.time() - step_start
        if row["skipped"]:
            bar.write(f"step {step}: skipped {int(row['skipped'])} update(s) with a NaN/inf loss or gradient")
        bar.set_postfix(reward=f"{row['reward']:.2f}", entropy=f"{row['entropy']:.2f}",
                        len=f"{row['response_length']:.1f}")
        # 6. evaluate on held-out problems, log, checkpoint
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            row.update(run_eval())
            bar.write(f"step {step}: held-out greedy accuracy {row['eval_accuracy']:.3f}, "
                      f"pass@{cfg.pass_k} {row[f'eval_pass@{cfg.pass_k}']:.3f}")
        log.write(row)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == last_step:
            save_checkpoint(ckpt_dir, model, tokenizer, optimizer, step, cfg,
                            {"warmup_losses": warmup_losses})
    bar.close()
    from erpo_kernels.trainer.compare import summarize

    summary = summarize(cfg, os.path.join(cfg.out_dir, "metrics.jsonl"), time.time() - t0, warmup_losses)
    return summary


if __name__ == "__main__":
    from erpo_kernels.trainer.cli import main

    sys.exit(main())

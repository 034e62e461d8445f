"""Supervised warm-up: a few hundred steps of next-token loss on the task's worked solutions.

A freshly initialised preset scores 0 on every problem, and RL from all-zero rewards has no
signal (every group has zero variance). A short warm-up gives non-zero but imperfect rewards.
The loss is built from the library's ``token_stats`` (fused log-probs from hidden states), so the
warm-up never materialises [tokens x vocab] logits either.
"""
from __future__ import annotations

import torch

from erpo_kernels import token_stats
from erpo_kernels.trainer.models import backbone_and_head
from erpo_kernels.trainer.rollout import position_ids


def encode_solutions(tokenizer, problems, device) -> tuple:
    """(input ids [B, L], attention mask [B, L], loss mask [B, L-1] on solution + EOS targets)."""
    prompt_ids = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    full_ids = [ids + tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for ids, p in zip(prompt_ids, problems)]
    width = max(len(ids) for ids in full_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in full_ids], device=device)
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in full_ids], device=device)
    loss_mask = torch.zeros(len(full_ids), width - 1, device=device)
    for row, (prompt, full) in enumerate(zip(prompt_ids, full_ids)):
        loss_mask[row, len(prompt) - 1:len(full) - 1] = 1.0  # targets = the solution tokens and EOS
    return input_ids, attention, loss_mask


def warmup(model, tokenizer, source, steps: int, batch_size: int, lr: float, progress: bool = True) -> list:
    """Train on ``source.batch(step, batch_size, "sft")`` solutions; returns the loss per step."""
    if steps <= 0:
        return []
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    backbone, lm_head = backbone_and_head(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)  # linear decay to 0
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="warm-up (SFT)", disable=not progress, dynamic_ncols=True)
    for step in bar:
        input_ids, attention, loss_mask = encode_solutions(tokenizer, source.batch(step, batch_size, "sft"), device)
        inputs, mask = input_ids[:, :-1], attention[:, :-1]
        hidden = backbone(input_ids=inputs, attention_mask=mask, position_ids=position_ids(mask),
                          use_cache=False).last_hidden_state
        stats = token_stats(hidden, lm_head, input_ids[:, 1:])
        loss = -(stats.logprobs * loss_mask).sum() / loss_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses

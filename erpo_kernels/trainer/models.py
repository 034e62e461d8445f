"""Models: a local Hugging Face causal LM directory, or a small preset built from a config.

Presets are Qwen2 / Llama architectures built with ``transformers`` from a config (random init,
nothing downloaded) with a character-level tokenizer over a fixed alphabet. The tokenizer is a real
``tokenizers`` WordLevel model wrapped in ``PreTrainedTokenizerFast`` and saved with
``save_pretrained``, so ``AutoTokenizer.from_pretrained(dir)`` and vLLM both load the pair.
Head dim is 32 everywhere: vLLM's CPU attention needs head_dim >= 32.
"""
from __future__ import annotations

import os
import string
from typing import Tuple

import torch

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# every character the generated tasks use; anything else maps to <unk>
ALPHABET = string.digits + "+-*/()=?#:;.,' \n" + string.ascii_lowercase + string.ascii_uppercase

# name -> (architecture, hidden size, layers, attention heads, MLP size); head_dim = hidden / heads = 32
PRESETS = {
    "tiny": ("qwen2", 64, 2, 2, 256),         # ~0.14M parameters: the CPU default
    "tiny-llama": ("llama", 64, 2, 2, 256),
    "small": ("qwen2", 128, 4, 4, 512),       # ~0.8M parameters
    "base": ("qwen2", 256, 6, 8, 1024),       # ~4.8M parameters, for a GPU
}


def _byte_level(char: str) -> str:
    """GPT-2's printable stand-in for a one-byte character (' ' -> 'Ġ', '\\n' -> 'Ċ')."""
    code = ord(char)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if code in printable:
        return char
    return chr(256 + sum(1 for b in range(code) if b not in printable))


def build_char_tokenizer():
    """A character-level PreTrainedTokenizerFast: one token per character, <pad>=0, <eos>=1, <unk>=2.

    It is a byte-level BPE with no merges (so every character is one token), the format of GPT-2,
    Llama-3 and Qwen2 tokenizers: whichever tokenizer class a loader picks for the architecture
    (transformers 5 forces Qwen2Tokenizer for qwen2 configs; vLLM) rebuilds exactly this tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [PAD, EOS, UNK] + [_byte_level(c) for c in ALPHABET]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left", model_max_length=256)


def build_preset(name: str, seed: int = 0):
    """(model, tokenizer) for a preset name, weights from ``torch.manual_seed(seed)``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if name not in PRESETS:
        raise ValueError(f"model preset: got {name!r}, expected one of {sorted(PRESETS)} or a model directory")
    arch, hidden, layers, heads, mlp = PRESETS[name]
    tokenizer = build_char_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                  head_dim=hidden // heads, max_position_embeddings=256, tie_word_embeddings=True,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-6)
    config = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM)(config)
    return model, tokenizer


def load_model(name_or_path: str, seed: int = 0, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, is_preset): a preset by name, else a local HF directory (nothing downloaded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar on every load
    torch_dtype = getattr(torch, dtype)
    if name_or_path in PRESETS:
        model, tokenizer = build_preset(name_or_path, seed)
        is_preset = True
    else:
        if not os.path.isdir(name_or_path):
            raise ValueError(f"--model: {name_or_path!r} is neither a preset {sorted(PRESETS)} "
                             "nor a local model directory (nothing is downloaded)")
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=True, dtype=torch_dtype)
        is_preset = False
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # prompts are left-padded so completions start in one column
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device=device, dtype=torch_dtype), tokenizer, is_preset


def save_model(model, tokenizer, directory: str) -> None:
    """An HF directory (safetensors + tokenizer) that ``--model`` and vLLM load as is."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on every checkpoint
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def backbone_and_head(model) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(the decoder that returns last_hidden_state after the final norm, the lm_head Linear)."""
    return model.get_decoder(), model.get_output_embeddings()

"""TrainConfig: every knob of ``erpo-train`` in one typed dataclass, with ``--key=value`` overrides.

The defaults finish on a 2-core CPU in under 3 minutes (the tiny preset, level-1 chains: two worked steps).
Overrides are parsed by the field's type (no ``exec``): ``--steps=100``, ``--algo grpo``,
``--resume`` (a bare flag sets a bool to True), ``--model=/path/to/hf_dir``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import List, Optional

ALGOS = ("erpo", "ep_grpo", "grpo", "dapo", "dr_grpo")


@dataclass
class TrainConfig:
    # --- run ----------------------------------------------------------------------------------
    out_dir: str = "runs/erpo-train"    # metrics.jsonl, checkpoints, summary, plots
    seed: int = 0
    device: str = "auto"                # "auto" = cuda if available (Triton backend), else cpu
    threads: int = 1                    # CPU threads for torch; tiny models run fastest on 1; 0 = torch default
    resume: bool = False                # continue from out_dir/ckpt (model, optimizer, RNG, step)
    compare: str = ""                   # e.g. "grpo,erpo": one run per algo, same seeds and budget; an entry
                                        # "erpo+ft4" is erpo with first_token_top_n=4 (an extra row)
    seeds: int = 1                      # --compare: seeds seed, seed+1, ..., seed+seeds-1 for every algo
    jobs: int = 1                       # --compare: runs at once (processes, threads each); 1 = one by one
    stop_after: int = 0                 # stop (with a checkpoint) after this step; 0 = run to `steps`
    # --- model --------------------------------------------------------------------------------
    model: str = "tiny"                 # preset ("tiny", "tiny-llama", "small", "base") or local HF dir
    dtype: str = "float32"              # parameter dtype ("bfloat16" on a GPU)
    # --- task ---------------------------------------------------------------------------------
    task: str = "chain"                 # "chain" | "arith" | "word" | "countdown" | "mix" | path to a .jsonl
    level: int = 1                      # difficulty 1..3 of the generated tasks
    format_reward: float = 0.0          # added to the reward for a well-formed "<work>#<answer>"
    max_new_tokens: int = 24            # completion budget per sample (chain level 2 needs 27+: use 40)
    num_eval: int = 64                  # held-out problems (never seen in training)
    # --- supervised warm-up (gives a fresh preset non-zero reward before RL) -------------------
    warmup_steps: int = 200             # 0 to skip; skipped anyway for a local --model
    warmup_batch: int = 32
    warmup_lr: float = 3e-3
    warmup_levels: List[int] = field(default_factory=list)  # levels the warm-up draws from; [] = `level`. E.g.
                                        # --level=2 --warmup_levels=1,3: the format, never a level-2 problem
    # --- rollout ------------------------------------------------------------------------------
    rollout: str = "hf"                 # "hf" (model.generate) or "vllm" (extra `vllm`)
    prompts_per_step: int = 16
    group_size: int = 8                 # G samples per prompt
    temperature: float = 0.5            # sampling temperature; the loss uses the same one (at 1.0 the tiny
                                        # model's samples are too noisy for RL to move the greedy accuracy)
    first_token_top_n: int = 0          # REFT-style exploration: first response token uniform over the policy's
                                        # top-N (training rollouts only, hf rollout); 0 = off
    # --- RL update ----------------------------------------------------------------------------
    algo: str = "erpo"                  # "erpo" | "ep_grpo" | "grpo" | "dapo" | "dr_grpo"
    steps: int = 500                    # rollout batches
    updates_per_batch: int = 2          # optimizer steps on each batch (PPO-style reuse)
    micro_batch: int = 64               # rows per forward/backward (any size: advantages come from the whole batch)
    lr: float = 3e-4
    lr_warmup_steps: int = 0            # RL learning rate ramps linearly from lr/N to lr over the first N steps
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    kl_beta: float = 0.0                # KL to the frozen reference (ERPOConfig.kl_beta)
    entropy_coef: float = 0.0
    gate_gamma: float = 5.0             # ERPO/EP-GRPO entropy-gate sharpness (ERPOConfig.gate_gamma)
    progress_eta: float = 0.2           # weight of the progress term (ERPOConfig.progress_eta); 0 = gate only
    eps_low: float = 0.2
    eps_high: float = 0.28
    backend: str = "auto"               # erpo_kernels backend: "auto" = Triton on CUDA, chunked torch on CPU
    # --- logging, evaluation, checkpoints -----------------------------------------------------
    eval_every: int = 50                # greedy accuracy and pass@k on the held-out set; 0 = only at the ends
    pass_k: int = 4
    ckpt_every: int = 100               # 0 = only at the end
    progress: bool = True               # tqdm bar

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"algo: got {self.algo!r}, expected one of {ALGOS}")
        if self.rollout not in ("hf", "vllm"):
            raise ValueError(f"rollout: got {self.rollout!r}, expected 'hf' or 'vllm'")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch: got {self.micro_batch!r}, expected an int >= 1")
        for name in ("steps", "group_size", "prompts_per_step", "updates_per_batch", "max_new_tokens", "seeds",
                     "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)!r}, expected >= 1")
        for name in ("seeds", "jobs"):
            if getattr(self, name) > 1 and not self.compare:
                raise ValueError(f"{name}: got {getattr(self, name)!r}; more than 1 needs --compare (one run is one seed)")
        if any(not 1 <= level <= 3 for level in self.warmup_levels):
            raise ValueError(f"warmup_levels: got {self.warmup_levels!r}, expected levels 1, 2 or 3")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps: got {self.lr_warmup_steps!r}, expected >= 0")
        if self.first_token_top_n < 0:
            raise ValueError(f"first_token_top_n: got {self.first_token_top_n!r}, expected >= 0 (0 = off)")
        if self.first_token_top_n and self.rollout != "hf":
            raise ValueError(f"first_token_top_n: supported by the 'hf' rollout only, got rollout={self.rollout!r}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _convert(name: str, kind, text: str):
    origin = typing.get_origin(kind)
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}: got {text!r}, expected true or false")
    if origin in (list, List):
        (item,) = typing.get_args(kind)
        return [item(part) for part in text.split(",") if part]
    if origin is typing.Union:  # Optional[X]
        if text.lower() == "none":
            return None
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{name}: got {text!r}, expected a {kind.__name__}") from None


def parse_args(argv: Optional[List[str]] = None, base: Optional[TrainConfig] = None) -> TrainConfig:
    """``--key=value`` / ``--key value`` / ``--flag`` (bools) over ``base`` (default TrainConfig())."""
    hints = typing.get_type_hints(TrainConfig)
    changes, args = {}, list(argv or [])
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options look like --key=value")
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in hints:
            raise ValueError(f"unknown option --{key}; known: {', '.join(sorted(hints))}")
        if not has_value:
            next_is_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            if hints[key] is bool and not next_is_value:
                value = "true"
            elif next_is_value:
                i += 1
                value = args[i]
            else:
                raise ValueError(f"--{key} needs a value")
        changes[key] = _convert(key, hints[key], value)
        i += 1
    return (base or TrainConfig()).replace(**changes)


def describe(config: TrainConfig) -> str:
    """The non-default fields, as the overrides that would reproduce this config."""
    default = TrainConfig()
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value != getattr(default, f.name):
            shown = ",".join(map(str, value)) if isinstance(value, list) else value
            parts.append(f"--{f.name}={shown}")
    return " ".join(parts) or "(defaults)"

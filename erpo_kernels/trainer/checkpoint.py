"""Checkpoints that resume exactly, and the per-step metrics log.

``out_dir/ckpt/`` is an HF model directory (``--model`` and vLLM load it as is) plus
``trainer_state.pt``: optimizer state, step, RNG states (torch, CUDA, python, numpy) and the
config. It is written to a temporary directory and renamed, so a crash never leaves half a
checkpoint behind.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch

from erpo_kernels.trainer.models import save_model

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(directory: str, model, tokenizer, optimizer, step: int, config,
                    extra: Optional[dict] = None) -> None:
    tmp = directory.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                "config": dataclasses.asdict(config), "extra": extra or {}}, os.path.join(tmp, STATE_FILE))
    old = directory.rstrip("/") + ".old"
    if os.path.isdir(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(directory: str) -> dict:
    # our own file, written by save_checkpoint above; it holds numpy RNG arrays, hence weights_only=False
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=False)


def has_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, STATE_FILE))


class MetricsLog:
    """One JSON object per line; on resume, lines past the checkpoint's step are dropped."""

    def __init__(self, path: str, resume_step: Optional[int] = None):
        self.path = path
        rows = read_metrics(path) if resume_step is not None else []
        with open(path, "w") as f:
            for row in rows:
                if row.get("step", 0) <= resume_step:
                    f.write(json.dumps(row) + "\n")

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

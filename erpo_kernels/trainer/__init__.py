"""erpo-train: the minimal RL trainer (tasks, rollout, loop, CLI). Imports transformers lazily.

    from erpo_kernels.trainer import TrainConfig, train
    summary = train(TrainConfig(algo="grpo", steps=20))
"""
from erpo_kernels.trainer.config import TrainConfig, parse_args


def train(config: TrainConfig) -> dict:
    from erpo_kernels.trainer.train import train as _train

    return _train(config)


__all__ = ["TrainConfig", "parse_args", "train"]

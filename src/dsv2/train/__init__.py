"""Training: data + tokenizer, AdamW + schedules, the loop with MoE balance losses, atomic checkpoints.

Entry points: `python -m dsv2.train` / `dsv2 train` (`dsv2.train.cli.main`), `python -m dsv2.train.demo`.
"""

from dsv2.train.trainer import Prepared, TrainArgs, TrainError, evaluate, prepare, train

__all__ = ["TrainArgs", "TrainError", "Prepared", "prepare", "train", "evaluate"]

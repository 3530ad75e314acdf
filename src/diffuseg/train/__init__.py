"""Training: one Accelerate loop (resumable, time-boxed, EMA) shared by every diffuseg trainer.

A trainer writes a :class:`TrainTask` and calls :func:`train`::

    from diffuseg.train import TrainConfig, train
    result = train(MyTask(...), TrainConfig(output_dir="runs/vae", max_steps=20_000, max_minutes=60))
    if not result.finished:  # time box hit: the next call resumes from the checkpoint
        ...
"""

from __future__ import annotations

from diffuseg.train.ema import EMA
from diffuseg.train.loop import (
    TrainConfig,
    TrainResult,
    TrainTask,
    export_checkpoint,
    latest_checkpoint,
    load_yaml_config,
    lr_factor,
    train,
)

__all__ = [
    "EMA",
    "TrainConfig",
    "TrainResult",
    "TrainTask",
    "export_checkpoint",
    "latest_checkpoint",
    "load_yaml_config",
    "lr_factor",
    "train",
]

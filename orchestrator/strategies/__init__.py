"""Distributed training strategies behind one interface (``Strategy``)."""

from __future__ import annotations

import torch

from orchestrator.config.schema import TrainConfig
from orchestrator.strategies.base import Strategy, build_lr_schedule, build_optimizer
from orchestrator.strategies.ddp import DDPStrategy
from orchestrator.strategies.deepspeed import DeepSpeedStrategy, build_ds_config

_STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy}


def build(spec: TrainConfig, device: torch.device) -> Strategy:
    return _STRATEGIES[spec.strategy](spec, device)


__all__ = [
    "DDPStrategy",
    "DeepSpeedStrategy",
    "Strategy",
    "build",
    "build_ds_config",
    "build_lr_schedule",
    "build_optimizer",
]

"""Distributed training strategies behind one interface (``Strategy``): torch DDP and DeepSpeed
ZeRO stages 0-3."""

from orchestrator.strategies.base import Strategy, build_lr_schedule, build_optimizer
from orchestrator.strategies.build import build
from orchestrator.strategies.ddp import DDPStrategy
from orchestrator.strategies.deepspeed import DeepSpeedStrategy, build_ds_config

__all__ = [
    "DDPStrategy",
    "DeepSpeedStrategy",
    "Strategy",
    "build",
    "build_ds_config",
    "build_lr_schedule",
    "build_optimizer",
]

"""The strategy a job's ``train.strategy`` names."""

from __future__ import annotations

import torch

from orchestrator.config.schema import TrainConfig
from orchestrator.strategies.base import Strategy
from orchestrator.strategies.ddp import DDPStrategy
from orchestrator.strategies.deepspeed import DeepSpeedStrategy

_STRATEGIES: dict[str, type[Strategy]] = {"ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy}


def build(spec: TrainConfig, device: torch.device) -> Strategy:
    return _STRATEGIES[spec.strategy](spec, device)

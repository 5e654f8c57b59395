"""The one small interface the training loop sees; DDP and DeepSpeed differ only behind it."""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.config.schema import TrainConfig


def build_optimizer(model: nn.Module, spec: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; biases and norm weights get no weight decay (the usual transformer recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    # foreach=False: the default multi-tensor path is no faster on CPU and uses more memory.
    return torch.optim.AdamW(groups, lr=spec.lr, foreach=False)


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, spec: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to ``spec.lr`` over ``warmup_ratio`` of the steps, then the chosen decay."""
    warmup = int(spec.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if spec.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Strategy(ABC):
    """Wraps a model for distributed training.

    Protocol of one optimizer step with ``grad_accum_steps`` micro-batches::

        for i, batch in enumerate(micro_batches):
            with strategy.accumulate(boundary=(i == last)), strategy.autocast():
                loss = strategy.model(**batch).loss
            strategy.backward(loss)      # scaled so N micro-batches == one N-times batch
        strategy.step()                  # clip, optimizer, LR schedule, zero grads
    """

    name = "base"

    def __init__(self, spec: TrainConfig, device: torch.device) -> None:
        self.spec = spec
        self.device = device

    @abstractmethod
    def prepare(self, model: nn.Module, total_steps: int) -> None:
        """Create optimizer and LR schedule and wrap ``model``; after it, ``model`` is usable."""

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The wrapped model to call for training forwards."""

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The plain model underneath (for evaluation, masks, export)."""

    @property
    def eval_model(self) -> nn.Module:
        """What evaluation calls; ZeRO-3 must go through the engine so weights get gathered."""
        return self.model

    def accumulate(self, boundary: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch; DDP skips its gradient all-reduce until the boundary."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> None: ...

    @abstractmethod
    def current_lr(self) -> float: ...

    @abstractmethod
    def save_checkpoint(self, folder: Path, client_state: dict[str, Any]) -> None:
        """Every rank calls it (ZeRO shards live on every rank); ``folder`` is rank-local."""

    @abstractmethod
    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        """Restore model, optimizer and schedule; returns the ``client_state`` saved with them."""

    @torch.no_grad()
    def apply_masks_(self, masks: dict[str, torch.Tensor]) -> None:
        """Zero pruned weights (masks keyed by parameter name of ``module``) after a step."""
        params = dict(self.module.named_parameters())
        for name, mask in masks.items():
            p = params[name]
            p.mul_(mask.to(device=p.device, dtype=p.dtype))

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full-precision unsharded weights; a collective call on every rank (ZeRO-3 gathers)."""

"""torch DistributedDataParallel (gloo on CPU, NCCL on GPU) with autocast and loss scaling."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from orchestrator.errors import CorruptFileError
from orchestrator.files import write_atomic
from orchestrator.safeload import CHECKPOINT_FIX, check_safetensors, load_json, load_torch
from orchestrator.strategies.base import Strategy, build_lr_schedule, build_optimizer

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
CLIENT_FILE = "client_state.json"


class DDPStrategy(Strategy):
    name = "ddp"

    def prepare(self, model: nn.Module, total_steps: int) -> None:
        self._module = model.to(self.device)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._model: nn.Module = DistributedDataParallel(self._module, device_ids=ids)
        else:
            self._model = self._module
        self.optimizer = build_optimizer(self._module, self.spec)
        self.scheduler = build_lr_schedule(self.optimizer, self.spec, total_steps)
        # fp16 needs loss scaling so small gradients do not flush to zero; bf16 does not.
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if self.spec.precision == "fp16" else None
        )

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def eval_model(self) -> nn.Module:
        # The bare module: DDP's forward would broadcast buffers, a needless collective.
        return self._module

    def accumulate(self, boundary: bool) -> contextlib.AbstractContextManager:
        # Skip DDP's gradient all-reduce on all but the last micro-batch: one all-reduce of the
        # accumulated sum gives the same gradient at a fraction of the communication.
        if not boundary and isinstance(self._model, DistributedDataParallel):
            return self._model.no_sync()
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = _DTYPES.get(self.spec.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        # Each micro-batch loss is a mean over its examples; dividing by the number of
        # micro-batches makes the accumulated gradient the mean over the whole effective batch.
        loss = loss / self.spec.grad_accum_steps
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self._module.parameters(), self.spec.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_checkpoint(self, folder: Path, client_state: dict[str, Any]) -> None:
        # DDP replicas are identical: rank 0 alone writes, the others contribute nothing.
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        folder.mkdir(parents=True, exist_ok=True)
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        # Each file under a temporary name, renamed when whole (a kill never leaves half a file).
        write_atomic(folder / MODEL_FILE, lambda tmp: save_model(self._module, str(tmp)))
        write_atomic(folder / STATE_FILE, lambda tmp: torch.save(state, tmp))
        write_atomic(folder / CLIENT_FILE, json.dumps(client_state))

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        # No pickle runs: the weights are safetensors, the optimizer / schedule / scaler state is
        # plain tensors and numbers (weights_only=True), the loop's counters JSON. A damaged file
        # is a CorruptFileError naming it.
        weights = folder / MODEL_FILE
        check_safetensors(weights, what="checkpoint file", fix=CHECKPOINT_FIX)
        load_model(self._module, str(weights), device=str(self.device))
        state = load_torch(
            folder / STATE_FILE,
            what="checkpoint file",
            fix=CHECKPOINT_FIX,
            map_location=self.device,
        )
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(
                folder / STATE_FILE,
                "checkpoint file",
                f"does not hold this run's optimizer state ({type(e).__name__}: {e})",
                CHECKPOINT_FIX,
            ) from None
        return load_json(folder / CLIENT_FILE, what="checkpoint file", fix=CHECKPOINT_FIX)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
            for k, v in self._module.state_dict().items()
        }

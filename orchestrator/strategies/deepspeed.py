"""DeepSpeed ZeRO stages 0-3, bf16 / fp16 / fp32, optional optimizer offload.

The DeepSpeed JSON is generated from the job (``build_ds_config``), never written by hand. The
optimizer is a plain ``torch.optim`` one passed in, because a DeepSpeed ``"optimizer"`` entry would
compile fused kernels (minutes on CPU) and gains nothing on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.config.schema import TrainConfig
from orchestrator.errors import CorruptFileError
from orchestrator.files import write_atomic
from orchestrator.safeload import CHECKPOINT_FIX, load_torch
from orchestrator.strategies.base import Strategy, build_lr_schedule, build_optimizer

CHECKPOINT_TAG = "state"  # one fixed tag: the folder holds exactly one checkpoint


def checkpoint_safe_globals() -> list[type]:
    """The only non-tensor classes DeepSpeed pickles into the checkpoints this tool makes, and so
    the only ones its loads may build. Found by saving ZeRO 0-3 x fp32 / bf16 x AdamW / SGD (with
    and without optimizer offload) on DeepSpeed 0.19.8 and listing each file's globals with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``: the ZeRO-1/2/3 optimizer shards hold
    the loss scaler object, the ZeRO stage enum and (ZeRO-1/2) fp32 fragment addresses; the model
    state files hold only tensors and plain values. ``DynamicLossScaler`` is what those shards
    hold instead of ``LossScaler`` with fp16 (GPU only; its fields are numbers and a dtype)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _checkpoint_fix() -> str:
    import deepspeed

    return (
        f"{CHECKPOINT_FIX} (a checkpoint written by another DeepSpeed version than "
        f"{deepspeed.__version__} may hold other classes: resume it with that version)"
    )


def _safe_checkpoint_engine(config: Any) -> Any:
    """DeepSpeed's own torch checkpoint engine, with loads that never run a pickle and writes
    that never leave half a file.

    DeepSpeed reads every file of a (non-universal, non-MoE) checkpoint through
    ``engine.checkpoint_engine.load``, and ``TorchCheckpointEngine.load`` calls
    ``torch.load(weights_only=False)``: resuming from a tampered shard would run whatever its
    pickle names. DeepSpeed 0.19 has no setting that plugs in a user checkpoint engine (the
    config only picks its Fast / Decoupled writers or DataStates), so ``prepare`` swaps this
    subclass into the one engine instance it created; the library's globals are untouched."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict: Any, path: str) -> None:
            write_atomic(
                Path(path),
                lambda tmp: torch.save(
                    state_dict, tmp, _use_new_zipfile_serialization=self.zipfile_serialization
                ),
            )

        def load(self, path: str, map_location: Any = None) -> Any:
            return load_torch(
                path,
                what="checkpoint file",
                fix=_checkpoint_fix(),
                allow=checkpoint_safe_globals(),
                map_location=map_location,
            )

    return SafeTorchCheckpointEngine(config)


def build_ds_config(
    spec: TrainConfig, world_size: int, num_params: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config for ``spec`` at ``world_size`` workers (``num_params``: the model's
    parameter count, which sizes the gradient-reduction bucket)."""
    zero: dict[str, Any] = {"stage": spec.zero_stage, "overlap_comm": False}
    if num_params is not None:
        # DeepSpeed's default bucket is 5e8 elements (1 GB in bf16) whatever the model, and
        # ZeRO-3 keeps it for the engine's life. A tenth of the model keeps that overhead small
        # (benchmarks/zero_memory.py) while gradients still reduce in about ten calls.
        zero["reduce_bucket_size"] = int(min(5e8, max(100_000, num_params // 10)))
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if spec.zero_stage == 3:
        # Gather full 16-bit weights on save so the final model can be exported from rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum_steps,
        "train_batch_size": spec.batch_size * spec.grad_accum_steps * world_size,
        "gradient_clipping": spec.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.precision == "bf16"},
        # Dynamic loss scaling (loss_scale 0) starting at 2**16, as fp16 training needs.
        "fp16": {
            "enabled": spec.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
        },
        # A torch optimizer is fine with offload; without this DeepSpeed insists on its CPU Adam.
        "zero_force_ds_cpu_optimizer": False,
        # ZeRO partitions any torch optimizer's state correctly; DeepSpeed only vouches for Adam.
        "zero_allow_untested_optimizer": spec.optimizer != "adamw",
        "wall_clock_breakdown": False,
        "steps_per_print": 1 << 30,  # our loop prints progress; keep DeepSpeed quiet
    }


def _whole_fp32_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """The fp32 master of each parameter, keyed by ``id`` of the 16-bit parameter, where the
    optimizer keeps whole masters rather than ZeRO fragments: DeepSpeed's ZeRO-0 wrappers for
    bf16 / fp16 (``FP16_UnfusedOptimizer``: a master per parameter in ``fp32_groups``;
    ``FP16_Optimizer``, chosen for a fused Adam: one flat master per group in
    ``fp32_groups_flat``, laid out like ``fp16_groups``). Empty for anything else."""
    lp_groups = getattr(optimizer, "fp16_groups", None) or []
    hp_groups = getattr(optimizer, "fp32_groups", None) or []
    flat_groups = getattr(optimizer, "fp32_groups_flat", None) or []
    masters: dict[int, torch.Tensor] = {}
    for lps, hps in zip(lp_groups, hp_groups, strict=False):
        for lp, hp in zip(lps, hps, strict=False):
            if lp.shape == hp.shape:
                masters[id(lp)] = hp
    if not hp_groups:
        for lps, flat in zip(lp_groups, flat_groups, strict=False):
            offset = 0
            for lp in lps:
                masters[id(lp)] = flat.detach().narrow(0, offset, lp.numel()).view_as(lp)
                offset += lp.numel()
    return masters


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def prepare(self, model: nn.Module, total_steps: int) -> None:
        import deepspeed
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        self.ds_config = build_ds_config(
            self.spec, world, num_params=sum(p.numel() for p in model.parameters())
        )
        optimizer = build_optimizer(model, self.spec)
        scheduler = build_lr_schedule(optimizer, self.spec, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,  # reuse the process group Ray (or the test) created
        )
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
            TorchCheckpointEngine,
        )

        # Resume must never unpickle arbitrary objects (see ``_safe_checkpoint_engine``). There
        # is no DeepSpeed option for a user checkpoint engine, so this engine instance's one is
        # replaced (only this instance: nothing global in DeepSpeed changes), built from the same
        # config DeepSpeed built its own from (which keeps its file format). Our generated config
        # never selects DeepSpeed's other engines; should one appear, refuse rather than load
        # unsafely.
        if type(self.engine.checkpoint_engine) is not TorchCheckpointEngine:
            raise RuntimeError(
                "unexpected DeepSpeed checkpoint engine "
                f"{type(self.engine.checkpoint_engine).__name__}: resume could not load safely"
            )
        self.engine.checkpoint_engine = _safe_checkpoint_engine(self.engine._config)
        self._boundary = True

    @property
    def model(self) -> nn.Module:
        return self.engine

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def accumulate(self, boundary: bool):  # noqa: ANN201 - a context manager
        # DeepSpeed counts micro-steps itself; we only remember where the boundary is.
        self._boundary = boundary
        return super().accumulate(boundary)

    def backward(self, loss: torch.Tensor) -> None:
        # engine.backward divides by gradient_accumulation_steps itself (scale_wrt_gas).
        self.engine.backward(loss)
        if not self._boundary:
            # engine.step() off the boundary only advances DeepSpeed's micro-step counter,
            # which decides when ZeRO reduces gradients and steps the optimizer.
            self.engine.step()

    def step(self) -> None:
        self.engine.step()

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_checkpoint(self, folder: Path, client_state: dict[str, Any]) -> None:
        # A collective: each rank writes its own optimizer / parameter shards into its folder.
        folder.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state=client_state)

    def load_checkpoint(self, folder: Path) -> dict[str, Any]:
        # Every file goes through the safe checkpoint engine set in ``prepare``: weights_only
        # loads with DeepSpeed's few classes allowed; a damaged file is a CorruptFileError.
        tagged = folder / CHECKPOINT_TAG
        if not tagged.is_dir():
            raise CorruptFileError(
                tagged, "checkpoint folder", "is missing (no DeepSpeed checkpoint)", CHECKPOINT_FIX
            )
        if not any(tagged.glob("*model_states.pt")):
            raise CorruptFileError(
                tagged, "checkpoint folder", "holds no DeepSpeed model states file", CHECKPOINT_FIX
            )
        load_path, client_state = self.engine.load_checkpoint(
            str(folder),
            tag=CHECKPOINT_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:  # DeepSpeed loaded nothing: never carry on from step 0 silently
            raise CorruptFileError(
                tagged,
                "checkpoint folder",
                "holds no checkpoint DeepSpeed can load",
                CHECKPOINT_FIX,
            )
        keep = ("step", "epoch", "micro_step", "samples_seen", "train_loss_sum", "train_loss_n")
        return {k: v for k, v in (client_state or {}).items() if k in keep}

    @torch.no_grad()
    def apply_masks_(self, masks: dict[str, torch.Tensor]) -> None:
        # The low-precision weights the forward uses, and the fp32 master shard this rank owns
        # (ZeRO-1/2 and the bf16 optimizer): zeroing only the former would be undone by the next
        # step, which copies the master back. ZeRO-3 is rejected with pruning at validation.
        super().apply_masks_(masks)
        params = dict(self.module.named_parameters())
        masters = _whole_fp32_masters(self.engine.optimizer)
        for name, mask in masks.items():
            mapping = getattr(params[name], "_hp_mapping", None)
            master = masters.get(id(params[name]))
            if mapping is None and master is not None and master.shape == mask.shape:
                master.data.mul_(mask.to(device=master.device, dtype=master.dtype))
            if mapping is None:
                continue
            addr = mapping.lp_fragment_address
            flat = mask.flatten().to(mapping.hp_fragment.device)
            mapping.hp_fragment.mul_(
                flat.narrow(0, addr.start, addr.numel).to(mapping.hp_fragment.dtype)
            )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        # ZeRO-1/2/3 and BF16_Optimizer: safe_get_full_fp32_param assembles the master from the
        # ranks' fragments. ZeRO-0 with bf16/fp16 has no fragments (it returns None there): its
        # whole masters sit in the optimizer wrapper, and p.data is only their 16-bit rounding.
        masters = _whole_fp32_masters(self.engine.optimizer)

        def fp32(p: nn.Parameter) -> torch.Tensor:
            full = safe_get_full_fp32_param(p)
            if full is None:
                full = masters.get(id(p), p.data)
            return full.detach().float().cpu().clone()

        if self.spec.zero_stage == 3:
            import deepspeed

            # Gathering is a collective: every rank must enter it, even if only rank 0 saves.
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                out = _by_name(module, fp32)
        else:
            out = _by_name(module, fp32)
        persistent = set(module.state_dict())  # named_buffers() also lists non-persistent ones
        for name, b in module.named_buffers():
            if name in persistent:
                out[name] = b.detach().cpu()
        return out


def _by_name(module: nn.Module, fp32: Callable[[nn.Parameter], torch.Tensor]) -> dict:
    """Every parameter name, a tied one (a language model's output head sharing the input
    embeddings) under each of its names, as ``state_dict`` lists them; gathered once."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in done:
            done[id(p)] = fp32(p)
        out[name] = done[id(p)]
    return out

"""Unstructured pruning: magnitude and Wanda (|W| x ||X||), one-shot or gradual (cubic GMP),
and SparseGPT (one-shot, second-order weight updates: ``compress.hessian``).

Masks are kept by a ``Pruner`` and re-applied after every optimizer step: Adam's moments keep
moving a pruned weight off zero otherwise, and a bf16 run's fp32 master copy would overwrite the
zeros on the next step. Parameter names are unchanged (no ``weight_orig``), so optimizers, DDP,
DeepSpeed and checkpoints see an ordinary model. The artifact stores a pruned weight as a bitmap
plus its non-zeros when that is smaller, so the zeros save bytes; nothing rebuilds at load.
Structured pruning is in ``structured.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.compress.common import (
    FilterFn,
    ModuleRow,
    collect_input_stats,
    per_layer,
    select_modules,
)
from orchestrator.compress.technique import (
    Applied,
    Context,
    MaskApplier,
    Technique,
    Workers,
    register,
)
from orchestrator.config.compress import (
    MagnitudePruneConfig,
    SparseGptPruneConfig,
    UnstructuredPruneMethod,
    WandaPruneConfig,
)
from orchestrator.errors import ConfigError, Problem

PruneConfig = UnstructuredPruneMethod


def cubic_sparsity(step: int, cfg: PruneConfig, total_steps: int) -> float:
    """Gradual magnitude pruning schedule (Zhu & Gupta 2017): s_t = s_f + (s_i - s_f)(1 - p)^3,
    p the progress from start_step to end_step (default: two thirds of training)."""
    if cfg.schedule == "oneshot":
        return cfg.sparsity
    end = (
        cfg.end_step if cfg.end_step is not None else max(cfg.start_step + 1, 2 * total_steps // 3)
    )
    progress = min(1.0, max(0.0, (step - cfg.start_step) / max(1, end - cfg.start_step)))
    return cfg.sparsity + (cfg.initial_sparsity - cfg.sparsity) * (1.0 - progress) ** 3


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along each row (the inputs of
    one output): the N:M layout, e.g. 2:4."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def check_pattern(modules: list[tuple[str, nn.Module]], cfg: PruneConfig) -> None:
    """Every layer an N:M pattern prunes must have a multiple of M inputs."""
    if cfg.n_m is None:
        return
    m = cfg.n_m[1]
    bad = [(n, mod.weight.shape[1]) for n, mod in modules if mod.weight.shape[1] % m]
    if bad:
        name, cols = bad[0]
        raise ConfigError(
            Problem(
                "compress.prune.pattern",
                cfg.pattern,
                f"{len(bad)} selected layer(s) take inputs in a number that is not a multiple "
                f"of {m} (e.g. {name}: {cols})",
                "exclude them with compress.prune.exclude, or use another pattern",
            )
        )


def _threshold_masks(
    scores: dict[str, torch.Tensor],
    sparsity: float | dict[str, float],
    scope: str,
    per_row: bool,
    n_m: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep the highest scores. ``per_row`` compares within each output row (Wanda's group);
    ``n_m``: the N:M pattern instead, in each row's groups of M inputs. ``sparsity``: one for
    all, or each layer's own (scope ``layer``; keyed like ``scores``)."""
    if n_m is not None:
        return {name: n_m_mask(s, *n_m) for name, s in scores.items()}
    if isinstance(sparsity, dict):
        return {
            name: _threshold_masks({name: s}, sparsity[name], "layer", per_row)[name]
            for name, s in scores.items()
        }
    masks = {}
    if sparsity <= 0:
        return {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = int(round(sparsity * flat.numel()))
        # kthvalue on the concatenated scores: exactly k weights fall at or under it.
        cut = torch.kthvalue(flat.float().cpu(), max(k, 1)).values.item() if k > 0 else -math.inf
        for name, s in scores.items():
            masks[name] = s > cut
        return masks
    for name, s in scores.items():
        if per_row:
            k = int(round(sparsity * s.shape[1]))
            idx = torch.argsort(s, dim=1)[:, :k]
            m = torch.ones_like(s, dtype=torch.bool)
            m.scatter_(1, idx, False)
        else:
            k = int(round(sparsity * s.numel()))
            idx = torch.argsort(s.flatten())[:k]
            m = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
            m[idx] = False
            m = m.view_as(s)
        masks[name] = m
    return masks


class Pruner:
    """Owns the pruning masks of one model: computes them, shrinks them on schedule, applies
    them. Keys are parameter names (``<module>.weight``) of the plain (unwrapped) model."""

    def __init__(
        self,
        cfg: PruneConfig,
        modules: list[tuple[str, nn.Module]],
        input_norms: dict[str, torch.Tensor] | None,
    ) -> None:
        self.cfg = cfg
        self.modules = dict(modules)
        self.input_norms = input_norms or {}
        self.masks: dict[str, torch.Tensor] = {}
        self.current_sparsity = 0.0
        # Each layer's own sparsity (``compress.prune.allocate`` or ``layers``; keyed by
        # parameter name), or None: ``cfg.sparsity`` for all; and for the manifest the
        # allocation's record, or the sparsities ``layers`` set (by module name).
        self.layer_sparsity: dict[str, float] | None = None
        self.allocation: dict[str, Any] | None = None
        self.layers: dict[str, float] | None = None

    def scores(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in self.modules.items():
            w = module.weight.detach().float().abs()
            if self.cfg.method == "wanda":
                # Wanda: |W_ij| * ||X_j||_2, X the layer's input over calibration tokens.
                w = w * self.input_norms[name].sqrt().to(w.device).unsqueeze(0)
            if f"{name}.weight" in self.masks:  # already-pruned weights stay pruned
                w = torch.where(self.masks[f"{name}.weight"], w, torch.zeros_like(w))
            out[f"{name}.weight"] = w
        return out

    def update(self, sparsity: float) -> bool:
        """Recompute masks at ``sparsity`` (never un-pruning). Returns True if masks changed."""
        if sparsity <= self.current_sparsity and self.masks:
            return False
        new = _threshold_masks(
            self.scores(),
            sparsity if self.layer_sparsity is None else self.layer_sparsity,
            self.cfg.scope,
            per_row=self.cfg.method == "wanda" and self.cfg.scope == "layer",
            n_m=self.cfg.n_m,
        )
        for key, m in new.items():
            self.masks[key] = m & self.masks[key] if key in self.masks else m
        self.current_sparsity = sparsity
        return True

    @torch.no_grad()
    def apply_(self, model: nn.Module | None = None) -> None:
        """Zero the pruned weights of the plain modules."""
        for name, module in self.modules.items():
            mask = self.masks.get(f"{name}.weight")
            if mask is not None:
                module.weight.mul_(mask.to(module.weight.dtype))

    def sync(self, model: nn.Module) -> list[str]:
        """Forget layers that a later technique replaced (factorizing a pruned layer makes it
        dense again: its sparsity is superseded); a wrapper sharing the weight (fake-quant) keeps
        the mask. Returns the names dropped."""
        gone = []
        for name, module in list(self.modules.items()):
            try:
                present = getattr(model.get_submodule(name), "weight", None) is module.weight
            except AttributeError:
                present = False
            if not present:
                gone.append(name)
                del self.modules[name]
                self.masks.pop(f"{name}.weight", None)
        return gone

    @torch.no_grad()
    def after_restore(self) -> None:
        """After loading a checkpoint: the masks are where the saved weights are zero."""
        for name, module in self.modules.items():
            self.masks[f"{name}.weight"] = module.weight.detach() != 0
        self.current_sparsity = self.measured_sparsity()

    def measured_sparsity(self) -> float:
        """zeros / total over the targeted weights, measured on the weights themselves."""
        zeros = total = 0
        for module in self.modules.values():
            w = module.weight.detach()
            zeros += int((w == 0).sum())
            total += w.numel()
        return zeros / max(total, 1)

    def after_step(self, step: int, total_steps: int, apply_masks: MaskApplier) -> None:
        """Called after every optimizer step: advance the schedule, then re-apply the masks
        through ``apply_masks`` (the strategy's, which also reaches fp32 master copies)."""
        cfg = self.cfg
        if (
            cfg.schedule == "gradual"
            and step >= cfg.start_step
            and (step - cfg.start_step) % cfg.update_every == 0
        ):
            self.update(cubic_sparsity(step, cfg, total_steps))
        apply_masks(self.masks)


def prune_(
    model: nn.Module,
    cfg: PruneConfig,
    *,
    calib: list[dict[str, torch.Tensor]] | None = None,
    filter_fn: FilterFn | None = None,
    total_steps: int = 0,
    agree: Callable[[Any], Any] = lambda value: value,
    cache_dir: Path | None = None,
    workers: Workers | None = None,
) -> tuple[Pruner, list[ModuleRow]]:
    """Unstructured pruning of the selected Linear layers, in place. One-shot prunes to
    ``cfg.sparsity`` now (with ``cfg.allocate``: each layer to its allocated sparsity, the
    allocation's record kept as ``pruner.allocation``); gradual starts at
    ``cfg.initial_sparsity`` and the training loop advances it through
    ``Pruner.after_step``."""
    modules = select_modules(
        model, cfg.include, cfg.exclude, (nn.Linear,), "compress.prune", filter_fn=filter_fn
    )
    check_pattern(modules, cfg)
    norms = None
    if cfg.method == "wanda":
        if not calib:
            raise ValueError("wanda pruning needs calibration batches")
        norms = collect_input_stats(model, modules, calib)
    pruner = Pruner(cfg, modules, norms)
    targets: dict[str, float] = {}
    if getattr(cfg, "allocate", None) is not None:
        pruner.allocation = _allocate(model, pruner, calib, agree, cache_dir, workers)
        targets = pruner.allocation["choice"]
    elif getattr(cfg, "layers", None):
        pruner.layers = per_layer(pruner.modules, cfg.layers, "compress.prune.layers")
        targets = {n: pruner.layers.get(n, cfg.sparsity) for n in pruner.modules}
    if targets:
        pruner.layer_sparsity = {f"{n}.weight": s for n, s in targets.items()}
    start = cfg.sparsity if cfg.schedule == "oneshot" else cfg.initial_sparsity
    pruner.update(start)
    pruner.apply_()
    return pruner, _rows(modules, cfg, targets)


def _allocate(
    model: nn.Module,
    pruner: Pruner,
    calib: list[dict[str, torch.Tensor]] | None,
    agree: Callable[[Any], Any],
    cache_dir: Path | None,
    workers: Workers | None,
) -> dict[str, Any]:
    """Each layer's sparsity under the mean ``cfg.sparsity``, from the model's measured
    sensitivity to pruning that layer alone by the method's own scores
    (``compress.sensitivity``)."""
    from orchestrator.compress.sensitivity import (
        allocate_sparsity,
        allocation_record,
        calibration_for,
        checked,
        profile,
        sparsity_costs,
        tensors_digest,
    )

    cfg = pruner.cfg
    allocate = cfg.allocate
    batches = calibration_for(calib, "compress.prune.allocate", allocate.model_dump())
    scores = pruner.scores()
    per_row = cfg.method == "wanda"

    def variants(name: str, layer: nn.Linear) -> Callable[[float], torch.Tensor | None]:
        key = f"{name}.weight"

        def pruned(s: float) -> torch.Tensor | None:
            if s <= 0:
                return None
            mask = _threshold_masks({key: scores[key]}, s, "layer", per_row)[key]
            return layer.weight.data * mask.to(layer.weight.dtype)

        return pruned

    layers = list(pruner.modules.items())
    prof = profile(
        model,
        layers,
        "sparsity",
        sorted(allocate.sparsities),
        variants,
        batches[: allocate.calib_batches],
        cache_dir=cache_dir,
        workers=workers,
        # Wanda's scores also read the input norms, measured on every calibration batch.
        recipe=f"{cfg.method}:{tensors_digest(pruner.input_norms)}",
    )
    try:
        choice = allocate_sparsity(prof, cfg.sparsity)
    except ValueError as e:  # the config checks the mean; this is a last guard
        raise ConfigError(
            Problem("compress.prune.sparsity", cfg.sparsity, str(e), "lower it")
        ) from None
    costs, budget = sparsity_costs(prof, cfg.sparsity)
    choice, check = checked(
        model, layers, prof, choice, costs, budget, variants, batches, allocate.refine
    )
    return allocation_record(prof, agree(choice), cfg.sparsity, check)


def _rows(
    modules: list[tuple[str, nn.Module]],
    cfg: PruneConfig,
    targets: dict[str, float] | None = None,
) -> list[ModuleRow]:
    """One row per pruned layer; ``targets``: each layer's own sparsity, where it has one."""
    targets = targets or {}
    rows = []
    for name, module in modules:
        w = module.weight
        nz = int((w != 0).sum())
        rows.append(
            ModuleRow(
                name=name,
                technique="prune",
                kind=type(module).__name__,
                shape_before=list(w.shape),
                shape_after=list(w.shape),
                params_before=w.numel(),
                params_after=w.numel(),
                details={
                    "method": cfg.method,
                    "sparsity": 1 - nz / w.numel(),
                    "target_sparsity": targets.get(name, cfg.sparsity),
                    "schedule": cfg.schedule,
                },
            )
        )
    return rows


@register
class MagnitudePrune(Technique):
    config_type = MagnitudePruneConfig

    def apply_(self, model: nn.Module, cfg: PruneConfig, ctx: Context) -> Applied:
        pruner, rows = prune_(
            model,
            cfg,
            calib=ctx.calib,
            filter_fn=ctx.filter_fn,
            total_steps=ctx.total_steps,
            agree=ctx.agree,
            cache_dir=ctx.cache_dir,
            workers=ctx.workers,
        )
        # The pruned layers, so that sparsity is measured over them (on any copy of the model).
        entry: dict[str, Any] = {"modules": sorted(pruner.modules)}
        if pruner.allocation is not None:
            entry["allocation"] = pruner.allocation
        if pruner.layers:
            entry["layers"] = pruner.layers
        return Applied(rows, entry=entry, hook=pruner)

    def sparsity_scope(self, model: nn.Module, entry: dict[str, Any]) -> list[nn.Module]:
        """The pruned layers that still hold their own weight in ``model`` (a layer a later
        technique factorized does not): what ``compress/sparsity`` is measured over."""
        out = []
        for name in entry.get("modules", []):
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                out.append(module)
        return out

    def note(self, cfg: PruneConfig) -> str:
        kind = "unstructured sparsity" if cfg.pattern is None else f"{cfg.pattern} sparsity"
        return (
            f"{kind} ({cfg.method}): bytes saved for real (bitmap + non-zero values in the "
            "artifact); no sparse CPU kernel is used, so it does not reduce latency"
        )


@register
class WandaPrune(MagnitudePrune):
    config_type = WandaPruneConfig
    needs_calibration = True


@register
class SparseGptPrune(MagnitudePrune):
    config_type = SparseGptPruneConfig
    needs_calibration = True

    def apply_(self, model: nn.Module, cfg: SparseGptPruneConfig, ctx: Context) -> Applied:
        from orchestrator.compress.hessian import output_error, sequential_, sparsegpt

        modules = select_modules(
            model, cfg.include, cfg.exclude, (nn.Linear,), "compress.prune", filter_fn=ctx.filter_fn
        )
        check_pattern(modules, cfg)
        errors: dict[str, dict[str, float]] = {}

        def solve(name: str, layer: nn.Linear, hessian: torch.Tensor) -> None:
            w = layer.weight.detach().float()
            new = sparsegpt(w, hessian, cfg.sparsity, damp=cfg.damp, n_m=cfg.n_m)
            masks = _threshold_masks({name: w.abs()}, cfg.sparsity, "layer", False, cfg.n_m)
            magnitude = w * masks[name]
            errors[name] = {
                "output_error": output_error(w, new, hessian),
                "magnitude_output_error": output_error(w, magnitude, hessian),
            }
            layer.weight.data.copy_(new.to(layer.weight.dtype))

        sequential_(model, modules, ctx.calib, solve)
        pruner = Pruner(cfg, modules, None)
        pruner.masks = {f"{n}.weight": m.weight.detach() != 0 for n, m in modules}
        pruner.current_sparsity = cfg.sparsity
        rows = _rows(modules, cfg)
        for row in rows:
            row.details.update(errors.get(row.name, {}))
        return Applied(rows, entry={"modules": sorted(pruner.modules)}, hook=pruner)

    def note(self, cfg: SparseGptPruneConfig) -> str:
        kind = "unstructured sparsity" if cfg.pattern is None else f"{cfg.pattern} sparsity"
        return (
            f"{kind} (sparsegpt: pruned with second-order weight updates on "
            "calibration data): bytes saved for real (bitmap + non-zero values in the "
            "artifact); no sparse CPU kernel is used, so it does not reduce latency"
        )

"""Shared pieces of the compression techniques: module selection, per-module report rows,
module replacement, calibration activation statistics, SQNR, non-zero bitmaps. Plain torch: no
Ray, no DeepSpeed."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.config.compress import DEFAULT_EXCLUDE
from orchestrator.errors import ConfigError, Problem

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class ModuleRow:
    """What one technique did (or declined to do) to one module."""

    name: str
    technique: str  # prune | factorize | quantize
    kind: str  # Linear, Embedding, ...
    shape_before: list[int]
    shape_after: list[int]
    params_before: int
    params_after: int
    skipped: bool = False
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_modules(
    model: nn.Module,
    include: list[str],
    exclude: list[str],
    types: tuple[type[nn.Module], ...],
    key: str,
    *,
    check_exclude: bool = True,  # False: exclude patterns may match nothing
    filter_fn: FilterFn | None = None,
) -> list[tuple[str, nn.Module]]:
    """Modules of ``types`` whose qualified name matches an ``include`` glob and no ``exclude``
    glob (and ``filter_fn``, if given). A user pattern that matches no module at all is an
    error naming ``key`` (e.g. ``compress.prune.include``): a typo must not silently do nothing."""
    names = [n for n, _ in model.named_modules() if n]
    problems = []
    patterns = [("include", p) for p in include]
    if check_exclude:
        # The default head patterns are generic (BERT has a classifier, GPT-2 a score head):
        # only patterns a user wrote must match something.
        patterns += [("exclude", p) for p in exclude if p not in DEFAULT_EXCLUDE]
    for which, pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            sample = ", ".join(names[:6])
            problems.append(
                Problem(
                    f"{key}.{which}",
                    pattern,
                    "matches no module of the model",
                    f"use glob patterns over module names such as {sample}",
                )
            )
    if problems:
        raise ConfigError(problems)
    out = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, types):
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        out.append((name, module))
    return out


def per_layer(names: Iterable[str], layers: dict[str, Any], key: str) -> dict[str, Any]:
    """Each of ``names`` that a pattern of ``layers`` (``compress.<stage>.layers``) matches ->
    the value of the first such pattern. A pattern matches a layer by its name or by the name
    of a module holding it (``*query`` also matches the two factors a factorization made of
    a ``query`` layer). A pattern that matches no layer is an error naming ``key``: a typo
    must not silently leave a layer at the default."""
    names = list(names)
    out: dict[str, Any] = {}
    used: set[str] = set()
    for name in names:
        prefixes = _prefixes(name)
        for pattern, value in layers.items():
            if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
                out[name] = value
                used.add(pattern)
                break
    problems = []
    for pattern in (p for p in layers if p not in used):
        if any(fnmatch.fnmatchcase(p, pattern) for n in names for p in _prefixes(n)):
            why, fix = (
                "takes no layer: every layer it matches takes an earlier pattern's value",
                "list the more specific patterns first",
            )
        else:
            why = "matches no layer this technique targets"
            fix = "use glob patterns over the targeted layers' names, such as " + ", ".join(
                names[:4]
            )
        problems.append(Problem(key, pattern, why, fix))
    if problems:
        raise ConfigError(problems)
    return out


def _prefixes(name: str) -> list[str]:
    """``a.b.c``, ``a.b``, ``a``: the module and the modules holding it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def first_param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    modules: Iterable[tuple[str, nn.Module]],
    calib: list[dict[str, torch.Tensor]],
    *,
    gram: bool = False,
) -> dict[str, torch.Tensor]:
    """Statistics of each module's input X (tokens or examples x channels) over the calibration
    batches, padding positions excluded (batches with an ``attention_mask``): per-channel sums
    of squares ||X_j||^2 (Wanda), or with ``gram`` the whole X^T X (activation-aware SVD),
    accumulated in float64."""
    stats: dict[str, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name: str) -> Callable:
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            if x.dim() == 3 and "mask" in mask_holder and x.shape[:2] == mask_holder["mask"].shape:
                x = x[mask_holder["mask"].bool()]
            x = x.reshape(-1, x.shape[-1])
            s = x.double().T @ x.double() if gram else (x * x).sum(0)
            stats[name] = stats[name] + s if name in stats else s

        return hook

    for name, module in modules:
        hooks.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        for batch in calib:
            mask = batch.get("attention_mask")  # image batches have no padding to exclude
            if mask is None:
                mask_holder.pop("mask", None)
            else:
                mask_holder["mask"] = mask.to(first_param(model).device)
            forward_eval(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def forward_eval(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """One inference forward on ``batch``'s model inputs (``input_ids`` and ``attention_mask``,
    or ``pixel_values``, and any other keyword such as ``use_cache``; labels are left out so
    no loss is computed), restoring the training mode."""
    was_training = model.training
    model.eval()
    device = first_param(model).device
    try:
        return model(
            **{
                k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()
                if k != "labels"
            }
        )
    finally:
        model.train(was_training)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||ref||^2 / ||ref - approx||^2)."""
    noise = (reference.float() - approx.float()).pow(2).sum().item()
    signal = reference.float().pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()


def bitmap(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask packed 8 per byte (uint8, 1-D), as the artifact stores where the
    non-zeros of a sparse weight are."""
    return torch.from_numpy(np.packbits(mask.flatten().cpu().numpy().astype(np.uint8)))


def unbitmap(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` booleans of a ``bitmap``."""
    return torch.from_numpy(np.unpackbits(bits.numpy())[:numel].astype(bool))

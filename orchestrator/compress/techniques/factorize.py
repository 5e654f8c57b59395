"""Low-rank factorization: a Linear W (out x in) becomes up(down(x)) with down: in -> r and
up: r -> out, from a truncated SVD. ``asvd`` is activation-aware: it whitens W's input side with
the calibration inputs' Gram matrix X^T X = L L^T and truncates the SVD of W L (the data
whitening of SVD-LLM, Wang et al. 2024; ASVD's per-channel scaling is its diagonal special
case). Since L^-1 X has orthonormal rows, truncating W L minimises the layer's *output* error
||W X - W_r X|| on the calibration data rather than the weight error ||W - W_r||.

A layer is skipped (and recorded) when the factorized form would not have fewer parameters:
speed and size then come from physically smaller layers, not from a nominal rank. The manifest
records each factorized layer's rank; a fresh model is given the same thin layers before the
saved weights load."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.compress.common import (
    FilterFn,
    ModuleRow,
    collect_input_stats,
    param_count,
    per_layer,
    select_modules,
    set_module,
)
from orchestrator.compress.technique import Applied, Context, Technique, Workers, register
from orchestrator.config.compress import AsvdConfig, FactorizeMethod, SvdConfig
from orchestrator.errors import ConfigError, Problem

FactorizeConfig = FactorizeMethod

# Damping added to X^T X before the Cholesky factorization, relative to its mean diagonal:
# keeps channels the calibration data never excites from making L singular.
GRAM_DAMPING = 1e-4


class LowRankLinear(nn.Module):
    """``up(down(x))``: two thin Linears in place of one (``rank`` = inner width)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def choose_rank(sigma: torch.Tensor, cfg: FactorizeConfig, in_f: int, out_f: int) -> int:
    full = min(in_f, out_f)
    if cfg.rank is not None:
        return min(cfg.rank, full)
    if cfg.rank_ratio is not None:
        return max(1, min(full, int(round(cfg.rank_ratio * full))))
    energy = torch.cumsum(sigma.double() ** 2, 0) / (sigma.double() ** 2).sum()
    return min(
        full, int(torch.searchsorted(energy, torch.tensor(cfg.energy, dtype=energy.dtype))) + 1
    )


@dataclass
class Decomposition:
    """The (whitened, for asvd) SVD of one weight, from which any rank's factors follow."""

    u: torch.Tensor
    sigma: torch.Tensor
    vh: torch.Tensor
    chol: torch.Tensor | None  # L of the calibration inputs' X^T X = L L^T, or None

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down), float64: ``up @ down`` is the best rank-``rank`` approximation."""
        root = self.sigma[:rank].sqrt()
        down = root.unsqueeze(1) * self.vh[:rank]
        if self.chol is not None:
            # Undo the whitening on the input side: W ~ U S V^T L^-1.
            down = torch.linalg.solve_triangular(self.chol, down, upper=False, left=False)
        return self.u[:, :rank] * root.unsqueeze(0), down


@torch.no_grad()
def decompose(weight: torch.Tensor, gram: torch.Tensor | None) -> Decomposition:
    """The SVD of ``weight`` (out x in), of ``weight @ L`` with ``gram`` (asvd)."""
    w = weight.detach().double()
    in_f = w.shape[1]
    chol = None
    if gram is not None:
        g = gram.to(w.device).double()
        g = g + GRAM_DAMPING * g.diagonal().mean().clamp_min(1e-12) * torch.eye(in_f, dtype=g.dtype)
        chol = torch.linalg.cholesky(g)  # lower triangular L, g = L L^T
    u, sigma, vh = torch.linalg.svd(w @ chol if chol is not None else w, full_matrices=False)
    return Decomposition(u, sigma, vh, chol)


def saves(rank: int, in_f: int, out_f: int) -> bool:
    """Whether rank-``rank`` factors have fewer parameters than the dense weight."""
    return rank * (in_f + out_f) < in_f * out_f


def ratio_rank(ratio: float, in_f: int, out_f: int) -> int:
    """The rank ``ratio`` of min(in, out) stands for, at least 1."""
    full = min(in_f, out_f)
    return max(1, min(full, int(round(ratio * full))))


@torch.no_grad()
def factorize_linear(
    linear: nn.Linear, cfg: FactorizeConfig, gram: torch.Tensor | None, rank: int | None = None
) -> tuple[LowRankLinear | None, int, str]:
    """The factorized replacement of ``linear`` (or None and why not), and the rank chosen
    (``rank``: this one instead of the config's rule). ``gram``: the calibration inputs' X^T X
    for the activation-aware variant."""
    out_f, in_f = linear.weight.shape
    dec = decompose(linear.weight, gram)
    if rank is None:
        rank = choose_rank(dec.sigma, cfg, in_f, out_f)
    if not saves(rank, in_f, out_f):
        reason = f"rank {rank} would not save parameters: {rank}x({in_f}+{out_f}) >= {in_f}x{out_f}"
        return None, rank, reason
    up, down = dec.factors(rank)
    new = LowRankLinear(in_f, out_f, rank, bias=linear.bias is not None).to(
        device=linear.weight.device, dtype=linear.weight.dtype
    )
    new.up.weight.copy_(up)
    new.down.weight.copy_(down)
    if linear.bias is not None:
        new.up.bias.copy_(linear.bias)
    return new, rank, ""


def _inside_low_rank(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), LowRankLinear)


def factorize_(
    model: nn.Module,
    cfg: FactorizeConfig,
    *,
    calib: list[dict[str, torch.Tensor]] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[ModuleRow]:
    """Replace each selected Linear by a LowRankLinear, in place. Returns one row per layer."""
    return factorize_allocated_(model, cfg, calib=calib, filter_fn=filter_fn)[0]


def factorize_allocated_(
    model: nn.Module,
    cfg: FactorizeConfig,
    *,
    calib: list[dict[str, torch.Tensor]] | None = None,
    filter_fn: FilterFn | None = None,
    agree: Callable[[Any], Any] = lambda value: value,
    cache_dir: Path | None = None,
    workers: Workers | None = None,
) -> tuple[list[ModuleRow], dict[str, Any] | None]:
    """``factorize_``, and with ``cfg.allocate`` the allocation's record (the rank ratio of
    each layer, 1 for the layers it keeps dense)."""
    modules = select_modules(
        model, cfg.include, cfg.exclude, (nn.Linear,), "compress.factorize", filter_fn=filter_fn
    )
    # The factors of an already-factorized layer are not factorized again (idempotence).
    modules = [(n, m) for n, m in modules if not _inside_low_rank(model, n)]
    grams = None
    if isinstance(cfg, AsvdConfig):
        if not calib:
            raise ValueError("asvd factorization needs calibration batches")
        grams = collect_input_stats(model, modules, calib, gram=True)
    allocation = None
    ratios: dict[str, float] = {}  # each layer's own rank ratio, where it has one (1: dense)
    if cfg.allocate is not None:
        allocation = _allocate(model, cfg, modules, grams, calib, agree, cache_dir, workers)
        ratios = allocation["choice"]
    elif cfg.layers:
        ratios = per_layer((n for n, _ in modules), cfg.layers, "compress.factorize.layers")
    ranks = {
        n: ratio_rank(ratios[n], m.in_features, m.out_features)
        for n, m in modules
        if ratios.get(n, 1) < 1
    }
    rows = []
    for name, linear in modules:
        shape = list(linear.weight.shape)
        before = param_count(linear)
        if ratios.get(name, 0) >= 1:
            why = "the allocation" if allocation is not None else "compress.factorize.layers"
            new, rank, reason = None, min(shape), f"kept dense by {why}"
        else:
            gram = grams[name] if grams else None
            new, rank, reason = factorize_linear(linear, cfg, gram, ranks.get(name))
        if new is not None:
            set_module(model, name, new)
        rows.append(
            ModuleRow(
                name,
                "factorize",
                "Linear",
                shape,
                [shape[0], rank, shape[1]] if new is not None else shape,
                before,
                param_count(new) if new is not None else before,
                skipped=new is None,
                reason=reason,
                details={"rank": rank, "method": cfg.method},
            )
        )
    return rows, allocation


def _rank_of(layer: nn.Linear, ratio: float) -> int | None:
    """The rank ``ratio`` gives ``layer``, None where it stays dense (1, or no saving)."""
    rank = ratio_rank(ratio, layer.in_features, layer.out_features)
    return rank if ratio < 1 and saves(rank, layer.in_features, layer.out_features) else None


def _kept(layer: nn.Linear, ratio: float) -> int:
    """The weights ``layer`` keeps at rank ratio ``ratio``."""
    rank = _rank_of(layer, ratio)
    dense = layer.in_features * layer.out_features
    return dense if rank is None else rank * (layer.in_features + layer.out_features)


def _budget_error(cfg: FactorizeConfig, modules: list[tuple[str, nn.Module]]) -> ConfigError | None:
    """The error for an ``allocate.param_ratio`` below what the smallest rank ratio keeps of
    ``modules`` (the most any allocation saves), or None when it is reachable."""
    spec = cfg.allocate
    layers = [m for _, m in modules if isinstance(m, nn.Linear)]
    dense = sum(m.in_features * m.out_features for m in layers)
    least = sum(min(_kept(m, r) for r in spec.rank_ratios) for m in layers) / max(dense, 1)
    if spec.param_ratio >= least - 1e-12:
        return None
    return ConfigError(
        Problem(
            "compress.factorize.allocate.param_ratio",
            spec.param_ratio,
            f"is below what the smallest rank ratio, {min(spec.rank_ratios):g}, on every "
            f"selected layer keeps ({least:.3f} of their weights)",
            f"raise it to at least {math.ceil(least * 1000) / 1000:.3f}, or add smaller "
            "rank_ratios",
        )
    )


def _allocate(
    model: nn.Module,
    cfg: FactorizeConfig,
    modules: list[tuple[str, nn.Linear]],
    grams: dict[str, torch.Tensor] | None,
    calib: list[dict[str, torch.Tensor]] | None,
    agree: Callable[[Any], Any],
    cache_dir: Path | None,
    workers: Workers | None,
) -> dict[str, Any]:
    """Each layer's rank ratio (1: dense) with the factorized weights at most
    ``allocate.param_ratio`` of the dense ones, from the model's measured sensitivity to
    factorizing that layer alone (``compress.sensitivity``)."""
    from orchestrator.compress.sensitivity import (
        allocate,
        allocation_record,
        batches_digest,
        calibration_for,
        checked,
        exact,
        profile,
    )

    spec = cfg.allocate
    key = "compress.factorize.allocate"
    batches = calibration_for(calib, key, spec.model_dump())
    values = sorted(set(spec.rank_ratios) | {1.0})

    def variants(name: str, layer: nn.Linear) -> Callable[[float], torch.Tensor | None]:
        dec = decompose(layer.weight, grams[name] if grams else None)

        def low_rank(ratio: float) -> torch.Tensor | None:
            rank = _rank_of(layer, ratio)
            if rank is None:
                return None
            up, down = dec.factors(rank)
            return up @ down

        return low_rank

    measured = batches[: spec.calib_batches]
    prof = profile(
        model,
        modules,
        "rank_ratio",
        values,
        variants,
        measured,
        cache_dir=cache_dir,
        workers=workers,
        # asvd's whitening also reads the inputs' Gram matrices, from every calibration batch.
        recipe=f"{cfg.method}:{batches_digest(batches) if grams else ''}",
    )
    costs = [[exact(_kept(layer, ratio)) for ratio in values] for _, layer in modules]
    budget = exact(spec.param_ratio) * sum(m.in_features * m.out_features for _, m in modules)
    try:
        choice = allocate(prof, costs, budget)
    except ValueError as e:  # the driver checked the budget on the dense model: a last guard
        raise _budget_error(cfg, modules) or ConfigError(
            Problem(f"{key}.param_ratio", spec.param_ratio, str(e), "raise it")
        ) from None
    choice, check = checked(
        model, modules, prof, choice, costs, budget, variants, batches, spec.refine
    )
    choice = agree(choice)
    record = allocation_record(prof, choice, spec.param_ratio, check)
    kept = sum(float(costs[i][values.index(choice[n])]) for i, (n, _) in enumerate(modules))
    record["param_ratio"] = kept / max(sum(prof.params), 1)
    return record


@register
class SvdFactorize(Technique):
    config_type = SvdConfig

    def select(
        self, model: nn.Module, cfg: FactorizeConfig, filter_fn: FilterFn | None = None
    ) -> list[tuple[str, nn.Module]]:
        """The targeted Linears; with ``allocate``, also a ConfigError for a budget that no
        allocation meets on them (the driver checks before anything runs)."""
        modules = super().select(model, cfg, filter_fn)
        if cfg.allocate is not None:
            error = _budget_error(cfg, modules)
            if error is not None:
                raise error
        return modules

    def apply_(self, model: nn.Module, cfg: FactorizeConfig, ctx: Context) -> Applied:
        rows, allocation = factorize_allocated_(
            model,
            cfg,
            calib=ctx.calib,
            filter_fn=ctx.filter_fn,
            agree=ctx.agree,
            cache_dir=ctx.cache_dir,
            workers=ctx.workers,
        )
        ranks = {r.name: r.details["rank"] for r in rows if not r.skipped}
        entry: dict[str, Any] = {"ranks": ranks}
        if allocation is not None:
            entry["allocation"] = allocation
        return Applied(rows, entry=entry)

    def rebuild_(self, model: nn.Module, cfg: FactorizeConfig, entry: dict[str, Any]) -> None:
        for name, rank in entry["ranks"].items():
            old = model.get_submodule(name)
            new = LowRankLinear(old.in_features, old.out_features, int(rank), old.bias is not None)
            set_module(model, name, new)

    def note(self, cfg: FactorizeConfig) -> str:
        return (
            f"low-rank factorization ({cfg.method}): two thinner Linear layers, fewer FLOPs and "
            "bytes for real"
        )


@register
class AsvdFactorize(SvdFactorize):
    config_type = AsvdConfig
    needs_calibration = True

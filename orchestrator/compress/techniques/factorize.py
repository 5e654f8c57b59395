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

from typing import Any

import torch
from torch import nn

from orchestrator.compress.common import (
    FilterFn,
    ModuleRow,
    collect_input_stats,
    param_count,
    select_modules,
    set_module,
)
from orchestrator.compress.technique import Applied, Context, Technique, register
from orchestrator.config.compress import AsvdConfig, FactorizeMethod, SvdConfig

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


@torch.no_grad()
def factorize_linear(
    linear: nn.Linear, cfg: FactorizeConfig, gram: torch.Tensor | None
) -> tuple[LowRankLinear | None, int, str]:
    """The factorized replacement of ``linear`` (or None and why not), and the rank chosen.
    ``gram``: the calibration inputs' X^T X for the activation-aware variant."""
    w = linear.weight.detach().double()
    out_f, in_f = w.shape
    if gram is not None:
        g = gram.to(w.device).double()
        g = g + GRAM_DAMPING * g.diagonal().mean().clamp_min(1e-12) * torch.eye(in_f, dtype=g.dtype)
        chol = torch.linalg.cholesky(g)  # lower triangular L, g = L L^T
    else:
        chol = None
    u, sigma, vh = torch.linalg.svd(w @ chol if chol is not None else w, full_matrices=False)
    rank = choose_rank(sigma, cfg, in_f, out_f)
    if rank * (in_f + out_f) >= in_f * out_f:
        reason = f"rank {rank} would not save parameters: {rank}x({in_f}+{out_f}) >= {in_f}x{out_f}"
        return None, rank, reason
    root = sigma[:rank].sqrt()
    down = root.unsqueeze(1) * vh[:rank]
    if chol is not None:
        # Undo the whitening on the input side: W ~ U S V^T L^-1.
        down = torch.linalg.solve_triangular(chol, down, upper=False, left=False)
    new = LowRankLinear(in_f, out_f, rank, bias=linear.bias is not None).to(
        device=linear.weight.device, dtype=linear.weight.dtype
    )
    new.up.weight.copy_(u[:, :rank] * root.unsqueeze(0))
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
    rows = []
    for name, linear in modules:
        new, rank, reason = factorize_linear(linear, cfg, grams[name] if grams else None)
        before = param_count(linear)
        shape = list(linear.weight.shape)
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
    return rows


@register
class SvdFactorize(Technique):
    config_type = SvdConfig

    def apply_(self, model: nn.Module, cfg: FactorizeConfig, ctx: Context) -> Applied:
        rows = factorize_(model, cfg, calib=ctx.calib, filter_fn=ctx.filter_fn)
        ranks = {r.name: r.details["rank"] for r in rows if not r.skipped}
        return Applied(rows, entry={"ranks": ranks})

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

"""Low-rank factorization: a Linear W (out x in) becomes up(down(x)) with down: in -> r and
up: r -> out, from a truncated SVD. ``asvd`` first scales W's input channels by the calibration
activations' magnitude (ASVD, Yuan et al. 2023), so the truncation keeps what the data uses.

A layer is skipped (and recorded) when the factorized form would not have fewer parameters:
speed and size then come from physically smaller layers, not from a nominal rank."""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.compress.common import (
    FilterFn,
    ModuleRow,
    collect_input_stats,
    select_modules,
    set_module,
)
from orchestrator.config.compress import FactorizeConfig

ASVD_ALPHA = 0.5  # exponent on the channel scale; the ASVD paper's default


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
    linear: nn.Linear, cfg: FactorizeConfig, channel_scale: torch.Tensor | None
) -> tuple[LowRankLinear | None, int, str]:
    """The factorized replacement of ``linear`` (or None and why not), and the rank chosen."""
    w = linear.weight.detach().float()
    out_f, in_f = w.shape
    if channel_scale is not None:
        s = channel_scale.to(w.device).float().clamp_min(1e-6)
        s = s / s.mean()  # scale-free: only relative channel importance matters
    else:
        s = torch.ones(in_f, device=w.device)
    u, sigma, vh = torch.linalg.svd(w * s.unsqueeze(0), full_matrices=False)
    rank = choose_rank(sigma, cfg, in_f, out_f)
    if rank * (in_f + out_f) >= in_f * out_f:
        return (
            None,
            rank,
            (f"rank {rank} would not save parameters: {rank}x({in_f}+{out_f}) >= {in_f}x{out_f}"),
        )
    root = sigma[:rank].sqrt()
    new = LowRankLinear(in_f, out_f, rank, bias=linear.bias is not None).to(
        device=linear.weight.device, dtype=linear.weight.dtype
    )
    new.up.weight.copy_(u[:, :rank] * root.unsqueeze(0))
    # Undo the channel scaling on the input side: W ~ U S V^T diag(1/s).
    new.down.weight.copy_((root.unsqueeze(1) * vh[:rank]) / s.unsqueeze(0))
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
    scales = None
    if cfg.method == "asvd":
        if not calib:
            raise ValueError("asvd factorization needs calibration batches")
        sumsq = collect_input_stats(model, modules, calib)
        scales = {n: v.sqrt() ** ASVD_ALPHA for n, v in sumsq.items()}
    rows = []
    for name, linear in modules:
        new, rank, reason = factorize_linear(linear, cfg, scales[name] if scales else None)
        before = sum(p.numel() for p in linear.parameters())
        shape = list(linear.weight.shape)
        if new is None:
            rows.append(
                ModuleRow(
                    name,
                    "factorize",
                    "Linear",
                    shape,
                    shape,
                    before,
                    before,
                    skipped=True,
                    reason=reason,
                    details={"rank": rank},
                )
            )
            continue
        set_module(model, name, new)
        after = sum(p.numel() for p in new.parameters())
        rows.append(
            ModuleRow(
                name,
                "factorize",
                "Linear",
                shape,
                [shape[0], rank, shape[1]],
                before,
                after,
                details={"rank": rank, "method": cfg.method},
            )
        )
    return rows

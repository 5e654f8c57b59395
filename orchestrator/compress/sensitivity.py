"""Per-layer sensitivity and allocation under a budget (mixed precision,
``compress.quantize.allocate``).

**Profile.** For each selected Linear and each candidate bit width, the layer's weight alone is
replaced by its quantized-dequantized value (the method's granularity, group size and symmetry)
and the model's outputs on calibration batches are compared with the unchanged model's: the
mean KL divergence ``KL(p_dense || p_changed)`` of the output distributions (softmax of the
logits), per example, in nats. One forward pass per (layer, bit width) per batch; layers are
independent, so the cost grows as layers x bit widths x batches (``Profile.seconds`` records
it).

**Allocation.** Choose one bit width per layer to minimise the sum of the layers' KL under the
budget ``sum(params_i * bits_i) <= avg_bits * sum(params_i)``. Summing per-layer losses is the
usual additive approximation (HAWQ, NVIDIA ModelOpt's AutoQuantize make the same one); given
it, the choice is a multiple-choice knapsack, solved exactly by dynamic programming over the
budget in units of the greatest common divisor of the layers' sizes (a BERT-size model has a
few hundred units). When that grid would exceed ``MAX_UNITS`` the costs are rounded up to a
coarser grid, which can only under-use the budget, never exceed it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.compress.common import forward_eval
from orchestrator.compress.qtensor import fake_quantize

Batch = dict[str, torch.Tensor]
MAX_UNITS = 200_000  # budget grid of the exact allocation (units; see the module doc)


@dataclass
class Profile:
    """``kl[i][j]``: mean KL divergence (nats per example) of the model's outputs when only
    layer ``layers[i]`` is quantized to ``bits[j]`` bits."""

    layers: list[str]
    params: list[int]
    bits: list[int]
    kl: list[list[float]]
    batches: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = forward_eval(model, batch)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.detach().float().reshape(-1, logits.shape[-1])


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(ref || other), both given as logits / log-probabilities."""
    return float(
        F.kl_div(F.log_softmax(logits, -1), ref_logp, log_target=True, reduction="batchmean")
    )


@torch.no_grad()
def profile_bits(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Linear]],
    bits: Sequence[int],
    quantize_args: Callable[[int], tuple[int, str, int, bool]],
    batches: Sequence[Batch],
) -> Profile:
    """The sensitivity of ``model`` to each layer of ``layers`` at each of ``bits``;
    ``quantize_args(b)``: the ``fake_quantize`` arguments for ``b`` bits. The model is left as
    it was."""
    start = time.perf_counter()
    refs = [F.log_softmax(_logits(model, b), -1) for b in batches]
    table = []
    for _, layer in layers:
        original = layer.weight.data
        row = []
        try:
            for b in bits:
                layer.weight.data = fake_quantize(original, *quantize_args(b))
                pairs = zip(refs, batches, strict=True)
                kls = [_kl(ref, _logits(model, batch)) for ref, batch in pairs]
                row.append(max(0.0, sum(kls) / len(kls)))
        finally:
            layer.weight.data = original
        table.append(row)
    return Profile(
        layers=[n for n, _ in layers],
        params=[int(m.weight.numel()) for _, m in layers],
        bits=list(bits),
        kl=table,
        batches=len(batches),
        seconds=time.perf_counter() - start,
    )


def allocate_bits(profile: Profile, avg_bits: float) -> dict[str, int]:
    """The bit width of each layer that minimises the summed KL with a mean bit width (weighted
    by the layers' sizes) of at most ``avg_bits``. Raises ``ValueError`` when even the
    smallest bit width everywhere exceeds the budget."""
    params = profile.params
    if not params:
        return {}
    unit = reduce(math.gcd, params)
    total_units = sum(p // unit for p in params) * max(profile.bits)
    if total_units > MAX_UNITS:
        unit = math.ceil(sum(params) * max(profile.bits) / MAX_UNITS)
    budget = math.floor(avg_bits * sum(params) / unit + 1e-9)
    costs = [[math.ceil(p * b / unit) for b in profile.bits] for p in params]
    if sum(min(c) for c in costs) > budget:
        raise ValueError(
            f"a mean of {avg_bits:g} bits is below what the smallest width, "
            f"{min(profile.bits)} bits, on every layer needs"
        )
    inf = math.inf
    # best[u]: least summed KL of the layers so far using at most u units.
    best = torch.zeros(budget + 1, dtype=torch.float64)
    choices = []
    for layer_costs, layer_kl in zip(costs, profile.kl, strict=True):
        new = torch.full_like(best, inf)
        pick = torch.full((budget + 1,), -1, dtype=torch.int64)
        for j, (c, kl) in enumerate(zip(layer_costs, layer_kl, strict=True)):
            if c > budget:
                continue
            cand = torch.full_like(best, inf)
            cand[c:] = best[: budget + 1 - c] + kl
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, j), pick)
        best = new
        choices.append(pick)
    # Walk back from the whole budget.
    u = budget
    picked = [0] * len(params)
    for i in range(len(params) - 1, -1, -1):
        picked[i] = int(choices[i][u])
        u -= costs[i][picked[i]]
    return {name: profile.bits[j] for name, j in zip(profile.layers, picked, strict=True)}


def mean_bits(profile: Profile, choice: dict[str, int]) -> float:
    """The size-weighted mean bit width of ``choice`` over the profile's layers."""
    sized = zip(profile.layers, profile.params, strict=True)
    return sum(p * choice[n] for n, p in sized) / max(sum(profile.params), 1)

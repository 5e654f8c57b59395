"""Per-layer sensitivity and allocation under a budget: mixed precision
(``compress.quantize.allocate``), per-layer sparsity (``compress.prune.allocate``) and per-layer
rank (``compress.factorize.allocate``).

**Profile.** For each selected Linear and each candidate setting (a bit width, a sparsity, a
rank ratio), the layer's weight alone is replaced by what that setting makes of it (quantized
and dequantized; pruned; the low-rank product) and the model's outputs on calibration batches
are compared with the unchanged model's: the mean KL divergence ``KL(p_dense || p_changed)`` of
the output distributions (softmax of the logits), per example, in nats. One forward pass per
(layer, setting) per batch; layers are independent, so the cost grows as layers x settings x
batches (``Profile.seconds`` records it).

**Allocation.** Choose one setting per layer to minimise the sum of the layers' KL under a
budget on a cost that adds over layers: bits (``sum(params_i * bits_i)``), kept weights
(``sum(params_i * (1 - sparsity_i))``), parameters after factorization. Summing per-layer
losses is the usual additive approximation (HAWQ, NVIDIA ModelOpt's AutoQuantize make the same
one); given it, the choice is a multiple-choice knapsack, solved exactly by dynamic programming
over the budget in units of the greatest common divisor of the costs (a BERT-size model has a
few hundred to a few thousand units). When that grid would exceed ``MAX_UNITS`` the costs are
rounded up to a coarser grid, which can only under-use the budget, never exceed it.

**Check and refinement.** The knapsack's choice is then measured with every layer changed at
once against the best single setting within the budget, and the better kept (``checked``);
with ``refine``, a local search on that joint loss follows (``refined``): one or two layers
moved one candidate step within the budget, in the order the profile predicts least harmful,
the first that lowers the joint KL taken, up to ``refine`` measurements.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import reduce
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.compress.common import forward_eval
from orchestrator.compress.technique import Workers
from orchestrator.errors import ConfigError, Problem
from orchestrator.files import write_atomic

Batch = dict[str, torch.Tensor]
MAX_UNITS = 200_000  # budget grid of the exact allocation (units; see the module doc)
# A layer's candidate weights for each setting: made once per layer (an SVD is shared by all
# of its ranks), then asked for each setting in turn (None: the layer as it is).
Variants = Callable[[str, nn.Linear], Callable[[float], torch.Tensor | None]]


@dataclass
class Profile:
    """``kl[i][j]``: mean KL divergence (nats per example) of the model's outputs when only
    layer ``layers[i]`` is changed by ``setting`` = ``values[j]`` (``bits``, ``sparsity``,
    ``rank_ratio``). ``seconds``: what measuring it cost (wall time); ``cached``: read back
    instead."""

    layers: list[str]
    params: list[int]
    setting: str
    values: list[float]
    kl: list[list[float]]
    batches: int
    seconds: float
    cached: bool = False
    workers: int = 1  # the workers the layers were split among (``seconds``: the slowest's)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = forward_eval(model, batch)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.detach().float().reshape(-1, logits.shape[-1])


# How ``_kl`` measures: part of a cached profile's key (2: in float64; 1 was float32).
KL_VERSION = 2


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over rows of KL(ref || other), both given as logits. In float64: in float32 each
    log-probability carries a rounding error of about 1e-8 nats, as large as the whole KL of a
    layer at 8 bits, and the profile could not tell 8 bits from 2 on a model whose outputs
    move little."""
    return float(
        F.kl_div(
            F.log_softmax(logits.double(), -1),
            F.log_softmax(ref_logits.double(), -1),
            log_target=True,
            reduction="batchmean",
        )
    )


def _digest(
    model: nn.Module,
    batches: Sequence[Batch],
    layers: Sequence[tuple[str, nn.Linear]],
    setting: str,
    values: Sequence[float],
    recipe: str,
) -> str:
    """A hash of everything a profile depends on: every tensor of the model (an earlier
    technique's change included), the calibration batches, the layers, the settings and
    ``recipe`` (how a setting changes a weight)."""
    h = hashlib.blake2b(digest_size=20)
    # KL_VERSION: profiles measured before the KL was taken in float64 are not read back.
    key = [[n for n, _ in layers], setting, list(values), recipe, KL_VERSION]
    h.update(json.dumps(key).encode())
    h.update(tensors_digest(model.state_dict()).encode())
    h.update(batches_digest(batches).encode())
    return h.hexdigest()


def tensors_digest(tensors: dict[str, Any]) -> str:
    """A hash of named tensors: names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def batches_digest(batches: Sequence[Batch]) -> str:
    """A hash of calibration batches."""
    named = {f"{i}.{k}": v for i, b in enumerate(batches) for k, v in sorted(b.items())}
    return tensors_digest(named)


@torch.no_grad()
def profile(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Linear]],
    setting: str,
    values: Sequence[float],
    variants: Variants,
    batches: Sequence[Batch],
    *,
    cache_dir: Path | None = None,
    recipe: str = "",
    workers: Workers | None = None,
) -> Profile:
    """The sensitivity of ``model`` to each layer of ``layers`` at each of ``values``;
    ``variants(name, layer)(value)``: the layer's weight under that setting (``None`` for a
    setting that leaves it as it is, which costs no forward pass). The model is left as it
    was. With ``cache_dir``, a profile measured before on the same model, batches, layers and
    settings (``recipe``: what else the variants depend on) is read back instead.

    ``workers`` (a distributed run's, all holding the same model and batches): each measures
    every ``size``-th layer from its ``rank`` on, and all receive the whole table; a profile is
    read back from the cache only when every worker has it."""
    workers = workers or Workers()
    path, cached = None, None
    if cache_dir is not None:
        key = _digest(model, batches, layers, setting, values, recipe)
        path = Path(cache_dir) / f"{setting}-{key}.json"
        with contextlib.suppress(OSError, ValueError, TypeError):
            cached = Profile(**{**json.loads(path.read_text()), "cached": True})
    if workers.size > 1 and not all(workers.gather(cached is not None)):
        # A worker on another node may lack it: one measuring alone would wait for the
        # others' shares forever. All measure.
        cached = None
    if cached is not None:
        return cached
    start = time.perf_counter()
    refs = _references(model, batches)
    mine = {
        i: _row(model, layers[i], values, variants, refs, batches)
        for i in range(workers.rank, len(layers), workers.size)
    }
    seconds = time.perf_counter() - start
    if workers.size > 1:
        shares = workers.gather((mine, seconds))
        mine = {i: row for rows, _ in shares for i, row in rows.items()}
        seconds = max(s for _, s in shares)  # the slowest worker's share is the wall time
    prof = Profile(
        layers=[n for n, _ in layers],
        params=[int(m.weight.numel()) for _, m in layers],
        setting=setting,
        values=[float(v) for v in values],
        kl=[mine[i] for i in range(len(layers))],
        batches=len(batches),
        seconds=seconds,
        workers=workers.size,
    )
    if path is not None:
        with contextlib.suppress(OSError):  # a cache that cannot be written is only slower
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(prof.to_json()))
    return prof


def _row(
    model: nn.Module,
    layer: tuple[str, nn.Linear],
    values: Sequence[float],
    variants: Variants,
    refs: Sequence[torch.Tensor],
    batches: Sequence[Batch],
) -> list[float]:
    """One layer's KL at each of ``values``, the layer restored afterwards."""
    name, module = layer
    original = module.weight.data
    make = variants(name, module)
    row = []
    try:
        for value in values:
            module.weight.data = original  # each setting starts from the layer as it is
            weight = make(value)
            if weight is None:
                row.append(0.0)
                continue
            module.weight.data = weight.to(original.dtype)
            pairs = zip(refs, batches, strict=True)
            kls = [_kl(ref, _logits(model, batch)) for ref, batch in pairs]
            row.append(max(0.0, sum(kls) / len(kls)))
    finally:
        module.weight.data = original
    return row


def calibration_for(calib: Sequence[Batch] | None, key: str, value: Any) -> Sequence[Batch]:
    """``calib``, or the error naming the allocation ``key`` that needed it."""
    if not calib:
        raise ConfigError(
            Problem(
                key,
                value,
                "measures each layer's sensitivity on calibration batches, and none were given",
                "run it through orchestrator compress / train / search, which pass the job's "
                "calibration batches",
            )
        )
    return calib


def exact(x: float) -> Fraction:
    """``x`` as the fraction a user meant by it (0.3 is 3/10, not the nearest binary float)."""
    return Fraction(x).limit_denominator(10_000)


def allocate(
    prof: Profile, costs: Sequence[Sequence[Fraction]], budget: Fraction
) -> dict[str, float]:
    """The setting of each layer that minimises the summed KL with a summed cost of at most
    ``budget``; ``costs[i][j]``: what layer i costs at ``prof.values[j]``. Raises
    ``ValueError`` when even the cheapest setting of every layer exceeds the budget."""
    if not prof.layers:
        return {}
    scale = reduce(math.lcm, (c.denominator for row in costs for c in row), budget.denominator)
    ints = [[int(c * scale) for c in row] for row in costs]
    unit = reduce(math.gcd, (c for row in ints for c in row if c), 0) or 1
    if sum(max(row) for row in ints) // unit > MAX_UNITS:
        unit = math.ceil(sum(max(row) for row in ints) / MAX_UNITS)
    units = [[math.ceil(c / unit) for c in row] for row in ints]
    room = min(math.floor(budget * scale / unit), sum(max(row) for row in units))
    if sum(min(row) for row in units) > room:
        raise ValueError("the budget is below what the cheapest setting of every layer needs")
    inf = math.inf
    # best[u]: least summed KL of the layers so far using at most u units.
    best = torch.zeros(room + 1, dtype=torch.float64)
    choices = []
    for layer_units, layer_kl in zip(units, prof.kl, strict=True):
        new = torch.full_like(best, inf)
        pick = torch.full((room + 1,), -1, dtype=torch.int64)
        for j, (c, kl) in enumerate(zip(layer_units, layer_kl, strict=True)):
            if c > room:
                continue
            cand = torch.full_like(best, inf)
            cand[c:] = best[: room + 1 - c] + kl
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, j), pick)
        best = new
        choices.append(pick)
    # Walk back from the whole budget.
    u = room
    picked = [0] * len(prof.layers)
    for i in range(len(prof.layers) - 1, -1, -1):
        picked[i] = int(choices[i][u])
        u -= units[i][picked[i]]
    return {name: prof.values[j] for name, j in zip(prof.layers, picked, strict=True)}


def weighted_mean(prof: Profile, choice: dict[str, float]) -> float:
    """The size-weighted mean setting of ``choice`` over the profile's layers (mean bits, mean
    sparsity)."""
    sized = zip(prof.layers, prof.params, strict=True)
    return sum(p * choice[n] for n, p in sized) / max(sum(prof.params), 1)


def bit_costs(prof: Profile, avg_bits: float) -> tuple[list[list[Fraction]], Fraction]:
    """Each layer's bits at each width, and the budget of a mean of ``avg_bits``."""
    costs = [[p * exact(b) for b in prof.values] for p in prof.params]
    return costs, exact(avg_bits) * sum(prof.params)


def sparsity_costs(prof: Profile, sparsity: float) -> tuple[list[list[Fraction]], Fraction]:
    """Each layer's kept weights at each sparsity, and the budget of a mean of ``sparsity``
    (at most ``1 - sparsity`` of the weights kept)."""
    costs = [[p * (1 - exact(s)) for s in prof.values] for p in prof.params]
    return costs, (1 - exact(sparsity)) * sum(prof.params)


def allocate_bits(prof: Profile, avg_bits: float) -> dict[str, float]:
    """The widths with a size-weighted mean of at most ``avg_bits``."""
    try:
        return allocate(prof, *bit_costs(prof, avg_bits))
    except ValueError:
        raise ValueError(
            f"a mean of {avg_bits:g} bits is below what the smallest width, "
            f"{min(prof.values):g} bits, on every layer needs"
        ) from None


def allocate_sparsity(prof: Profile, sparsity: float) -> dict[str, float]:
    """The sparsities with a size-weighted mean of at least ``sparsity``."""
    try:
        return allocate(prof, *sparsity_costs(prof, sparsity))
    except ValueError:
        raise ValueError(
            f"a mean sparsity of {sparsity:g} is above what the largest candidate, "
            f"{max(prof.values):g}, on every layer reaches"
        ) from None


@torch.no_grad()
def joint_kl(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Linear]],
    choice: dict[str, float],
    variants: Variants,
    batches: Sequence[Batch],
) -> float:
    """The mean KL divergence of the model's outputs with every layer changed at once, each to
    its setting in ``choice``. The model is left as it was."""
    makes = {name: variants(name, layer) for name, layer in layers}
    return _joint_kl(model, layers, choice, makes, batches, _references(model, batches))


def _references(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """The unchanged model's logits on ``batches`` (float32; ``_kl`` takes them to float64).
    ``_kl`` redoes their log-softmax at each call, a small cost beside the forward pass it
    follows; float64 log-probabilities kept for every batch would double this memory, which
    on a 49k-token vocabulary is hundreds of MB."""
    return [_logits(model, b) for b in batches]


def _joint_kl(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Linear]],
    choice: dict[str, float],
    makes: dict[str, Callable[[float], torch.Tensor | None]],
    batches: Sequence[Batch],
    refs: Sequence[torch.Tensor],
) -> float:
    """``joint_kl`` from each layer's variants already made (an SVD each) and the references
    already computed, so that several choices are measured at the cost of their passes only."""
    originals = {}
    try:
        for name, layer in layers:
            originals[name] = layer.weight.data
            weight = makes[name](choice[name])
            if weight is not None:
                layer.weight.data = weight.to(originals[name].dtype)
        kls = [_kl(ref, _logits(model, b)) for ref, b in zip(refs, batches, strict=True)]
    finally:
        for name, layer in layers:
            if name in originals:
                layer.weight.data = originals[name]
    return max(0.0, sum(kls) / len(kls))


def checked(
    model: nn.Module,
    layers: Sequence[tuple[str, nn.Linear]],
    prof: Profile,
    choice: dict[str, float],
    costs: Sequence[Sequence[Fraction]],
    budget: Fraction,
    variants: Variants,
    batches: Sequence[Batch],
    refine: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """``choice`` (the knapsack's, from summed per-layer losses) or, when it moves the model's
    outputs more with every layer changed at once, the uniform setting within the budget that
    loses least: the additive approximation is checked, not trusted (layers' errors compound,
    most under a tight budget). Two forward passes per batch, so the callers give it every
    calibration batch, not only the profile's. With ``refine``, then up to that many more
    joint measurements (``refined``). Returns the kept choice and the check's record."""
    uniform = None
    for j, value in enumerate(prof.values):
        if sum(row[j] for row in costs) <= budget:
            loss = sum(row[j] for row in prof.kl)
            if uniform is None or loss < uniform[0]:
                uniform = (loss, value)
    flat = {name: uniform[1] for name in prof.layers} if uniform else None
    needed = flat is not None and flat != choice
    if not needed and not refine:
        return choice, {"kept": "allocation", "uniform": None}
    # Every choice from the same variants and references: each layer's SVD and the unchanged
    # model's outputs are computed once.
    makes = {name: variants(name, layer) for name, layer in layers}
    with torch.no_grad():
        refs = _references(model, batches)
        allocated = _joint_kl(model, layers, choice, makes, batches, refs)
        record: dict[str, Any] = {"kept": "allocation", "uniform": None}
        kept, kl = choice, allocated
        if needed:
            same = _joint_kl(model, layers, flat, makes, batches, refs)
            record = {
                "uniform": uniform[1],
                "allocation_kl": allocated,
                "uniform_kl": same,
                "kept": "allocation" if allocated <= same else "uniform",
            }
            if same < allocated:
                kept, kl = flat, same
        if refine:

            def measure(c: dict[str, float]) -> float:
                return _joint_kl(model, layers, c, makes, batches, refs)

            kept, record["refine"] = refined(prof, kept, kl, costs, budget, measure, refine)
    return kept, record


def refined(
    prof: Profile,
    choice: dict[str, float],
    kl: float,
    costs: Sequence[Sequence[Fraction]],
    budget: Fraction,
    measure: Callable[[dict[str, float]], float],
    evaluations: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """A local search measured with every layer changed at once (``measure``: the joint KL of
    a choice), from ``choice`` (joint KL ``kl``): the neighbours move one layer, or two, one
    candidate step each (``prof.values`` in order) within the budget; they are measured in the
    order of the profile's summed change (least harmful first, since the knapsack left no
    move the profile thinks helps), and the first that lowers the joint KL is taken; at most
    ``evaluations`` measurements. Returns the best choice and the search's record."""
    names = prof.layers
    at = [prof.values.index(choice[n]) for n in names]
    n_values = len(prof.values)
    start, measured, taken = kl, 0, 0
    seen = {tuple(at)}
    while measured < evaluations:
        spent = sum(costs[i][j] for i, j in enumerate(at))
        steps = [
            (i, j, prof.kl[i][j] - prof.kl[i][at[i]], costs[i][j] - costs[i][at[i]])
            for i in range(len(names))
            for j in (at[i] - 1, at[i] + 1)
            if 0 <= j < n_values
        ]
        moves = [((delta, cost), [(i, j)]) for i, j, delta, cost in steps]
        moves += [
            ((d1 + d2, c1 + c2), [(i1, j1), (i2, j2)])
            for k, (i1, j1, d1, c1) in enumerate(steps)
            for i2, j2, d2, c2 in steps[k + 1 :]
            if i1 != i2
        ]
        moves = sorted((m for m in moves if spent + m[0][1] <= budget), key=lambda m: m[0][0])
        better = None
        for _, changes in moves:
            after = list(at)
            for i, j in changes:
                after[i] = j
            if tuple(after) in seen:
                continue
            seen.add(tuple(after))
            measured += 1
            candidate = measure({n: prof.values[j] for n, j in zip(names, after, strict=True)})
            if candidate < kl:
                better = (after, candidate)
                break
            if measured >= evaluations:
                break
        if better is None:
            break
        at, kl = better
        taken += 1
    final = {n: prof.values[j] for n, j in zip(names, at, strict=True)}
    return final, {"evaluations": measured, "moves": taken, "kl_before": start, "kl_after": kl}


def allocation_record(
    prof: Profile, choice: dict[str, float], budget: float, check: dict[str, Any]
) -> dict[str, Any]:
    """What the manifest and the report keep of an allocation: the setting of each layer, its
    size-weighted mean, the budget, the joint check (``checked``), the profile."""
    return {
        "setting": prof.setting,
        "choice": choice,
        "mean": weighted_mean(prof, choice),
        "budget": budget,
        "check": check,
        "profile": prof.to_json(),
    }

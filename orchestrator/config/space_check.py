"""The search section checked against the job it belongs to: a step of loading a job
(``loader.validate_job``), after the job itself validated.

Every key of ``search.space`` must be a job key, and every combination the searcher can draw
must make a valid trial job; the baseline's overrides must make a valid job too. Checked when
the job is loaded, not after hours of trials.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from orchestrator.config.compress import ALLOCATE_CALIB_BATCHES, CompressConfig
from orchestrator.config.overrides import apply_overrides
from orchestrator.config.search import (
    PER_LAYER,
    Distribution,
    SearchConfig,
    baseline_base,
    trial_base,
    trial_overrides,
)
from orchestrator.errors import Problem

# Beyond this many combinations the space check tries each key alone instead of the product.
MAX_COMBINATIONS = 2048

Validate = Callable[[dict[str, Any]], list[Problem]]


def search_problems(
    job: dict[str, Any],
    search: SearchConfig,
    validate: Validate,
    exclusive: list[tuple[str, ...]] | None = None,
) -> list[Problem]:
    """Problems of ``search`` against ``job`` (the job's raw form);
    ``validate(raw)`` returns the problems of a raw job, empty when it is valid; ``exclusive``:
    the groups of exclusive keys the baseline's overrides replace (see ``apply_overrides``)."""
    # The jobs as the search builds them: trials start from the dense baseline (a stand-in
    # path here: where it will be), the baseline is the dense job with its own overrides.
    trials = trial_base(job, search, "baseline/model")
    problems = [
        Problem(f"search.{p.key}", p.value, p.message, p.fix)
        for p in _space_problems(trials, search.space, validate)
    ]
    if not problems:  # the allocations need the stage's config from a valid combination
        problems += _allocation_problems(trials, search, validate)
        problems += _point_problems(trials, search, validate)
    if search.baseline.overrides:
        for p in validate(baseline_base(job, search, exclusive or ())):
            key = f"search.baseline.overrides.{p.key}"
            problems.append(Problem(key, p.value, p.message, p.fix))
    return problems


def combinations(space: dict[str, Distribution]) -> list[dict[str, Any]]:
    """Every combination of choice values and range ends, or each key alone (the others at
    their first candidate) when there are more than ``MAX_COMBINATIONS``."""
    keys = list(space)
    candidates = [space[k].candidates() for k in keys]
    if math.prod(len(c) for c in candidates) <= MAX_COMBINATIONS:
        combos = list(itertools.product(*candidates))
    else:
        first = [c[0] for c in candidates]
        combos = [
            tuple(v if j == i else first[j] for j in range(len(keys)))
            for i, c in enumerate(candidates)
            for v in c
        ]
    return [dict(zip(keys, combo, strict=True)) for combo in combos]


def _target(key: str, dist: Distribution) -> str:
    """The job key a space key sets: its stage's ``layers`` for a per-layer key."""
    return PER_LAYER[key] if dist.per_layer and key in PER_LAYER else key


def _related(key: str, space_key: str) -> bool:
    """``key`` is ``space_key``, below it, or a section holding it."""
    return key == space_key or key.startswith(space_key + ".") or space_key.startswith(key + ".")


def _space_problems(
    job: dict[str, Any], space: dict[str, Distribution], validate: Validate
) -> list[Problem]:
    """Problems keyed relative to ``search``: space keys that are not job keys, and values or
    combinations that make an invalid trial job (at most five, each kind once)."""
    problems: list[Problem] = []
    keys = list(space)
    seen: set[str] = set()
    for sampled in combinations(space):
        raw = apply_overrides(job, trial_overrides(space, sampled))
        for p in validate(raw):
            owner = next((k for k in keys if _related(p.key, _target(k, space[k]))), None)
            if p.message == "unknown key" and owner is not None:
                if p.key not in seen:
                    seen.add(p.key)
                    problems.append(
                        Problem(
                            f"space.{owner}", owner, "is not a key of the job", _did_you_mean(p.fix)
                        )
                    )
                continue
            where = owner or p.key
            tag = f"{where}|{p.message}"
            if tag in seen:
                continue
            seen.add(tag)
            shown = ", ".join(f"{k}={v!r}" for k, v in sampled.items() if len(keys) > 1)
            problems.append(
                Problem(
                    f"space.{where}",
                    sampled.get(where, p.value),
                    f"makes an invalid trial job: {p.key} = {p.value!r}: {p.message}"
                    + (f" (with {shown})" if shown else ""),
                    "draw whole numbers: {int: [lo, hi]} or {choice: [...]}"
                    if "valid integer" in p.message
                    else "narrow the range, or use a labelled choice of whole sections so that "
                    "only valid combinations can be drawn",
                )
            )
        if len(problems) >= 5:
            break
    return problems


def per_layer_stage(key: str) -> str:
    """The compress stage a per-layer key belongs to (``compress.quantize.bits``: quantize)."""
    return PER_LAYER[key].split(".")[1]


def stage_configs(job: dict[str, Any], search: SearchConfig) -> dict[str, tuple[Any, dict]]:
    """Each per-layer key's technique config as the trials apply it (its ``layers`` empty),
    with the sampled values it comes from: the first of the space's combinations that
    applies the stage."""
    wanted = {k: per_layer_stage(k) for k, d in search.space.items() if d.per_layer}
    out: dict[str, tuple[Any, dict]] = {}
    for sampled in combinations(search.space):
        raw = apply_overrides(job, trial_overrides(search.space, sampled))
        compress = CompressConfig.model_validate(raw.get("compress") or {})
        for key, stage in wanted.items():
            cfg = getattr(compress, stage)
            if key not in out and cfg is not None:
                out[key] = (cfg.model_copy(update={"layers": {}}), sampled)
        if len(out) == len(wanted):
            break
    return out


def allocation_job(
    job: dict[str, Any], key: str, values: list[Any], stage_cfg: Any, budget: float
) -> dict[str, Any]:
    """The raw job that measures the allocation of per-layer key ``key`` at ``budget``: the
    stage alone (``stage_cfg``, from ``stage_configs``), allocating over ``values`` (the key's
    choice) instead of setting each layer or one value for all, with the job's calibration."""
    cfg = stage_cfg.model_dump(mode="json")
    cfg.pop("layers", None)
    calib = CompressConfig.model_validate(job.get("compress") or {}).calib_batches
    # The profile's batches: allocate's own default, or all the job has when it has fewer.
    profile = {"calib_batches": min(ALLOCATE_CALIB_BATCHES, calib)}
    if key == "compress.quantize.bits":
        cfg["allocate"] = {"bits": values, "avg_bits": budget, **profile}
    elif key == "compress.prune.sparsity":
        cfg.update(sparsity=budget, allocate={"sparsities": values, **profile})
    else:  # rank: a layer may also stay dense (1), the allocation's own option
        for rule in ("rank", "rank_ratio", "energy"):
            cfg.pop(rule, None)
        ratios = [v for v in values if float(v) < 1]
        cfg["allocate"] = {"rank_ratios": ratios, "param_ratio": budget, **profile}
    raw = {k: v for k, v in job.items() if k != "search"}
    raw["compress"] = {per_layer_stage(key): cfg, "calib_batches": calib}
    return raw


def _allocation_problems(
    job: dict[str, Any], search: SearchConfig, validate: Validate
) -> list[Problem]:
    """Each allocation starting point's job must be valid: measured after the baseline, a
    setting only ``allocate`` checks (its calibration batches, say) must fail here, not then."""
    keys = [k for k, d in search.space.items() if d.per_layer and d.allocations]
    if not keys:
        return []
    configs = stage_configs(job, search)
    problems: list[Problem] = []
    for key in keys:
        if key not in configs:  # no combination applies the stage: nothing is allocated
            continue
        stage_cfg, _ = configs[key]
        dist = search.space[key]
        for budget in dist.allocations or []:
            raw = allocation_job(job, key, list(dist.choice), stage_cfg, budget)
            found = validate(raw)
            problems += [
                Problem(
                    f"search.space.{key}.allocations",
                    budget,
                    f"makes an invalid allocation job: {p.key} = {p.value!r}: {p.message}",
                    p.fix,
                )
                for p in found
            ]
            if found:  # the other budgets share the cause
                break
    return problems


def _point_problems(job: dict[str, Any], search: SearchConfig, validate: Validate) -> list[Problem]:
    """Each starting point must make a valid trial job: a recipe inside every key's domain can
    still combine into an invalid one (a range's middle the combinations do not try)."""
    problems: list[Problem] = []
    for i, point in enumerate(search.points):
        raw = apply_overrides(job, trial_overrides(search.space, point))
        problems += [
            Problem(
                f"search.points.{i}",
                point,
                f"makes an invalid trial job: {p.key} = {p.value!r}: {p.message}",
                "change this point's values, or remove it",
            )
            for p in validate(raw)
        ]
    return problems


def _did_you_mean(fix: str) -> str:
    """The loader's "did you mean a.b?" for the unknown key, when it found one."""
    if fix.startswith("did you mean"):
        return fix
    return "use a dotted key of the job (as in `orchestrator validate JOB.yaml`)"

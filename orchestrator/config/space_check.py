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
    # The jobs as the search builds them: trials start from the dense baseline (a placeholder
    # path here: where it will be), the baseline is the dense job with its own overrides.
    trials = trial_base(job, search, "baseline/model")
    problems = [
        Problem(f"search.{p.key}", p.value, p.message, p.fix)
        for p in _space_problems(trials, search.space, validate)
    ]
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


def _did_you_mean(fix: str) -> str:
    """The loader's "did you mean a.b?" for the unknown key, when it found one."""
    if fix.startswith("did you mean"):
        return fix
    return "use a dotted key of the job (as in `orchestrator validate JOB.yaml`)"

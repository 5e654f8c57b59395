"""The Pareto front: which trials no other trial beats on every objective at once.

A compression search trades accuracy against size and latency, so there is rarely one best
recipe; the front is the set a person chooses from. Kept free of pyarrow and numpy so the rule
itself is easy to read and to test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MODES = ("max", "min")


def _missing(v: float | None) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    better = False
    for x, y, mode in zip(a, b, modes, strict=True):
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(points: Sequence[Sequence[float | None]], modes: Sequence[str]) -> list[bool]:
    """Non-dominated mask of ``points`` (one row per trial, one column per objective).

    ``modes`` says per column whether bigger ("max") or smaller ("min") is better. Identical
    rows do not dominate each other, so ties are all kept: two recipes with the same accuracy
    and size are both worth showing. A row with a missing (None or NaN) objective is never on
    the front, since it cannot be compared with the others on that objective.
    """
    modes = list(modes)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    for row in points:
        if len(row) != len(modes):
            raise ValueError(f"a point has {len(row)} values for {len(modes)} objectives")
    complete = [i for i, row in enumerate(points) if not any(_missing(v) for v in row)]
    # Objectives as "bigger is better"; a point can only be dominated by one that sorts before
    # it in this lexicographic order, and if it is dominated at all, then by a point of the
    # front found so far (dominance is transitive). So each point is compared with the front
    # only: O(n log n + n * front) instead of every pair, which matters at thousands of trials.
    signs = [1.0 if mode == "max" else -1.0 for mode in modes]
    rows = {i: [s * float(v) for s, v in zip(signs, points[i], strict=True)] for i in complete}
    order = sorted(complete, key=lambda i: rows[i], reverse=True)
    ups = ["max"] * len(modes)
    front: list[int] = []
    for i in order:
        if not any(dominates(rows[j], rows[i], ups) for j in front):
            front.append(i)
    mask = [False] * len(points)
    for i in front:
        mask[i] = True
    return mask

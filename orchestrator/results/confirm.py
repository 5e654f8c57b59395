"""A trial trained again with other seeds, read back for the report and the terminal.

The selection's interval covers the evaluation's sampling noise, not the recipe's own recovery
training, which moves with its seed (near a constraint, by about a point on the quickstart:
benchmarks/BENCHMARKS.md). ``orchestrator confirm`` and ``search.confirm_seeds``
(``orchestrator.search.confirm``) train a trial's own job again with other ``train.seed``
values and record each run's final metrics in ``confirm.json`` of the run directory:

    {"<trial>": {"<seed>": {"status": "done", "metrics": {...}, "wall_s": 312.0, "run": "<dir>"},
                 "<seed>": {"status": "error", "error": "...", "wall_s": 40.0, "run": "<dir>"}}}

Here each run becomes a row of the results table (the same columns, judged by the same rules
as the trials: ``table.build_table``), beside the trial's own run, and ``Confirmation`` counts
the seeds with which the constraint held on validation and on test. The runs' validation
losses are pooled (``stats.pooled_over_seeds``: their mean and a one-sided bound that counts
the seeds' spread besides the evaluation's noise); a trial whose pooled bound (its mean, without
a confidence) breaks the quality constraint is ``confirmed`` false in the results table and
never selected (``table.best_trial``). Test never decides.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config.search import SearchConfig
from orchestrator.results.quality import DEFAULT_CONFIDENCE, Quality, quality_of
from orchestrator.results.table import build_table
from orchestrator.stats import pooled_over_seeds

CONFIRM = "confirm.json"
CONFIRM_DIR = "confirm"  # the runs' own folders: confirm/<trial>-seed<S>


def read_confirm(run_dir: str | Path, notes: list[str] | None = None) -> dict[str, dict]:
    """``confirm.json`` of ``run_dir`` as {trial: {seed (str): run record}}; empty when there is
    none, and when it is unreadable (a line saying so goes to ``notes``)."""
    path = Path(run_dir) / CONFIRM
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        if notes is not None:
            notes.append(f"{CONFIRM} is unreadable ({e}); the runs with other seeds are not shown")
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        trial: {str(s): r for s, r in seeds.items() if isinstance(r, dict)}
        for trial, seeds in raw.items()
        if isinstance(seeds, dict)
    }


@dataclass
class Confirmation:
    """A trial and its runs with other seeds: ``rows`` are results-table rows (``build_table``)
    with a ``seed`` key, the trial's own run first. ``limit``: the quality constraint (None:
    the search sets none); ``confidence``: the search's (None: the point estimate decides)."""

    trial: str
    rows: list[dict[str, Any]]
    quality: Quality
    limit: float | None
    confidence: float | None

    @property
    def done(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "done"]

    def count(self, column: str) -> int:
        return sum(bool(r.get(column)) for r in self.done)

    def pooled(self) -> tuple[float, float] | None:
        """The validation loss over the finished runs and its pooled one-sided bound
        (``stats.pooled_over_seeds``, at the search's confidence, else 95 %); None with fewer
        than two runs that report one."""
        q, level = self.quality, self.confidence or DEFAULT_CONFIDENCE
        pairs = [(q.loss(r, None, "eval")[0], q.bound(r, level)) for r in self.done]
        pairs = [(loss, b) for loss, b in pairs if loss is not None and b is not None]
        if len(pairs) < 2:
            return None
        return pooled_over_seeds([p[0] for p in pairs], [p[1] for p in pairs], level)

    @property
    def held(self) -> bool | None:
        """Whether the recipe is within the quality constraint over its seeds: the pooled
        bound (with a confidence; else the mean loss) at most the limit. None without a
        constraint, while a run failed, or with no other seed's run yet."""
        return self._held(self.pooled())

    def _held(self, pooled: tuple[float, float] | None) -> bool | None:
        if self.limit is None or pooled is None or len(self.done) < len(self.rows):
            return None
        return pooled[1 if self.confidence else 0] <= self.limit + 1e-12

    def text(self) -> str:
        """In words: the seeds; the validation loss over them, its pooled bound and whether
        that is within the constraint; the test loss's mean and range."""
        q, done = self.quality, self.done
        again = ", ".join(str(r["seed"]) for r in self.rows[1:])
        out = (
            f"{self.trial}, trained with seed {self.rows[0]['seed']} in the search and again "
            f"with seed{'s' if len(self.rows) > 2 else ''} {again}"
        )
        failed = len(self.rows) - len(done)
        if failed:
            out += f" ({failed} run{'s' if failed > 1 else ''} failed)"
        pooled = self.pooled()
        if pooled is not None:
            level = self.confidence or DEFAULT_CONFIDENCE
            out += (
                f": validation {q.words} {100 * pooled[0]:+.2f} {q.unit} over the {len(done)} "
                f"runs, pooled one-sided {level:.0%} bound {100 * pooled[1]:+.2f}"
            )
            held = self._held(pooled)
            if held is not None:
                verdict = "within the constraint" if held else "not within the constraint"
                out += f": {verdict} ({self.count('feasible')} of {len(done)} runs alone)"
        losses = [r[f"test_{q.column}"] for r in done if r.get(f"test_{q.column}") is not None]
        if len(losses) > 1:
            out += (
                f"; test {q.held_words} {100 * statistics.mean(losses):+.2f} {q.unit} on "
                f"average ({100 * min(losses):+.2f} to {100 * max(losses):+.2f})"
            )
            if self.limit is not None:
                out += f", within the constraint in {self.count('held_on_test')} of {len(done)}"
        return out


def confirmation(
    record: dict[str, Any],
    seeds: dict[str, dict],
    own_seed: int,
    search: SearchConfig,
    baseline: dict[str, float] | None,
) -> Confirmation:
    """The trial ``record`` (as ``load_trials`` returns it, trained with ``own_seed``) and its
    runs with other ``seeds`` (``read_confirm``'s entry for it), judged as trials are."""
    runs = [{**record, "seed": own_seed}]
    for seed, run in seeds.items():
        done = run.get("status") == "done" and isinstance(run.get("metrics"), dict)
        runs.append(
            {
                "trial": f"{record['trial']}-seed{seed}",
                "seed": int(seed),
                "status": "done" if done else "error",
                "config": record["config"],
                "metrics": run["metrics"] if done else {},
                "error": None if done else str(run.get("error") or "no result recorded"),
                "wall_s": run.get("wall_s"),
            }
        )
    table = build_table(runs, search, baseline)
    by_name = {r["trial"]: r for r in runs}
    rows = [{**row, "seed": by_name[row["trial"]]["seed"]} for row in table.to_pylist()]
    rows.sort(key=lambda r: (r["trial"] != record["trial"], r["seed"]))
    q = quality_of(search)
    return Confirmation(record["trial"], rows, q, q.limit(search), search.constraints.confidence)


def confirmations(
    run_dir: str | Path,
    trials: list[dict[str, Any]],
    own_seed: int,
    search: SearchConfig,
    baseline: dict[str, float] | None,
    notes: list[str] | None = None,
) -> list[Confirmation]:
    """Every trial of ``confirm.json`` that is among ``trials``, in trial order."""
    recorded = read_confirm(run_dir, notes)
    return [
        confirmation(t, recorded[t["trial"]], own_seed, search, baseline)
        for t in sorted(trials, key=lambda t: t["trial"])
        if recorded.get(t["trial"])
    ]

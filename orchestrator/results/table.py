"""The results table: a row per trial of a search run directory (docs/contracts.md, "Run
directory").

The search writes one ``trials/<name>/trial.json`` per trial as the trial's state changes, so
the directory can be read at any time, including while the search runs or after it was killed.
Reading is therefore forgiving: a half-written or garbled file is skipped with a note, never a
crash, because the report is what a person looks at to find out what went wrong.

Infeasible trials stay in the table, marked with the constraints they broke in words: a search
where nothing met the bar is still worth reading, and the reasons say which bar to move.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from orchestrator.config.search import (
    OPTIONAL_SECTIONS,
    TRIAL_METRICS,
    SearchConfig,
    ignored,
    sampled_values,
    switched_off,
)
from orchestrator.results.pareto import pareto_front
from orchestrator.results.quality import (
    confidence_of,
    quality_of,
    quality_of_columns,
)

TRIALS = "trials"
STATUSES = ("done", "running", "stopped", "error")
# The one artifact folder name a trial record may give: export joins it into a path.
ARTIFACT = "model"
ACCURACY = "eval/accuracy"
# Sizes are shown in MB = 10**6 bytes (what disk and download tools print).
MB = 1e6
RANGE_KINDS = ("uniform", "loguniform", "int")


def _number(v: Any) -> float | None:
    """A finite float, or None (bools are not numbers here: they are config switches)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def load_baseline(run_dir: str | Path, notes: list[str] | None = None) -> dict[str, float] | None:
    """The dense model's metrics from ``baseline.json``, or None (with a note) when the search
    stopped before the baseline finished or the file is unreadable."""
    notes = notes if notes is not None else []
    path = Path(run_dir) / "baseline.json"
    if not path.is_file():
        notes.append(
            "no baseline.json: the dense baseline has not finished, so accuracy drops (or "
            "perplexity increases) without paired figures are unknown"
        )
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        notes.append(f"baseline.json is unreadable ({e}); treated as missing")
        return None
    if not isinstance(raw, dict):
        notes.append("baseline.json does not hold a mapping of metrics; treated as missing")
        return None
    return {k: f for k, v in raw.items() if (f := _number(v)) is not None}


def load_trials(run_dir: str | Path, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Every readable trial record under ``run_dir/trials``, sorted by trial name.

    A folder without ``trial.json`` (the trial is being set up), or with one that is not valid
    JSON or not a trial record, is skipped and a line saying so is appended to ``notes``. The
    folder name is the trial's name (export finds the artifact by it); records are normalised
    so later code can rely on every field being there with the right type.
    """
    notes = notes if notes is not None else []
    root = Path(run_dir) / TRIALS
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        path = folder / "trial.json"
        if not path.is_file():
            notes.append(f"trial {folder.name}: no trial.json yet; skipped")
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            notes.append(f"trial {folder.name}: trial.json is unreadable ({e}); skipped")
            continue
        record = normalize_record(folder.name, raw, notes)
        if record is not None:
            out.append(record)
    return out


def normalize_record(name: str, raw: Any, notes: list[str]) -> dict[str, Any] | None:
    """A trial record as ``load_trials`` returns it (every field there, with its type), or
    None with a note when ``raw`` is not a trial record. ``name``: the trial's folder name."""
    if not isinstance(raw, dict) or raw.get("status") not in STATUSES:
        status = raw.get("status") if isinstance(raw, dict) else None
        notes.append(
            f"trial {name}: trial.json is not a trial record (status {status!r}, "
            f"expected one of {', '.join(STATUSES)}); skipped"
        )
        return None
    artifact = raw.get("artifact")
    if artifact not in (None, ARTIFACT):
        notes.append(
            f"trial {name}: trial.json names the artifact {artifact!r}, not the "
            f"folder this tool writes ({ARTIFACT!r}); it is not used"
        )
        artifact = None
    config = raw.get("config") if isinstance(raw.get("config"), dict) else {}
    metrics = raw.get("metrics") if isinstance(raw.get("metrics"), dict) else {}
    record = dict(raw)
    record.update(
        trial=name,
        config=config,
        metrics={k: f for k, v in metrics.items() if (f := _number(v)) is not None},
        error=None if raw.get("error") is None else str(raw["error"]),
        artifact=artifact,
        wall_s=_number(raw.get("wall_s")),
    )
    return record


def effective_config(config: dict[str, Any], search: SearchConfig) -> dict[str, Any]:
    """The trial's sampled values as shown: labels kept (``int8``, ``off``), and keys below a
    section the trial switched off set to None, since the trial ignored them (see
    ``orchestrator.config.search.trial_overrides``)."""
    off = switched_off(search.space, config)
    values = sampled_values(search.space, config)
    return {key: None if ignored(key, off) else values.get(key) for key in search.space}


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.2g}"
    return str(value)


def recipe(config: dict[str, Any]) -> str:
    """A short recipe for a plot label or a table cell: ``sparsity=0.42 quantize=int8``.

    Keys are shortened to their last part and floats to 2 significant digits; a switched-off
    section reads ``factorize=off``, other null keys are left out."""
    parts = []
    for key, value in config.items():
        name = key.rsplit(".", 1)[-1]
        if value is None:
            if key in OPTIONAL_SECTIONS:
                parts.append(f"{name}=off")
            continue
        if isinstance(value, dict):  # a per-layer key: {layer: value}
            parts.append(f"{name}=mean{_short(_mean(value))}/layer")
            continue
        parts.append(f"{name}={_short(value)}")
    return " ".join(parts) or "(no search keys)"


def _mean(layers: dict[str, Any]) -> float:
    """The plain mean of a per-layer key's values (``recipe``, the ``config/`` column)."""
    return sum(float(v) for v in layers.values()) / max(len(layers), 1)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def selection_rule(search: SearchConfig) -> str:
    """In words, when a trial meets the quality constraint (the report states it)."""
    q, c = quality_of(search), search.constraints
    limit = q.limit(search)
    if limit is None:
        return f"no {q.words} constraint"
    bound = f"{limit:g}"
    if c.confidence is None:
        return (
            f"a trial is feasible when its validation {q.words} (point estimate) is at most {bound}"
        )
    return (
        f"a trial is feasible when its paired validation {q.words} is at most {bound} with "
        f"{c.confidence:.0%} confidence (its one-sided {c.confidence:.0%} upper bound, the "
        f"{q.column}_bound column)"
    )


def check_constraints(
    metrics: dict[str, float], search: SearchConfig, baseline: dict[str, float] | None
) -> list[str]:
    """The constraints a trial breaks, each in words (``accuracy drop 0.023 > 0.01``).

    A metric a constraint needs but the trial did not report counts as broken: an unverified
    recipe must not be exported as meeting the bar."""
    c = search.constraints
    q = quality_of(search)
    broken = []

    def need(key: str, label: str) -> float | None:
        v = metrics.get(key)
        if v is None:
            broken.append(f"{label} unknown ({key} not reported)")
        return v

    limit = q.limit(search)
    if limit is not None:
        loss, _, _ = q.loss(metrics, baseline, "eval", confidence_of(search))
        # Fractions, as the constraint is written in the job (0.01 = 1 point, 0.15 = 15 %); a
        # tolerance so that a loss equal to the bound, up to float noise, passes.
        if c.confidence is not None:
            bound = q.bound(metrics, c.confidence)
            if bound is None:
                broken.append(f"{q.words} bound unknown (the trial reported no paired figures)")
            elif bound > limit + 1e-12:
                broken.append(
                    f"{q.words} upper bound {bound:.3g} (one-sided {c.confidence:.0%}) > "
                    f"{_fmt(limit)}"
                )
        elif loss is None:
            broken.append(f"{q.words} unknown (no paired figures and no dense baseline)")
        elif loss > limit + 1e-12:
            broken.append(f"{q.words} {loss:.3g} > {_fmt(limit)}")
    if c.max_size_bytes is not None:
        size = need("compress/size_bytes", "size")
        if size is not None and size > c.max_size_bytes:
            broken.append(f"size {size:,.0f} bytes > {c.max_size_bytes:,.0f} bytes")
    if c.min_size_ratio is not None:
        ratio = size_ratio(metrics, baseline)
        if ratio is None:
            broken.append("size ratio unknown (compress/size_ratio not reported)")
        elif ratio < c.min_size_ratio:
            broken.append(f"size ratio {ratio:.3g}x < {_fmt(c.min_size_ratio)}x")
    if c.max_latency_ms is not None:
        ms = need("perf/latency_ms_b32", "latency")
        if ms is not None and ms > c.max_latency_ms:
            broken.append(f"latency {ms:.3g} ms (batch 32) > {_fmt(c.max_latency_ms)} ms")
    if c.min_speedup is not None:
        speedup = need("perf/speedup", "speedup")
        if speedup is not None and speedup < c.min_speedup:
            broken.append(f"speedup {speedup:.3g}x < {_fmt(c.min_speedup)}x")
    return broken


def size_ratio(metrics: dict[str, float], baseline: dict[str, float] | None) -> float | None:
    """Dense bytes / artifact bytes: reported by the trial, else derived from the dense size."""
    if metrics.get("compress/size_ratio") is not None:
        return metrics["compress/size_ratio"]
    size = metrics.get("compress/size_bytes")
    dense = metrics.get("compress/dense_size_bytes") or (baseline or {}).get("compress/size_bytes")
    return dense / size if size and dense else None


def _config_column(values: list[Any], kind: str) -> pa.Array:
    """float64 for numbers, bool for switches, else strings (labels), so parquet readers get
    sortable numeric columns where the space is numeric."""
    # A per-layer key's column holds the mean of its layers' values (the trial's job.yaml has
    # each layer's).
    values = [_mean(v) if isinstance(v, dict) else v for v in values]
    given = [v for v in values if v is not None]
    if not given:
        return pa.array(values, pa.float64() if kind in RANGE_KINDS else pa.string())
    if all(isinstance(v, bool) for v in given):
        return pa.array(values, pa.bool_())
    if all(_number(v) is not None for v in given):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array([None if v is None else _short(v) for v in values], pa.string())


def metric_keys(trials: list[dict[str, Any]], search: SearchConfig) -> list[str]:
    """Metric columns: every key a trial reported, plus the objectives (so the table always has
    the columns the front is computed on); the order of docs/contracts.md first, then others
    sorted."""
    seen = {k for t in trials for k in t["metrics"]} | {o.metric for o in search.objectives}
    seen.add(search.selection.metric)
    known = [k for k in TRIAL_METRICS if k in seen]
    return known + sorted(seen - set(known))


def build_table(
    trials: list[dict[str, Any]],
    search: SearchConfig,
    baseline: dict[str, float] | None,
    confirmed: dict[str, bool | None] | None = None,
) -> pa.Table:
    """A row per trial (as ``load_trials`` returns them); see the module doc for the rules.

    Columns: ``trial``, ``status``, ``config/<key>`` per space key, ``recipe``, one float64
    column per metric key, the quality's loss (``accuracy_drop`` or ``perplexity_increase``,
    ``quality.Quality``) with its interval for validation and test, ``feasible`` (null unless
    done), ``violations`` (null when none), ``confirmed`` (the argument's verdict by trial:
    whether the trial, trained again with other seeds, is within the quality constraint over
    them, ``results.confirm``; null when it was not trained again), ``pareto``, ``best``,
    ``error``, ``wall_s``."""
    trials = sorted(trials, key=lambda t: t["trial"])
    configs = [effective_config(t["config"], search) for t in trials]
    keys = metric_keys(trials, search)
    columns: dict[str, pa.Array] = {
        "trial": pa.array([t["trial"] for t in trials], pa.string()),
        "status": pa.array([t["status"] for t in trials], pa.string()),
    }
    for key, dist in search.space.items():
        columns[f"config/{key}"] = _config_column([c[key] for c in configs], dist.kind)
    columns["recipe"] = pa.array([recipe(c) for c in configs], pa.string())
    for key in keys:
        columns[key] = pa.array([t["metrics"].get(key) for t in trials], pa.float64())
    level = confidence_of(search)
    q = quality_of(search)
    for prefix, name in (("eval", q.column), ("test", f"test_{q.column}")):
        losses = [q.loss(t["metrics"], baseline, prefix, level) for t in trials]
        for i, suffix in enumerate(("", "_lo", "_hi")):
            columns[name + suffix] = pa.array([d[i] for d in losses], pa.float64())
    if search.constraints.confidence is not None:
        columns[f"{q.column}_bound"] = pa.array(
            [q.bound(t["metrics"], search.constraints.confidence) for t in trials],
            pa.float64(),
        )
    bound = q.limit(search)
    held = [
        None if bound is None or t["status"] != "done" or d is None else d <= bound + 1e-12
        for t, d in zip(trials, columns[f"test_{q.column}"].to_pylist(), strict=True)
    ]
    # Whether the quality constraint also holds on the held-out test split (point estimate):
    # selection saw only validation, so this is the check that the answer generalises.
    columns["held_on_test"] = pa.array(held, pa.bool_())
    feasible: list[bool | None] = []
    violations: list[str | None] = []
    for t in trials:
        if t["status"] != "done":
            feasible.append(None)
            violations.append(None)
            continue
        broken = check_constraints(t["metrics"], search, baseline)
        feasible.append(not broken)
        violations.append("; ".join(broken) or None)
    columns["feasible"] = pa.array(feasible, pa.bool_())
    columns["violations"] = pa.array(violations, pa.string())
    columns["confirmed"] = pa.array([(confirmed or {}).get(t["trial"]) for t in trials], pa.bool_())
    eligible = [i for i, f in enumerate(feasible) if f]
    front = pareto_front(
        [[trials[i]["metrics"].get(o.metric) for o in search.objectives] for i in eligible],
        [o.mode for o in search.objectives],
    )
    on_front = {i for i, keep in zip(eligible, front, strict=True) if keep}
    columns["pareto"] = pa.array([i in on_front for i in range(len(trials))], pa.bool_())
    columns["error"] = pa.array([t["error"] for t in trials], pa.string())
    columns["wall_s"] = pa.array([t["wall_s"] for t in trials], pa.float64())
    table = pa.table(columns)
    best = best_trial(table, search)
    marks = [best is not None and t["trial"] == best["trial"] for t in trials]
    return table.append_column("best", pa.array(marks, pa.bool_()))


def _rank(value: float | None, mode: str) -> tuple[int, float]:
    """Sort key: missing values last, better values first."""
    if value is None or math.isnan(value):
        return (1, 0.0)
    return (0, -value if mode == "max" else value)


def best_trial(table: pa.Table, search: SearchConfig) -> dict[str, Any] | None:
    """The row of the best done, feasible trial on ``search.selection`` (what ``export --best``
    ships), ties broken by the remaining objectives in order, then by name so the pick is
    stable across re-runs of the report; a trial not within the quality constraint over the
    seeds it was trained again with (``confirmed`` false) is passed over. None when no trial is
    feasible."""
    select = search.selection
    others = [o for o in search.objectives if o.metric != select.metric]
    rows = [
        r
        for r in table.to_pylist()
        if r["status"] == "done"
        and r.get("feasible")
        and r.get("confirmed") is not False
        and _number(r.get(select.metric)) is not None
    ]
    if not rows:
        return None

    def key(r: dict[str, Any]) -> tuple:
        ranks = [_rank(r.get(o.metric), o.mode) for o in [select, *others]]
        return (*ranks, r["trial"])

    return min(rows, key=key)


def not_selected_why(row: dict[str, Any], metric: str) -> str:
    """Why a finished trial (a results-table row) was not selected, in words."""
    if row.get("violations"):
        return row["violations"]
    if row.get("confirmed") is False:
        return "not within the constraint over the seeds it was trained again with (confirm.json)"
    return f"no {metric}"


def _cell(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def drop_text(
    drop: float | None,
    lo: float | None = None,
    hi: float | None = None,
    bound: float | None = None,
) -> str:
    """A loss x 100 (an accuracy drop in points, a perplexity increase in %) with its interval
    and, when selection used one, its one-sided upper bound: ``+0.40 [-0.31, +1.12] <= +0.98``."""
    if drop is None:
        return "-"
    text = f"{100 * drop:+.2f}"
    if lo is not None and hi is not None:
        text += f" [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    if bound is not None:
        text += f" <= {100 * bound:+.2f}"
    return text


def row_drop_text(row: dict[str, Any], prefix: str = "") -> str:
    """``drop_text`` of a results-table row (``prefix`` "test_" for the test split)."""
    name = f"{prefix}{quality_of_columns(row).column}"
    return drop_text(
        row.get(name), row.get(f"{name}_lo"), row.get(f"{name}_hi"), row.get(f"{name}_bound")
    )


def held_text(row: dict[str, Any]) -> str:
    """Whether a trial's quality constraint held on the test split, in words."""
    q = quality_of_columns(row)
    loss = f"test {q.held_words} {row_drop_text(row, 'test_')} {q.unit}"
    if row.get("held_on_test") is None:
        return loss
    verdict = "held on test" if row["held_on_test"] else "did not hold on test"
    return f"{verdict} ({loss})"


def format_pareto_table(table: pa.Table, confirmed: Sequence[str] = ()) -> str:
    """The Pareto rows as aligned plain text for the terminal (accuracy drops in points or
    perplexity increases in %, with their intervals), and a line for the best feasible trial
    (or the reason there is none); then ``confirmed``: the trials trained again with other
    seeds, in words (``results.confirm``)."""
    rows = table.to_pylist()
    front = [r for r in rows if r.get("pareto")]
    q = quality_of_columns(table.column_names)
    head = [
        "trial",
        "recipe",
        f"eval {q.abbrev}",
        f"val {q.loss_header} [95 % interval] <= bound",
        f"test {q.loss_header} [95 % interval]",
        "size MB",
        "x smaller",
        q.latency_header,
        "speedup",
    ]
    body = []
    for r in front:
        size = r.get("compress/size_bytes")
        body.append(
            [
                r["trial"],
                r.get("recipe") or "",
                _cell(r.get(q.metric), q.metric_fmt),
                row_drop_text(r),
                row_drop_text(r, "test_"),
                _cell(None if size is None else size / MB, ".3f"),
                _cell(r.get("compress/size_ratio"), ".2f"),
                _cell(r.get(q.latency), ".2f"),
                _cell(r.get("perf/speedup"), ".2f"),
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]

    def line(cells: list[str]) -> str:
        # Text columns (trial, recipe) left-aligned, numbers right-aligned.
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    done = sum(r["status"] == "done" for r in rows)
    out = [f"Pareto front: {len(front)} of {done} finished trials ({len(rows)} in all)"]
    if front:
        out += [line(head), line(["-" * w for w in widths]), *(line(b) for b in body)]
    best = next((r for r in rows if r.get("best")), None)
    if best is not None:
        out.append(f"best feasible trial: {best['trial']} ({best.get('recipe') or ''})")
        out.append(f"  {held_text(best)}")
    elif done:
        out.append("best feasible trial: none (no finished trial met the constraints)")
    else:
        out.append("best feasible trial: none yet (no trial has finished)")
    out += [f"trained again with other seeds: {line}" for line in confirmed]
    return "\n".join(out)

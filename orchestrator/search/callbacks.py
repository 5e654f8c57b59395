"""Driver side of a search: a ``trial.json`` per trial as its state changes, and the report
refreshed as trials finish, so a browser open on report.html follows the search.

The driver's cost per finished trial stays bounded at thousands of trials
(``benchmarks/driver_scale.py``): the records are kept in memory (each trial's file is written,
never read back), and the report, which is rebuilt from every trial so far and takes seconds at
thousands of them (mostly the plot), is rebuilt when a trial ends only if the previous rebuild
ended at least ``REPORT_COST_FACTOR`` times its own duration ago; otherwise at a later step of
Tune's loop. The report path so takes at most about 1 / (1 + factor) of the driver's time, and
a small search, whose trials take minutes, still gets a report after every trial. The driver
writes the final report when the search ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from orchestrator.config.schema import JobSpec
from orchestrator.config.search import SearchConfig, sampled_values
from orchestrator.results.quality import confidence_of, quality_of
from orchestrator.results.table import (
    check_constraints,
    drop_text,
    effective_config,
    load_baseline,
    load_trials,
    normalize_record,
    recipe,
)
from orchestrator.search import space as space_lib
from orchestrator.search.records import (
    ARTIFACT,
    TRIALS,
    error_text,
    numbers,
    write_trial,
)
from orchestrator.search.trial import FIT_S, TRIAL_FN_S
from orchestrator.storage import RunFolder

REPORT_COST_FACTOR = 20.0


def _say(line: str) -> None:
    print(f"[orchestrator] {line}", flush=True)


def started_line(name: str, config: dict[str, Any], search: SearchConfig) -> str:
    return f"trial {name} started: {recipe(effective_config(config, search))}"


def finished_line(
    name: str,
    metrics: dict[str, float],
    search: SearchConfig,
    baseline: dict[str, float] | None,
    progress: str,
) -> str:
    """A finished trial in one line: validation accuracy (or perplexity) with its paired drop
    (or increase), how much smaller and faster, and whether it meets the constraints (else the
    first one it broke)."""
    level = confidence_of(search)
    q = quality_of(search)
    loss, lo, hi = q.loss(metrics, baseline, "eval", level)
    bound = None if search.constraints.confidence is None else q.bound(metrics, level)
    score = metrics.get(q.metric)
    parts = [
        f"trial {name} done {progress}:",
        f"val {q.abbrev} -" if score is None else f"val {q.abbrev} {score:{q.metric_fmt}}",
        f"({q.loss_word} {drop_text(loss, lo, hi, bound)} {q.unit})",
    ]
    for key, word in (("compress/size_ratio", "smaller"), ("perf/speedup", "faster")):
        if metrics.get(key) is not None:
            parts.append(f"| {metrics[key]:.2f}x {word}")
    broken = check_constraints(metrics, search, baseline)
    parts.append("| feasible" if not broken else f"| infeasible: {broken[0]}")
    return " ".join(parts)


class ReportSchedule:
    """When the report is due: something changed since the last rebuild, and the last one
    ended at least ``factor`` times its own duration ago."""

    def __init__(
        self, factor: float = REPORT_COST_FACTOR, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.factor, self.clock = factor, clock
        self.dirty = False
        self.last_end: float | None = None
        self.last_cost = 0.0
        self.rebuilds = 0

    def due(self) -> bool:
        if not self.dirty:
            return False
        return self.last_end is None or self.clock() - self.last_end >= self.factor * self.last_cost

    def run(self, rebuild: Callable[[], Any]) -> None:
        start = self.clock()
        self.dirty = False
        rebuild()
        self.last_end = self.clock()
        self.last_cost = self.last_end - start
        self.rebuilds += 1


def record_trials(run_dir: RunFolder, spec: JobSpec) -> Any:
    """The Tune callback that keeps the records and the report (``TrialRecords``); Ray is
    imported only here, when a search starts."""
    from ray import tune

    class RecordTrials(TrialRecords, tune.Callback):
        pass

    return RecordTrials(run_dir, spec)


class TrialRecords:
    """Tune's trial events -> ``trial.json`` records, a line on the terminal per trial, and the
    report rebuilt on ``ReportSchedule``. The driver is the records' only writer."""

    def __init__(self, run_dir: RunFolder, spec: JobSpec) -> None:
        self.run_dir, self.spec = run_dir, spec
        self.records: dict[str, dict[str, Any]] = {}
        self.schedule = ReportSchedule()
        self.total = space_lib.num_trials(spec.search)
        self.baseline: dict[str, float] | None = None

    def setup(self, **info: Any) -> None:
        # The records of a resumed search's earlier trials, read once when the experiment
        # starts (not when this callback is made: a resumed experiment unpickles the one its
        # first start made); from here on the driver, their only writer, keeps them in memory.
        self.records = {t["trial"]: t for t in load_trials(self.run_dir.local)}

    def _progress(self) -> str:
        ended = sum(r.get("status") != "running" for r in self.records.values())
        return f"({ended} of {self.total})"

    def _record(self, trial: Any, status: str, **extra: Any) -> None:
        name = str(trial)  # the trial_name_creator's name
        old = self.records.get(name, {})
        if old.get("status") == "done":
            return  # finished before a resume: its record stands as it was
        sampled = sampled_values(self.spec.search.space, trial.config)
        record = {
            "trial": name,
            "status": status,
            "config": {k: sampled.get(k) for k in self.spec.search.space},
            "metrics": old.get("metrics", {}),
            "error": None,
            "artifact": None,
            "wall_s": old.get("wall_s"),
            "started": old.get("started", time.time()),
        }
        record.update(extra)
        write_trial(self.run_dir, record)
        self.records[name] = record

    def _wall(self, name: str) -> float:
        return time.time() - self.records.get(name, {}).get("started", time.time())

    def _report(self) -> None:
        from orchestrator.results import write_run_report

        notes: list[str] = []
        trials = [normalize_record(n, r, notes) for n, r in sorted(self.records.items())]
        write_run_report(
            self.run_dir, running=True, spec=self.spec, trials=[t for t in trials if t is not None]
        )

    def _trial_ended(self) -> None:
        self.schedule.dirty = True
        if self.schedule.due():
            self.schedule.run(self._report)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.schedule.due():
            self.schedule.run(self._report)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.records.get(str(trial), {}).get("status") != "done":
            _say(started_line(str(trial), trial.config, self.spec.search))
        self._record(trial, "running", started=time.time())

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self._record(trial, "running", metrics=numbers(result))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = str(trial)
        rel = f"{TRIALS}/{name}"
        wall = self._wall(name)
        # Written by the trial, maybe on another node (the report reads the selected trial's
        # compress report for its allocation heatmap).
        self.run_dir.pull(f"{rel}/metrics.json")
        self.run_dir.pull(f"{rel}/compress_report.json")
        final = self.run_dir.local / rel / "metrics.json"
        if final.is_file() and self.run_dir.exists(f"{rel}/{ARTIFACT}"):
            _say(self._done(trial, json.loads(final.read_text()), wall))
        else:
            # Ended without its final artifact: the scheduler stopped it early.
            last = numbers(trial.last_result or {})
            self._record(trial, "stopped", metrics=last, wall_s=wall)
            step = last.get("train/step")
            at = "" if step is None else f" at step {step:.0f}"
            _say(f"trial {name} stopped early by the scheduler{at} {self._progress()}")
        self._trial_ended()

    def _done(self, trial: Any, final: dict[str, Any], wall: float) -> str:
        """Record a trial that finished with its artifact; its line for the terminal."""
        metrics = numbers(final)
        last = trial.last_result or {}
        metrics.update({k: float(last[k]) for k in (FIT_S, TRIAL_FN_S) if k in last})
        self._record(trial, "done", metrics=metrics, artifact=ARTIFACT, wall_s=wall)
        if self.baseline is None:  # written before the first trial started
            self.baseline = load_baseline(self.run_dir.local)
        search = self.spec.search
        return finished_line(str(trial), metrics, search, self.baseline, self._progress())

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        wall = self._wall(str(trial))
        error = error_text(trial)
        self._record(trial, "error", error=error, wall_s=wall)
        last = error.strip().splitlines()[-1] if error.strip() else "see the log above"
        _say(f"trial {trial} failed {self._progress()}: {last}")
        self._trial_ended()

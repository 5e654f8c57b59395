"""Driver side of a search: a ``trial.json`` per trial as its state changes, and the report
refreshed after each finished trial, so a browser open on report.html follows the search."""

from __future__ import annotations

import json
import time
from typing import Any

from orchestrator.config.schema import JobSpec
from orchestrator.search.records import (
    ARTIFACT,
    TRIALS,
    error_text,
    numbers,
    read_trial,
    write_trial,
)
from orchestrator.search.trial import FIT_S, TRIAL_FN_S
from orchestrator.storage import RunFolder


def record_trials(run_dir: RunFolder, spec: JobSpec) -> Any:
    """The Tune callback that keeps the records and the report."""
    from ray import tune

    from orchestrator.results import write_run_report

    keys = list(spec.search.space)

    class RecordTrials(tune.Callback):
        def _record(self, trial: Any, status: str, **extra: Any) -> None:
            name = str(trial)  # the trial_name_creator's name
            old = read_trial(run_dir, name) or {}
            if old.get("status") == "done":
                return  # finished before a resume: its record stands as it was
            record = {
                "trial": name,
                "status": status,
                "config": {k: trial.config.get(k) for k in keys},
                "metrics": old.get("metrics", {}),
                "error": None,
                "artifact": None,
                "wall_s": old.get("wall_s"),
                "started": old.get("started", time.time()),
            }
            record.update(extra)
            write_trial(run_dir, record)

        def _wall(self, name: str) -> float:
            old = read_trial(run_dir, name) or {}
            return time.time() - old.get("started", time.time())

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._record(trial, "running", started=time.time())

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            self._record(trial, "running", metrics=numbers(result))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name = str(trial)
            rel = f"{TRIALS}/{name}"
            wall = self._wall(name)
            run_dir.pull(f"{rel}/metrics.json")  # written by the trial, maybe on another node
            final = run_dir.local / rel / "metrics.json"
            if final.is_file() and run_dir.exists(f"{rel}/{ARTIFACT}"):
                metrics = numbers(json.loads(final.read_text()))
                last = trial.last_result or {}
                metrics.update({k: float(last[k]) for k in (FIT_S, TRIAL_FN_S) if k in last})
                self._record(trial, "done", metrics=metrics, artifact=ARTIFACT, wall_s=wall)
            else:
                # Ended without its final artifact: the scheduler stopped it early.
                self._record(
                    trial, "stopped", metrics=numbers(trial.last_result or {}), wall_s=wall
                )
            write_run_report(run_dir, running=True, spec=spec)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            wall = self._wall(str(trial))
            self._record(trial, "error", error=error_text(trial), wall_s=wall)
            write_run_report(run_dir, running=True, spec=spec)

    return RecordTrials()

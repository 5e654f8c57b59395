"""Train a trial's recipe again with other seeds: ``search.confirm_seeds`` (the selected trial,
after the search) and ``orchestrator confirm RUN_DIR --seeds ...`` (any finished trial, after).

Each seed is one Ray Train run of the trial's own ``job.yaml`` with ``train.seed`` changed,
exactly as ``orchestrator train`` runs it, in ``<run>/confirm/<trial>-seed<S>``: the same
compression, recovery, artifact and measurements, paired with the same dense model. Its final
metrics go to ``confirm.json`` (``results.confirm``) as soon as it ends, so an interrupted
confirmation picks up where it stopped: a seed already measured is not trained again, one cut
short resumes from its last checkpoint (Ray Train's, under its run folder).
"""

from __future__ import annotations

import json
import time
from typing import Any

from orchestrator import launch
from orchestrator.config.loader import read_yaml, validate_job
from orchestrator.config.schema import JobSpec
from orchestrator.config.search import confirm_seeds_problem
from orchestrator.errors import ConfigError, Problem, RunError
from orchestrator.results.confirm import CONFIRM, CONFIRM_DIR, read_confirm
from orchestrator.results.table import TRIALS
from orchestrator.search.records import numbers
from orchestrator.storage import RunFolder


def seed_job(folder: RunFolder, trial: str, seed: int) -> JobSpec:
    """The trial's own job with ``train.seed`` = ``seed``, in its own run folder under
    ``confirm/``."""
    folder.pull(f"{TRIALS}/{trial}/job.yaml")
    raw = read_yaml(folder.local / TRIALS / trial / "job.yaml")
    raw.setdefault("train", {})["seed"] = seed
    raw["name"] = f"{trial}-seed{seed}"
    raw.setdefault("output", {})["dir"] = folder.uri(CONFIRM_DIR)
    return validate_job(raw, source=f"trial {trial} with train.seed={seed}")


def confirm_trial(
    folder: RunFolder, trial: str, seeds: list[int], address: str | None = None
) -> dict[str, dict[str, Any]]:
    """Train ``trial`` again with each of ``seeds`` that ``confirm.json`` does not hold
    measured yet; returns the trial's entry of ``confirm.json``. A run that fails is recorded
    as failed (its error) and the next seed goes on; a failed seed is tried again by the next
    confirmation (it resumes from its checkpoint)."""
    records = read_confirm(folder.local)
    mine = records.setdefault(trial, {})
    todo = [s for s in seeds if mine.get(str(s), {}).get("status") != "done"]
    if len(todo) < len(seeds):
        done = [str(s) for s in seeds if s not in todo]
        _say(f"{trial}: seed(s) {', '.join(done)} already measured ({folder.uri(CONFIRM)})")
    for i, seed in enumerate(todo, 1):
        spec = seed_job(folder, trial, seed)
        run = launch.run_dir(launch.resolve_paths(spec))
        _say(f"confirming {trial}: trained again with train.seed={seed} ({i} of {len(todo)})")
        start = time.perf_counter()
        try:
            metrics = launch.train(spec, address)
        except RunError as e:
            mine[str(seed)] = {"status": "error", "error": str(e)}
            _say(f"{trial} with train.seed={seed} failed: {e}")
        else:
            mine[str(seed)] = {"status": "done", "metrics": numbers(metrics)}
        mine[str(seed)].update(wall_s=time.perf_counter() - start, run=str(run))
        folder.write_text(CONFIRM, json.dumps(records, indent=2, sort_keys=True))
    return mine


def confirm_command(
    folder: RunFolder, trial: str | None, seeds: list[int], address: str | None = None
) -> tuple[list[str], JobSpec]:
    """``orchestrator confirm``: check the run, the trial (default: the selected one; it must
    have finished) and the seeds before Ray starts, then ``confirm_trial``. Returns the seeds
    whose run failed, and the run's job (read and checked once, for its report)."""
    from orchestrator.results import read_run
    from orchestrator.results.export import finished_trial

    run = read_run(folder.local)
    name, _ = finished_trial(run, trial, "confirm", "so there is no result to compare with")
    found = confirm_seeds_problem(seeds, run.spec.train.seed)
    if found:
        why, others = found
        fix = f"give other seeds, each once, e.g. --seeds {' '.join(map(str, others))}"
        raise _error("--seeds", seeds, why, fix)
    runs = confirm_trial(folder, name, seeds, address)
    return [str(s) for s in seeds if runs[str(s)]["status"] != "done"], run.spec


def _error(key: str, value: Any, message: str, fix: str) -> ConfigError:
    return ConfigError(Problem(key, value, message, fix), source="confirm")


def _say(line: str) -> None:
    print(f"[orchestrator] {line}", flush=True)

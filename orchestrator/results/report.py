"""``orchestrator report RUN_DIR``: read a search's run directory and (re)write its results.

Called by the search driver after each finished trial (``running=True``, so an open browser
follows the search) and by the CLI on a finished or interrupted run. Every file is written to
a temporary name in the same folder and renamed, so a reader (a browser reloading, a script
reading the parquet) never sees half a file, and a crash leaves the previous version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.config.loader import read_yaml, validate_job
from orchestrator.config.schema import JobSpec
from orchestrator.config.search import SearchConfig
from orchestrator.errors import ConfigError, Problem
from orchestrator.files import write_atomic
from orchestrator.results.confirm import Confirmation, confirmations
from orchestrator.results.html import render_html, status_counts
from orchestrator.results.plot import render_pareto_png, render_sensitivity_png
from orchestrator.results.table import best_trial, build_table, load_baseline, load_trials
from orchestrator.storage import RunFolder

RESULTS = "results.parquet"
PARETO = "pareto.parquet"
PLOT = "pareto.png"
HTML = "report.html"
OUTPUTS = (RESULTS, PARETO, PLOT, HTML)


@dataclass
class RunData:
    """What a run directory holds, read once: the job, the baseline, the trials and notes on
    anything that could not be read."""

    run_dir: Path
    spec: JobSpec
    search: SearchConfig
    job_yaml: str
    baseline: dict[str, float] | None
    trials: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportSummary:
    """What ``write_report`` found and wrote (the CLI prints it; the search driver logs it)."""

    counts: dict[str, int]
    n_pareto: int
    best: str | None
    notes: list[str]
    paths: list[Path]
    confirmed: list[str] = field(default_factory=list)  # trials trained with other seeds

    @property
    def n_trials(self) -> int:
        return sum(self.counts.values())


def _run_dir_error(run_dir: Path, message: str, fix: str) -> ConfigError:
    return ConfigError(Problem("RUN_DIR", str(run_dir), message, fix), source="run directory")


def allocations_in(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-layer allocations (sparsity, rank, bit widths: ``setting``, ``choice``, ``mean``,
    ``profile``) among a compress report's ``steps``, in stage order."""
    return [s["entry"]["allocation"] for s in steps if "allocation" in s["entry"]]


def allocations_of(folder: Path) -> list[dict[str, Any]]:
    """``allocations_in`` of the ``compress_report.json`` in ``folder``; none also when there
    is no readable report."""
    try:
        return allocations_in(json.loads((folder / "compress_report.json").read_text())["steps"])
    except (OSError, ValueError, TypeError, KeyError):
        return []


def read_run(
    run_dir: str | Path,
    spec: JobSpec | None = None,
    trials: list[dict[str, Any]] | None = None,
) -> RunData:
    """Read and validate a search run directory; raises ``ConfigError`` naming RUN_DIR when it
    is not one (no folder, no job.yaml, a job without a search section). ``spec``: the job the
    directory's job.yaml holds, when the caller (the search driver) has it validated already;
    validating a job checks every combination of its search space, once is enough.
    ``trials``: the trial records, when the caller (the search driver) holds them in memory
    already, as ``load_trials`` returns them; else they are read from the directory."""
    run_dir = Path(run_dir)
    fix = "pass the run directory of a search: <output.dir>/<job name>, which holds job.yaml"
    if not run_dir.is_dir():
        raise _run_dir_error(run_dir, "no such directory", fix)
    job_path = run_dir / "job.yaml"
    if not job_path.is_file():
        raise _run_dir_error(run_dir, "holds no job.yaml, so it is not a run directory", fix)
    if spec is None:
        spec = validate_job(read_yaml(job_path), source=str(job_path))
    if spec.search is None:
        raise _run_dir_error(
            run_dir,
            "holds a job without a search section; report and export read search runs",
            "run `orchestrator search JOB.yaml` (the job needs a search: section) and pass "
            "its run directory",
        )
    notes: list[str] = []
    baseline = load_baseline(run_dir, notes)
    if trials is None:
        trials = load_trials(run_dir, notes)
    text = job_path.read_text(encoding="utf-8")
    return RunData(run_dir, spec, spec.search, text, baseline, trials, notes)


def run_table(run: RunData, notes: list[str] | None = None) -> tuple[pa.Table, list[Confirmation]]:
    """The results table of ``run`` (``build_table``), with what the trials trained again with
    other seeds say (``results.confirm``; a trial that broke the constraints with one is not
    selected), and those trials."""
    confirmed = confirmations(
        run.run_dir, run.trials, run.spec.train.seed, run.search, run.baseline, notes
    )
    verdicts = {c.trial: c.held for c in confirmed}
    return build_table(run.trials, run.search, run.baseline, verdicts), confirmed


def _write_bytes(path: Path, data: bytes) -> None:
    write_atomic(path, data)


def _write_parquet(path: Path, table: pa.Table) -> None:
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def write_report(
    run_dir: str | Path,
    running: bool = False,
    spec: JobSpec | None = None,
    location: str | None = None,
    trials: list[dict[str, Any]] | None = None,
) -> ReportSummary:
    """Write ``results.parquet``, ``pareto.parquet``, ``pareto.png`` and ``report.html``.

    ``running=True`` (the search driver) makes the page reload itself every few seconds. A
    partial run (trials running, failed or stopped, no baseline yet) still gets a full report
    that says what is missing; only a directory that is not a search run is an error, and then
    nothing is written. ``spec``: see ``read_run``. ``location``: the run's storage URI when
    ``run_dir`` is this machine's mirror of it (the page names it, and the export command).
    ``trials``: see ``read_run``."""
    run = read_run(run_dir, spec, trials)
    search = run.search
    notes = list(run.notes)
    table, confirmed = run_table(run, notes)
    best = best_trial(table, search)
    front = table.filter(table.column("pareto"))
    png = render_pareto_png(table, run.baseline, title=f"{run.spec.name}: compression search")
    allocations = [] if best is None else allocations_of(run.run_dir / "trials" / best["trial"])
    counts = status_counts(table)
    if counts["done"] and best is None:
        notes.append("no finished trial met the constraints; see the violations column")
    page = render_html(
        job_name=run.spec.name,
        job_yaml=run.job_yaml,
        run_dir=location or run.run_dir,
        search=search,
        table=table,
        baseline=run.baseline,
        png=png,
        sensitivity_png=render_sensitivity_png(allocations) if allocations else None,
        best=best,
        notes=notes,
        running=running,
        confirmed=confirmed,
    )
    paths = [run.run_dir / name for name in OUTPUTS]
    _write_parquet(paths[0], table)
    _write_parquet(paths[1], front)
    _write_bytes(paths[2], png)
    _write_bytes(paths[3], page.encode("utf-8"))
    return ReportSummary(
        counts=counts,
        n_pareto=front.num_rows,
        best=None if best is None else best["trial"],
        notes=notes,
        paths=paths,
        confirmed=[c.text() for c in confirmed],
    )


def write_run_report(
    folder: RunFolder,
    running: bool = False,
    spec: JobSpec | None = None,
    trials: list[dict[str, Any]] | None = None,
) -> ReportSummary:
    """``write_report`` for a run folder: written in its folder (this machine's mirror when the
    run is in storage, the page then naming the URI) and copied to storage."""
    location = folder.location if folder.remote else None
    summary = write_report(
        folder.local, running=running, spec=spec, location=location, trials=trials
    )
    folder.push(*OUTPUTS)
    return summary

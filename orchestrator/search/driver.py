"""``orchestrator search``: the driver. It validates the job, trains (or evaluates) the dense
baseline once, then runs a Ray Tune experiment whose trials (``trial.train_driver_fn``) each
compress, recover, evaluate and measure one recipe; ``callbacks`` records every trial and
refreshes the report as trials finish."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import launch, loop
from orchestrator.config.loader import dump_job
from orchestrator.config.schema import JobSpec
from orchestrator.config.search import trial_base
from orchestrator.errors import ConfigError, Problem, RunError
from orchestrator.search import space as space_lib
from orchestrator.search import tracking
from orchestrator.search.baseline import run_baseline
from orchestrator.search.callbacks import record_trials
from orchestrator.search.confirm import confirm_trial
from orchestrator.search.names import TrialNamer
from orchestrator.search.records import TRIALS, check_records, read_trial, write_trial
from orchestrator.search.snapshot import reconcile
from orchestrator.search.trial import train_driver_fn
from orchestrator.storage import RunFolder, StorageError, unreachable

if TYPE_CHECKING:
    from orchestrator.results.report import ReportSummary

TUNE_NAME = "tune"  # Tune's experiment folder inside the run directory (restore finds it by name)
# What a trial's function needs besides its CPUs: the trial process itself mostly waits on its
# Train run. Tune rejects a trainable that asks for nothing, and a fraction of a CPU would make
# a 2-worker x 1-CPU trial need 2.01 CPUs on a 2-CPU laptop, so it reserves memory instead.
TRIAL_DRIVER_MEMORY = 256 * 2**20
# Searches of at most this many trials snapshot Tune's experiment state at every step.
SNAPSHOT_EVERY_STEP_UP_TO = 50


def _no_search(spec: JobSpec) -> ConfigError:
    return ConfigError(
        Problem(
            "search",
            None,
            "the job has no search section: nothing to search",
            "add search.space (e.g. compress.prune.sparsity: {uniform: [0.2, 0.7]}), or "
            "run `orchestrator train` for a single recipe",
        )
    )


def check_search_dir(spec: JobSpec, resume: bool) -> None:
    """Before anything starts: the same search again needs ``--resume`` (a finished or
    interrupted search is never silently mixed with a new one); a different job is refused;
    a folder to resume must hold records as this tool writes them."""
    from ray import tune

    folder = launch.run_dir(spec)
    saved = folder.local / "job.yaml"
    if saved.is_file() and saved.read_text() != dump_job(spec):
        launch.claim_run_dir(spec)  # raises: a different job under the same name
    started = folder.exists(TUNE_NAME) and tune.Tuner.can_restore(folder.uri(TUNE_NAME))
    if (started or (folder.local / "baseline.json").is_file()) and not resume:
        raise ConfigError(
            Problem(
                "name",
                spec.name,
                f"{folder} already holds this search",
                "add --resume to continue it (finished trials are kept), or choose another "
                f"name (name={spec.name}-2)",
            )
        )
    if resume:
        check_records(folder)


def build_tuner(
    spec: JobSpec,
    folder: RunFolder,
    parallel: int,
    total_steps: int,
    resume: bool,
    verbose: bool = False,
    extra_callbacks: list[Any] | None = None,
    layers: dict[str, list[str]] | None = None,
    points: list[dict[str, Any]] | None = None,
) -> Any:
    """The Tune experiment: a new one, or the interrupted one restored (``--resume``).
    ``verbose``: Tune's own trial table every 30 s besides the driver's line per trial.
    ``extra_callbacks``: trackers' Tune callbacks (a restored experiment keeps those of its
    first start: Tune saved them with it); ``layers``: the layers of each per-layer space key
    (``_per_layer_targets``); ``points``: configs the searcher tries first."""
    from ray import tune

    search = spec.search
    trainable = tune.with_resources(
        tune.with_parameters(
            train_driver_fn,
            # Every trial starts from the fine-tuned dense model, not the raw pretrained one.
            base=trial_base(spec.model_dump(mode="json"), search, folder.uri("baseline", "model")),
            search=search.model_dump(mode="json"),
            run_dir=folder.location,
        ),
        {"memory": TRIAL_DRIVER_MEMORY},
    )
    experiment = folder.uri(TUNE_NAME)
    if resume and folder.exists(TUNE_NAME) and tune.Tuner.can_restore(experiment):
        print(f"[orchestrator] resuming the search in {experiment}", flush=True)
        for note in reconcile(experiment, search, parallel):
            print(f"[orchestrator] snapshot of the killed driver: {note}", flush=True)
        return tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    namer = TrialNamer(folder, search)
    return tune.Tuner(
        trainable,
        param_space=space_lib.param_space(search, layers),
        tune_config=tune.TuneConfig(
            search_alg=space_lib.searcher(search, parallel, points),
            scheduler=space_lib.scheduler(search, total_steps, spec.train.eval_every),
            num_samples=search.samples,
            max_concurrent_trials=parallel,
            time_budget_s=search.time_budget_s,
            trial_name_creator=namer,
            trial_dirname_creator=namer,
            # One trial process serves trial after trial: no process start-up and imports per
            # trial (the Train workers themselves are new for every trial). Not with early
            # stopping: a stopped trial's process is killed with its Train run.
            reuse_actors=search.scheduler == "none",
        ),
        # Tune's strict check rejects any result without the searcher's metrics; trials forward
        # only results that hold them (trial.forward_progress).
        run_config=tune.RunConfig(
            name=TUNE_NAME,
            storage_path=folder.location,  # a URI too: Tune keeps its experiment state there
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            callbacks=[record_trials(folder, spec), *(extra_callbacks or [])],
            progress_reporter=tune.CLIReporter(
                metric_columns=[o.metric for o in search.objectives],
                parameter_columns=list(search.space),
                max_report_frequency=30,
            )
            if verbose
            else None,
            verbose=1 if verbose else 0,
        ),
    )


def search(
    spec: JobSpec, address: str | None = None, resume: bool = False, verbose: bool = False
) -> ReportSummary:
    """Run (or resume) the search of ``spec``; returns the report's summary. The terminal gets
    a line per started and finished trial (``verbose``: Tune's trial table too)."""
    if spec.search is None:
        raise _no_search(spec)
    # Tune's classic progress table honours the columns below (its newer one ignores them).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Snapshot the experiment at every step of Tune's loop instead of Tune's adaptive period
    # (10 s or more). Tune copies each snapshot to the run folder in the background, so a driver
    # killed within moments of starting a trial may still lose it: that trial is marked
    # interrupted (close_lost_trials) and its recipe drawn again, never a finished one rerun
    # (its trial function hands Tune the saved result), and a copy torn between the trial list
    # and the searcher is made whole on --resume (snapshot.reconcile). The snapshot holds every
    # trial (about 50 kB each with the debug search's results), so a large search keeps Tune's
    # period: a driver killed there may lose the trials started in its last seconds.
    if space_lib.num_trials(spec.search) <= SNAPSHOT_EVERY_STEP_UP_TO:
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    from orchestrator.results import write_run_report

    # Everything that can be checked before Ray starts, then Ray, then the run folder.
    spec = launch.resolve_paths(spec)
    folder = launch.run_dir(spec)
    try:
        folder.pull_records()  # a run in storage: this machine's mirror starts from it
    except StorageError as e:
        raise unreachable("output.dir", spec.output.dir, e) from None
    check_search_dir(spec, resume)
    tracking.check(spec)
    tokenizer, bundle = launch.preflight(spec)
    layers = _per_layer_targets(spec, tokenizer, bundle)
    launch.connect_ray(spec, address)
    launch.check_capacity(spec)
    launch.claim_run_dir(spec)
    tracker = _start_tracker(spec, folder)  # the search run shows in MLflow from the start
    try:
        run_baseline(spec, folder, address)
    except BaseException as e:
        if tracker:
            tracker.finish(None, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise

    t = spec.train
    _, total_steps = loop.plan_steps(t, bundle, t.num_workers)
    cluster = launch.cluster_capacity()
    need_cpu = t.num_workers * spec.resources.cpus_per_worker
    need_gpu = t.num_workers * spec.resources.gpus_per_worker
    parallel = space_lib.concurrency(spec.search, cluster, need_cpu, need_gpu)
    print(
        f"[orchestrator] search {folder} | {space_lib.num_trials(spec.search)} trials, "
        f"{parallel} at a time ({t.num_workers} x {t.strategy} workers each, {need_cpu:g} CPUs "
        f"of {cluster.get('CPU', 0):g}) | objectives "
        + ", ".join(f"{o.mode} {o.metric}" for o in spec.search.objectives),
        flush=True,
    )
    callbacks = [tracker.callback()] if tracker else []
    points = None
    if not (resume and folder.exists(TUNE_NAME)):  # a resumed searcher keeps its own
        points = _starting_points(spec, folder, layers, tokenizer, bundle)
    tuner = build_tuner(
        spec, folder, parallel, total_steps, resume, verbose, callbacks, layers, points
    )
    try:
        grid = tuner.fit()
    except Exception as e:  # Tune raises on driver-side failures (trial errors are recorded)
        write_run_report(folder, running=False, spec=spec)
        if tracker:
            tracker.finish(None, "FAILED")
        raise RunError(f"the search failed: {e}\n{traceback.format_exc(limit=3)}") from e
    close_lost_trials(folder, {Path(r.path).name for r in grid if r.path})
    summary = write_run_report(folder, running=False, spec=spec)
    print(pareto_text(folder.local, summary))
    if spec.search.confirm_seeds:
        summary = _confirm_selected(spec, folder, summary, address)
    all_failed = bool(summary.counts["error"] and not summary.counts["done"])
    if tracker:
        tracker.finish(summary, "FAILED" if all_failed else "FINISHED")
    if all_failed:
        # Nothing to choose from: a failed run, not a search that found nothing feasible.
        records = [read_trial(folder, n) for n in sorted(_trial_names(folder))]
        errors = [r["error"] for r in records if r and r.get("status") == "error" and r["error"]]
        error = errors[0] if errors else "see the log above"
        raise RunError(
            f"every trial of the search failed ({summary.counts['error']} of "
            f"{summary.n_trials}); the first error:\n{error}\nreport: {folder.uri('report.html')}"
        )
    return summary


def _per_layer_targets(spec: JobSpec, tokenizer: Any, bundle: Any) -> dict[str, list[str]]:
    """The layers of each per-layer key of the space (none without one), read from the dense
    model before Ray starts: a pattern or a section that selects none fails here, exit 2."""
    if not any(d.per_layer for d in spec.search.space.values()):
        return {}
    from orchestrator import models

    model = models.build_model(spec.model, bundle.num_labels, tokenizer)
    return space_lib.per_layer_targets(spec.model_dump(mode="json"), spec.search, model)


def _starting_points(
    spec: JobSpec, folder: RunFolder, layers: dict[str, list[str]], tokenizer: Any, bundle: Any
) -> list[dict[str, Any]]:
    """What the searcher tries first: the job's ``search.points``, then the per-layer
    allocations (``allocations`` on a per-layer key), measured on the dense baseline the
    trials start from."""
    points = space_lib.starting_points(spec.search, layers)
    if points:
        print(
            f"[orchestrator] the searcher starts from the job's {len(points)} recipe(s) in "
            "search.points",
            flush=True,
        )
    keys = [k for k, d in spec.search.space.items() if d.per_layer and d.allocations]
    if not keys:
        return points
    start = time.perf_counter()
    base = trial_base(spec.model_dump(mode="json"), spec.search, folder.uri("baseline", "model"))
    allocated = space_lib.allocation_points(base, spec.search, layers, bundle, tokenizer)
    print(
        f"[orchestrator] the searcher starts from {len(allocated)} per-layer allocations of "
        f"{', '.join(keys)}, measured on the dense model in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    return points + allocated


def _confirm_selected(
    spec: JobSpec, folder: RunFolder, summary: ReportSummary, address: str | None
) -> ReportSummary:
    """``search.confirm_seeds``: the selected trial trained again with each seed; when it is
    not within the constraint over them, the report selects the next trial, which is trained
    again in turn, up to ``search.confirm_candidates`` trials (``search.confirm``)."""
    from orchestrator.results import write_run_report

    search = spec.search
    shown = summary.confirmed  # already printed under the Pareto table (a resumed search)
    tried: list[str] = []
    while (
        summary.best is not None
        and summary.best not in tried
        and len(tried) < search.confirm_candidates
    ):
        tried.append(summary.best)
        confirm_trial(folder, summary.best, search.confirm_seeds, address)
        summary = write_run_report(folder, running=False, spec=spec)
    for line in summary.confirmed:
        if line not in shown:
            print(f"trained again with other seeds: {line}")
    if summary.best is None:
        why = "no trial is feasible" if not tried else "none trained again held over its seeds"
        print(f"[orchestrator] search.confirm_seeds: no trial is selected ({why})")
    elif summary.best not in tried:
        print(
            f"[orchestrator] selected: {summary.best}, not trained with other seeds: the "
            f"{len(tried)} selected before it were not within the constraint over their seeds "
            f"(search.confirm_candidates={search.confirm_candidates})"
        )
    return summary


def _start_tracker(spec: JobSpec, folder: RunFolder) -> tracking.Tracker | None:
    """The MLflow search run, when the job asks for one; None, after a warning, when MLflow
    fails here, after the check before the search (the search goes on without it)."""
    if spec.tracking.mlflow is None:
        return None
    tracker = tracking.Tracker(spec, folder)
    try:
        tracker.start()
    except Exception as e:
        tracker.warn("creating the search run", e)
        return None
    return tracker


def _trial_names(folder: RunFolder) -> list[str]:
    return [p.parent.name for p in (folder.local / TRIALS).glob("*/trial.json")]


def close_lost_trials(folder: RunFolder, known: set[str]) -> None:
    """A trial the driver started just before it was killed, after Tune's last snapshot of the
    experiment, is unknown to the resumed experiment: mark its record instead of leaving it
    "running" forever (Tune drew its recipe again as a new trial)."""
    for path in (folder.local / TRIALS).glob("*/trial.json"):
        record = read_trial(folder, path.parent.name)
        if record and record["status"] == "running" and record["trial"] not in known:
            record.update(
                status="error",
                error="interrupted: the driver stopped before Ray Tune recorded this trial; "
                "the resumed search did not continue it",
            )
            write_trial(folder, record)


def pareto_text(folder: Path, summary: ReportSummary) -> str:
    """The Pareto table for the terminal, from the results table just written, and the
    trials trained again with other seeds (``summary``)."""
    import pyarrow.parquet as pq

    from orchestrator.results import format_pareto_table

    return format_pareto_table(pq.read_table(folder / "results.parquet"), summary.confirmed)

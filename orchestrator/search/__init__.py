"""``orchestrator search``: Ray Tune over compression recipes (DESIGN.md 2).

The driver validates the job, trains (or evaluates) the dense baseline once, then runs a Tune
experiment whose function trainable, ``train_driver_fn``, builds one trial job from the sampled
dotted keys and fits one multi-worker ``TorchTrainer`` for it (Ray Train V2: the trainer is fitted
inside the Tune function, never passed to the ``Tuner``). Each trial compresses, recovers,
evaluates and measures its artifact; a driver-side callback records every trial under
``trials/<name>/trial.json`` and refreshes the report as trials finish.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import launch, loop
from orchestrator.config.loader import apply_overrides, dump_job, validate_job
from orchestrator.config.schema import JobSpec
from orchestrator.config.search import SearchConfig, ignored, switched_off
from orchestrator.errors import ConfigError, Problem, RunError
from orchestrator.search import space as space_lib
from orchestrator.storage import RunFolder, StorageError, join, unreachable

if TYPE_CHECKING:
    from orchestrator.results.report import ReportSummary

TUNE_NAME = "tune"  # Tune's experiment folder inside the run directory (restore finds it by name)
TRIALS = "trials"
# What a trial's function needs besides its CPUs: the trial process itself mostly waits on its
# Train run. Tune rejects a trainable that asks for nothing, and a fraction of a CPU would make
# a 2-worker x 1-CPU trial need 2.01 CPUs on a 2-CPU laptop, so it reserves memory instead.
TRIAL_DRIVER_MEMORY = 256 * 2**20


# A finished trial's timing, measured by its trial function: the Train run's fit() and the
# whole function. Added to the driver's record of the trial (not to the trial's metrics.json).
FIT_S = "time/fit_s"
TRIAL_FN_S = "time/trial_fn_s"


def write_trial(run_dir: RunFolder, record: dict[str, Any]) -> None:
    rel = f"{TRIALS}/{record['trial']}/trial.json"
    run_dir.write_text(rel, json.dumps(record, indent=2, sort_keys=True))


def read_trial(run_dir: RunFolder, name: str) -> dict[str, Any] | None:
    """The driver's record of a trial (the driver alone writes it: its mirror is current)."""
    path = run_dir.local / TRIALS / name / "trial.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_driver_fn(
    config: dict[str, Any], *, base: dict[str, Any], search: dict[str, Any], run_dir: str
) -> None:
    """One trial (a Tune function trainable): build the trial's job from the sampled values and
    fit one ``TorchTrainer``; Train reports reach Tune through a ``TuneReportCallback``."""
    import ray.tune

    entered = time.perf_counter()
    spec_search = SearchConfig.model_validate(search)
    name = ray.tune.get_context().get_trial_name()
    sampled = {k: config[k] for k in spec_search.space}
    raw = space_lib.trial_job(base, spec_search, sampled, name, join(run_dir, TRIALS))
    spec = validate_job(raw, source=f"trial {name}")
    # This process may run on another node than the driver: with output.dir in storage, its
    # trial folder is this node's mirror, pulled from and pushed to storage.
    folder = launch.run_dir(spec)
    folder.pull("metrics.json", "job.yaml")
    final, job_text = folder.local / "metrics.json", dump_job(spec)
    saved = folder.local / "job.yaml"
    if final.is_file() and saved.is_file() and folder.exists("model"):
        if saved.read_text() == job_text:
            # Finished before the driver was stopped, but after Tune's last snapshot of the
            # experiment: hand Tune the result instead of training again.
            ray.tune.report(_numbers(json.loads(final.read_text())))
            return
    folder.write_text("job.yaml", job_text)
    callback = _forward_intermediate(space_lib.required_metrics(spec_search))
    fit_from = time.perf_counter()
    result = launch.build_trainer(spec, folder, callbacks=[callback]).fit()
    fit_s = time.perf_counter() - fit_from
    if result.error is not None:
        raise RunError(f"trial {name} failed: {result.error}")
    metrics = launch.collect_result(result, folder)
    # Where a trial's time goes outside its workers' loop (benchmarks/trial_overhead.py): the
    # Train run's own start and end, and this function around it. Tune's result only.
    metrics[FIT_S] = fit_s
    metrics[TRIAL_FN_S] = time.perf_counter() - entered
    # The final result goes to Tune only now, with the artifact in the trial folder: a
    # scheduler's decision on it can no longer cut the copy short.
    ray.tune.report(metrics)


def _forward_intermediate(required: list[str]) -> Any:
    """A ``TuneReportCallback`` for the Train run's progress reports: it forwards those that
    hold every metric the searcher and scheduler read (Tune rejects results without them), such
    as validation accuracy during training for ASHA. The final report (``time/worker_s`` marks
    it) is the trial function's own, sent after the artifact is in place."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardIntermediate(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            m = metrics[0] if metrics else {}
            if "time/worker_s" not in m and all(k in m for k in required):
                super().after_report(run_context, metrics, checkpoint)

    return ForwardIntermediate()


def _results_callback(run_dir: RunFolder, spec: JobSpec) -> Any:
    """Driver side: a ``trial.json`` per trial as its state changes, and the report refreshed
    after each finished trial, so a browser open on report.html follows the search."""
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

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._record(trial, "running", started=time.time())

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            self._record(trial, "running", metrics=_numbers(result))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name = str(trial)
            rel = f"{TRIALS}/{name}"
            old = read_trial(run_dir, name) or {}
            wall = time.time() - old.get("started", time.time())
            run_dir.pull(f"{rel}/metrics.json")  # written by the trial, maybe on another node
            final = run_dir.local / rel / "metrics.json"
            if final.is_file() and run_dir.exists(f"{rel}/model"):
                metrics = _numbers(json.loads(final.read_text()))
                last = trial.last_result or {}
                metrics.update({k: float(last[k]) for k in (FIT_S, TRIAL_FN_S) if k in last})
                self._record(trial, "done", metrics=metrics, artifact="model", wall_s=wall)
            else:
                # Ended without its final artifact: the scheduler stopped it early.
                self._record(
                    trial, "stopped", metrics=_numbers(trial.last_result or {}), wall_s=wall
                )
            write_run_report(run_dir, running=True, spec=spec)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            old = read_trial(run_dir, str(trial)) or {}
            wall = time.time() - old.get("started", time.time())
            self._record(trial, "error", error=_error_text(trial), wall_s=wall)
            write_run_report(run_dir, running=True, spec=spec)

    return RecordTrials()


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if "/" in k
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(float(v))
    }


def _error_text(trial: Any) -> str:
    """The last lines of the trial's error (Tune keeps the traceback in a file)."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-3:]) or "the trial failed (see the driver log)"


def baseline_spec(spec: JobSpec, folder: RunFolder) -> JobSpec:
    """The dense job: compression and search removed, the baseline's own overrides applied."""
    raw = spec.model_dump(mode="json", exclude={"search", "compress"})
    raw = apply_overrides(raw, spec.search.baseline.overrides)
    raw["name"] = "baseline"
    raw["output"] = {"dir": folder.location}
    return validate_job(raw, source="search.baseline")


def _measure_dense(job: dict[str, Any], model_path: str | None) -> dict[str, float]:
    """Runs as a Ray task (on a worker node on a cluster): evaluate and measure the dense model."""
    from orchestrator import data as data_lib
    from orchestrator import finalize, models

    spec = JobSpec.model_validate(job)
    if model_path:
        spec = spec.model_copy(
            update={"model": spec.model.model_copy(update={"name": None, "path": model_path})}
        )
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data_lib.build(spec.data, tokenizer)
    model = models.build_model(spec.model, bundle.num_labels, tokenizer, seed=spec.train.seed)
    finalize.label_config(model, bundle)
    return finalize.measure_dense(spec, model, bundle, tokenizer)


def run_baseline(spec: JobSpec, folder: RunFolder, address: str | None) -> dict[str, float]:
    """Fine-tune the dense model once (or take the job's model as is), evaluate and measure it,
    and save ``baseline.json``. A finished baseline is reused (resume, or a crash after it)."""
    import ray

    out = folder.local / "baseline.json"
    if out.is_file():
        return json.loads(out.read_text())
    model_path = None
    if spec.search.baseline.train:
        bspec = baseline_spec(spec, folder)
        print(
            f"[orchestrator] dense baseline: fine-tuning once ({folder.uri('baseline')})",
            flush=True,
        )
        # Its accuracy is measured again below on the saved model, the same way as trials'.
        launch.train(bspec, address=address)
        # A URI when output.dir is one: the task (and every trial) fetches it from storage.
        model_path = folder.uri("baseline", "model")
    job = spec.model_dump(mode="json", exclude={"search", "compress"})
    task = ray.remote(_measure_dense).options(
        num_cpus=spec.resources.cpus_per_worker, num_gpus=0, max_retries=1
    )
    try:
        metrics = ray.get(task.remote(job, model_path))
    except Exception as e:  # a RayTaskError wraps the worker's exception
        raise RunError(f"measuring the dense baseline failed: {e}") from e
    folder.write_text("baseline.json", json.dumps(metrics, indent=2, sort_keys=True))
    print(
        f"[orchestrator] dense baseline: eval/accuracy {metrics['eval/accuracy']:.4f} | "
        f"{metrics['compress/size_bytes'] / 1e6:.1f} MB | "
        f"{metrics['perf/latency_ms_b32']:.1f} ms per batch of 32",
        flush=True,
    )
    return metrics


def check_search_dir(spec: JobSpec, resume: bool) -> None:
    """Before anything starts: the same search again needs ``--resume`` (a finished or
    interrupted search is never silently mixed with a new one); a different job is refused."""
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


def search(spec: JobSpec, address: str | None = None, resume: bool = False) -> ReportSummary:
    """Run (or resume) the search of ``spec``; returns the report's summary."""
    if spec.search is None:
        raise ConfigError(
            Problem(
                "search",
                None,
                "the job has no search section: nothing to search",
                "add search.space (e.g. compress.prune.sparsity: {uniform: [0.2, 0.7]}), or "
                "run `orchestrator train` for a single recipe",
            )
        )
    # Tune's classic progress table honours the columns below (its newer one ignores them).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Snapshot the experiment at every step of Tune's loop instead of every 10+ s: a driver
    # killed right after a trial finished then resumes knowing it finished (the state is a few
    # kB per trial).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    from ray import tune

    from orchestrator.results import write_run_report

    spec = launch.resolve_paths(spec)
    folder = launch.run_dir(spec)
    try:
        folder.pull_records()  # a run in storage: this machine's mirror starts from it
    except StorageError as e:
        raise unreachable("output.dir", spec.output.dir, e) from None
    check_search_dir(spec, resume)
    _, bundle = launch.preflight(spec)
    launch.connect_ray(spec, address)
    launch.check_capacity(spec)
    launch.claim_run_dir(spec)
    search_cfg = spec.search
    run_baseline(spec, folder, address)

    base = spec.model_dump(mode="json", exclude={"search"})
    if search_cfg.baseline.train:
        # Every trial starts from the fine-tuned dense model, not from the raw pretrained one.
        base["model"] = {
            "path": folder.uri("baseline", "model"),
            "num_layers": spec.model.num_layers,
        }
    t = spec.train
    _, total_steps = loop.plan_steps(t, bundle, t.num_workers)
    cluster = launch.cluster_capacity()
    need_cpu = t.num_workers * spec.resources.cpus_per_worker
    need_gpu = t.num_workers * spec.resources.gpus_per_worker
    parallel = space_lib.concurrency(search_cfg, cluster, need_cpu, need_gpu)
    print(
        f"[orchestrator] search {folder} | {space_lib.num_trials(search_cfg)} trials, "
        f"{parallel} at a time "
        f"({t.num_workers} x {t.strategy} workers each, {need_cpu:g} CPUs of "
        f"{cluster.get('CPU', 0):g}) | objectives "
        + ", ".join(f"{o.mode} {o.metric}" for o in search_cfg.objectives),
        flush=True,
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            train_driver_fn,
            base=base,
            search=search_cfg.model_dump(mode="json"),
            run_dir=folder.location,
        ),
        {"memory": TRIAL_DRIVER_MEMORY},
    )
    # Tune's strict check rejects any result without the searcher's metrics; trials forward
    # only complete results (see _forward_complete_results), which always hold them.
    run_config = tune.RunConfig(
        name=TUNE_NAME,
        storage_path=folder.location,  # a URI too: Tune keeps its experiment state there
        failure_config=tune.FailureConfig(max_failures=search_cfg.max_failures),
        callbacks=[_results_callback(folder, spec)],
        progress_reporter=tune.CLIReporter(
            metric_columns=[o.metric for o in search_cfg.objectives],
            parameter_columns=list(search_cfg.space),
            max_report_frequency=30,
        ),
        verbose=1,
    )
    experiment = folder.uri(TUNE_NAME)
    namer = _TrialNamer(folder, search_cfg)
    if resume and folder.exists(TUNE_NAME) and tune.Tuner.can_restore(experiment):
        print(f"[orchestrator] resuming the search in {experiment}", flush=True)
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space_lib.param_space(search_cfg),
            tune_config=tune.TuneConfig(
                search_alg=space_lib.searcher(search_cfg, parallel),
                scheduler=space_lib.scheduler(search_cfg, total_steps, t.eval_every),
                num_samples=search_cfg.samples,
                max_concurrent_trials=parallel,
                time_budget_s=search_cfg.time_budget_s,
                trial_name_creator=namer,
                # One trial process serves trial after trial: no process start-up and imports
                # per trial (the Train workers themselves are new for every trial). Not with
                # early stopping: a stopped trial's process is killed with its Train run.
                reuse_actors=search_cfg.scheduler == "none",
                trial_dirname_creator=namer,
            ),
            run_config=run_config,
        )
    try:
        grid = tuner.fit()
    except Exception as e:  # Tune raises on driver-side failures (trial errors are recorded)
        write_run_report(folder, running=False, spec=spec)
        raise RunError(f"the search failed: {e}\n{traceback.format_exc(limit=3)}") from e
    _close_lost_trials(folder, {Path(r.path).name for r in grid if r.path})
    summary = write_run_report(folder, running=False, spec=spec)
    print(pareto_text(folder.local))
    return summary


def _close_lost_trials(folder: RunFolder, known: set[str]) -> None:
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


def pareto_text(folder: Path) -> str:
    """The Pareto table for the terminal, from the results table just written."""
    import pyarrow.parquet as pq

    from orchestrator.results import format_pareto_table

    return format_pareto_table(pq.read_table(folder / "results.parquet"))


class _TrialNamer:
    """Trial names from an ordinal and the sampled recipe, kept per Tune trial id in
    ``trials/names.json``. Tune deep-copies the name creator for every trial and calls it again
    for trials it restores, so the mapping lives on disk: a resumed trial keeps its name (and
    with it its folder and its Train checkpoints), a new one takes the next ordinal."""

    def __init__(self, run_dir: RunFolder, search: SearchConfig) -> None:
        self.run_dir = run_dir
        self.path = run_dir.local / TRIALS / "names.json"
        self.search = search

    def __call__(self, trial: Any) -> str:
        try:
            names: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            names = {}
        if trial.trial_id not in names:
            index = 1 + max((int(n[1:4]) for n in names.values()), default=-1)
            sampled = {k: trial.config[k] for k in self.search.space if k in trial.config}
            # Keys under a section the trial switched off are not part of its recipe.
            off = switched_off(self.search.space, sampled)
            recipe = {k: v for k, v in sampled.items() if not ignored(k, off)}
            names[trial.trial_id] = space_lib.trial_name(index, recipe)
            self.run_dir.write_text(
                f"{TRIALS}/names.json", json.dumps(names, indent=2, sort_keys=True)
            )
        return names[trial.trial_id]

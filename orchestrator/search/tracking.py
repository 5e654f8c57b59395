"""MLflow tracking of a search (``tracking.mlflow``).

What a search logs, from its driver only (trials and workers never talk to MLflow):

- one **search run** (named after the job) in the experiment ``tracking.mlflow.experiment``:
  the resolved job as params (dotted keys) and as ``job.yaml``; at the end the dense model's
  figures (``dense/<metric>``), the selected recipe's (``selected/<metric>``), the trial counts,
  the Pareto table (``pareto_table.json``, shown by MLflow's UI), ``results.parquet``,
  ``pareto.parquet``, ``pareto.png``, ``report.html`` and, with ``log_model``, the selected
  model's files under ``selected_model/`` as ``orchestrator export --best`` writes them;
- one **child run per trial** (tag ``mlflow.parentRunId``), made by Ray Tune's
  ``MLflowLoggerCallback``: the trial's sampled recipe as params, its progress results as metrics
  by step; when it ends, its final metrics (test accuracy, bytes, latency...), tags for its
  recipe, status and feasibility, and its ``compress_report.json``, ``metrics.json`` and
  ``job.yaml`` as artifacts.

The URI is checked before the search starts: a server that does not answer is a bad input
(exit 2, naming ``tracking.mlflow.tracking_uri``, nothing written). A tracker that fails later,
in the middle of a search, does not stop it: the driver warns once and logs no more (the run
directory holds everything). ``--resume`` logs into the same search run (its id is kept in the
run directory's ``mlflow.json``) and marks the child runs the interrupted driver left running as
KILLED.

Ray Tune's callback logs a metric per HTTP request; the subclass here sends each result as one
batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config.loader import dump_job
from orchestrator.config.schema import JobSpec, MlflowConfig
from orchestrator.errors import ConfigError, Problem
from orchestrator.search.records import TRIALS, numbers
from orchestrator.storage import RunFolder

if TYPE_CHECKING:
    from orchestrator.results.report import ReportSummary

STATE = "mlflow.json"  # in the run directory: the search run's id, for --resume
ROLE_TAG = "orchestrator.role"  # "search" on the search run, "trial" on a trial's run
# MLflow's limits on one log_batch call and on a param's value.
BATCH_PARAMS, BATCH_METRICS, PARAM_CHARS = 100, 1000, 6000
# How the URI is probed before the search: one quick attempt, not MLflow's minutes of retries.
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# The driver's requests during the search (the user's own settings of these win).
SEARCH_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
TRIAL_FILES = ("compress_report.json", "metrics.json", "job.yaml")
RUN_FILES = (
    "job.yaml",
    "baseline.json",
    "results.parquet",
    "pareto.parquet",
    "pareto.png",
    "confirm.json",  # when the search trained its selection again with other seeds
)


def _say(line: str) -> None:
    print(f"[orchestrator] {line}", flush=True)


def _say_stopped(what: str, reason: str, folder: RunFolder) -> None:
    _say(
        f"MLflow logging stopped ({what}: {reason}); the search goes on, and its run directory "
        f"{folder} holds every result"
    )


def experiment_name(spec: JobSpec) -> str:
    cfg = spec.tracking.mlflow
    return (cfg.experiment if cfg and cfg.experiment else None) or spec.name


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def check(spec: JobSpec) -> None:
    """Before anything runs: MLflow is installed, the tracking URI answers, and the experiment
    is usable. Raises ``ConfigError`` naming the key."""
    cfg = spec.tracking.mlflow
    if cfg is None:
        return
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(
            Problem(
                "tracking.mlflow",
                cfg.model_dump(),
                "needs the mlflow package, which is not installed",
                "pip install -e '.[mlflow]' (or pip install mlflow), or remove tracking.mlflow",
            )
        ) from None
    name = experiment_name(spec)
    with _env(PROBE_ENV):
        try:
            experiment = MlflowClient(cfg.tracking_uri).get_experiment_by_name(name)
        except Exception as e:  # connection refused, DNS, HTTP 401/403, a bad store URI...
            raise ConfigError(
                Problem(
                    "tracking.mlflow.tracking_uri",
                    cfg.tracking_uri,
                    f"MLflow cannot be reached there ({_first_line(e)})",
                    "start the tracking server (e.g. mlflow server --backend-store-uri "
                    "sqlite:///mlflow.db --host 127.0.0.1 --port 5000, then "
                    "tracking_uri: http://127.0.0.1:5000), fix the URI or its credentials "
                    "(MLFLOW_TRACKING_TOKEN...), or remove tracking.mlflow",
                )
            ) from None
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            Problem(
                "tracking.mlflow.experiment",
                name,
                "is a deleted MLflow experiment (its name stays taken until it is purged)",
                f"restore it (mlflow experiments restore --experiment-id "
                f"{experiment.experiment_id}) or choose another name",
            )
        )


def _flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A job as MLflow params: dotted keys, leaves as text (lists and empty sections as JSON)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    text = tree if isinstance(tree, str) else json.dumps(tree)
    return {prefix[:-1]: text[:PARAM_CHARS]}


def _log_batch(
    client: Any,
    run_id: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    step: int = 0,
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for k, v in sorted((metrics or {}).items())]
    ps = [Param(k, str(v)) for k, v in sorted((params or {}).items())]
    ts = [RunTag(k, str(v)) for k, v in sorted((tags or {}).items())]
    chunks = [ms[i : i + BATCH_METRICS] for i in range(0, len(ms), BATCH_METRICS)]
    for i, chunk in enumerate(chunks or ([[]] if ts else [])):
        client.log_batch(run_id, metrics=chunk, tags=ts if i == 0 else [])
    for i in range(0, len(ps), BATCH_PARAMS):
        client.log_batch(run_id, params=ps[i : i + BATCH_PARAMS])


class Tracker:
    """The search run in MLflow, and the Tune callback that adds the trial runs under it."""

    def __init__(self, spec: JobSpec, folder: RunFolder) -> None:
        from mlflow.tracking import MlflowClient

        cfg = spec.tracking.mlflow
        if cfg is None:
            raise ValueError("the job has no tracking.mlflow section")
        self.cfg: MlflowConfig = cfg
        self.spec, self.folder = spec, folder
        # MLflow prints two lines with links whenever a run ends; the driver prints one line
        # per trial, and the search run's link once.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # MLflow retries a failed request 7 times over about 4 minutes, which would stall Tune's
        # loop that long when a server goes away; a few retries ride out a restart.
        for key, value in SEARCH_ENV.items():
            os.environ.setdefault(key, value)
        self.client = MlflowClient(cfg.tracking_uri)
        self.experiment = experiment_name(spec)
        self.run_id: str | None = None
        self.failed: str | None = None  # the error that stopped logging, if one did

    def warn(self, what: str, error: BaseException) -> None:
        """A tracker that fails in the middle of a search does not stop it: say so, once."""
        if self.failed is None:
            self.failed = _first_line(error)
            _say_stopped(what, self.failed, self.folder)

    def start(self) -> str:
        """Create the search run, or take up the one an interrupted search left (``--resume``;
        its child runs still marked running are set KILLED: Tune draws those trials again)."""
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        state = self._state()
        if state and state.get("tracking_uri") == self.cfg.tracking_uri:
            with contextlib.suppress(Exception):  # a run deleted in MLflow: start a new one
                run = self.client.get_run(state["run_id"])
                if run.info.lifecycle_stage == "active":
                    self.run_id = run.info.run_id
                    self.client.update_run(self.run_id, status="RUNNING")
                    for child in self.client.search_runs(
                        [run.info.experiment_id],
                        f"tags.mlflow.parentRunId = '{self.run_id}' "
                        "and attributes.status = 'RUNNING'",
                    ):
                        self.client.set_terminated(child.info.run_id, status="KILLED")
        if self.run_id is None:
            run = self.client.create_run(
                exp_id,
                run_name=self.spec.name,
                tags={
                    ROLE_TAG: "search",
                    "orchestrator.run_dir": self.folder.location,
                    "mlflow.note.content": f"Compression search {self.spec.name}: every trial "
                    f"is a child run; report.html holds the report. Run directory: "
                    f"{self.folder.location}",
                },
            )
            self.run_id = run.info.run_id
            _log_batch(self.client, self.run_id, params=_flatten(self.spec.model_dump(mode="json")))
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "job.yaml").write_text(dump_job(self.spec))
                self.client.log_artifact(self.run_id, str(Path(tmp) / "job.yaml"))
            self.folder.write_text(
                STATE,
                json.dumps(
                    {
                        "tracking_uri": self.cfg.tracking_uri,
                        "experiment_id": exp_id,
                        "run_id": self.run_id,
                    },
                    indent=2,
                ),
            )
        _say(f"MLflow: experiment {self.experiment!r}, search run {self.link()}")
        return self.run_id

    def link(self) -> str:
        """The search run's page on a tracking server, else its id and store."""
        uri = self.cfg.tracking_uri.rstrip("/")
        if uri.startswith(("http://", "https://")):
            run = self.client.get_run(self.run_id)
            return f"{uri}/#/experiments/{run.info.experiment_id}/runs/{self.run_id}"
        return f"{self.run_id} in {uri}"

    def _state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.folder.local / STATE).read_text())
        except (OSError, ValueError):
            return None

    def callback(self) -> Any:
        """Ray Tune's MLflow callback, a child run per trial under the search run."""
        return trial_runs(self.spec, self.folder, self.cfg, self.experiment, self.run_id or "")

    def finish(self, summary: ReportSummary | None, status: str = "FINISHED") -> None:
        """The search's results on its run, and the run ended with ``status`` (FAILED when the
        search failed or no trial finished, KILLED when it was interrupted)."""
        if self.run_id is None:
            return
        try:
            self._finish(summary)
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            self.warn("at the end of the search", e)
            return
        _say(f"MLflow: the search and its trials are logged under {self.link()}")

    def _finish(self, summary: ReportSummary | None) -> None:
        import pyarrow.parquet as pq

        from orchestrator.results.table import load_baseline

        local = self.folder.local
        metrics: dict[str, float] = {}
        baseline = load_baseline(local)
        metrics.update({f"dense/{k}": v for k, v in (baseline or {}).items()})
        tags = {"selected_trial": (summary.best if summary else None) or "none"}
        if summary is not None:
            metrics.update({f"trials/{k}": float(v) for k, v in summary.counts.items()})
            metrics["trials/pareto"] = float(summary.n_pareto)
            if summary.best:
                final = local / TRIALS / summary.best / "metrics.json"
                if final.is_file():
                    chosen = numbers(json.loads(final.read_text()))
                    metrics.update({f"selected/{k}": v for k, v in chosen.items()})
        _log_batch(self.client, self.run_id, metrics=metrics, tags=tags)
        for name in (*RUN_FILES, "report.html"):
            if (local / name).is_file():
                self.client.log_artifact(self.run_id, str(local / name))
        if (local / "pareto.parquet").is_file():
            front = pq.read_table(local / "pareto.parquet").to_pandas()
            self.client.log_table(self.run_id, data=front, artifact_file="pareto_table.json")
        if self.cfg.log_model and summary is not None and summary.best:
            from orchestrator.results.export import export_trial

            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "selected_model"
                export_trial(self.folder, out, summary.best)
                self.client.log_artifacts(self.run_id, str(out), "selected_model")


def trial_runs(
    spec: JobSpec, folder: RunFolder, cfg: MlflowConfig, experiment: str, parent: str
) -> Any:
    """The Tune callback (``TrialRuns`` on Ray's ``MLflowLoggerCallback``); Ray is imported
    only here, when a search starts."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class TrialRuns(_TrialRuns, MLflowLoggerCallback):
        pass

    return TrialRuns(spec, folder, cfg, experiment, parent)


class _TrialRuns:
    """Ray's ``MLflowLoggerCallback`` with the search run as parent, each result sent as one
    batch, and the trial's own files and final figures logged when it ends. A failure warns
    once and turns logging off (the search goes on)."""

    def __init__(
        self, spec: JobSpec, folder: RunFolder, cfg: MlflowConfig, experiment: str, parent: str
    ) -> None:
        super().__init__(  # MLflowLoggerCallback's
            tracking_uri=cfg.tracking_uri,
            experiment_name=experiment,
            tags={"mlflow.parentRunId": parent, ROLE_TAG: "trial"},
        )
        self._spec, self._folder = spec, folder
        self.failed: str | None = None
        self.baseline: dict[str, float] | None = None

    def _guard(self, what: str, fn: Any) -> None:
        if self.failed is not None:
            return
        try:
            fn()
        except Exception as e:
            self.failed = _first_line(e)
            _say_stopped(what, self.failed, self._folder)

    def setup(self, *args: Any, **kwargs: Any) -> None:
        # A resumed search unpickles this callback as the first start made it: its search run
        # is the one the driver just took up (or made anew), as mlflow.json says.
        with contextlib.suppress(OSError, ValueError, KeyError):
            state = json.loads((self._folder.local / STATE).read_text())
            self.tags = {**(self.tags or {}), "mlflow.parentRunId": state["run_id"]}
        base = super()
        self._guard("setup", lambda: base.setup(*args, **kwargs))

    def log_trial_start(self, trial: Any) -> None:
        from orchestrator.results.table import effective_config, recipe

        base = super()

        def start() -> None:
            base.log_trial_start(trial)
            shown = effective_config(trial.config, self._spec.search)
            self._client().set_tag(self._trial_runs[trial], "orchestrator.recipe", recipe(shown))

        self._guard(f"trial {trial} started", start)

    def _client(self) -> Any:
        return self.mlflow_util._get_client()

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        def log() -> None:
            values = numbers(result)
            step = int(values.get("train/step", result.get("training_iteration", iteration)))
            _log_batch(self._client(), self._trial_runs[trial], metrics=values, step=step)

        if trial in getattr(self, "_trial_runs", {}):
            self._guard(f"trial {trial} result", log)

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        if trial in getattr(self, "_trial_runs", {}):
            self._guard(f"trial {trial} ended", lambda: self._end(trial, failed))

    def _end(self, trial: Any, failed: bool) -> None:
        """The trial's final figures, whether they meet the constraints (a tag), and its
        files; then its MLflow run is closed."""
        from orchestrator.results.table import check_constraints, load_baseline

        run_id = self._trial_runs.pop(trial)
        client, folder = self._client(), self._folder
        rel = f"{TRIALS}/{trial}"
        for name in TRIAL_FILES:
            folder.pull(f"{rel}/{name}")
        path = folder.local / rel
        tags = {"orchestrator.status": "failed" if failed else "stopped"}
        if (path / "metrics.json").is_file() and not failed:
            final = numbers(json.loads((path / "metrics.json").read_text()))
            if self.baseline is None:  # written before the first trial started
                self.baseline = load_baseline(folder.local)
            broken = check_constraints(final, self._spec.search, self.baseline)
            tags = {
                "orchestrator.status": "done",
                "orchestrator.feasible": "yes" if not broken else f"no: {broken[0]}",
            }
            _log_batch(
                client, run_id, metrics=final, tags=tags, step=int(final.get("train/step", 0))
            )
        else:
            _log_batch(client, run_id, tags=tags)
        for name in TRIAL_FILES:
            if (path / name).is_file():
                client.log_artifact(run_id, str(path / name))
        client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

"""One trial, run by Ray Tune: ``train_driver_fn`` (a Tune function trainable) builds the
trial's job from the sampled dotted keys and fits one multi-worker ``TorchTrainer`` for it (Ray
Train V2: the trainer is fitted inside the Tune function, never passed to the ``Tuner``)."""

from __future__ import annotations

import json
import time
from typing import Any

from orchestrator import launch
from orchestrator.config.loader import dump_job, validate_job
from orchestrator.config.search import SearchConfig, sampled_values
from orchestrator.errors import RunError
from orchestrator.loop import FINAL_REPORT
from orchestrator.search import space as space_lib
from orchestrator.search.records import TRIALS, numbers
from orchestrator.storage import join

# A finished trial's timing, measured by its trial function: the Train run's fit() and the
# whole function. Added to the driver's record of the trial (not to the trial's metrics.json).
FIT_S = "time/fit_s"
TRIAL_FN_S = "time/trial_fn_s"


def train_driver_fn(
    config: dict[str, Any], *, base: dict[str, Any], search: dict[str, Any], run_dir: str
) -> None:
    """One trial: build the trial's job from the sampled values and fit one ``TorchTrainer``;
    its progress reports reach Tune through ``forward_progress``, its final result after the
    model is in the trial's folder."""
    import ray.tune

    entered = time.perf_counter()
    spec_search = SearchConfig.model_validate(search)
    name = ray.tune.get_context().get_trial_name()
    sampled = sampled_values(spec_search.space, config)
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
            ray.tune.report(numbers(json.loads(final.read_text())))
            return
    folder.write_text("job.yaml", job_text)
    callback = forward_progress(space_lib.required_metrics(spec_search))
    fit_from = time.perf_counter()
    try:
        result = launch.build_trainer(spec, folder, callbacks=[callback]).fit()
    except Exception as e:  # Ray Train raises why the run failed
        raise RunError(f"trial {name} failed: {launch.train_failure(e, spec)}") from e
    fit_s = time.perf_counter() - fit_from
    if result.error is not None:
        raise RunError(f"trial {name} failed: {launch.train_failure(result.error, spec)}")
    metrics = launch.collect_result(result, folder)
    # Where a trial's time goes outside its workers' loop (benchmarks/trial_overhead.py): the
    # Train run's own start and end, and this function around it. Tune's result only.
    metrics[FIT_S] = fit_s
    metrics[TRIAL_FN_S] = time.perf_counter() - entered
    # The final result goes to Tune only now, with the artifact in the trial folder: a
    # scheduler's decision on it can no longer cut the copy short.
    ray.tune.report(metrics)


def forward_progress(required: list[str]) -> Any:
    """A ``TuneReportCallback`` for the Train run's progress reports: it forwards those that
    hold every metric the searcher and scheduler read (Tune rejects results without them), such
    as validation accuracy during training for ASHA. The final report (``FINAL_REPORT`` set)
    is the trial function's own, sent after the artifact is in place."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardProgress(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            m = metrics[0] if metrics else {}
            if not m.get(FINAL_REPORT) and all(k in m for k in required):
                super().after_report(run_context, metrics, checkpoint)

    return ForwardProgress()

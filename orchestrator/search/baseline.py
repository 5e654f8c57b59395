"""The dense baseline of a search: fine-tuned once (a Ray Train run) or taken as is, evaluated
and measured like a trial, saved as ``baseline/`` and ``baseline.json``; every trial starts from
it and is compared with it."""

from __future__ import annotations

import json
from typing import Any

from orchestrator import launch
from orchestrator.config.loader import EXCLUSIVE, validate_job
from orchestrator.config.schema import JobSpec
from orchestrator.config.search import baseline_base
from orchestrator.errors import RunError
from orchestrator.results.quality import quality_of
from orchestrator.storage import RunFolder


def baseline_spec(spec: JobSpec, folder: RunFolder) -> JobSpec:
    """The dense job: compression and search removed, the baseline's own overrides applied."""
    raw = baseline_base(spec.model_dump(mode="json"), spec.search, EXCLUSIVE)
    raw["name"] = "baseline"
    raw["output"] = {"dir": folder.location}
    return validate_job(raw, source="search.baseline")


def _measure_dense(job: dict[str, Any], model_path: str | None) -> dict[str, float]:
    """Runs as a Ray task (on a worker node on a cluster): evaluate and measure the dense model."""
    from orchestrator import data as data_lib
    from orchestrator import finalize, models

    spec = JobSpec.model_validate(job)
    if model_path:
        spec = finalize.saved_model_spec(spec, model_path)
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data_lib.build(spec.data, tokenizer, models.task_of(spec.model))
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
        # Measured below on the saved model as trials are; its answers on validation and test
        # are read from the node's cache the run's own export filled (a worker on another node
        # without it evaluates the model again).
        launch.train(bspec, address=address)
        # A URI when output.dir is one: the task (and every trial) fetches it from storage.
        model_path = folder.uri("baseline", "model")
    job = spec.model_dump(mode="json", exclude={"search", "compress"})
    job["train"]["distill"] = None
    task = ray.remote(_measure_dense).options(
        num_cpus=spec.resources.cpus_per_worker, num_gpus=0, max_retries=1
    )
    try:
        metrics = ray.get(task.remote(job, model_path))
    except Exception as e:  # a RayTaskError wraps the worker's exception
        raise RunError(f"measuring the dense baseline failed: {e}") from e
    folder.write_text("baseline.json", json.dumps(metrics, indent=2, sort_keys=True))
    q = quality_of(spec.search)
    print(
        f"[orchestrator] dense baseline: {q.metric} {metrics[q.metric]:{q.metric_fmt}} | "
        f"{metrics['compress/size_bytes'] / 1e6:.1f} MB | "
        f"{metrics[q.latency]:.1f} ms ({q.latency_words})",
        flush=True,
    )
    return metrics

"""Turn a compressed model into its artifact and its honest numbers (no Ray, one process).

Shared by ``orchestrator compress`` (one-shot) and the end of a compressed training run (rank 0):
write the artifact, load it back exactly as a user would, and measure *that*: its bytes, its
accuracy on validation and test, and its latency against the dense model, side by side.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator import data as data_lib
from orchestrator import models
from orchestrator.compress import CompressionReport, compress_, summary_metrics
from orchestrator.compress.artifact import load_artifact, save_artifact, weights_bytes
from orchestrator.compress.common import param_count
from orchestrator.compress.measure import kernel_summary, measure_latency
from orchestrator.config.schema import JobSpec
from orchestrator.files import write_atomic
from orchestrator.stats import PairedCounts
from orchestrator.storage import cache_root


def calibration_batches(
    spec: JobSpec, bundle: data_lib.DataBundle
) -> list[dict[str, torch.Tensor]]:
    """The same calibration batches on every rank (masks and ranks must agree across ranks):
    the first ``compress.calib_batches`` batches of the seeded, unsharded training order."""
    batches = []
    for batch in bundle.train_batches(spec.train.batch_size, 0, 1, spec.data.seed, 0):
        batches.append(batch)
        if len(batches) >= spec.compress.calib_batches:
            break
    return batches


def build_compressed(
    spec: JobSpec,
    bundle: data_lib.DataBundle,
    tokenizer: Any,
    calib: list[dict[str, torch.Tensor]],
    total_steps: int = 0,
    agree: Callable[[Any], Any] | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """The job's model with its compression recipe applied (training form); ``agree``: see
    ``compress.technique.Context.agree``."""
    model = models.build_model(spec.model, bundle.num_labels, tokenizer, seed=spec.train.seed)
    label_config(model, bundle)
    report = compress_(
        model,
        spec.compress,
        calib=calib,
        total_steps=total_steps,
        tokenizer=tokenizer,
        token_counts=(lambda: bundle.token_counts("train")) if tokenizer is not None else None,
        agree=agree,
    )
    return model, report


def label_config(model: nn.Module, bundle: data_lib.DataBundle) -> None:
    model.config.id2label = dict(enumerate(bundle.label_names))
    model.config.label2id = {n: i for i, n in enumerate(bundle.label_names)}


def split_key(split: str) -> str:
    """Metric namespace: validation is ``eval/*``, held-out test ``test/*`` (docs/contracts.md)."""
    return {"validation": "eval"}.get(split, split)


@torch.no_grad()
def score(
    model: nn.Module,
    batches: Iterable[tuple[dict[str, torch.Tensor], int]],
    device: torch.device | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[float]:
    """[correct, examples, summed loss] over ``(batch, real rows)`` pairs; a pair with 0 real
    rows is a stand-in batch (a rank kept in step with the others) that is run but not counted."""
    was_training = model.training
    model.eval()
    correct = total = loss_sum = 0.0
    for batch, real in batches:
        labels = batch.pop("labels")
        inputs = {k: v.to(device) for k, v in batch.items()} if device else batch
        with autocast():
            logits = model(**inputs).logits.float()
        if real == 0:
            continue
        labels = labels.to(logits.device)
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
        total += real
    model.train(was_training)
    return [correct, total, loss_sum]


def evaluate_plain(
    model: nn.Module, bundle: data_lib.DataBundle, split: str, batch_size: int = 64
) -> dict[str, float]:
    """Accuracy and mean loss of ``model`` over the whole ``split``, in this process."""
    return evaluate_answers(model, bundle, split, batch_size)[0]


@torch.no_grad()
def evaluate_answers(
    model: nn.Module, bundle: data_lib.DataBundle, split: str, batch_size: int = 64
) -> tuple[dict[str, float], list[bool]]:
    """Accuracy and mean loss over the whole ``split`` in this process, and whether each
    example (in the split's order) was answered right: what a paired comparison needs."""
    was_training = model.training
    model.eval()
    answers: list[bool] = []
    loss_sum = 0.0
    for batch, _ in bundle.eval_batches(split, batch_size, 0, 1):
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        answers += (logits.argmax(-1) == labels).tolist()
    model.train(was_training)
    key = split_key(split)
    n = len(answers)
    return {f"{key}/accuracy": sum(answers) / n, f"{key}/loss": loss_sum / n}, answers


def _dense_answers_path(spec: JobSpec) -> Path:
    """Where the dense model's answers for this job's data are cached on this node: keyed by
    the model's files (or its from-config spec and seed) and every data key that changes the
    splits or the tokens."""
    h = hashlib.sha256()
    h.update(spec.model.model_dump_json(exclude={"path", "tokenizer_path"}).encode())
    h.update(spec.data.model_dump_json(exclude={"cache_dir"}).encode())
    h.update(str(spec.train.seed).encode())
    folder = models.model_dir(spec.model)
    for path in sorted(folder.rglob("*")) if folder is not None else []:
        if path.is_file():
            h.update(path.name.encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return cache_root() / "dense_answers" / f"{h.hexdigest()[:32]}.json"


def dense_answers(
    spec: JobSpec, dense: nn.Module, bundle: data_lib.DataBundle
) -> tuple[dict[str, float], dict[str, list[bool]]]:
    """The dense model's accuracy and loss on validation and test, and its right / wrong
    answer for every example: computed once per node and cached (every trial of a search
    compares with the same dense model)."""
    path = _dense_answers_path(spec)
    splits = ("validation", "test")
    try:
        cached = json.loads(path.read_text())
        if all(len(cached["answers"][s]) == bundle.sizes[s] for s in splits):
            answers = {s: [bool(a) for a in cached["answers"][s]] for s in splits}
            return {k: float(v) for k, v in cached["metrics"].items()}, answers
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not cached yet (or unreadable): compute it
    metrics: dict[str, float] = {}
    answers = {}
    for split in splits:
        split_metrics, answers[split] = evaluate_answers(dense, bundle, split)
        metrics.update(split_metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"metrics": metrics, "answers": {s: [int(a) for a in v] for s, v in answers.items()}}
    write_atomic(path, json.dumps(saved))
    return metrics, answers


def finalize(
    spec: JobSpec,
    model: nn.Module,
    report: CompressionReport,
    bundle: data_lib.DataBundle,
    tokenizer: Any,
    folder: Path,
) -> dict[str, float]:
    """Write ``model``'s artifact (``model`` in its training form, made by ``report.steps``) to
    ``folder``, reload it, evaluate and time it against the dense model. Returns the metrics
    (the keys of docs/contracts.md); also fills ``report.metrics``."""
    size = save_artifact(model, folder, steps=report.steps, tokenizer=tokenizer)
    dense = models.build_model(spec.model, bundle.num_labels, tokenizer, seed=spec.train.seed)
    label_config(dense, bundle)
    with tempfile.TemporaryDirectory() as tmp:
        dense_size = save_artifact(dense, Path(tmp) / "dense", tokenizer=tokenizer)
        dense_weights = weights_bytes(Path(tmp) / "dense")
    shipped = load_artifact(folder)
    params_before = int(report.metrics.get("compress/params_before", param_count(dense)))
    metrics = dict(summary_metrics(model, report.steps, params_before))
    metrics["compress/skipped_modules"] = float(sum(r.skipped for r in report.rows))
    _, reference = dense_answers(spec, dense, bundle)
    for split in ("validation", "test"):
        # Paired with the dense model on the same examples: the drop and its interval.
        split_metrics, answers = evaluate_answers(shipped, bundle, split)
        metrics.update(split_metrics)
        metrics.update(PairedCounts.of(reference[split], answers).metrics(split_key(split)))
    if spec.measure.backend == "onnxruntime":
        from orchestrator.compress.measure import measure_latency_onnxruntime
        from orchestrator.compress.onnx_export import manifest_steps

        latency = measure_latency_onnxruntime(
            {"dense": (dense, None), "compressed": (shipped, manifest_steps(folder))},
            seq_len=spec.data.max_length,
            threads=spec.measure.threads,
        )
        report.notes.append(
            f"latency measured in ONNX Runtime ({spec.measure.threads} thread(s)), the dense "
            "fp32 model and this recipe each exported to ONNX as `export --format onnx` does"
        )
    else:
        latency = measure_latency(
            {"dense": dense, "compressed": shipped},
            seq_len=spec.data.max_length,
            threads=spec.measure.threads,
        )
    kernels = kernel_summary(shipped)
    report.kernels = kernels
    report.notes.append(
        "runs on: " + ", ".join(f"{n} x {kind}" for kind, n in sorted(kernels.items()))
    )
    metrics.update(latency["compressed"])
    metrics.update(
        {
            f"perf/dense_{k.split('/')[1]}": v
            for k, v in latency["dense"].items()
            if k.startswith("perf/latency")
        }
    )
    metrics["perf/speedup"] = (
        latency["dense"]["perf/latency_ms_b32"] / latency["compressed"]["perf/latency_ms_b32"]
    )
    metrics.update(_sizes(size, weights_bytes(folder), dense_size, dense_weights))
    report.metrics.update(metrics)
    return metrics


def _sizes(size: int, weights: int, dense_size: int, dense_weights: int) -> dict[str, float]:
    """The artifact's bytes on disk (every file, config and tokenizer included) and the model's
    own (weights file + manifest), for the compressed and the dense model alike."""
    return {
        "compress/size_bytes": float(size),
        "compress/weights_bytes": float(weights),
        "compress/dense_size_bytes": float(dense_size),
        "compress/dense_weights_bytes": float(dense_weights),
        "compress/size_ratio": dense_size / size,
    }


def measure_dense(
    spec: JobSpec, model: nn.Module, bundle: data_lib.DataBundle, tokenizer: Any
) -> dict[str, float]:
    """The dense reference's numbers under the same keys a compressed trial reports: accuracy on
    validation and test, artifact bytes, latency (alone: there is nothing to interleave with)."""
    metrics = dict(summary_metrics(model, [], param_count(model)))
    # Also cached for the trials on this node, which compare with these answers.
    accuracy, answers = dense_answers(spec, model, bundle)
    metrics.update(accuracy)
    for split, values in answers.items():
        metrics[f"{split_key(split)}/examples"] = float(len(values))
    with tempfile.TemporaryDirectory() as tmp:
        size = save_artifact(model, Path(tmp) / "dense", tokenizer=tokenizer)
        weights = weights_bytes(Path(tmp) / "dense")
    latency = measure_latency(
        {"dense": model}, seq_len=spec.data.max_length, threads=spec.measure.threads
    )
    metrics.update(latency["dense"])
    metrics.update(_sizes(size, weights, size, weights))
    metrics["perf/speedup"] = 1.0
    return metrics

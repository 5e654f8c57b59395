"""Turn a compressed model into its artifact and its honest numbers (no Ray, one process).

Shared by ``orchestrator compress`` (one-shot) and the end of a compressed training run (rank 0):
write the artifact, load it back exactly as a user would, and measure *that*: its bytes, its
accuracy on validation and test (a language model: its perplexity), and its latency against the
dense model, side by side.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
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
from orchestrator.compress.measure import kernel_summary, measure_decode, measure_latency
from orchestrator.compress.technique import Workers
from orchestrator.config.schema import JobSpec
from orchestrator.files import write_atomic
from orchestrator.models import CAUSAL_LM
from orchestrator.stats import PairedCounts, PairedPerplexity
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
    workers: Workers | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """The job's model with its compression recipe applied (training form); ``agree``,
    ``workers``: see ``compress.technique.Context``."""
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
        cache_dir=data_lib.cache_root(spec.data) / "sensitivity",
        workers=workers,
    )
    return model, report


def label_config(model: nn.Module, bundle: data_lib.DataBundle) -> None:
    """Record the label names in a classifier's config (a language model has none)."""
    if bundle.task == CAUSAL_LM:
        return
    model.config.id2label = dict(enumerate(bundle.label_names))
    model.config.label2id = {n: i for i, n in enumerate(bundle.label_names)}


def split_key(split: str) -> str:
    """Metric namespace: validation is ``eval/*``, held-out test ``test/*`` (docs/contracts.md)."""
    return {"validation": "eval"}.get(split, split)


# Blocks per evaluation batch of a language model: its logits are blocks x length x vocabulary
# floats (8 x 128 x 49,152 for SmolLM2: 200 MB), and a copy or two of them while scoring.
LM_EVAL_BATCH = 8


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the next token and whether it was the argmax, for
    a language model's ``logits`` (batch x length x vocabulary) on blocks ``labels`` (every
    position but the last predicts the next)."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    ).view(target.shape)
    return nll, logits.argmax(-1) == target


def split_metrics(key: str, correct: float, total: float, loss_sum: float, task: str) -> dict:
    """A split's metrics from summed counts: accuracy and mean loss for a classifier; mean
    per-token loss, perplexity and next-token accuracy for a language model."""
    if task == CAUSAL_LM:
        loss = loss_sum / total
        return {
            f"{key}/loss": loss,
            f"{key}/perplexity": math.exp(loss),
            f"{key}/token_accuracy": correct / total,
        }
    return {f"{key}/accuracy": correct / total, f"{key}/loss": loss_sum / total}


@torch.no_grad()
def score(
    model: nn.Module,
    batches: Iterable[tuple[dict[str, torch.Tensor], int]],
    device: torch.device | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[float]:
    """[correct, counted, summed loss] over ``(batch, real rows)`` pairs: examples for a
    classifier, predicted tokens for a language model (its labels are blocks of ids). A pair
    with 0 real rows is a stand-in batch (a rank kept in step with the others) that is run but
    not counted."""
    was_training = model.training
    model.eval()
    correct = total = loss_sum = 0.0
    for batch, real in batches:
        labels = batch.pop("labels")
        inputs = {k: v.to(device) for k, v in batch.items()} if device else batch
        if labels.dim() == 2:
            inputs["use_cache"] = False  # a language model scored, not generating
        with autocast():
            logits = model(**inputs).logits.float()
        if real == 0:
            continue
        labels = labels.to(logits.device)
        if labels.dim() == 2:  # a language model's blocks
            nll, right = _token_losses(logits, labels)
            loss_sum += nll.sum().item()
            correct += int(right.sum())
            total += nll.numel()
            continue
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(-1) == labels).sum())
        total += real
    model.train(was_training)
    return [correct, total, loss_sum]


def evaluate_plain(
    model: nn.Module, bundle: data_lib.DataBundle, split: str, batch_size: int = 64
) -> dict[str, float]:
    """The split's metrics (``split_metrics``) for ``model`` over the whole ``split``, in this
    process."""
    return evaluate_answers(model, bundle, split, batch_size)[0]


@torch.no_grad()
def evaluate_answers(
    model: nn.Module, bundle: data_lib.DataBundle, split: str, batch_size: int = 64
) -> tuple[dict[str, float], list]:
    """The split's metrics over the whole ``split`` in this process, and per example (in the
    split's order) what a paired comparison needs: whether a classifier answered right, or a
    language model's summed negative log-likelihood of each block."""
    was_training = model.training
    model.eval()
    causal = bundle.task == CAUSAL_LM
    answers: list = []
    correct = total = loss_sum = 0.0
    if causal:
        batch_size = min(batch_size, LM_EVAL_BATCH)
    for batch, _ in bundle.eval_batches(split, batch_size, 0, 1):
        labels = batch.pop("labels")
        if causal:
            batch["use_cache"] = False
        logits = model(**batch).logits.float()
        if causal:
            nll, right = _token_losses(logits, labels)
            answers += nll.sum(1).tolist()
            correct += int(right.sum())
            total += nll.numel()
            loss_sum += nll.sum().item()
            continue
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        answers += (logits.argmax(-1) == labels).tolist()
    model.train(was_training)
    if not causal:
        correct, total = sum(answers), len(answers)
    return split_metrics(split_key(split), correct, total, loss_sum, bundle.task), answers


def paired(
    bundle: data_lib.DataBundle, dense: list, compressed: list
) -> PairedCounts | PairedPerplexity:
    """The paired comparison of a model with the dense one on the same examples."""
    if bundle.task == CAUSAL_LM:
        length = len(bundle.splits["test"][0]["input_ids"])
        return PairedPerplexity.of(dense, compressed, tokens_per_block=length - 1)
    return PairedCounts.of(dense, compressed)


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


def saved_model_spec(spec: JobSpec, path: str) -> JobSpec:
    """``spec`` reading its model from the saved folder ``path`` (a search's fine-tuned
    baseline): how the search measures that model, and the key its cached answers
    (``dense_answers``) are found under."""
    model = spec.model.model_copy(update={"name": None, "path": path})
    return spec.model_copy(update={"model": model})


def dense_answers(
    spec: JobSpec, dense: nn.Module, bundle: data_lib.DataBundle
) -> tuple[dict[str, float], dict[str, list[bool]]]:
    """The dense model's metrics on validation and test, and its answer for every example
    (``evaluate_answers``): computed once per node and cached (every trial of a search
    compares with the same dense model)."""
    path = _dense_answers_path(spec)
    splits = ("validation", "test")
    try:
        cached = json.loads(path.read_text())
        if all(len(cached["answers"][s]) == bundle.sizes[s] for s in splits):
            cast = float if bundle.task == CAUSAL_LM else bool
            answers = {s: [cast(a) for a in cached["answers"][s]] for s in splits}
            return {k: float(v) for k, v in cached["metrics"].items()}, answers
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not cached yet (or unreadable): compute it
    metrics: dict[str, float] = {}
    answers = {}
    for split in splits:
        split_metrics, answers[split] = evaluate_answers(dense, bundle, split)
        metrics.update(split_metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    cast = float if bundle.task == CAUSAL_LM else int
    saved = {"metrics": metrics, "answers": {s: [cast(a) for a in v] for s, v in answers.items()}}
    write_atomic(path, json.dumps(saved))
    return metrics, answers


def finalize(
    spec: JobSpec,
    model: nn.Module,
    report: CompressionReport,
    bundle: data_lib.DataBundle,
    tokenizer: Any,
    folder: Path,
    answers: dict[str, list] | None = None,
) -> dict[str, float]:
    """Write ``model``'s artifact (``model`` in its training form, made by ``report.steps``) to
    ``folder``, reload it, evaluate and time it against the dense model. Returns the metrics
    (the keys of docs/contracts.md); also fills ``report.metrics``, and ``answers`` when given:
    the reloaded model's answer per example of each split (``evaluate_answers``), to pair it
    with another recipe's."""
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
        split_metrics, mine = evaluate_answers(shipped, bundle, split)
        metrics.update(split_metrics)
        metrics.update(paired(bundle, reference[split], mine).metrics(split_key(split)))
        if answers is not None:
            answers[split] = mine
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
        latency = timed(spec, bundle, {"dense": dense, "compressed": shipped})
    kernels = kernel_summary(shipped)
    report.kernels = kernels
    report.notes.append(
        "runs on: " + ", ".join(f"{n} x {kind}" for kind, n in sorted(kernels.items()))
    )
    if bundle.task == CAUSAL_LM and tokenizer is not None:
        for label, m in (("dense", dense), ("compressed", shipped)):
            report.notes.append(f"{label}, greedy: {continuation(m, tokenizer)!r}")
    metrics.update(latency["compressed"])
    metrics.update(
        {
            f"perf/dense_{k.split('/')[1]}": v
            for k, v in latency["dense"].items()
            if k.startswith("perf/latency")
        }
    )
    speed = speed_key(bundle)
    metrics["perf/speedup"] = latency["dense"][speed] / latency["compressed"][speed]
    if bundle.task == CAUSAL_LM:
        metrics["perf/dense_decode_tokens_per_s"] = latency["dense"]["perf/decode_tokens_per_s"]
        metrics["perf/decode_speedup"] = (
            latency["compressed"]["perf/decode_tokens_per_s"]
            / latency["dense"]["perf/decode_tokens_per_s"]
        )
    metrics.update(_sizes(size, weights_bytes(folder), dense_size, dense_weights))
    report.metrics.update(metrics)
    return metrics


PROMPT = "The history of the United Kingdom"  # what a language model's report continues


@torch.no_grad()
def continuation(model: nn.Module, tokenizer: Any, new_tokens: int = 24) -> str:
    """``PROMPT`` and the model's greedy continuation of it: what a reader of the report sees
    of a compressed language model beside the dense one."""
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.eval().generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def speed_key(bundle: data_lib.DataBundle) -> str:
    """The latency ``perf/speedup`` compares: a classifier's at batch 32; a language model's
    prefill of one block at batch 1 (its decoding speed is ``perf/decode_speedup``)."""
    return "perf/latency_ms_b1" if bundle.task == CAUSAL_LM else "perf/latency_ms_b32"


def timed(
    spec: JobSpec, bundle: data_lib.DataBundle, models_: dict[str, nn.Module]
) -> dict[str, dict[str, float]]:
    """Latency in torch of ``models_`` side by side: batches 1 and 32 of ``data.max_length``
    tokens for a classifier; a language model's prefill of one block at batch 1 and its greedy
    decoding speed at batch 1 (a batch of 32 full blocks takes tens of seconds per forward on
    one CPU thread for a 135 M-parameter decoder)."""
    threads = spec.measure.threads
    if bundle.task != CAUSAL_LM:
        return measure_latency(models_, seq_len=spec.data.max_length, threads=threads)
    out = measure_latency(
        models_, seq_len=spec.data.max_length, batch_sizes=(1,), repeats=5, threads=threads
    )
    for label, values in measure_decode(models_, threads=threads).items():
        out[label].update(values)
    return out


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
    latency = timed(spec, bundle, {"dense": model})
    metrics.update(latency["dense"])
    metrics.update(_sizes(size, weights, size, weights))
    metrics["perf/speedup"] = 1.0
    return metrics

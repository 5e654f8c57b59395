"""Honest CPU latency: the median of repeated timed forwards after warm-up, dense and compressed
models interleaved in one loop so machine noise hits both alike; speed-up is their ratio."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
from torch import nn

BATCH_SIZES = (1, 32)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch at ``threads`` intra-op threads inside the block (None: as it is), and back to the
    count before it afterwards, also after an error."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def example_inputs(
    model: nn.Module, batch: int, seq_len: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch of the inputs ``model`` takes: its own ``example_inputs(batch, seed)`` where it
    has one (the MLP: random images), else ``seq_len`` random token ids of its vocabulary
    (above the first 1000 ids, which are mostly special and unused tokens)."""
    own = getattr(model, "example_inputs", None)
    if callable(own):
        return own(batch, seed=seed)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab - 1), vocab, (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def _time_once(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(**inputs)
    return (time.perf_counter() - start) * 1000.0


def measure_latency(
    models: dict[str, nn.Module],
    *,
    seq_len: int,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    repeats: int = 7,
    warmup: int = 2,
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{model label: {"perf/latency_ms_b1": ..., "perf/latency_ms_b32": ...}}`` on CPU at
    ``threads`` torch intra-op threads (default: the current count); fixed-length inputs of
    ``seq_len`` tokens (for token models), built once from the first model so that every model
    times the same batch."""
    with torch_threads(threads):
        return _measure(models, seq_len, batch_sizes, repeats, warmup)


def _measure(
    models: dict[str, nn.Module],
    seq_len: int,
    batch_sizes: tuple[int, ...],
    repeats: int,
    warmup: int,
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {label: {} for label in models}
    for m in models.values():
        m.eval()
    first = next(iter(models.values()))
    for bs in batch_sizes:
        inputs = example_inputs(first, bs, seq_len)
        times: dict[str, list[float]] = {label: [] for label in models}
        for _ in range(warmup):
            for m in models.values():
                _time_once(m, inputs)
        for _ in range(repeats):
            for label, m in models.items():
                times[label].append(_time_once(m, inputs))
        for label in models:
            out[label][f"perf/latency_ms_b{bs}"] = statistics.median(times[label])
    for label in models:
        out[label]["perf/threads"] = float(torch.get_num_threads())
    return out


def measure_latency_onnxruntime(
    models: dict[str, tuple[nn.Module, list[dict] | None]],
    *,
    seq_len: int,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    repeats: int = 7,
    warmup: int = 2,
    threads: int = 1,
) -> dict[str, dict[str, float]]:
    """``measure_latency`` in ONNX Runtime: each model exported to ONNX as ``orchestrator
    export --format onnx`` writes it (``steps``: the artifact's manifest steps; None: a dense
    model, exported as it is), run by one session of ``threads`` intra-op threads, the models
    interleaved on the same inputs; medians in ms, and ``perf/onnxruntime`` = 1."""
    import tempfile
    from pathlib import Path

    from orchestrator.compress import onnx_export

    first = next(iter(models.values()))[0]
    example = example_inputs(first, 2, seq_len)
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (model, steps) in models.items():
            path = Path(tmp) / f"{label}.onnx"
            if steps is None:
                onnx_export.export_float(model.eval(), path, example)
            else:
                onnx_export.to_onnx(model.eval(), steps, path, example)
            sessions[label] = onnx_export.session(path, threads)
    out: dict[str, dict[str, float]] = {label: {} for label in models}
    for bs in batch_sizes:
        feed = {k: v.numpy() for k, v in example_inputs(first, bs, seq_len).items()}
        times: dict[str, list[float]] = {label: [] for label in models}
        for i in range(warmup + repeats):
            for label, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feed)
                if i >= warmup:
                    times[label].append((time.perf_counter() - start) * 1000.0)
        for label in models:
            out[label][f"perf/latency_ms_b{bs}"] = statistics.median(times[label])
    for label in models:
        out[label]["perf/threads"] = float(threads)
        out[label]["perf/onnxruntime"] = 1.0
    return out


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """What the model's layers run on: a count per kind of leaf module that holds weights
    (``int8 Linear (torch.ao dynamic)``, ``fp32 Linear``, ``4-bit packed embedding``, ...)."""
    from orchestrator.compress.qmodules import (
        Int8Embedding,
        PackedEmbedding,
        dynamic_linear_type,
    )

    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, dynamic_linear_type()):
            kind = "int8 Linear (torch.ao dynamic int8 kernel)"
        elif isinstance(module, Int8Embedding):
            kind = "int8 embedding (rows dequantized on lookup)"
        elif isinstance(module, PackedEmbedding):
            kind = f"{module.bits}-bit packed embedding (rows dequantized on lookup)"
        elif isinstance(module, nn.Linear):
            kind = f"{str(module.weight.dtype).removeprefix('torch.')} Linear"
        elif isinstance(module, nn.Embedding):
            kind = f"{str(module.weight.dtype).removeprefix('torch.')} embedding"
        else:
            continue
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@torch.inference_mode()
def measure_decode(
    models: dict[str, nn.Module],
    *,
    prompt_len: int = 16,
    new_tokens: int = 32,
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, dict[str, float]]:
    """Greedy decoding speed of language models at batch 1: ``{label: {"perf/decode_tokens_per_s":
    ...}}``, the median over ``repeats`` of ``new_tokens`` generated after a ``prompt_len``-token
    prompt (prefill included, key-value cache on), the models interleaved as in
    ``measure_latency``. Exactly ``new_tokens`` are generated (no early stop at end of text)."""
    with torch_threads(threads):
        first = next(iter(models.values()))
        inputs = example_inputs(first, 1, prompt_len)
        kwargs = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=first.config.pad_token_id or 0,
        )
        times: dict[str, list[float]] = {label: [] for label in models}
        for m in models.values():
            m.eval()
            m.generate(**inputs, **kwargs)  # warm-up
        for _ in range(repeats):
            for label, m in models.items():
                start = time.perf_counter()
                m.generate(**inputs, **kwargs)
                times[label].append(time.perf_counter() - start)
        return {
            label: {"perf/decode_tokens_per_s": new_tokens / statistics.median(t)}
            for label, t in times.items()
        }

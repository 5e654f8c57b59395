"""Honest CPU latency: the median of repeated timed forwards after warm-up, dense and compressed
models interleaved in one loop so machine noise hits both alike; speed-up is their ratio."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

BATCH_SIZES = (1, 32)


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
) -> dict[str, dict[str, float]]:
    """``{model label: {"perf/latency_ms_b1": ..., "perf/latency_ms_b32": ...}}`` on CPU with
    the current torch thread count; fixed-length inputs of ``seq_len`` tokens (for token
    models), built once from the first model so that every model times the same batch."""
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

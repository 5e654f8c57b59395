"""Run a function on N local processes joined by a gloo process group on 127.0.0.1.

Used by the distributed test tier and the benchmarks: the same thing ``torchrun`` does, minus
the command line, with each rank's return value handed back to the caller.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Imported once, by the fork server every worker is forked from (see ``run_workers``): the
# loop brings torch, torch.distributed and transformers; DeepSpeed it imports only when used.
PRELOAD = ["orchestrator.loop", "deepspeed"]


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    port: int,
    args: tuple,
    queue: mp.Queue,
    environ: dict[str, str],
) -> None:
    # The caller's environment now, not the fork server's when it started.
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    # One intra-op thread per rank: two ranks on two cores must not oversubscribe them.
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # report any failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(
    fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 600
) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` new processes; returns the results
    by rank. ``fn`` must be importable (module level) and its result picklable.

    The processes are forked from multiprocessing's fork server, which imports ``PRELOAD``
    once and stays up for the caller's life: a worker starts with torch, transformers and
    DeepSpeed imported (seconds per process on two cores otherwise, every call) and nothing
    else of the caller's. The fork server never computes, so no thread pool is forked."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the fork server starts, the first call
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue, environ))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def tiny_classifier(vocab_size: int = 500) -> torch.nn.Module:
    """A 2-layer BERT classifier (3 labels) without dropout, seeded: small enough for 2-process
    tests, and the same function on every rank and every run."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return BertForSequenceClassification(config)


def deepspeed_bf16(stage: int, world: int, batch_size: int = 4, lr: float = 1e-3) -> Any:
    """A ``TrainConfig`` for DeepSpeed ZeRO ``stage`` in bf16 with AdamW and no warm-up: the
    strategy tests' usual run."""
    from orchestrator.config.schema import TrainConfig

    return TrainConfig(
        strategy="deepspeed",
        zero_stage=stage,
        precision="bf16",
        optimizer="adamw",
        batch_size=batch_size,
        lr=lr,
        warmup_ratio=0.0,
        num_workers=world,
    )


def random_token_batches(seed: int, n: int = 3, vocab: int = 200) -> list[dict[str, Any]]:
    """``n`` batches of 4 x 12 random token ids with 3-class labels, seeded per caller."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1, vocab, (4, 12), generator=g),
            "labels": torch.randint(0, 3, (4,), generator=g),
        }
        for _ in range(n)
    ]


def train_steps(strategy: Any, batches: list[dict[str, Any]]) -> list[float]:
    """One optimizer step per batch through ``strategy`` (no accumulation); the losses."""
    losses = []
    for batch in batches:
        with strategy.accumulate(boundary=True), strategy.autocast():
            loss = strategy.model(**batch).loss
        strategy.backward(loss)
        strategy.step()
        losses.append(float(loss.detach().float()))
    return losses


def run_job_worker(rank: int, world: int, job: dict, store: str) -> dict:
    """``loop.run`` of the job ``job`` (a dict) as one of ``world`` workers; the checkpoint of
    the final report (the artifact and compress_report.json) is copied to ``store``. Returns
    the run's final metrics."""
    import shutil
    from pathlib import Path

    from orchestrator import loop
    from orchestrator.config import validate_job

    def report(metrics: dict, folder: Path | None) -> None:
        if folder is not None and "compress/size_bytes" in metrics:
            shutil.copytree(folder, Path(store), dirs_exist_ok=True)

    ctx = loop.WorkerContext(rank=rank, world_size=world, report=report, local_world_size=world)
    return loop.run(validate_job(job), ctx)

"""The training loop every worker runs. Plain torch.distributed: no Ray, no DeepSpeed imports.

Ray (``orchestrator.launch``) or a test harness supplies a ``WorkerContext``: rank, world size,
how to report metrics with a checkpoint, and the checkpoint to resume from. The loop reads top to
bottom: data -> model -> strategy -> (resume) -> steps with periodic eval / checkpoint -> final
eval on validation and test -> final checkpoint with an exportable model.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator import data as data_lib
from orchestrator import finalize, models, strategies
from orchestrator.config.loader import dump_job
from orchestrator.config.schema import JobSpec, TrainConfig
from orchestrator.files import write_atomic, write_dir_atomic
from orchestrator.safeload import CHECKPOINT_FIX, load_json

Report = Callable[[dict[str, float], Path | None], None]
# In a final checkpoint only: the run's final metrics. A run restored from it had finished.
FINAL_FILE = "final.json"


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    report: Report = field(default=lambda metrics, checkpoint: None)
    restore_dir: Path | None = None


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _all_reduce_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def log(message: str) -> None:
    """A progress line on stdout. Not ``print``: Ray Train patches ``print`` in workers to also
    go through its logger, which printed every line twice on the driver."""
    sys.stdout.write(f"[orchestrator] {message}\n")
    sys.stdout.flush()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def evaluate(
    strategy: strategies.Strategy,
    bundle: data_lib.DataBundle,
    split: str,
    batch_size: int,
    ctx: WorkerContext,
    device: torch.device,
) -> dict[str, float]:
    """Accuracy and mean loss over the whole split. Each rank scores its shard; the sums are
    all-reduced so every rank returns the identical numbers."""
    batches = bundle.eval_batches(split, batch_size, ctx.rank, ctx.world_size)
    sums = finalize.score(strategy.eval_model, batches, device, strategy.autocast)
    correct, total, loss_sum = _all_reduce_sum(sums, device)
    key = finalize.split_key(split)
    return {f"{key}/accuracy": correct / total, f"{key}/loss": loss_sum / total}


def plan_steps(tspec: TrainConfig, bundle: data_lib.DataBundle, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a run with ``world_size`` workers."""
    steps_per_epoch = bundle.batches_per_epoch(tspec.batch_size, world_size) // (
        tspec.grad_accum_steps
    )
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training split ({bundle.sizes['train']} examples) is smaller than one optimizer "
            f"step ({tspec.batch_size} x {tspec.grad_accum_steps} x {world_size} workers): "
            "lower train.batch_size / train.grad_accum_steps or use more data"
        )
    return steps_per_epoch, tspec.max_steps or math.ceil(tspec.epochs * steps_per_epoch)


def seed_dropout(seed: int, rank: int, step: int) -> None:
    """Seed the RNG behind dropout from (job seed, rank, step). Called at the start and after
    every checkpoint, so a run restarted from the checkpoint of step N draws what the
    uninterrupted run drew after step N. Dropout differs per rank, as in any data-parallel
    run; the weights were seeded identically before."""
    torch.manual_seed(seed + 1000 * (rank + 1) + 1_000_003 * step)


def device_for(spec: JobSpec, ctx: WorkerContext) -> torch.device:
    if spec.resources.gpus_per_worker > 0 and torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def _report_finished(ctx: WorkerContext, restore: Path) -> dict[str, float]:
    """Restored from a final checkpoint (the run had finished: the same job started again, or a
    worker lost after the last report): report its metrics and its files again instead of
    training, since the final checkpoint holds no state to train on from."""
    saved = load_json(restore / FINAL_FILE, what="checkpoint file", fix=CHECKPOINT_FIX)
    metrics = {k: float(v) for k, v in saved.items()}
    if ctx.rank != 0:
        ctx.report(metrics, None)
        return metrics
    folder = Path(tempfile.mkdtemp(prefix="orch-ckpt-"))
    shutil.copytree(restore, folder, dirs_exist_ok=True)
    step = int(metrics.get("train/step", 0))
    log(f"the run had finished (step {step}); reporting its final checkpoint again ({restore})")
    ctx.report(metrics, folder)
    shutil.rmtree(folder, ignore_errors=True)
    return metrics


def run(spec: JobSpec, ctx: WorkerContext) -> dict[str, float]:
    """Train ``spec`` on this worker; returns the final metrics (identical on every rank)."""
    started = time.perf_counter()
    if ctx.restore_dir is not None and (ctx.restore_dir / FINAL_FILE).is_file():
        return _report_finished(ctx, ctx.restore_dir)
    tspec = spec.train
    device = device_for(spec, ctx)
    is_main = ctx.rank == 0

    tokenizer = models.build_tokenizer(spec.model)
    # Rank 0 tokenizes and fills the cache first; the others then read it instead of repeating it.
    if not is_main and dist.is_initialized():
        dist.barrier()
    bundle = data_lib.build(spec.data, tokenizer)
    if is_main and dist.is_initialized():
        dist.barrier()

    steps_per_epoch, total_steps = plan_steps(tspec, bundle, ctx.world_size)

    # Compression comes before the strategy wraps the model: the optimizer, DDP buckets and ZeRO
    # partitions must see the final (factorized, structurally pruned, fake-quant) modules.
    creport = None
    if spec.compress.enabled:
        calib = finalize.calibration_batches(spec, bundle)
        model, creport = finalize.build_compressed(spec, bundle, tokenizer, calib, total_steps)
    else:
        model = models.build_model(spec.model, bundle.num_labels, tokenizer, seed=tspec.seed)
        finalize.label_config(model, bundle)
    pruner = creport.pruner if creport is not None else None

    strategy = strategies.build(tspec, device)
    strategy.prepare(model, total_steps)
    state = {"step": 0, "epoch": 0, "micro_step": 0, "samples_seen": 0}
    if ctx.restore_dir is not None:
        state.update(strategy.load_checkpoint(ctx.restore_dir))
        if pruner is not None:
            pruner.restore_from_weights()
        if is_main:
            log(f"resumed from step {state['step']} ({ctx.restore_dir})")
    seed_dropout(tspec.seed, ctx.rank, state["step"])

    def checkpoint(metrics: dict[str, float], final: bool) -> None:
        """Every rank writes its part into a rank-local folder, then reports it; Ray merges the
        ranks' folders into one checkpoint in the run's storage."""
        folder = Path(tempfile.mkdtemp(prefix="orch-ckpt-"))
        if not final:
            # The final checkpoint carries what the run produced, not the state to train on
            # from (optimizer moments, ZeRO shards: several times the model, of no use once
            # training is done). Every rank skips it alike: on DeepSpeed it is a collective.
            strategy.save_checkpoint(folder, dict(state))
        full = strategy.full_state_dict() if final else None  # collective on ZeRO-3
        if is_main:
            write_atomic(folder / "job.yaml", dump_job(spec))
        if full is not None and spec.compress.enabled:
            metrics.update(export_compressed(full, folder / "model"))
        elif full is not None and is_main:

            def save_model(tmp: Path) -> None:
                strategy.module.save_pretrained(str(tmp), state_dict=full)
                if tokenizer is not None:  # image models (the MLP) have none
                    tokenizer.save_pretrained(str(tmp))

            write_dir_atomic(folder / "model", save_model)
        if final:
            # Time spent in this function: data, model, compression, training, evaluation and
            # the artifact's measurement. The run's wall time minus this is orchestration cost.
            # The slowest rank's, so that every rank reports identical metrics.
            metrics["time/worker_s"] = _all_reduce_max(time.perf_counter() - started, device)
            if is_main:  # marks the checkpoint final: a restore from it reports it again
                write_atomic(folder / FINAL_FILE, json.dumps(metrics, indent=2, sort_keys=True))
        ctx.report(metrics, folder if any(folder.iterdir()) else None)
        shutil.rmtree(folder, ignore_errors=True)
        # A run resumed from this checkpoint re-seeds the same way: it continues exactly as
        # this one does (same dropout masks), so a worker restart does not change the result.
        seed_dropout(tspec.seed, ctx.rank, state["step"])

    def export_compressed(full: dict[str, torch.Tensor], folder: Path) -> dict[str, float]:
        """Rank 0 rebuilds the compressed structure on a plain CPU model, loads the trained
        weights, writes the artifact and measures it while the other ranks wait; the figures
        are then broadcast so every rank reports the same metrics."""
        out: list[dict[str, float] | None] = [None]
        if is_main:
            export_model, report = finalize.build_compressed(
                spec, bundle, tokenizer, calib, total_steps
            )
            export_model.load_state_dict(full)
            out[0] = finalize.finalize(
                spec,
                export_model,
                report,
                bundle,
                tokenizer,
                folder,
                int(creport.metrics["compress/params_before"]),
            )
            write_atomic(
                folder.parent / "compress_report.json",
                json.dumps({"job": spec.name, **report.to_dict()}, indent=2),
            )
        if dist.is_initialized():
            dist.broadcast_object_list(out, src=0)
        return out[0]

    metrics: dict[str, float] = {}
    loss_sum = loss_n = 0.0
    window_start, window_samples = time.perf_counter(), 0
    gas = tspec.grad_accum_steps
    model_fwd = strategy.model
    model_fwd.train()
    while state["step"] < total_steps:
        batches = bundle.train_batches(
            tspec.batch_size,
            ctx.rank,
            ctx.world_size,
            tspec.seed,
            state["epoch"],
            skip=state["micro_step"],
        )
        for batch in batches:
            i = state["micro_step"] % gas
            if state["micro_step"] >= steps_per_epoch * gas:
                break  # leftover micro-batches that do not fill an optimizer step
            batch = {k: v.to(device) for k, v in batch.items()}
            with strategy.accumulate(boundary=(i == gas - 1)), strategy.autocast():
                loss = model_fwd(**batch).loss
            strategy.backward(loss)
            loss_sum += loss.item()
            loss_n += 1
            state["micro_step"] += 1
            window_samples += batch["labels"].shape[0]
            if i != gas - 1:
                continue
            strategy.step()
            state["step"] += 1
            step = state["step"]
            if pruner is not None:
                # After the optimizer: Adam's moments would move pruned weights off zero.
                pruner.step(step, total_steps, strategy.apply_masks_)
            last = step >= total_steps
            # Step 1 is logged too: it shows how long start-up took before training began.
            logged = step % tspec.log_every == 0 or step == 1
            if logged or last:
                # The slowest rank's time: throughput is the whole group's, same on every rank.
                elapsed = _all_reduce_max(time.perf_counter() - window_start, device)
                loss_sum, loss_n, samples = _all_reduce_sum(
                    [loss_sum, loss_n, window_samples], device
                )
                state["samples_seen"] += int(samples)
                metrics = {
                    "train/loss": loss_sum / max(loss_n, 1),
                    "train/samples_per_s": samples / max(elapsed, 1e-9),
                    "train/lr": strategy.current_lr(),
                    "train/step": float(step),
                    "train/epoch": state["epoch"] + state["micro_step"] / (steps_per_epoch * gas),
                }
                if is_main:
                    log(
                        f"step {step}/{total_steps} | epoch "
                        f"{metrics['train/epoch']:.2f} | loss {metrics['train/loss']:.4f} | lr "
                        f"{metrics['train/lr']:.2e} | "
                        f"{metrics['train/samples_per_s']:.1f} samples/s"
                    )
                loss_sum = loss_n = 0.0
                window_start, window_samples = time.perf_counter(), 0
            if last:
                break
            do_eval = tspec.eval_every and step % tspec.eval_every == 0
            do_ckpt = tspec.checkpoint_every and step % tspec.checkpoint_every == 0
            if do_eval:
                metrics.update(
                    evaluate(strategy, bundle, "validation", tspec.batch_size, ctx, device)
                )
                if is_main:
                    log(
                        f"step {step} | eval/accuracy {metrics['eval/accuracy']:.4f} | "
                        f"eval/loss {metrics['eval/loss']:.4f}"
                    )
            if do_ckpt:
                checkpoint(dict(metrics), final=False)
            elif do_eval or logged:
                # Intermediate results (Tune's schedulers and TensorBoard see the curve).
                ctx.report(dict(metrics), None)
            if do_eval or do_ckpt:
                window_start = time.perf_counter()  # eval / checkpoint time is not training time
        if state["step"] >= total_steps:
            break
        state["epoch"] += 1
        state["micro_step"] = 0

    if not spec.compress.enabled:
        # A compressed run is scored on its artifact instead (export_compressed): what ships.
        metrics.update(evaluate(strategy, bundle, "validation", tspec.batch_size, ctx, device))
        metrics.update(evaluate(strategy, bundle, "test", tspec.batch_size, ctx, device))
    metrics["train/step"] = float(state["step"])
    metrics["mem/peak_mb"] = _all_reduce_max(peak_memory_mb(device), device)
    checkpoint(metrics, final=True)  # the final figures (artifact measurements) land in metrics
    return metrics

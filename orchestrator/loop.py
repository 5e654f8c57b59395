"""The training loop every worker runs. Plain torch.distributed: no Ray, no DeepSpeed imports.

Ray (``orchestrator.launch``) or a test harness supplies a ``WorkerContext``: rank, world size,
the device, how to report metrics with a checkpoint, and the checkpoint to resume from.
``Trainer.fit`` reads top to bottom: build data, model (compressed: its training form) and
strategy; resume; then optimizer steps, each followed by the small steps that decide for
themselves whether they run now (log, evaluate, checkpoint); then the final export, which
writes the model that ships and measures that.
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orchestrator import data as data_lib
from orchestrator import finalize, models, strategies
from orchestrator.compress import CompressionReport, skeleton
from orchestrator.compress.measure import torch_threads
from orchestrator.compress.technique import Workers
from orchestrator.config.loader import dump_job
from orchestrator.config.schema import JobSpec, TrainConfig
from orchestrator.distill import Distiller, emulated_bf16_note, prepare_teacher
from orchestrator.files import write_atomic, write_dir_atomic
from orchestrator.safeload import CHECKPOINT_FIX, load_json

Report = Callable[[dict[str, Any], Path | None], None]
# In a final checkpoint only: the run's final metrics. A run restored from it had finished.
FINAL_FILE = "final.json"
# Set (True) in the one report that carries the run's final metrics and model; progress
# reports during training never have it.
FINAL_REPORT = "final_report"


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    report: Report = field(default=lambda metrics, checkpoint: None)
    restore_dir: Path | None = None
    # The device this worker trains on, as its launcher assigned it (Ray Train picks the GPU
    # of a worker, fractional or several GPUs per worker included); None: the CPU.
    device: torch.device | None = None
    # Ranks on this worker's node (this one included): while rank 0 exports alone, the CPU
    # threads of the others on its node are idle and its to use.
    local_world_size: int = 1


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


def _node_threads(local_world_size: int, device: torch.device) -> int | None:
    """Torch's intra-op threads for rank 0 while it works alone (the export: evaluating the
    artifact on validation and test) and the others wait for it in a collective: each rank runs
    ``torch.get_num_threads()`` threads (Ray sets them to the worker's CPUs), so the node's
    share of the run's CPUs is that times the local ranks, at most the cores this process may
    use. None (leave them) off the CPU or when that is no more than now. Used as
    ``torch_threads(_node_threads(...))``; latency is still timed at ``measure.threads``
    (``measure_latency`` sets its own)."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = min(before * max(1, local_world_size), cores or 1)
    if device.type != "cpu" or threads <= before:
        return None
    return threads


def _broadcast(value: Any, is_main: bool) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value if is_main else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value``, by rank."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def log(message: str) -> None:
    """A progress line on stdout. Not ``print``: Ray Train patches ``print`` in workers to also
    go through its logger, which printed every line twice on the driver."""
    sys.stdout.write(f"[orchestrator] {message}\n")
    sys.stdout.flush()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


@dataclass
class TrainState:
    """Where training is; saved with every checkpoint and restored from it."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    micro_step: int = 0  # micro-batches of this epoch consumed
    samples_seen: int = 0  # training examples over all ranks


class Window:
    """What this rank trained on since the last report: summed loss, micro-batches, examples,
    and since when (evaluation and checkpoint time excluded)."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.loss_sum, self.batches, self.samples = 0.0, 0, 0
        self.start = time.perf_counter()

    def add(self, loss: float, samples: int) -> None:
        self.loss_sum += loss
        self.batches += 1
        self.samples += samples


class Trainer:
    """One worker's run of a job: see the module docstring for the order of things."""

    def __init__(self, spec: JobSpec, ctx: WorkerContext) -> None:
        self.spec, self.ctx = spec, ctx
        self.tspec = spec.train
        self.device = ctx.device or torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.is_main = ctx.rank == 0
        self.started = time.perf_counter()

        self.tokenizer = models.build_tokenizer(spec.model)
        # Rank 0 tokenizes and fills the cache first; the others then read it instead.
        if not self.is_main and dist.is_initialized():
            dist.barrier()
        self.bundle = data_lib.build(spec.data, self.tokenizer, models.task_of(spec.model))
        if self.is_main and dist.is_initialized():
            dist.barrier()
        self.steps_per_epoch, self.total_steps = plan_steps(self.tspec, self.bundle, ctx.world_size)

        # Compression comes before the strategy wraps the model: the optimizer, DDP buckets and
        # ZeRO partitions must see the final (factorized, structurally pruned, fake-quant)
        # modules.
        self.creport: CompressionReport | None = None
        if spec.compress.enabled:
            calib = finalize.calibration_batches(spec, self.bundle)
            model, self.creport = finalize.build_compressed(
                spec,
                self.bundle,
                self.tokenizer,
                calib,
                self.total_steps,
                agree=lambda value: _broadcast(value, self.is_main),
                workers=Workers(ctx.rank, ctx.world_size, _gather),
            )
        else:
            model = models.build_model(
                spec.model, self.bundle.num_labels, self.tokenizer, seed=self.tspec.seed
            )
            finalize.label_config(model, self.bundle)
        self.hooks = self.creport.hooks if self.creport is not None else []
        self.distiller = self.build_distiller() if self.tspec.distill is not None else None
        self.strategy = strategies.build(self.tspec, self.device)
        self.strategy.prepare(model, self.total_steps)
        self.state = TrainState()
        self.window = Window()

    def build_distiller(self) -> Distiller:
        """The frozen dense teacher (the job's model before compression: in a search, the dense
        baseline), on this worker's device with its weights at ``distill.teacher_precision``,
        running under the training precision's autocast."""
        precision = self.tspec.distill.teacher_precision
        teacher = prepare_teacher(
            models.build_model(
                self.spec.model, self.bundle.num_labels, self.tokenizer, seed=self.tspec.seed
            ),
            precision,
            self.device,
        )
        note = emulated_bf16_note(precision, self.device)
        if note is not None and self.is_main:
            log(note)
        bf16 = self.tspec.precision == "bf16"

        def autocast() -> Any:
            return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

        # A student with blocks removed is matched to the teacher blocks it kept.
        steps = self.creport.steps if self.creport is not None else []
        kept = [s.technique.kept_hidden_states(s.entry) for s in steps]
        block_map = next((k for k in kept if k is not None), None)
        return Distiller(teacher, self.tspec.distill, autocast, block_map)

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to ``total_steps`` (from the restored step), then export; returns the final
        metrics, identical on every rank."""
        self.restore()
        seed_dropout(self.tspec.seed, self.ctx.rank, self.state.step)
        self.strategy.model.train()
        while self.state.step < self.total_steps:
            for batch in self.epoch_batches():
                if self.train_step(batch):
                    self.after_optimizer_step()
                    if self.state.step >= self.total_steps:
                        break
            if self.state.step >= self.total_steps:
                break
            self.state.epoch += 1
            self.state.micro_step = 0
        return self.finish()

    def epoch_batches(self) -> Any:
        """This rank's micro-batches of the current epoch, from where the epoch stands, only
        as many as fill whole optimizer steps."""
        t = self.tspec
        left = self.steps_per_epoch * t.grad_accum_steps - self.state.micro_step
        batches = self.bundle.train_batches(
            t.batch_size,
            self.ctx.rank,
            self.ctx.world_size,
            t.seed,
            self.state.epoch,
            skip=self.state.micro_step,
        )
        for i, batch in enumerate(batches):
            if i >= left:
                return
            yield batch

    def train_step(self, batch: dict[str, torch.Tensor]) -> bool:
        """Forward and backward of one micro-batch; the optimizer steps on the last micro-batch
        of each ``grad_accum_steps``. Returns True when it did."""
        gas = self.tspec.grad_accum_steps
        boundary = self.state.micro_step % gas == gas - 1
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.strategy.accumulate(boundary=boundary), self.strategy.autocast():
            if self.distiller is None:
                loss = self.strategy.model(**batch).loss
            else:
                hidden = (
                    {"output_hidden_states": True} if self.distiller.wants_hidden_states else {}
                )
                loss = self.distiller.loss(self.strategy.model(**batch, **hidden), batch)
        self.strategy.backward(loss)
        self.window.add(loss.item(), int(batch["labels"].shape[0]))
        self.state.micro_step += 1
        if not boundary:
            return False
        self.strategy.step()
        self.state.step += 1
        for hook in self.hooks:
            # After the optimizer: Adam's moments would move pruned weights off zero.
            hook.after_step(self.state.step, self.total_steps, self.strategy.apply_masks_)
        return True

    def after_optimizer_step(self) -> None:
        """The periodic steps after an optimizer step, each when it is due. Every report
        carries the training metrics of this step (not of an earlier logging step)."""
        step = self.state.step
        if step >= self.total_steps:
            return  # the final report (``finish``) covers the last step
        evaluate, checkpoint = self.eval_due(step), self.checkpoint_due(step)
        if not (self.log_due(step) or evaluate or checkpoint):
            return
        metrics = self.train_metrics()
        if evaluate:
            metrics.update(self.evaluate("validation"))
        if checkpoint:
            self.checkpoint(metrics)
        else:
            # Progress results: Tune's schedulers and TensorBoard see the curve.
            self.ctx.report(metrics, None)
        if evaluate or checkpoint:
            self.window.start = time.perf_counter()  # eval / checkpoint time is not training

    def log_due(self, step: int) -> bool:
        # Step 1 is logged too: it shows how long start-up took before training began.
        return step % self.tspec.log_every == 0 or step == 1

    def eval_due(self, step: int) -> bool:
        return bool(self.tspec.eval_every) and step % self.tspec.eval_every == 0

    def checkpoint_due(self, step: int) -> bool:
        return bool(self.tspec.checkpoint_every) and step % self.tspec.checkpoint_every == 0

    # -- the steps -----------------------------------------------------------------------------

    def restore(self) -> None:
        """Continue from the checkpoint the launcher hands over, if any."""
        if self.ctx.restore_dir is None:
            return
        saved = self.strategy.load_checkpoint(self.ctx.restore_dir)
        self.state = TrainState(**{k: int(saved[k]) for k in asdict(TrainState()) if k in saved})
        for hook in self.hooks:
            hook.after_restore()
        if self.is_main:
            log(f"resumed from step {self.state.step} ({self.ctx.restore_dir})")

    def train_metrics(self) -> dict[str, float]:
        """The training window's loss and throughput over all ranks (the slowest rank's time:
        the whole group's throughput, the same on every rank); starts a new window."""
        w, step = self.window, self.state.step
        elapsed = _all_reduce_max(time.perf_counter() - w.start, self.device)
        loss_sum, batches, samples = _all_reduce_sum(
            [w.loss_sum, w.batches, w.samples], self.device
        )
        self.state.samples_seen += int(samples)
        per_epoch = self.steps_per_epoch * self.tspec.grad_accum_steps
        metrics = {
            "train/loss": loss_sum / max(batches, 1),
            "train/samples_per_s": samples / max(elapsed, 1e-9),
            "train/samples_seen": float(self.state.samples_seen),
            "train/lr": self.strategy.current_lr(),
            "train/step": float(step),
            "train/epoch": self.state.epoch + self.state.micro_step / per_epoch,
        }
        if self.is_main:
            log(
                f"step {step}/{self.total_steps} | epoch {metrics['train/epoch']:.2f} | loss "
                f"{metrics['train/loss']:.4f} | lr {metrics['train/lr']:.2e} | "
                f"{metrics['train/samples_per_s']:.1f} samples/s"
            )
        w.restart()
        return metrics

    def evaluate(self, split: str) -> dict[str, float]:
        """The split's metrics (``finalize.split_metrics``) for the model being trained. Each rank
        scores its shard; the sums are all-reduced so every rank returns the same numbers."""
        batches = self.bundle.eval_batches(
            split, self.tspec.batch_size, self.ctx.rank, self.ctx.world_size
        )
        sums = finalize.score(
            self.strategy.eval_model, batches, self.device, self.strategy.autocast
        )
        correct, total, loss_sum = _all_reduce_sum(sums, self.device)
        key = finalize.split_key(split)
        metrics = finalize.split_metrics(key, correct, total, loss_sum, self.bundle.task)
        if self.is_main:
            log(
                f"step {self.state.step} | "
                + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            )
        return metrics

    def checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank writes its part of the training state into a rank-local folder and
        reports it; Ray merges the ranks' folders into one checkpoint in the run's storage."""
        folder = Path(tempfile.mkdtemp(prefix="orch-ckpt-"))
        self.strategy.save_checkpoint(folder, asdict(self.state))  # a collective on DeepSpeed
        if self.is_main:
            write_atomic(folder / "job.yaml", dump_job(self.spec))
        self.ctx.report(metrics, folder if any(folder.iterdir()) else None)
        shutil.rmtree(folder, ignore_errors=True)
        # A run resumed from this checkpoint re-seeds the same way: it continues exactly as
        # this one does (same dropout masks), so a worker restart does not change the result.
        seed_dropout(self.tspec.seed, self.ctx.rank, self.state.step)

    def finish(self) -> dict[str, float]:
        """The final report: the last training window, the exported model and its measured
        figures, in a checkpoint that holds what the run produced (the model, final.json), not
        the state to train on from (optimizer moments, ZeRO shards: several times the model,
        of no use once training is done)."""
        metrics = self.train_metrics()
        folder = Path(tempfile.mkdtemp(prefix="orch-ckpt-"))
        metrics.update(self.export(folder))
        metrics["mem/peak_mb"] = _all_reduce_max(peak_memory_mb(self.device), self.device)
        # Data, model, compression, training, evaluation and the artifact's measurement: the
        # run's wall time minus this is orchestration cost. The slowest rank's.
        metrics["time/worker_s"] = _all_reduce_max(time.perf_counter() - self.started, self.device)
        if self.is_main:
            write_atomic(folder / "job.yaml", dump_job(self.spec))
            # Marks the checkpoint final: a run restored from it reports it again.
            write_atomic(folder / FINAL_FILE, json.dumps(metrics, indent=2, sort_keys=True))
        self.ctx.report({**metrics, FINAL_REPORT: True}, folder if any(folder.iterdir()) else None)
        shutil.rmtree(folder, ignore_errors=True)
        return metrics

    def export(self, folder: Path) -> dict[str, float]:
        """The model that ships, written into ``folder/model`` and measured there: every rank
        gathers the full fp32 weights (a collective on ZeRO-3), rank 0 writes and scores what
        it wrote while the others wait (on the threads of the ranks of its node: see
        ``_node_threads``), and broadcasts the figures so every rank reports the same."""
        full = self.strategy.full_state_dict()
        metrics = None
        if self.is_main:
            started = time.perf_counter()
            with torch_threads(_node_threads(self.ctx.local_world_size, self.device)):
                if self.creport is not None:
                    metrics = self.export_compressed(full, folder)
                else:
                    metrics = self.export_dense(full, folder)
            metrics["time/export_s"] = time.perf_counter() - started
        return _broadcast(metrics, self.is_main)

    def export_dense(self, full: dict[str, torch.Tensor], folder: Path) -> dict[str, float]:
        """The fine-tuned model in Hugging Face format (fp32 safetensors), scored as saved:
        not the live model, which may hold 16-bit weights or run under autocast."""

        def save(tmp: Path) -> None:
            self.strategy.module.save_pretrained(str(tmp), state_dict=full)
            if self.tokenizer is not None:  # image models (the MLP) have none
                models.save_tokenizer(self.tokenizer, tmp)

        write_dir_atomic(folder / "model", save)
        saved = models.load_saved(folder / "model")
        # Its answers on validation and test, cached on this node under the key a search looks
        # them up by once this model is its baseline (the same files): the search's measurement
        # of the baseline and its trials then read them instead of evaluating it again.
        key = finalize.saved_model_spec(self.spec, str(folder / "model"))
        metrics, _ = finalize.dense_answers(key, saved, self.bundle)
        return metrics

    def export_compressed(self, full: dict[str, torch.Tensor], folder: Path) -> dict[str, float]:
        """The artifact, rebuilt from the applied steps (no second calibration, SVD or pruning:
        the manifest entries say what the structure is), holding the trained weights; written,
        reloaded as a user would and measured (``finalize.finalize``)."""
        config = copy.deepcopy(self.strategy.module.config)
        model = skeleton(config, self.creport.steps)
        model.load_state_dict(full)
        metrics = finalize.finalize(
            self.spec, model, self.creport, self.bundle, self.tokenizer, folder / "model"
        )
        report = {"job": self.spec.name, **self.creport.to_dict()}
        write_atomic(folder / "compress_report.json", json.dumps(report, indent=2))
        return metrics


def _report_finished(ctx: WorkerContext, restore: Path) -> dict[str, float]:
    """Restored from a final checkpoint (the run had finished: the same job started again, or a
    worker lost after the last report): report its metrics and its files again instead of
    training, since the final checkpoint holds no state to train on from."""
    saved = load_json(restore / FINAL_FILE, what="checkpoint file", fix=CHECKPOINT_FIX)
    metrics = {k: float(v) for k, v in saved.items()}
    if ctx.rank != 0:
        ctx.report({**metrics, FINAL_REPORT: True}, None)
        return metrics
    folder = Path(tempfile.mkdtemp(prefix="orch-ckpt-"))
    shutil.copytree(restore, folder, dirs_exist_ok=True)
    step = int(metrics.get("train/step", 0))
    log(f"the run had finished (step {step}); reporting its final checkpoint again ({restore})")
    ctx.report({**metrics, FINAL_REPORT: True}, folder)
    shutil.rmtree(folder, ignore_errors=True)
    return metrics


def run(spec: JobSpec, ctx: WorkerContext) -> dict[str, float]:
    """Train ``spec`` on this worker; returns the final metrics (identical on every rank)."""
    if ctx.restore_dir is not None and (ctx.restore_dir / FINAL_FILE).is_file():
        return _report_finished(ctx, ctx.restore_dir)
    return Trainer(spec, ctx).fit()

"""Fault tolerance, measured: a Ray Train worker process is SIGKILLed mid-run (as a lost node or
the OOM killer would); with ``train.max_failures`` the run restarts its worker group from the
last checkpoint, repeats at most the steps since that checkpoint, and ends with the metrics of an
uninterrupted run of the same seed. DDP and DeepSpeed ZeRO-3 bf16."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from orchestrator.config import load_job
from orchestrator.testing import faults

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
JOBS = {"ddp": "jobs/debug/ddp.yaml", "deepspeed": "jobs/debug/deepspeed_zero3.yaml"}
CHECKPOINT_EVERY, MAX_STEPS = 5, 20


def _overrides(tmp_path: Path, name: str) -> list[str]:
    return [
        f"name={name}",
        f"output.dir={tmp_path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"train.max_steps={MAX_STEPS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
        "train.eval_every=0",
        "train.log_every=1",
        "train.max_failures=1",
    ]


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_killed_worker_resumes_from_last_checkpoint(
    ray_cluster: str, tmp_path: Path, strategy: str
) -> None:
    from orchestrator import launch

    job = ROOT / JOBS[strategy]
    reference = launch.train(load_job(job, _overrides(tmp_path, "reference")))

    run = faults.run_and_kill_worker(
        [sys.executable, "-m", "orchestrator", "train", str(job), *_overrides(tmp_path, "killed")],
        kill_at_step=7,
        worker=0 if strategy == "ddp" else -1,  # rank 0 in one case, another rank in the other
        env={**os.environ, "RAY_ADDRESS": ray_cluster},
        cwd=tmp_path,
        timeout_s=600,
    )
    out = run.output
    assert run.returncode == 0, out[-4000:]
    assert run.killed_pid and run.last_step_before >= 7

    # Restarted from the newest checkpoint at or before the kill, not from scratch ...
    assert run.resumed_step is not None, out[-4000:]
    assert run.resumed_step > 0 and run.resumed_step % CHECKPOINT_EVERY == 0
    assert run.resumed_step <= run.last_step_before
    # ... so at most the steps since that checkpoint were done twice ...
    assert 0 <= run.steps_lost <= CHECKPOINT_EVERY
    # ... and the new group took up from there to the end, each step once.
    assert run.restarted_steps == list(range(run.resumed_step + 1, MAX_STEPS + 1)), out[-4000:]

    # Same data order, optimizer state and dropout seeds: the uninterrupted run's result.
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert metrics["train/step"] == MAX_STEPS
    for key in ("eval/accuracy", "test/accuracy"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-9), key
    for key in ("eval/loss", "test/loss"):
        assert metrics[key] == pytest.approx(reference[key], rel=1e-4), key
    recovery = run.first_step_time - run.kill_time
    print(
        f"{strategy}: kill at step {run.last_step_before}, resumed from {run.resumed_step}, "
        f"{run.steps_lost} steps lost, first step after {recovery:.1f} s"
    )

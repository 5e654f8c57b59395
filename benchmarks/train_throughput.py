"""Steady-state training throughput of ``orchestrator train`` against a bare torchrun loop.

Both run the same model (the packaged MiniLM), data, per-worker batch, optimizer and number of
steps with 2 workers, side by side in one invocation, for DDP and for DeepSpeed ZeRO-2. The
orchestrator runs through a real embedded Ray (``TorchTrainer``); the baseline is
``benchmarks/bare_loop.py`` under ``torchrun``. Both print progress lines in the same format:
steady state is the mean samples/s of the windows after the first ``--warmup`` steps; time to
first step is from process start to the step-1 line (Ray start-up, data, model, strategy set-up).

Run: python benchmarks/train_throughput.py [--steps 60]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\[orchestrator\] step (\d+)/\d+ .*?([\d.]+) samples/s")


def run(cmd: list[str], warmup: int) -> tuple[float, float]:
    """Run ``cmd``; return (steady-state samples/s, seconds to the first step)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first, rates = None, []
    out = []
    for line in proc.stdout:
        out.append(line)
        m = LINE.search(line)
        if not m:
            continue
        step, rate = int(m.group(1)), float(m.group(2))
        if step == 1 and first is None:
            first = time.perf_counter() - start
        elif step > warmup:
            rates.append(rate)
    if proc.wait() != 0 or not rates or first is None:
        sys.exit(f"failed: {' '.join(cmd)}\n{''.join(out[-40:])}")
    return statistics.mean(rates), first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--job", default="jobs/minilm_mr_finetune.yaml")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    rows = []
    for label, strat in [
        ("ddp", ["train.strategy=ddp"]),
        ("deepspeed zero-2", ["train.strategy=deepspeed", "train.zero_stage=2"]),
    ]:
        with tempfile.TemporaryDirectory() as out:
            orch_cmd = [
                str(bin_dir / "orchestrator"),
                "train",
                args.job,
                *strat,
                f"train.max_steps={args.steps}",
                "train.log_every=10",
                "train.eval_every=0",
                "train.checkpoint_every=0",
                f"output.dir={out}",
            ]
            orch, orch_first = run(orch_cmd, args.warmup)
        bare_cmd = [
            str(bin_dir / "torchrun"),
            "--nproc_per_node",
            "2",
            "benchmarks/bare_loop.py",
            "--job",
            args.job,
            "--strategy",
            strat[0].split("=")[1],
            "--steps",
            str(args.steps),
        ]
        bare, bare_first = run(bare_cmd, args.warmup)
        rows.append((label, orch, bare, orch / bare, orch_first, bare_first))
        print(f"{label}: orchestrator {orch:.1f} samples/s, bare {bare:.1f} samples/s", flush=True)
    print(f"\n2 workers, {args.steps} steps, steady state after step {args.warmup}")
    print(
        "| strategy | orchestrator samples/s | bare torchrun samples/s | ratio | "
        "time to first step: orchestrator / bare (s) |"
    )
    print("|---|---|---|---|---|")
    for label, orch, bare, ratio, of, bf in rows:
        print(f"| {label} | {orch:.1f} | {bare:.1f} | {ratio:.3f} | {of:.1f} / {bf:.1f} |")
    print(f"goal ratio >= 0.95: {'met' if all(r[3] >= 0.95 for r in rows) else 'NOT met'}")


if __name__ == "__main__":
    main()

"""Accuracy, artifact bytes and CPU latency of compression recipes on the fine-tuned MiniLM.

The base model is MiniLM fine-tuned on MR sentiment by ``jobs/minilm_mr_finetune.yaml`` (run
once and reused from ``runs/minilm-mr-finetune/model``; this script runs it if it is missing).
Each recipe is applied one-shot (``orchestrator compress`` path) and, separately, with a short
recovery fine-tune (the training loop in one process, ``--recovery-steps`` optimizer steps).
Every figure comes from the artifact written to disk and loaded back: test accuracy, bytes of
``model.safetensors`` + manifest, and latency at batch 1 and 32 (64 tokens) timed side by side
with the dense model in the same process.

Run: python benchmarks/compress_quality.py [--recovery-steps 60] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "runs/minilm-mr-finetune/model"

RECIPES: dict[str, dict] = {
    "dense": {},
    "int8 dynamic": {"quantize": {"method": "dynamic_int8"}},
    "4-bit weights": {
        "quantize": {"method": "weight_only", "bits": 4, "granularity": "group", "group_size": 64}
    },
    "50% magnitude": {"prune": {"method": "magnitude", "sparsity": 0.5}},
    "70% magnitude": {"prune": {"method": "magnitude", "sparsity": 0.7}},
    "90% magnitude": {"prune": {"method": "magnitude", "sparsity": 0.9}},
    "50% wanda": {"prune": {"method": "wanda", "sparsity": 0.5}},
    "70% wanda": {"prune": {"method": "wanda", "sparsity": 0.7}},
    "90% wanda": {"prune": {"method": "wanda", "sparsity": 0.9}},
    "25% structured": {"prune": {"method": "structured", "sparsity": 0.25}},
    "50% structured": {"prune": {"method": "structured", "sparsity": 0.5}},
    "svd r=0.25": {"factorize": {"method": "svd", "rank_ratio": 0.25}},
    "asvd r=0.25": {"factorize": {"method": "asvd", "rank_ratio": 0.25}},
    "svd r=0.5": {"factorize": {"method": "svd", "rank_ratio": 0.5}},
    "asvd r=0.5": {"factorize": {"method": "asvd", "rank_ratio": 0.5}},
    "combined: 50% structured + int8": {
        "prune": {"method": "structured", "sparsity": 0.5},
        "quantize": {"method": "dynamic_int8"},
    },
    "combined: 50% wanda attention + asvd FFN r=0.5 + 4-bit": {
        "prune": {"method": "wanda", "sparsity": 0.5, "include": ["*attention*"]},
        "factorize": {
            "method": "asvd",
            "rank_ratio": 0.5,
            "include": ["*intermediate.dense", "*output.dense"],
        },
        "quantize": {"method": "fake", "bits": 4, "granularity": "group", "group_size": 64},
    },
}


def base_job(steps: int, out: str) -> dict:
    return {
        "name": "bench",
        "model": {"path": str(BASE)},
        "data": {"name": "mr", "limit": 5000, "max_length": 64},
        "train": {
            "num_workers": 1,
            "batch_size": 32,
            "max_steps": max(steps, 1),
            "lr": 3e-5,
            "warmup_ratio": 0.1,
            "log_every": 1000,
        },
        "compress": {"calib_batches": 8},
        "output": {"dir": out},
    }


def one_shot(job: dict) -> dict[str, float]:
    from orchestrator import launch
    from orchestrator.config import validate_job
    from orchestrator.finalize import build_compressed, calibration_batches, finalize

    spec = validate_job(job)
    tokenizer, bundle = launch.preflight(spec)
    calib = calibration_batches(spec, bundle)
    model, report = build_compressed(spec, bundle, tokenizer, calib)
    with tempfile.TemporaryDirectory() as tmp:
        return finalize(
            spec,
            model,
            report,
            bundle,
            tokenizer,
            Path(tmp) / "model",
        )


def recovered(job: dict) -> dict[str, float]:
    from orchestrator import loop
    from orchestrator.config import validate_job

    return loop.run(validate_job(job), loop.WorkerContext())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recovery-steps", type=int, default=60)
    ap.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    args = ap.parse_args()
    if not (BASE / "config.json").is_file():
        subprocess.run(
            [
                str(Path(sys.executable).parent / "orchestrator"),
                "train",
                "jobs/minilm_mr_finetune.yaml",
            ],
            cwd=ROOT,
            check=True,
        )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; base {BASE}; "
        f"recovery {args.recovery_steps} steps x 32 examples",
        flush=True,
    )
    rows = []
    for name, recipe in RECIPES.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as out:
            job = base_job(args.recovery_steps, out)
            job["compress"].update(recipe)
            t = time.perf_counter()
            # "dense" (an empty recipe) goes through the same path: artifact, reload, eval,
            # latency; recovery would only fine-tune it further, so it is not run.
            shot = one_shot(job)
            rec = recovered(job) if recipe and args.recovery_steps > 0 else None
            rows.append((name, shot, rec))
            print(
                f"{name}: one-shot acc {shot['test/accuracy']:.4f}"
                + (f", recovered acc {rec['test/accuracy']:.4f}" if rec else "")
                + f", {shot['compress/size_bytes'] / 1e6:.1f} MB, "
                f"b32 {shot['perf/latency_ms_b32']:.0f} ms ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    print_table(rows)


def print_table(rows: list) -> None:
    dense = rows[0][1] if rows and rows[0][0] == "dense" else None
    print(
        "\n| recipe | test acc one-shot | test acc recovered | artifact MB | x smaller | "
        "latency b1 ms | latency b32 ms | speed-up b32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, shot, rec in rows:
        smaller = shot["compress/size_ratio"]
        rec_acc = f"{rec['test/accuracy']:.4f}" if rec else "-"
        print(
            f"| {name} | {shot['test/accuracy']:.4f} | {rec_acc} | "
            f"{shot['compress/size_bytes'] / 1e6:.2f} | {smaller:.2f} | "
            f"{shot['perf/latency_ms_b1']:.1f} | {shot['perf/latency_ms_b32']:.0f} | "
            f"{shot['perf/speedup']:.2f} |"
        )
    if dense:
        print(
            f"\ndense test accuracy {dense['test/accuracy']:.4f}; speed-ups are dense latency / "
            "compressed latency, timed side by side in the same process"
        )


if __name__ == "__main__":
    main()

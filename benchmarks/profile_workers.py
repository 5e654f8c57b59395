"""What splitting a sensitivity profile over a trial's workers saves: the wall time of the
per-layer profile of MiniLM-L6 (``compress.<stage>.allocate``) on gloo workers, side by side in
one run, for each family:

- ``1 worker``: one process with every core (a one-worker trial);
- ``2 workers, whole``: each of two workers measures every layer (what a two-worker trial did
  before the split: the same profile twice, each on half the cores);
- ``2 workers, split``: each measures half the layers and both receive the whole table
  (``compress.technique.Workers``; what a two-worker trial does now).

Each configuration reads its data from its own fresh cache folder, so no profile is read back
from the profile cache. The figure is ``Profile.seconds`` (the slowest worker's wall time) and
whether the split profile equals the single process's.

Run: python benchmarks/profile_workers.py [--families bits sparsity rank]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from orchestrator.testing import run_workers

FAMILIES: dict[str, dict[str, Any]] = {
    "bits": {
        "quantize": {
            "method": "weight_only",
            "granularity": "group",
            "group_size": 64,
            "allocate": {"avg_bits": 3.0},
        }
    },
    "sparsity": {"prune": {"method": "magnitude", "sparsity": 0.5, "allocate": {}}},
    "rank": {"factorize": {"method": "svd", "allocate": {"param_ratio": 0.5}}},
}


def job(family: str, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": f"profile-{family}",
        "model": {"name": args.model},
        "data": {
            "name": "mr",
            "limit": 600,
            "max_length": args.max_length,
            "cache_dir": str(cache),
        },
        "train": {"batch_size": args.batch_size},
        "compress": {**FAMILIES[family], "calib_batches": 2},
    }


def worker(rank: int, world: int, raw: dict[str, Any], split: bool) -> dict[str, Any]:
    from orchestrator import data, finalize, loop, models
    from orchestrator.compress.technique import Workers
    from orchestrator.config import validate_job

    spec = validate_job(raw)
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data.build(spec.data, tokenizer)
    calib = finalize.calibration_batches(spec, bundle)
    workers = Workers(rank, world, loop._gather) if split else Workers()
    _, report = finalize.build_compressed(spec, bundle, tokenizer, calib, workers=workers)
    entry = report.steps[0].entry["allocation"]
    prof = entry["profile"]
    return {
        "seconds": prof["seconds"],
        "kl": prof["kl"],
        "shape": (len(prof["layers"]), len(prof["values"]), prof["batches"]),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--model", default="minilm-l6", help="a packaged model name")
    ap.add_argument("--batch-size", type=int, default=16, help="sentences per calibration batch")
    ap.add_argument("--max-length", type=int, default=48, help="tokens per sentence")
    args = ap.parse_args()
    cpu = platform.processor() or "unknown CPU"
    print(
        f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPUs ({cpu}), torch "
        f"{torch.__version__}; {args.model}, 2 calibration batches of {args.batch_size} "
        f"sentences x {args.max_length} tokens\n"
    )
    print(
        "| family | layers x candidates x batches | configuration | threads per worker | "
        "profile seconds | vs 1 worker | equals 1 worker's profile |"
    )
    print("|---|---|---|---|---|---|---|")
    for family in args.families:
        rows = []
        for label, world, split in (
            ("1 worker", 1, False),
            ("2 workers, whole", 2, False),
            ("2 workers, split", 2, True),
        ):
            with tempfile.TemporaryDirectory(prefix="profile-workers-") as tmp:
                results = run_workers(worker, world, job(family, Path(tmp), args), split)
            rows.append((label, results))
        alone = rows[0][1][0]
        for label, results in rows:
            seconds = max(r["seconds"] for r in results)
            same = all(
                torch.allclose(
                    torch.tensor(r["kl"]), torch.tensor(alone["kl"]), rtol=1e-4, atol=1e-7
                )
                for r in results
            )
            shape = " x ".join(map(str, alone["shape"]))
            print(
                f"| {family} | {shape} | {label} | {results[0]['threads']} | {seconds:.1f} | "
                f"{seconds / alone['seconds']:.2f}x | {'yes' if same else 'no'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Mixed precision from a measured sensitivity profile against one bit width for every layer
(issue #14), one-shot on the fine-tuned MiniLM-L6: weight-only group quantization of every
Linear (group 64, embeddings at 8 bits in every row), either uniform at ``b`` bits or
``compress.quantize.allocate`` with the widths 2, 3, 4 and 8 under a mean of ``b`` bits. Each
row is measured on the reloaded artifact as a trial measures it: the mean bit width of the
Linear weights, bytes on disk, and the accuracy drop on the validation and test splits paired
with the dense model (95 % interval); for the allocated rows, the profile's cost.

The dense model is a MiniLM-L6 fine-tuned on the quickstart's data (``--dense``: a folder
``benchmarks/distill_recovery.py`` writes, by default /tmp/distill/dense).

Run: python benchmarks/allocation.py [--dense /tmp/distill/dense] [--bits 2 3 4]
     [--calib-batches 2] [--no-uniform]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from orchestrator import data, finalize, models
from orchestrator.config.loader import load_job

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "quickstart.yaml"
BASE = {"method": "weight_only", "granularity": "group", "group_size": 64, "embedding_bits": 8}
WIDTHS = [2, 3, 4, 8]


def _recipes(bits: list[float], calib_batches: int, uniform: bool) -> dict[str, dict[str, Any]]:
    rows = {}
    allocate = {"bits": WIDTHS, "calib_batches": calib_batches}
    for b in bits:
        if uniform and float(b).is_integer():
            rows[f"uniform {b:g} bits"] = {**BASE, "bits": int(b)}
        rows[f"allocated, mean {b:g} bits"] = {**BASE, "allocate": {**allocate, "avg_bits": b}}
    return rows


def _drop(m: dict[str, float], p: str) -> str:
    return (
        f"{100 * m[f'{p}/accuracy_drop']:+.2f} [{100 * m[f'{p}/accuracy_drop_lo']:+.2f}, "
        f"{100 * m[f'{p}/accuracy_drop_hi']:+.2f}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, default=Path("/tmp/distill/dense"))
    parser.add_argument("--bits", nargs="*", type=float, default=[2.0, 2.5, 3.0, 4.0])
    parser.add_argument(
        "--calib-batches", type=int, default=2, help="batches the sensitivity is measured on"
    )
    parser.add_argument("--no-uniform", action="store_true", help="only the allocated rows")
    args = parser.parse_args()
    base = load_job(JOB, {"model": {"path": str(args.dense)}, "compress": {"vocab": None}})
    tokenizer = models.build_tokenizer(base.model)
    bundle = data.build(base.data, tokenizer)
    print(
        f"MiniLM-L6 fine-tuned on MR ({bundle.sizes}), one-shot weight-only group-64 "
        f"quantization of every Linear, 8-bit embeddings; {base.compress.calib_batches} "
        "calibration batches of the training split"
    )
    print(
        "| recipe | mean Linear bits | MB on disk | val drop, points [95 %] "
        "| test drop, points [95 %] | profile |"
    )
    print("|---|---|---|---|---|---|")
    for label, quantize in _recipes(args.bits, args.calib_batches, not args.no_uniform).items():
        compress = {"vocab": None, "prune": None, "quantize": quantize}
        spec = load_job(JOB, {"model": {"path": str(args.dense)}, "compress": compress})
        calib = finalize.calibration_batches(spec, bundle)
        model, report = finalize.build_compressed(spec, bundle, tokenizer, calib)
        step = next(s for s in report.steps if s.config.stage == "quantize")
        allocation = step.entry.get("allocation")
        with tempfile.TemporaryDirectory() as tmp:
            m = finalize.finalize(spec, model, report, bundle, tokenizer, Path(tmp) / "model")
        if allocation:
            p = allocation["profile"]
            mean = allocation["mean_bits"]
            cost = (
                f"{p['seconds']:.0f} s ({len(p['layers'])} layers x {len(p['bits'])} widths x "
                f"{p['batches']} batches)"
            )
        else:
            mean, cost = float(quantize["bits"]), "-"
        print(
            f"| {label} | {mean:.2f} | {m['compress/size_bytes'] / 1e6:.2f} | {_drop(m, 'eval')} "
            f"| {_drop(m, 'test')} | {cost} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

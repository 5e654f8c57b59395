"""What each compression technique contributes to size and speed on MiniLM-L6, one row per
technique and then combined, measured on the reloaded artifacts exactly as a trial measures
them: bytes on disk of the whole artifact folder (tokenizer included) against the dense
model's, latency at batch 32 on ``measure.threads`` threads interleaved with the dense model,
and the accuracy drop on the validation and test splits paired with the dense model, with its
95 % interval. One-shot (no recovery training): the rows show what a technique costs before
recovery wins accuracy back.

The dense model is a MiniLM-L6 fine-tuned on the quickstart's data (``--dense``: a folder
``benchmarks/distill_recovery.py`` writes, by default /tmp/distill/dense).

Run: python benchmarks/technique_table.py [--dense /tmp/distill/dense]
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
FFN = ["*intermediate.dense", "*layer.?.output.dense"]
ROWS: dict[str, dict[str, Any]] = {
    "vocabulary trim (unseen: nearest row)": {"vocab": {"method": "trim"}},
    "vocabulary trim (unseen: unknown row)": {"vocab": {"method": "trim", "unseen": "unknown"}},
    "depth: 1 of 6 blocks": {"depth": {"method": "similarity", "blocks": 1}},
    "structured 40 % heads + FFN": {"prune": {"method": "structured", "sparsity": 0.4}},
    "ASVD of the FFN, rank 0.5": {
        "factorize": {"method": "asvd", "rank_ratio": 0.5, "include": FFN}
    },
    "int8 kernels (int8 embeddings)": {"quantize": {"method": "dynamic_int8"}},
    "int8 kernels, 4-bit embeddings": {"quantize": {"method": "dynamic_int8", "embedding_bits": 4}},
    "4-bit weights (packed, group 64)": {
        "quantize": {"method": "weight_only", "bits": 4, "granularity": "group", "group_size": 64}
    },
    "combined: trim + structured 40 % + int8, 4-bit emb": {
        "vocab": {"method": "trim"},
        "prune": {"method": "structured", "sparsity": 0.4},
        "quantize": {"method": "dynamic_int8", "embedding_bits": 4},
    },
    "combined: trim + 1 block + structured 40 % + int8, 4-bit emb": {
        "vocab": {"method": "trim"},
        "depth": {"method": "similarity", "blocks": 1},
        "prune": {"method": "structured", "sparsity": 0.4},
        "quantize": {"method": "dynamic_int8", "embedding_bits": 4},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, default=Path("/tmp/distill/dense"))
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help="which rows (labels)")
    args = parser.parse_args()
    base = load_job(JOB, {"model": {"path": str(args.dense)}})
    tokenizer = models.build_tokenizer(base.model)
    bundle = data.build(base.data, tokenizer)
    print(
        f"MiniLM-L6 fine-tuned on MR ({bundle.sizes}), max_length {base.data.max_length}, "
        f"latency at batch 32 on {base.measure.threads} thread(s), one-shot"
    )
    print(
        "| technique | MB on disk | x smaller | ms b32 | speed-up | val drop, points [95 %] "
        "| test drop, points [95 %] |"
    )
    print("|---|---|---|---|---|---|---|")
    for label in args.rows:
        recipe = ROWS[label]
        spec = load_job(JOB, {"model": {"path": str(args.dense)}, "compress": recipe})
        calib = finalize.calibration_batches(spec, bundle)
        model, report = finalize.build_compressed(spec, bundle, tokenizer, calib)
        with tempfile.TemporaryDirectory() as tmp:
            m = finalize.finalize(spec, model, report, bundle, tokenizer, Path(tmp) / "model")

        def drop(p: str, m: dict = m) -> str:
            return (
                f"{100 * m[f'{p}/accuracy_drop']:+.2f} [{100 * m[f'{p}/accuracy_drop_lo']:+.2f}, "
                f"{100 * m[f'{p}/accuracy_drop_hi']:+.2f}]"
            )

        print(
            f"| {label} | {m['compress/size_bytes'] / 1e6:.2f} | {m['compress/size_ratio']:.2f} "
            f"| {m['perf/latency_ms_b32']:.1f} | {m['perf/speedup']:.2f} | {drop('eval')} | "
            f"{drop('test')} |",
            flush=True,
        )
    print(
        f"dense: {m['compress/dense_size_bytes'] / 1e6:.2f} MB on disk, "
        f"{m['perf/dense_latency_ms_b32']:.1f} ms per batch of 32"
    )


if __name__ == "__main__":
    main()

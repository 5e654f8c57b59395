"""End-of-run export of a compressed trial, before and after it rebuilt from the manifest.

At the end of a compressed training run, rank 0 needs the compressed model's structure to load
the trained weights into. It used to get it by compressing a fresh model a second time
(``build_model`` + ``compress_``: calibration forwards, SVD, pruning importance); now it builds
it from the steps the first compression recorded (``compress.skeleton``: the config's dense
model and each technique's ``rebuild_``). Both are timed here side by side (interleaved,
medians), on the quickstart's recipes, MiniLM-L6 on MR at the quickstart's data settings, plus
the part both share: writing the artifact, reloading it, evaluating and timing it
(``finalize.finalize``).

Run: python benchmarks/export_time.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from orchestrator import data, finalize, models
from orchestrator.compress import compress_, skeleton
from orchestrator.config.loader import load_job

JOB = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml"
FFN = ["*intermediate.dense", "*layer.?.output.dense"]
# Recipes the quickstart's space draws (benchmarks/BENCHMARKS.md lists its trials).
RECIPES = {
    "structured 0.38 + int8": {
        "prune": {"method": "structured", "sparsity": 0.38},
        "quantize": {"method": "dynamic_int8"},
    },
    "asvd-ffn 0.5 + w4": {
        "factorize": {"method": "asvd", "rank_ratio": 0.5, "include": FFN},
        "quantize": {"method": "weight_only", "bits": 4, "granularity": "group", "group_size": 64},
    },
    "structured 0.46 + asvd-ffn 0.25 + int8": {
        "prune": {"method": "structured", "sparsity": 0.46},
        "factorize": {"method": "asvd", "rank_ratio": 0.25, "include": FFN},
        "quantize": {"method": "dynamic_int8"},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_job(JOB)
    tokenizer = models.build_tokenizer(base.model)
    bundle = data.build(base.data, tokenizer)
    print(
        f"MiniLM-L6, MR limit {base.data.limit}, max_length {base.data.max_length}, "
        f"{base.compress.calib_batches} calibration batches of {base.train.batch_size}, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print(f"{'recipe':<40} {'compress again s':>16} {'from manifest s':>15} {'measure s':>10}")
    for label, raw in RECIPES.items():
        spec = load_job(JOB, {"compress": raw})
        calib = finalize.calibration_batches(spec, bundle)
        trained, report = finalize.build_compressed(spec, bundle, tokenizer, calib)
        state = trained.state_dict()
        again, rebuilt, measure = [], [], []
        for _ in range(args.repeats):
            start = time.perf_counter()  # before: compress a fresh model again
            model = models.build_model(spec.model, bundle.num_labels, tokenizer, seed=0)
            finalize.label_config(model, bundle)
            compress_(model, spec.compress, calib=calib)
            model.load_state_dict(state)
            again.append(time.perf_counter() - start)

            start = time.perf_counter()  # after: the structure from the recorded steps
            model = skeleton(copy.deepcopy(trained.config), report.steps)
            model.load_state_dict(state)
            rebuilt.append(time.perf_counter() - start)

            start = time.perf_counter()  # both: write, reload, evaluate, time the artifact
            with tempfile.TemporaryDirectory() as tmp:
                finalize.finalize(spec, model, report, bundle, tokenizer, Path(tmp) / "model")
            measure.append(time.perf_counter() - start)
        print(
            f"{label:<40} {statistics.median(again):16.2f} {statistics.median(rebuilt):15.2f} "
            f"{statistics.median(measure):10.2f}"
        )


if __name__ == "__main__":
    main()

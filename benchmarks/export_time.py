"""The end-of-run export of a trial, timed by its parts, side by side.

At the end of a training run rank 0 alone writes the model that ships and measures it while the
other ranks wait. Timed here, interleaved, medians, on the quickstart's job (its data and its
recipes; MiniLM-L6 on MR):

- the compressed structure the trained weights load into: compressing a fresh model a second
  time (``build_model`` + ``compress_``: calibration forwards, pruning importance, the
  vocabulary count), against building it from the steps the first compression recorded
  (``compress.skeleton``, what the loop does);
- the measurement (``finalize.finalize``: write the artifact, reload it, evaluate it on the
  validation and test splits paired with the dense model, time it against the dense model at
  ``measure.threads``) at each of ``--threads`` torch threads: one is a rank's own, two what
  rank 0 borrows from the other rank of its node on the quickstart (``loop._node_threads``);
- the dense baseline's export: its answers on validation and test (what ``finalize.dense_answers``
  does without its cache) at the same thread counts, once per run of the search.

Run: python benchmarks/export_time.py [--repeats 3] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from orchestrator import data, finalize, models
from orchestrator.compress import compress_, skeleton
from orchestrator.compress.measure import torch_threads
from orchestrator.config.loader import load_job

JOB = Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml"
# The corners of the quickstart's space (benchmarks/BENCHMARKS.md lists its trials).
RECIPES = {
    "trim + structured 0.45 + int8": {
        "vocab": {"method": "trim", "min_count": 1},
        "prune": {"method": "structured", "sparsity": 0.45},
        "quantize": {"method": "dynamic_int8"},
    },
    "trim + structured 0.2 + int8, 4-bit emb": {
        "vocab": {"method": "trim", "min_count": 1},
        "prune": {"method": "structured", "sparsity": 0.2},
        "quantize": {"method": "dynamic_int8", "embedding_bits": 4},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(args.threads[0])
    base = load_job(JOB)
    tokenizer = models.build_tokenizer(base.model)
    bundle = data.build(base.data, tokenizer)
    dense = models.build_model(base.model, bundle.num_labels, tokenizer, seed=0)
    finalize.label_config(dense, bundle)
    finalize.dense_answers(base, dense, bundle)  # cached: every trial's measurement reads it
    sizes = ", ".join(f"{bundle.sizes[s]:,} {s}" for s in ("train", "validation", "test"))
    print(
        f"MiniLM-L6 on MR ({sizes} sentences), max_length {base.data.max_length}; latency "
        f"at {base.measure.threads} thread(s); median of {args.repeats}"
    )
    measure_cols = [f"measure s @{t}" for t in args.threads]
    print(
        f"{'recipe':<42} {'compress again s':>16} {'from manifest s':>15} "
        + " ".join(f"{c:>14}" for c in measure_cols)
    )
    for label, raw in RECIPES.items():
        spec = load_job(JOB, {"compress": raw})
        calib = finalize.calibration_batches(spec, bundle)
        trained, report = finalize.build_compressed(spec, bundle, tokenizer, calib)
        state = trained.state_dict()
        counts = functools.partial(bundle.token_counts, "train")  # as build_compressed passes
        again, rebuilt = [], []
        measure: dict[int, list[float]] = {t: [] for t in args.threads}
        for _ in range(args.repeats):
            start = time.perf_counter()  # before: compress a fresh model again
            model = models.build_model(spec.model, bundle.num_labels, tokenizer, seed=0)
            finalize.label_config(model, bundle)
            compress_(model, spec.compress, calib=calib, tokenizer=tokenizer, token_counts=counts)
            model.load_state_dict(state)
            again.append(time.perf_counter() - start)

            start = time.perf_counter()  # the loop: the structure from the recorded steps
            model = skeleton(copy.deepcopy(trained.config), report.steps)
            model.load_state_dict(state)
            rebuilt.append(time.perf_counter() - start)

            for t in args.threads:  # write, reload, evaluate, time the artifact
                with torch_threads(t), tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    folder = Path(tmp) / "model"
                    finalize.finalize(spec, model, copy.deepcopy(report), bundle, tokenizer, folder)
                    measure[t].append(time.perf_counter() - start)
        print(
            f"{label:<42} {statistics.median(again):16.2f} {statistics.median(rebuilt):15.2f} "
            + " ".join(f"{statistics.median(measure[t]):14.2f}" for t in args.threads)
        )
    answers: dict[int, list[float]] = {t: [] for t in args.threads}
    for _ in range(args.repeats):
        for t in args.threads:  # what dense_answers does on a node without its cache
            with torch_threads(t):
                start = time.perf_counter()
                for split in ("validation", "test"):
                    finalize.evaluate_answers(dense, bundle, split)
                answers[t].append(time.perf_counter() - start)
    print(
        f"{'dense model (the baseline export)':<42} {'':>16} {'':>15} "
        + " ".join(f"{statistics.median(answers[t]):14.2f}" for t in args.threads)
    )


if __name__ == "__main__":
    main()

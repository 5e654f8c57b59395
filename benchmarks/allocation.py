"""Per-layer allocation from a measured sensitivity profile against one setting for every layer
(issue #14), one-shot on the fine-tuned MiniLM-L6, at equal size:

- ``--family bits``: weight-only quantization of every Linear (rounded to nearest, or GPTQ with
  ``--quantize-method gptq``; groups of 64 inputs per scale,
  ``--group-size``, or one scale per output channel with ``--granularity channel``; embeddings
  at 8 bits), uniform at ``b`` bits
  or ``compress.quantize.allocate`` with the widths 2, 3, 4 and 8 (``--widths``) under a mean
  of ``b`` bits;
- ``--family sparsity``: unstructured pruning of every Linear (``--prune-method`` magnitude or
  wanda), uniform at ``s`` or ``compress.prune.allocate`` (sparsities 0 to 0.875 by eighths)
  under a mean of ``s``;
- ``--family rank``: SVD (``--factorize-method`` svd or asvd) of every Linear, uniform at rank
  ratio ``r``, or ``compress.factorize.allocate`` (rank ratios 1/8 to 1/2, or dense) under the
  fraction of the dense weights the uniform recipe keeps.

Each row is measured on the reloaded artifact as a trial measures it: bytes on disk and the
accuracy drop on the validation and test splits paired with the dense model (95 % interval);
for the allocated rows, the profile's cost and what the joint check kept (the knapsack's
allocation or the best uniform setting within the budget, whichever moves the outputs less
with every layer changed at once; ``orchestrator.compress.sensitivity.checked``). Where both
recipes of a level ran, a last line compares them with each other on the same sentences: how
many points more the allocated recipe gets right, with its paired 95 % interval.

The dense model is a MiniLM-L6 fine-tuned on the quickstart's data (``--dense``: a folder
``benchmarks/distill_recovery.py`` writes, by default /tmp/distill/dense).

Run: python benchmarks/allocation.py [--family bits|sparsity|rank] [--levels 2 3 4]
     [--dense /tmp/distill/dense] [--calib-batches 2] [--no-uniform] [--widths 2 3 4 8]
     [--granularity group|channel] [--group-size 64] [--quantize-method weight_only|gptq]
     [--refine 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from orchestrator import data, finalize, models
from orchestrator.config.loader import load_job
from orchestrator.stats import PairedCounts

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "quickstart.yaml"
BITS = {"method": "weight_only", "granularity": "group", "group_size": 64, "embedding_bits": 8}
WIDTHS = [2, 3, 4, 8]
DEFAULT_LEVELS = {"bits": [2.0, 2.5, 3.0, 4.0], "sparsity": [0.5, 0.6, 0.7], "rank": [0.25]}
WHAT = {
    "bits": "weight-only quantization of every Linear, 8-bit embeddings",
    "sparsity": "unstructured pruning of every Linear, float weights",
    "rank": "low-rank factorization of every Linear, float weights",
}


def _stage(family: str, level: float, allocated: bool, args: argparse.Namespace) -> dict:
    """The compress section of one row (the rank budget is filled in from the uniform row)."""
    calib = {"calib_batches": args.calib_batches, "refine": args.refine}
    if family == "bits":
        if allocated:
            widths = {"bits": args.widths, "avg_bits": level, **calib}
            return {"quantize": {**_bits(args), "allocate": widths}}
        return {"quantize": {**_bits(args), "bits": int(level)}}
    if family == "sparsity":
        prune = {"method": args.prune_method, "sparsity": level}
        return {"prune": {**prune, "allocate": calib} if allocated else prune}
    factorize = {"method": args.factorize_method}
    if allocated:
        return {"factorize": {**factorize, "allocate": {"param_ratio": level, **calib}}}
    return {"factorize": {**factorize, "rank_ratio": level}}


def _bits(args: argparse.Namespace) -> dict:
    """The quantize section's settings but the widths: rounding to nearest or GPTQ
    (``--quantize-method``), groups of ``--group-size`` inputs or one scale per output
    channel."""
    bits = BITS | {"method": args.quantize_method}
    if args.granularity == "channel":
        return {k: v for k, v in bits.items() if k != "group_size"} | {"granularity": "channel"}
    return bits | {"group_size": args.group_size}


def _drop(m: dict[str, float], p: str) -> str:
    return (
        f"{100 * m[f'{p}/accuracy_drop']:+.2f} [{100 * m[f'{p}/accuracy_drop_lo']:+.2f}, "
        f"{100 * m[f'{p}/accuracy_drop_hi']:+.2f}]"
    )


def _gain(uniform: dict[str, list], allocated: dict[str, list]) -> str:
    """How many points more the allocated recipe answers right than the uniform one, on each
    split, paired on the same sentences [95 %]."""
    out = []
    for split in ("validation", "test"):
        counts = PairedCounts.of(uniform[split], allocated[split])
        lo, hi = counts.interval()
        out.append(f"{split} {-100 * counts.drop:+.2f} [{-100 * hi:+.2f}, {-100 * lo:+.2f}]")
    return ", ".join(out)


def _kept(report: Any) -> float:
    """The fraction of the factorized stage's dense Linear weights its layers keep."""
    rows = [r for r in report.rows if r.technique == "factorize"]
    dense = sum(r.shape_before[0] * r.shape_before[1] for r in rows)
    kept = sum(
        r.shape_before[0] * r.shape_before[1]
        if r.skipped
        else r.shape_after[1] * (r.shape_before[0] + r.shape_before[1])
        for r in rows
    )
    return kept / dense


def _mean(family: str, level: float, allocation: dict | None, report: Any) -> str:
    if family == "rank":
        return f"{_kept(report):.3f} of the weights"
    mean = allocation["mean"] if allocation else level
    return f"{mean:.2f} bits" if family == "bits" else f"{mean:.3f} sparse"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(WHAT), default="bits")
    parser.add_argument(
        "--levels",
        nargs="*",
        type=float,
        help="mean bits / mean sparsities / uniform rank ratios (default per family)",
    )
    parser.add_argument("--dense", type=Path, default=Path("/tmp/distill/dense"))
    parser.add_argument("--prune-method", choices=["magnitude", "wanda"], default="magnitude")
    parser.add_argument("--factorize-method", choices=["svd", "asvd"], default="svd")
    parser.add_argument(
        "--calib-batches", type=int, default=2, help="batches the sensitivity is measured on"
    )
    parser.add_argument("--no-uniform", action="store_true", help="only the allocated rows")
    parser.add_argument(
        "--widths", nargs="+", type=int, default=WIDTHS, help="--family bits: the candidate widths"
    )
    parser.add_argument(
        "--granularity", choices=["group", "channel"], default="group", help="--family bits"
    )
    parser.add_argument(
        "--group-size", type=int, default=64, help="--family bits: inputs per scale"
    )
    parser.add_argument(
        "--quantize-method",
        choices=["weight_only", "gptq"],
        default="weight_only",
        help="--family bits: rounding to nearest, or GPTQ (in the profile as in the recipe)",
    )
    parser.add_argument(
        "--refine", type=int, default=0, help="allocate.refine: joint measurements after it"
    )
    args = parser.parse_args()
    family = args.family
    if family == "rank" and args.no_uniform:
        parser.error("--family rank takes its budget from the uniform rows: drop --no-uniform")
    levels = args.levels or DEFAULT_LEVELS[family]
    dense = {"model": {"path": str(args.dense)}}
    base = load_job(JOB, {**dense, "compress": {"vocab": None}})
    # The profile draws its batches from the job's calibration batches: more for the profile
    # than the job has raises both (the joint check and calibrated methods then use them too).
    pool = {}
    if args.calib_batches > base.compress.calib_batches:
        pool = {"calib_batches": args.calib_batches}
        base = load_job(JOB, {**dense, "compress": {"vocab": None, **pool}})
    tokenizer = models.build_tokenizer(base.model)
    bundle = data.build(base.data, tokenizer)
    print(
        f"MiniLM-L6 fine-tuned on MR ({bundle.sizes}), one-shot {WHAT[family]}; "
        f"{base.compress.calib_batches} calibration batches of the training split"
        + (
            f"; {args.quantize_method}, {args.granularity} scales"
            + (f" of {args.group_size} inputs" if args.granularity == "group" else "")
            + f", allocated widths {args.widths}"
            if family == "bits"
            else ""
        )
    )
    print(
        "| recipe | mean | MB on disk | val drop, points [95 %] | test drop, points [95 %] "
        "| profile | kept after the joint check |"
    )
    print("|---|---|---|---|---|---|---|")
    for level in levels:
        budget = level
        answers = {}
        for allocated in (False, True):
            if not allocated and (args.no_uniform or (family == "bits" and level % 1)):
                continue
            compress = {"vocab": None, "prune": None, "quantize": None, **pool}
            compress.update(_stage(family, budget, allocated, args))
            spec = load_job(JOB, {**dense, "compress": compress})
            calib = finalize.calibration_batches(spec, bundle)
            model, report = finalize.build_compressed(spec, bundle, tokenizer, calib)
            allocation = next(
                (s.entry["allocation"] for s in report.steps if "allocation" in s.entry), None
            )
            with tempfile.TemporaryDirectory() as tmp:
                answers[allocated] = {}  # each example's answer, filled by finalize
                m = finalize.finalize(
                    spec, model, report, bundle, tokenizer, Path(tmp) / "model", answers[allocated]
                )
            if family == "rank" and not allocated:
                budget = round(_kept(report), 4)  # the allocation gets the same size
            cost = check = "-"
            if allocation:
                p = allocation["profile"]
                cost = (
                    f"{p['seconds']:.0f} s ({len(p['layers'])} layers x {len(p['values'])} "
                    f"settings x {p['batches']} batches{', cached' if p['cached'] else ''})"
                )
                c = allocation["check"]
                check = c["kept"]
                if c["uniform"] is not None:
                    check += (
                        f" (joint KL {c['allocation_kl']:.4f} allocated, {c['uniform_kl']:.4f} "
                        f"at {c['uniform']:g} everywhere)"
                    )
                if c.get("refine"):
                    r = c["refine"]
                    check += (
                        f"; refined: {r['moves']} moves in {r['evaluations']} measurements, "
                        f"joint KL {r['kl_before']:.4f} -> {r['kl_after']:.4f}"
                    )
            label = f"{'allocated' if allocated else 'uniform'} {family} {level:g}"
            print(
                f"| {label} | {_mean(family, level, allocation, report)} "
                f"| {m['compress/size_bytes'] / 1e6:.2f} | {_drop(m, 'eval')} "
                f"| {_drop(m, 'test')} | {cost} | {check} |",
                flush=True,
            )
        if len(answers) == 2:
            print(f"- at {level:g}, allocated against uniform, points: {_gain(*answers.values())}")


if __name__ == "__main__":
    main()

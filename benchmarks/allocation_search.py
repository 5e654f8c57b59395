"""A search with per-layer allocation against the same search with one setting for every
layer, with recovery training, at an equal trial budget, over several seeds (issue goal: the
allocated search's front dominates; hypervolume ratio, mean and spread).

Each search is a real ``orchestrator search`` (embedded Ray, Optuna's TPE on both objectives
``eval/accuracy`` and ``compress/size_bytes``) from a fine-tuned dense MiniLM-L6 (``--model``,
by default the dense model ``benchmarks/distill_recovery.py`` trains on the quickstart's
data), whose trials compress it, recover for ``--steps`` optimizer steps on one worker and
measure the artifact. The two spaces differ only in how each layer's setting is chosen:

- ``sparsity``: magnitude pruning of every Linear; uniform: ``compress.prune.sparsity`` in
  [lo, hi] for every layer; allocated: the same key as the mean, each layer's sparsity from
  the measured profile (``compress.prune.allocate``). ``--range`` (default 0.4 0.85).
- ``bits``: packed weights with fake-quant recovery, 4-bit embedding rows; uniform:
  ``compress.quantize.bits`` one of the widths 2, 3, 4, 8 within [lo, hi] for every layer;
  allocated: ``compress.quantize.allocate.avg_bits`` in [lo, hi] (mixed precision, each layer
  at 2, 3, 4 or 8). ``--range`` (default 2 8).

Hypervolume is 2-D over (artifact bytes / dense bytes, validation accuracy), reference (1.0,
chance); the same trials' test accuracy gives a second one. Data: the first 3,000 sentences of
MR's seeded permutation (900 validation, 900 test, 1,200 for recovery), all from the dense
model's own test split, so none was trained on.

Run: python benchmarks/allocation_search.py --family sparsity --seeds 0 1 2 --trials 8 \
       --model /tmp/distill/dense --work /tmp/as [--range 0.4 0.85] [--sparsities 0 ... 0.95] \
       [--points 0.6 0.7 ...]
The table of the searches finished in a --work folder (of the seeds given), running nothing:
     python benchmarks/allocation_search.py --family sparsity --table-from /tmp/as
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from search_efficiency import hypervolume_2d  # noqa: E402

from orchestrator.results.pareto import pareto_front  # noqa: E402

# The searched key's range per family unless --range says otherwise.
RANGES = {"sparsity": (0.4, 0.85), "bits": (2.0, 8.0)}
WIDTHS = [2, 3, 4, 8]
SPACE_NAMES = ("uniform", "allocated")
# The hypervolume's reference point: (size ratio, accuracy) of the dense size at chance.
HV_REF = (1.0, 0.5)


def uniform_widths(lo: float, hi: float) -> list[int]:
    """The bit widths the uniform space takes within [lo, hi]."""
    return [w for w in WIDTHS if lo <= w <= hi]


def spaces(
    family: str, lo: float, hi: float, sparsities: list[float] | None = None
) -> dict[str, tuple[dict, dict]]:
    """space -> (the job's compress section, its search space), the searched key within [lo,
    hi]: for bits, the uniform space takes the widths in [lo, hi] and the allocated one a mean
    width in [lo, hi] (its layers may still take any of 2, 3, 4, 8). ``sparsities``: the
    allocated space's candidates (``compress.prune.allocate.sparsities``; None: the
    product's default, up to 0.875)."""
    if family == "sparsity":
        searched = {"compress.prune.sparsity": {"uniform": [lo, hi]}}
        prune = {"method": "magnitude", "sparsity": 0.5}
        allocate = {} if sparsities is None else {"sparsities": sparsities}
        return {
            "uniform": ({"prune": prune}, searched),
            "allocated": ({"prune": {**prune, "allocate": allocate}}, searched),
        }
    quantize = {"method": "fake", "granularity": "group", "embedding_bits": 4}
    return {
        "uniform": (
            {"quantize": quantize},
            {"compress.quantize.bits": {"choice": uniform_widths(lo, hi)}},
        ),
        "allocated": (
            # The job's own value (the search replaces it): 4 bits, or the range's nearest.
            {"quantize": {**quantize, "allocate": {"avg_bits": min(max(4.0, lo), hi)}}},
            {"compress.quantize.allocate.avg_bits": {"uniform": [lo, hi]}},
        ),
    }


def job(args: argparse.Namespace, space: str, seed: int, out: Path) -> dict[str, Any]:
    compress, searched = spaces(args.family, *args.range, args.sparsities)[space]
    return {
        "name": f"{args.family}-{space}-seed{seed}",
        "model": {"path": str(args.model)},
        # The first 3,000 sentences of the quickstart's permutation: 900 validation, 900 test
        # and 1,200 for recovery, all within the dense model's own test split (its training
        # sentences are the last 20 %), so none of them was trained on.
        "data": {
            "name": "mr",
            "limit": 3000,
            "val_fraction": 0.3,
            "test_fraction": 0.3,
            "max_length": 48,
        },
        "train": {
            "strategy": "ddp",
            "num_workers": 1,
            "batch_size": 32,
            "max_steps": args.steps,
            "lr": 1.0e-4,
            "log_every": 20,
        },
        "resources": {"cpus_per_worker": 2},
        "measure": {"threads": 1},
        "compress": compress,
        "search": {
            "space": searched,
            "objectives": [
                {"metric": "eval/accuracy", "mode": "max"},
                {"metric": "compress/size_bytes", "mode": "min"},
            ],
            "algorithm": "optuna",
            "num_samples": args.trials,
            "seed": seed,
            "baseline": {"train": False},
            # The same starting points in both spaces: the searched key at each value.
            **({"points": [{k: v} for v in args.points for k in searched]} if args.points else {}),
        },
        "output": {"dir": str(out)},
    }


def read_trials(run: Path) -> list[dict[str, Any]]:
    """The trials of a finished search (its results.parquet rows)."""
    import pyarrow.parquet as pq

    return pq.read_table(run / "results.parquet").to_pylist()


def run_search(raw: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """``orchestrator search`` on ``raw``; returns its trials (results.parquet rows)."""
    path = work / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    log = work / f"{raw['name']}.log"
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "search", str(path)],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    if proc.returncode != 0:
        sys.exit(f"{raw['name']}: orchestrator search failed ({proc.returncode}); see {log}")
    return read_trials(Path(raw["output"]["dir"]) / raw["name"])


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated (size ratio, accuracy) points, each once (the product's rule)."""
    kept = pareto_front(points, ("min", "max"))
    return sorted({p for p, keep in zip(points, kept, strict=True) if keep})


def coverage(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> tuple[int, int]:
    """(how many of b's front points are weakly dominated by a point of a's front, how many
    b's front has): Zitzler's set coverage C(a, b) as a count. The fronts dominate each other
    point by point when C(a, b) is all of b and C(b, a) only the points they share."""
    fa, fb = front(a), front(b)
    covered = sum(any(p[0] <= q[0] and p[1] >= q[1] for p in fa) for q in fb)
    return covered, len(fb)


def _points(trials: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(size ratio, accuracy on ``key``'s split) of a summary's trials that have it."""
    return [(t["size"], t[key]) for t in trials if t[key] is not None]


def summary(trials: list[dict[str, Any]], minutes: float | None) -> dict[str, Any]:
    """One search: its hypervolumes, failures, wall time and finished trials."""
    done = [
        {
            "recipe": t["recipe"],
            "size": t["compress/size_bytes"] / t["compress/dense_size_bytes"],
            "eval": t["eval/accuracy"],
            "test": t["test/accuracy"],
            # The searched value as drawn (one config/ column: the space has one key).
            "drawn": next(v for k, v in t.items() if k.startswith("config/")),
        }
        for t in trials
        if t["status"] == "done"
    ]
    return {
        "hv": hypervolume_2d(_points(done, "eval"), HV_REF),
        "hv_test": hypervolume_2d(_points(done, "test"), HV_REF),
        "failed": len(trials) - len(done),
        "minutes": minutes,
        "trials": done,
    }


def print_table(
    rows: list[dict[str, Any]], args: argparse.Namespace, wall_min: float | None
) -> None:
    ratios = [r["allocated"]["hv"] / r["uniform"]["hv"] for r in rows]
    tests = [r["allocated"]["hv_test"] / r["uniform"]["hv_test"] for r in rows]
    print(
        f"\n### Search with allocation against one setting for every layer: {args.family}, "
        f"{args.trials} trials per search, {args.steps} recovery steps\n"
    )
    wall = f"wall time {wall_min:.1f} min" if wall_min is not None else "printed from the runs"
    print(f"- date: {datetime.date.today().isoformat()}; {os.cpu_count()} CPUs; {wall}")
    print(f"- command: `python {' '.join(sys.argv)}`")
    for space, (compress, searched) in spaces(args.family, *args.range, args.sparsities).items():
        print(f"- {space}: compress {compress}, search.space {searched}")
    print(
        "- hypervolume over (artifact bytes / dense bytes, validation accuracy), reference "
        f"{HV_REF}\n"
    )
    print(
        "| seed | HV uniform | HV allocated | ratio | HV test uniform | HV test allocated | "
        "test ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for r, ratio, test in zip(rows, ratios, tests, strict=True):
        u, a = r["uniform"], r["allocated"]
        print(
            f"| {r['seed']} | {u['hv']:.4f} | {a['hv']:.4f} | {ratio:.3f} | "
            f"{u['hv_test']:.4f} | {a['hv_test']:.4f} | {test:.3f} |"
        )
    spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    tspread = statistics.stdev(tests) if len(tests) > 1 else 0.0
    print(
        f"| mean +- sd | | | **{statistics.mean(ratios):.3f} +- {spread:.3f}** | | | "
        f"{statistics.mean(tests):.3f} +- {tspread:.3f} |"
    )
    print(
        "\nSet coverage: of each front's points, how many a point of the other front weakly "
        "dominates\n"
    )
    print("| seed | split | uniform points covered by allocated | allocated covered by uniform |")
    print("|---|---|---|---|")
    for r in rows:
        for key, split in (("eval", "validation"), ("test", "test")):
            u, a = (_points(r[space]["trials"], key) for space in SPACE_NAMES)
            (cu, nu), (ca, na) = coverage(a, u), coverage(u, a)
            print(f"| {r['seed']} | {split} | {cu} of {nu} | {ca} of {na} |")
    pairs = [
        (r["seed"], u, a)
        for r in rows
        for u in r["uniform"]["trials"]
        for a in r["allocated"]["trials"]
        if u["drawn"] == a["drawn"]
    ]
    if pairs:
        print(
            "\nThe same value drawn in both searches of a seed (the searchers' seeded first "
            "draws): allocated minus uniform, accuracy points\n"
        )
        print("| seed | drawn | size uniform / allocated | validation | test |")
        print("|---|---|---|---|---|")
        for seed, u, a in pairs:
            print(
                f"| {seed} | {u['drawn']:.4g} | {u['size']:.3f} / {a['size']:.3f} | "
                f"{100 * (a['eval'] - u['eval']):+.2f} | {100 * (a['test'] - u['test']):+.2f} |"
            )
    for r in rows:
        for space in SPACE_NAMES:
            print(f"\nseed {r['seed']}, {space}: size / dense, validation, test accuracy")
            for t in sorted(r[space]["trials"], key=lambda t: t["size"]):
                print(f"    {t['recipe']}: {t['size']:.3f}, {t['eval']:.4f}, {t['test']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=list(RANGES), default="sparsity")
    ap.add_argument(
        "--range",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="the searched key's range (default: sparsity 0.4 0.85, bits 2 8)",
    )
    ap.add_argument(
        "--sparsities",
        type=float,
        nargs="+",
        default=None,
        help="sparsity family: the allocated space's candidate sparsities per layer (default: "
        "the product's, 0 to 0.875; a range above 0.875 needs a larger one)",
    )
    ap.add_argument(
        "--points",
        type=float,
        nargs="+",
        default=None,
        help="starting points of both searches (search.points): the searched key at each "
        "value, then the searcher draws the rest of the trials",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=8, help="trial budget of each search")
    ap.add_argument("--steps", type=int, default=40, help="recovery steps of each trial")
    ap.add_argument(
        "--model",
        type=Path,
        default=Path("/tmp/distill-recovery/dense"),
        help="the fine-tuned dense MiniLM (benchmarks/distill_recovery.py makes it)",
    )
    ap.add_argument("--work", type=Path, default=None, help="run folders (default: temporary)")
    ap.add_argument(
        "--table-from",
        type=Path,
        default=None,
        help="a --work folder: print the table of the searches finished there, run nothing",
    )
    args = ap.parse_args()
    args.range = tuple(args.range or RANGES[args.family])
    lo, hi = args.range
    if not lo < hi:
        ap.error(f"--range {lo} {hi}: LO must be below HI")
    if args.sparsities is not None and args.family != "sparsity":
        ap.error("--sparsities is for --family sparsity")
    if args.family == "bits" and len(uniform_widths(lo, hi)) < 2:
        ap.error(f"--range {lo} {hi}: the uniform space needs two of the widths {WIDTHS}")
    if args.table_from is not None:
        rows = []
        for seed in args.seeds:
            runs = {
                space: args.table_from / "runs" / f"{args.family}-{space}-seed{seed}"
                for space in SPACE_NAMES
            }
            if all((r / "results.parquet").is_file() for r in runs.values()):
                row = {space: summary(read_trials(r), None) for space, r in runs.items()}
                rows.append({"seed": seed, **row})
        print_table(rows, args, None)
        return
    if not (args.model / "config.json").is_file():
        sys.exit(f"no fine-tuned model in {args.model}: run benchmarks/distill_recovery.py")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="allocation-search-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for seed in args.seeds:
            row: dict[str, Any] = {"seed": seed}
            for space in SPACE_NAMES:
                t0 = time.perf_counter()
                trials = run_search(job(args, space, seed, work / "runs"), work)
                row[space] = summary(trials, (time.perf_counter() - t0) / 60)
                print(
                    f"seed {seed} {space}: HV {row[space]['hv']:.4f} (test "
                    f"{row[space]['hv_test']:.4f}), {len(trials)} trials in "
                    f"{row[space]['minutes']:.1f} min",
                    flush=True,
                )
                for t in row[space]["trials"]:
                    print(
                        f"    {t['recipe']}: size {t['size']:.3f} of dense, validation "
                        f"{t['eval']:.4f}, test {t['test']:.4f}",
                        flush=True,
                    )
            rows.append(row)
        (work / "results.json").write_text(json.dumps(rows, indent=1))
    print_table(rows, args, (time.perf_counter() - started) / 60)


if __name__ == "__main__":
    main()

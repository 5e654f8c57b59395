"""Search efficiency: hypervolume of the multi-objective Optuna search against random search at
an equal trial budget, on a cheap but real task, over several seeds (issue goal: >= 1.2x random).

Each trial is one-shot compression (no recovery training) of a fine-tuned MiniLM sentiment
classifier (by default the dense baseline of ``orchestrator search jobs/quickstart.yaml``, in
``runs/quickstart/baseline/model``): the trial's job is built from the sampled values exactly as
``orchestrator search`` builds it (``search.space.trial_job`` + ``validate_job``), compressed
(``finalize.build_compressed``), written as an artifact, loaded back and measured
(``finalize.finalize``: validation and test accuracy, bytes on disk, latency). Each trial reports
``eval/accuracy`` (maximized) and ``compress/size_bytes`` (minimized) with ``ray.tune.report``.

Both searchers come from ``search.space.searcher`` / ``param_space`` (what ``orchestrator search``
uses) over the same space, with the same trial budget, the same data split and the same seed:
``algorithm: optuna`` (TPE by default, ``--sampler gp`` or ``nsga2``) and ``algorithm: random``
(Tune's ``BasicVariantGenerator``). The space is joint and mostly poor at random: unstructured
pruning (magnitude / wanda) at 10-90% sparsity, SVD / ASVD at rank ratios 0.1-0.9 (above ~0.5
the factors hold more weights than the matrix), and int8 / 4-bit / 2-bit weights. With
``--space layers`` it is the per-layer space instead: each Linear's bit width (2, 3, 4 or 8),
one dimension per layer (``per_layer: true`` on ``compress.quantize.bits``; 36 on MiniLM-L6),
where a random draw puts a quarter of the layers at 2 bits. ``--allocations 2.5 3 ...`` (with
``--space layers``) adds what ``allocations:`` on that key does in a job: the per-layer bit
allocations at those average-bit budgets, measured once on the dense model, are the first trials
of an Optuna and of a random search (Tune's ``points_to_evaluate``, inside the same budget); the
searches are then TPE from the allocations, random from the allocations, and plain random (the
baseline every ratio is over). The table then adds a control the same trials give: random search
starting from the uniform recipes (every layer at each width up to the largest budget, measured
before the searches), the starting points a user would write by hand.

Hypervolume is 2-D, over (size / dense size, validation accuracy), with the reference point
(size ratio 1.0, accuracy 1 / number of classes): only trials smaller than the dense model and
better than chance count. It is reported after every 4 finished trials (the anytime curve) and
at the full budget; the ratio is each search's hypervolume over random's, per seed and averaged. The
same trials' test accuracy gives a second hypervolume (a check that the front generalises).

Run (the recorded benchmarks, about 20 s a trial on 2 cores):
  python benchmarks/search_efficiency.py --trials 12 --seeds 0 1 2
  python benchmarks/search_efficiency.py --space layers --trials 20 --seeds 0 1 2 \
      --model-path /tmp/distill/dense --limit 3000 --allocations 2.25 2.5 2.75 3 3.5 4
Smoke test (tiny random model, seconds):
  python benchmarks/search_efficiency.py --trials 4 --seeds 0 --limit 400 \\
      --model-name tiny-bert
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "runs/quickstart/baseline/model"
OBJECTIVES = [
    {"metric": "eval/accuracy", "mode": "max"},
    {"metric": "compress/size_bytes", "mode": "min"},
]
# Dotted job keys -> distributions, as in a job's search.space. A section that is "off" drops
# the keys below it for that trial (orchestrator.config.search.trial_overrides).
SPACE: dict[str, Any] = {
    "compress.prune": {
        "choice": {
            "off": None,
            "magnitude": {"method": "magnitude"},
            "wanda": {"method": "wanda"},
        }
    },
    "compress.prune.sparsity": {"uniform": [0.1, 0.9]},
    "compress.factorize": {
        "choice": {"off": None, "svd": {"method": "svd"}, "asvd": {"method": "asvd"}}
    },
    "compress.factorize.rank_ratio": {"uniform": [0.1, 0.9]},
    "compress.quantize": {
        "choice": {
            "off": None,
            "int8": {"method": "dynamic_int8"},
            "w4": {"method": "weight_only", "bits": 4, "granularity": "group", "group_size": 64},
            "w2": {"method": "weight_only", "bits": 2, "granularity": "group", "group_size": 64},
        }
    },
}
# The per-layer space (``--space layers``): each Linear's weights at 2, 3, 4 or 8 bits, one
# dimension per layer (36 on MiniLM-L6), everything else fixed: packed group-wise weights and
# 4-bit embedding rows. Random search draws a quarter of the layers at 2 bits in every trial.
LAYERS_BASE = {
    "quantize": {
        "method": "weight_only",
        "bits": 4,
        "granularity": "group",
        "group_size": 64,
        "embedding_bits": 4,
    }
}
SPACE_LAYERS: dict[str, Any] = {
    "compress.quantize.bits": {"choice": [2, 3, 4, 8], "per_layer": True},
}
CURVE_EVERY = 4
GOAL = 1.2
# Trials finished so far, per search (driver side; filled by the _Progress callback).
_DONE: dict[str, list[dict[str, Any]]] = {}


# ----------------------------------------------------------------------------- hypervolume


def hypervolume_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` = [(size ratio, accuracy)] (size minimised, accuracy
    maximised) and bounded by ``ref``; points that do not dominate ``ref`` add nothing."""
    inside = sorted((s, a) for s, a in points if s < ref[0] and a > ref[1])
    area, best = 0.0, ref[1]
    for size, acc in inside:  # by size ascending: each better accuracy adds a strip
        if acc > best:
            area += (ref[0] - size) * (acc - best)
            best = acc
    return area


def _hypervolume_grid(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """The same area by brute force over the grid of the points' coordinates (a check)."""
    pts = [(s, a) for s, a in points if s < ref[0] and a > ref[1]]
    xs = sorted({s for s, _ in pts} | {ref[0]})
    ys = sorted({a for _, a in pts} | {ref[1]})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:], strict=False):
        for y0, y1 in zip(ys, ys[1:], strict=False):
            if any(s <= x0 and a >= y1 for s, a in pts):
                area += (x1 - x0) * (y1 - y0)
    return area


def check_hypervolume() -> None:
    """Raises if the sweep disagrees with a hand-computed example or with brute force."""
    # A=(0.2, 0.7): box [0.2, 1] x [0.5, 0.7] = 0.16; B=(0.5, 0.9): [0.5, 1] x [0.5, 0.9] = 0.2;
    # overlap [0.5, 1] x [0.5, 0.7] = 0.1 -> 0.26. C is dominated by B; D is larger than the
    # reference, E below chance: neither counts.
    example = [(0.2, 0.7), (0.5, 0.9), (0.8, 0.6), (1.2, 0.95), (0.1, 0.4)]
    got = hypervolume_2d(example, (1.0, 0.5))
    if abs(got - 0.26) > 1e-12:
        raise RuntimeError(f"hypervolume_2d: {got} on the hand example, expected 0.26")
    if hypervolume_2d([], (1.0, 0.5)) != 0.0 or hypervolume_2d([(1.0, 0.9)], (1.0, 0.5)) != 0.0:
        raise RuntimeError("hypervolume_2d: points on the reference must add nothing")
    rng = random.Random(0)
    for _ in range(200):
        pts = [
            (round(rng.uniform(0, 1.2), 2), round(rng.uniform(0.3, 1), 2))
            for _ in range(rng.randint(0, 12))
        ]
        a, b = hypervolume_2d(pts, (1.0, 0.5)), _hypervolume_grid(pts, (1.0, 0.5))
        if abs(a - b) > 1e-9:
            raise RuntimeError(f"hypervolume_2d: {a} vs brute force {b} on {pts}")


# ----------------------------------------------------------------------------- the trials


def base_job(args: argparse.Namespace, algorithm: str, seed: int, work: Path) -> dict[str, Any]:
    model = {"name": args.model_name} if args.model_name else {"path": args.model_path}
    return {
        "name": "search-efficiency",
        "model": model,
        "data": {"name": "mr", "limit": args.limit, "max_length": args.max_length},
        # No training: batch_size sets the calibration batches (wanda, asvd) only.
        "train": {"num_workers": 1, "batch_size": 32, "max_steps": 1},
        "compress": {
            "calib_batches": args.calib_batches,
            **(LAYERS_BASE if args.space == "layers" else {}),
        },
        "search": {
            "space": _layers_space(args) if args.space == "layers" else SPACE,
            "objectives": OBJECTIVES,
            "algorithm": algorithm,
            "sampler": args.sampler,
            "num_samples": args.trials,
            "seed": seed,
            "baseline": {"train": False},
        },
        "output": {"dir": str(work)},
    }


def _layers_space(args: argparse.Namespace) -> dict[str, Any]:
    """The per-layer space, with ``allocations`` on its key when the searches start there."""
    if not args.allocations:
        return SPACE_LAYERS
    key = "compress.quantize.bits"
    return {key: {**SPACE_LAYERS[key], "allocations": args.allocations}}


def trial_fn(config: dict[str, Any], *, base: dict[str, Any], search: dict, work: str) -> None:
    """One trial (a Tune function trainable): one-shot compression of the trial's job, its
    artifact written to a temporary folder, loaded back and measured."""
    import ray.tune

    from orchestrator import data as data_lib
    from orchestrator import models
    from orchestrator.config.loader import validate_job
    from orchestrator.config.search import SearchConfig, sampled_values
    from orchestrator.finalize import build_compressed, calibration_batches, finalize
    from orchestrator.search.space import trial_job

    start = time.perf_counter()
    search_cfg = SearchConfig.model_validate(search)
    name = ray.tune.get_context().get_trial_name()
    sampled = sampled_values(search_cfg.space, config)
    spec = validate_job(trial_job(base, search_cfg, sampled, name, work), source=f"trial {name}")
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data_lib.build(spec.data, tokenizer)  # the driver warmed the tokenization cache
    calib = calibration_batches(spec, bundle)
    model, report = build_compressed(spec, bundle, tokenizer, calib)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        metrics = finalize(
            spec,
            model,
            report,
            bundle,
            tokenizer,
            Path(tmp) / "model",
        )
    metrics["bench/trial_s"] = time.perf_counter() - start
    metrics["bench/torch_threads"] = float(torch.get_num_threads())
    ray.tune.report(metrics)


def _progress(label: str, total: int) -> Any:
    from ray import tune

    class _Progress(tune.Callback):
        """Prints each finished trial and records it, in finishing order."""

        def _done(self, trial: Any, metrics: dict[str, Any] | None, error: str | None) -> None:
            done = _DONE.setdefault(label, [])
            done.append({"config": dict(trial.config), "metrics": metrics, "error": error})
            recipe = ", ".join(
                f"{k.split('.', 1)[1]}={v:.2f}" if isinstance(v, float) else f"{k[9:]}={v}"
                for k, v in trial.config.items()
                if _active(k, trial.config) and ":" not in k
            )
            layers = [v for k, v in trial.config.items() if ":" in k]
            if layers:  # a per-layer space: the values' mean and how many of each
                counts = {v: layers.count(v) for v in sorted(set(layers))}
                mean = f"mean {sum(layers) / len(layers):.2f} per layer {counts}"
                recipe = f"{recipe}, {mean}" if recipe else mean
            if metrics:
                print(
                    f"  {label} {len(done):2d}/{total}: acc {metrics['eval/accuracy']:.3f}, "
                    f"size {metrics['compress/size_ratio'] ** -1:.3f} of dense "
                    f"({metrics['bench/trial_s']:.0f} s) [{recipe}]",
                    flush=True,
                )
            else:
                print(f"  {label} {len(done):2d}/{total}: FAILED [{recipe}]: {error}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(trial, dict(trial.last_result or {}), None)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            try:
                text = str(trial.get_error() or "")
            except Exception:  # the message only
                text = ""
            lines = [line for line in text.splitlines() if line.strip()]
            self._done(trial, None, lines[-1] if lines else str(trial.error_file or "error"))

    return _Progress()


def _active(key: str, config: dict[str, Any]) -> bool:
    """False for a key below a section the trial switched off (it has no effect)."""
    section = key.rsplit(".", 1)[0]
    return config.get(section, "") != "off"


def searches(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(label, algorithm, from the allocations) of each search a seed runs; the last one, plain
    random search, is what every ratio is over."""
    name = f"optuna {args.sampler}"
    if args.allocations:
        return [
            (f"{name} + allocations", "optuna", True),
            ("random + allocations", "random", True),
            ("random", "random", False),
        ]
    return [(name, "optuna", False), ("random", "random", False)]


def run_search(
    args: argparse.Namespace,
    algorithm: str,
    seed: int,
    work: Path,
    points: list[dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """One Tune experiment, trying ``points`` first; returns its trials in finishing order and
    its wall time."""
    from ray import tune

    from orchestrator import launch
    from orchestrator.config.loader import validate_job
    from orchestrator.search.space import param_space, searcher

    spec = launch.resolve_paths(validate_job(base_job(args, algorithm, seed, work)))
    search_cfg = spec.search
    base = spec.model_dump(mode="json", exclude={"search"})
    label = f"{algorithm if algorithm == 'random' else args.sampler}{'-alloc' if points else ''}"
    label = f"{label}-seed{seed}"
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_fn, base=base, search=search_cfg.model_dump(mode="json"), work=str(work)
        ),
        {"CPU": 1},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(search_cfg, args.layers),
        tune_config=tune.TuneConfig(
            search_alg=searcher(search_cfg, args.concurrency, points),
            num_samples=args.trials,
            max_concurrent_trials=args.concurrency,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=label,
            storage_path=str(work / "tune"),
            callbacks=[_progress(label, args.trials)],
            verbose=0,
        ),
    )
    _DONE[label] = []
    start = time.perf_counter()
    tuner.fit()
    return _DONE[label], time.perf_counter() - start


# ----------------------------------------------------------------------------- scoring


def reference(header: dict[str, Any]) -> tuple[float, float]:
    """The hypervolume's reference point (size ratio, accuracy): the dense size (the per-layer
    space: the size of its largest recipe) and chance."""
    return header.get("ref_size", 1.0), header["ref_acc"]


def curve(
    trials: list[dict[str, Any]], ref: tuple[float, float], key: str = "eval/accuracy"
) -> list[tuple[int, float]]:
    """[(trials finished, hypervolume of those)] every CURVE_EVERY trials and at the end."""
    points: list[tuple[float, float]] = []
    out = []
    for i, t in enumerate(trials, 1):
        if t["metrics"]:
            points.append(_point(t["metrics"], key))
        if i % CURVE_EVERY == 0 or i == len(trials):
            out.append((i, hypervolume_2d(points, ref)))
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (float("inf") if a > 0 else float("nan"))


def headroom(record: list[dict[str, Any]], ref: tuple[float, float]) -> float:
    """Hypervolume of every trial of every search together: the best front this run knows, an
    upper bound on what one search of the budget reached (a searcher at it cannot be beaten)."""
    return curve([t for r in record for t in r["trials"]], ref)[-1][1]


def _point(metrics: dict[str, Any], key: str) -> tuple[float, float]:
    """(size ratio, accuracy) of one measured recipe."""
    return metrics["compress/size_bytes"] / metrics["compress/dense_size_bytes"], metrics[key]


def _points(trials: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(size ratio, accuracy) of the trials that finished."""
    return [_point(t["metrics"], key) for t in trials if t["metrics"]]


def _uniform(header: dict[str, Any], key: str) -> list[tuple[float, float]]:
    return [_point(m, key) for m in header["uniform"].values()]


def print_uniform_control(header: dict[str, Any], record: list[dict[str, Any]], n: int) -> None:
    """What seeding with the uniform recipes instead of the allocations gives: each seed's plain
    random search, its first trials kept and the uniform recipes (every layer at each width up
    to the largest budget) in place of the rest: the same budget, and the recipes random search
    draws after starting points (it draws the same sequence)."""
    ref = reference(header)
    widths = ", ".join(header["uniform"])
    ratios, test_ratios = [], []
    for search in record:
        if search["searcher"] != "random":
            continue
        kept = search["trials"][: n - len(header["uniform"])]
        for key, out in (("eval/accuracy", ratios), ("test/accuracy", test_ratios)):
            plain = curve(search["trials"], ref, key)[-1][1]
            seeded = hypervolume_2d(_uniform(header, key) + _points(kept, key), ref)
            out.append(_ratio(seeded, plain))
    points = header["allocations"].get("points")
    if points:
        first = [t for t in record[0]["trials"] if t["config"] in points]
    else:  # an older results.json: Tune runs the starting points first
        first = record[0]["trials"][: len(header["allocations"]["budgets"])]
    alone = hypervolume_2d(_points(first, "eval/accuracy"), ref)
    uniform = hypervolume_2d(_uniform(header, "eval/accuracy"), ref)
    print(
        f"\ncontrol, random + uniform (every layer at {widths} bits, then random's first "
        f"{n - len(header['uniform'])} trials): "
        + ", ".join(f"{v:.2f}" for v in ratios)
        + f" x random (mean {sum(ratios) / len(ratios):.2f}; test "
        + ", ".join(f"{v:.2f}" for v in test_ratios)
        + f"); the allocations alone reach HV {alone:.4f}, the uniform recipes alone {uniform:.4f}"
    )


def print_table(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    header: dict[str, Any],
    record: list[dict[str, Any]],
) -> None:
    # A results.json from before ``--allocations`` names no searchers: TPE (or its sampler), random.
    labels = header.get("searchers") or [f"optuna {args.sampler}", "random"]
    marks = [n for n, _ in rows[0]["curves"][0]]
    print(f"\n### Search efficiency: {' vs '.join(labels)}, {args.trials} trials per search\n")
    print(f"- date: {header['date']}; wall time {header['wall_min']:.1f} min")
    print(f"- command: `{header['command']}`")
    print(
        f"- machine: {header['cpus']} CPUs ({header['cpu']}), torch {torch.__version__} with "
        f"{header['threads']} thread(s) per trial, {args.concurrency} trial(s) at a time; "
        f"ray {header['ray']}, optuna {header['optuna']}"
    )
    print(
        f"- task: one-shot compression of `{header['model']}` (dense validation accuracy "
        f"{header['dense_acc']:.3f}), MR limit {args.limit} ({header['n_val']} validation / "
        f"{header['n_test']} test sentences), {args.max_length} tokens; median trial "
        f"{header['trial_s']:.0f} s"
    )
    print(f"- space: {header.get('space', 'joint')}")
    if header.get("allocations"):
        a = header["allocations"]
        print(
            f"- allocations: at average bits {a['budgets']}, measured on the dense model in "
            f"{a['seconds']:.0f} s (once; the first {len(a['budgets'])} trials of each search "
            "marked + allocations)"
        )
    print(
        "- hypervolume over (artifact bytes / dense bytes, validation accuracy), reference "
        f"({reference(header)[0]:.3f}{' = all layers at 8 bits' if 'ref_size' in header else ''}"
        f", {header['ref_acc']:.2f} = chance); HV test: the same trials' test accuracy\n"
    )
    print(
        "| seed | searcher | "
        + " | ".join(f"HV @{n}" for n in marks)
        + " | HV test | failed | HV ratio vs random |"
    )
    print("|---|---|" + "---|" * len(marks) + "---|---|---|")
    base = len(labels) - 1  # plain random search
    ratios: list[list[float]] = [[] for _ in labels]
    test_ratios: list[list[float]] = [[] for _ in labels]
    for r in rows:
        for which, label in enumerate(labels):
            hv = [f"{v:.4f}" for _, v in r["curves"][which]]
            ratios[which].append(_ratio(r["curves"][which][-1][1], r["curves"][base][-1][1]))
            test_ratios[which].append(_ratio(r["test_hv"][which], r["test_hv"][base]))
            ratio = "1.00" if which == base else f"**{ratios[which][-1]:.2f}**"
            print(
                f"| {r['seed']} | {label} | {' | '.join(hv)} | {r['test_hv'][which]:.4f} | "
                f"{r['failed'][which]} | {ratio} |"
            )
    for which, label in enumerate(labels[:base]):
        mean = sum(ratios[which]) / len(rows)
        sd = statistics.stdev(ratios[which]) if len(rows) > 1 else 0.0
        test_mean = sum(test_ratios[which]) / len(rows)
        verdict = "met" if mean >= GOAL else "not met"
        print(
            f"| mean | {label} | {' | '.join('' for _ in marks)} | ratio {test_mean:.2f} | | "
            f"**{mean:.2f}** +- {sd:.2f} (goal >= {GOAL}: {verdict}) |"
        )
    if base == 2:  # the searcher's own share: from the same allocations, TPE against random
        own = [_ratio(r["curves"][0][-1][1], r["curves"][1][-1][1]) for r in rows]
        print(
            f"\nfrom the same allocations, {labels[0]} / {labels[1]}: "
            + ", ".join(f"{v:.2f}" for v in own)
            + f" (mean {sum(own) / len(own):.2f})"
        )
    if header.get("uniform"):
        print_uniform_control(header, record, args.trials)
    best = headroom(record, reference(header))
    share = [
        sum(r["curves"][which][-1][1] for r in rows) / len(rows) / best
        for which in range(len(labels))
    ]
    print(
        f"\nheadroom: all {sum(len(r['trials']) for r in record)} trials of all searches "
        f"together reach HV {best:.4f}; the mean final HV is "
        + ", ".join(f"{s:.1%} of that for {label}" for s, label in zip(share, labels, strict=True))
        + f" (so at most {1 / share[base]:.2f}x random was possible)"
    )


# ----------------------------------------------------------------------------- main


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=16, help="trial budget of each search")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="searcher seeds")
    ap.add_argument(
        "--sampler", choices=["tpe", "gp", "nsga2"], default="tpe", help="optuna sampler"
    )
    ap.add_argument(
        "--model-path", default=DEFAULT_MODEL, help="fine-tuned classifier folder (Hugging Face)"
    )
    ap.add_argument(
        "--model-name", default=None, help="a packaged model instead (tiny-bert, minilm-l6)"
    )
    ap.add_argument(
        "--limit",
        type=int,
        default=1000,
        help="MR examples in all (10%% validation, 20%% test); with the quickstart baseline at "
        "most 3000, so that validation stays out of its training data (checked)",
    )
    ap.add_argument(
        "--space",
        choices=["joint", "layers"],
        default="joint",
        help="joint: prune / factorize / quantize methods and settings (9 dimensions); layers: "
        "each Linear's bit width, one dimension per layer",
    )
    ap.add_argument(
        "--allocations",
        type=float,
        nargs="+",
        default=None,
        help="with --space layers: average-bit budgets whose per-layer allocations start an "
        "Optuna and a random search (against plain random search)",
    )
    ap.add_argument("--max-length", type=int, default=48, help="tokens per sentence")
    ap.add_argument("--calib-batches", type=int, default=4, help="x 32 sentences (wanda, asvd)")
    ap.add_argument("--concurrency", type=int, default=2, help="trials at a time (1 CPU each)")
    ap.add_argument("--out", default=None, help="Tune storage and results.json (default: temp)")
    ap.add_argument(
        "--table-from", default=None, help="print the table of a saved results.json, run nothing"
    )
    args = ap.parse_args()
    if args.allocations and args.space != "layers":
        ap.error("--allocations needs --space layers (they are per-layer starting points)")
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        args.trials = max(len(r["trials"]) for r in saved["searches"])
        print_table(saved["rows"], args, saved["header"], saved["searches"])
        return

    check_hypervolume()
    if not args.model_name:
        path = Path(args.model_path)
        args.model_path = str(path if path.is_absolute() else (ROOT / path).resolve())
        if not (Path(args.model_path) / "config.json").is_file():
            sys.exit(
                f"no fine-tuned model in {args.model_path}: run `orchestrator search "
                "jobs/quickstart.yaml` (its baseline), or pass --model-path / --model-name"
            )
        _check_no_leak(Path(args.model_path), args.limit)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="search-efficiency-") as tmp:
        work = Path(args.out or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        header = _preflight(args, work)
        print(
            f"{header['cpus']} CPUs, torch {torch.__version__}; model {header['model']} (dense "
            f"validation accuracy {header['dense_acc']:.3f}); {args.trials} trials x "
            f"{len(args.seeds)} seeds x {len(searches(args))} searchers, "
            f"{args.concurrency} at a time",
            flush=True,
        )
        import ray

        ray.init(address="local", num_cpus=2, log_to_driver=False)
        try:
            rows, record = [], []
            points = header["allocations"]["points"] if args.allocations else None
            for seed in args.seeds:
                row: dict[str, Any] = {"seed": seed, "curves": [], "test_hv": [], "failed": []}
                for label, algorithm, seeded in searches(args):
                    trials, wall = run_search(
                        args, algorithm, seed, work, points if seeded else None
                    )
                    row["curves"].append(curve(trials, reference(header)))
                    test = curve(trials, reference(header), key="test/accuracy")
                    row["test_hv"].append(test[-1][1] if test else 0.0)
                    row["failed"].append(sum(1 for t in trials if not t["metrics"]))
                    record.append(
                        {
                            "seed": seed,
                            "algorithm": algorithm,
                            "searcher": label,
                            "wall_s": wall,
                            "trials": trials,
                        }
                    )
                    print(
                        f"seed {seed} {label}: hypervolume {row['curves'][-1][-1][1]:.4f} "
                        f"after {len(trials)} trials ({wall:.0f} s)",
                        flush=True,
                    )
                rows.append(row)
        finally:
            ray.shutdown()
        times = sorted(
            t["metrics"]["bench/trial_s"] for r in record for t in r["trials"] if t["metrics"]
        )
        threads = {
            int(t["metrics"]["bench/torch_threads"])
            for r in record
            for t in r["trials"]
            if t["metrics"]
        }
        header.update(
            wall_min=(time.perf_counter() - started) / 60,
            trial_s=times[len(times) // 2] if times else float("nan"),
            threads="/".join(map(str, sorted(threads))) or "?",
        )
        (work / "results.json").write_text(
            json.dumps({"header": header, "rows": rows, "searches": record}, indent=1)
        )
        print_table(rows, args, header, record)
        if args.out:
            print(f"\ntrials: {work / 'results.json'}")


def _check_no_leak(model: Path, limit: int) -> None:
    """Refuse a validation set that overlaps the fine-tuned model's own training data: the
    split is a seeded permutation cut as test | validation | train, so with the same seed our
    validation slice must end before the baseline's training slice begins."""
    import yaml

    job = model.parent / "job.yaml"
    if not job.is_file():
        return
    data = (yaml.safe_load(job.read_text()) or {}).get("data") or {}
    if data.get("name") != "mr" or data.get("seed", 0) != 0:
        return
    base_limit = data.get("limit")
    if base_limit is None:
        return
    train_from = round(base_limit * data.get("test_fraction", 0.2)) + round(
        base_limit * data.get("val_fraction", 0.1)
    )
    ours_to = round(limit * 0.2) + round(limit * 0.1)
    if ours_to > train_from:
        sys.exit(
            f"--limit {limit}: its validation sentences overlap the training data of {model} "
            f"(fine-tuned on data.limit {base_limit}); use --limit <= {int(train_from / 0.3)}"
        )


def uniform_recipe(spec: Any, bits: int, bundle: Any, tokenizer: Any, work: Path) -> dict:
    """Every layer of the per-layer space at ``bits``, measured as a trial is."""
    from orchestrator.config.loader import validate_job
    from orchestrator.finalize import build_compressed, calibration_batches, finalize
    from orchestrator.search.space import trial_job

    base = spec.model_dump(mode="json", exclude={"search"})
    raw = trial_job(base, spec.search, {"compress.quantize.bits": bits}, f"w{bits}", str(work))
    job = validate_job(raw)
    model, report = build_compressed(job, bundle, tokenizer, calibration_batches(job, bundle))
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        return finalize(job, model, report, bundle, tokenizer, Path(tmp) / "model")


def uniform_points(
    args: argparse.Namespace, spec: Any, bundle: Any, tokenizer: Any, work: Path
) -> dict[str, dict[str, float]]:
    """The control of ``--allocations``: every layer at one width, for each width of the choice
    up to the largest budget (the recipes a user seeds by hand, without a profile)."""
    widths = SPACE_LAYERS["compress.quantize.bits"]["choice"]
    out = {}
    for bits in [w for w in widths if w <= max(args.allocations)]:
        m = uniform_recipe(spec, bits, bundle, tokenizer, work)
        out[str(bits)] = {
            k: m[k]
            for k in (
                "eval/accuracy",
                "test/accuracy",
                "compress/size_bytes",
                "compress/dense_size_bytes",
            )
        }
    return out


def _preflight(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Validate the job (every combination of the space), warm the tokenization cache, and
    measure the dense model once; returns the facts for the table's header."""
    import optuna
    import ray

    from orchestrator import launch, models
    from orchestrator.config.loader import validate_job
    from orchestrator.finalize import evaluate_plain, label_config
    from orchestrator.search.space import allocation_points, per_layer_targets

    for algorithm in ("optuna", "random"):
        spec = launch.resolve_paths(validate_job(base_job(args, algorithm, 0, work)))
    tokenizer, bundle = launch.preflight(spec)
    dense = models.build_model(spec.model, bundle.num_labels, tokenizer, seed=spec.train.seed)
    # The per-layer space's dimensions, as ``orchestrator search`` reads them from the model.
    args.layers = per_layer_targets(spec.model_dump(mode="json"), spec.search, dense)
    label_config(dense, bundle)
    dense_acc = evaluate_plain(dense, bundle, "validation")["eval/accuracy"]
    argv = [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    extra = {}
    if args.space == "layers":
        # The reference size: every layer at the largest width (8 bits), measured as a trial is.
        m = uniform_recipe(spec, 8, bundle, tokenizer, work)
        extra["ref_size"] = m["compress/size_bytes"] / m["compress/dense_size_bytes"]
    if args.allocations:
        extra["uniform"] = uniform_points(args, spec, bundle, tokenizer, work)
        # What the driver does after its baseline for a key with ``allocations``.
        start = time.perf_counter()
        job = spec.model_dump(mode="json")
        extra["allocations"] = {
            "points": allocation_points(job, spec.search, args.layers, bundle, tokenizer),
            "budgets": args.allocations,
            "seconds": time.perf_counter() - start,
        }
    return {
        **extra,
        "searchers": [label for label, _, _ in searches(args)],
        "date": datetime.date.today().isoformat(),
        "command": "python " + shlex.join(argv),
        "cpus": os.cpu_count(),
        "cpu": _cpu_name(),
        "ray": ray.__version__,
        "optuna": optuna.__version__,
        "model": args.model_name or os.path.relpath(args.model_path, ROOT),
        "space": (
            f"per layer: each of {sum(map(len, args.layers.values()))} Linears' bit width in "
            f"{SPACE_LAYERS['compress.quantize.bits']['choice']} (weight_only, group 64, 4-bit "
            "embeddings)"
            if args.space == "layers"
            else "joint: prune / factorize / quantize methods and settings"
        ),
        "dense_acc": dense_acc,
        "ref_acc": 1.0 / bundle.num_labels,
        "n_val": bundle.sizes["validation"],
        "n_test": bundle.sizes["test"],
    }


if __name__ == "__main__":
    main()

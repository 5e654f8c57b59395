"""The search driver's own cost at scale (issue #17): what the driver does per finished trial
(its record, the results and Pareto tables, the plot, the report), at 10, 100, 1,000 and 5,000
trials, with synthetic trial records and no Ray.

The driver's Tune callback (``orchestrator.search.callbacks.record_trials``) is driven as Tune
drives it: for each trial ``on_trial_start``, three ``on_trial_result`` calls,
``on_trial_complete`` (after the trial's ``metrics.json`` and ``model/`` are in place, as the
trial writes them), and ``on_step_end`` after each, as Tune's loop calls it once per step.
Trials finish back to back as fast as the driver takes them, the worst case for the driver.
Printed, per size:

- the driver's time per finished trial, overall and in the last tenth of the trials (the cost
  at that size), and the part of it spent in the report path (tables, Pareto, plot, page),
  amortised over the trials;
- one full rebuild of the four result files at that size (what every finished trial cost
  before the report was throttled), and the size of ``report.html``.

    python benchmarks/driver_scale.py [--sizes 10,100,1000,5000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orchestrator.results as results  # noqa: E402
from orchestrator.config.loader import dump_job, load_job  # noqa: E402
from orchestrator.search.callbacks import record_trials  # noqa: E402
from orchestrator.storage import RunFolder  # noqa: E402

JOB = ROOT / "jobs" / "quickstart.yaml"
DENSE_BYTES = 90_900_000
DENSE_MS = 240.0
N_VAL, N_TEST = 4756, 3699


class FakeTrial:
    """What the callback reads of a Tune trial: its name, config and last result."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name, self.config = name, config
        self.last_result: dict[str, Any] = {}
        self.error_file = None

    def __str__(self) -> str:
        return self.name


def paired(prefix: str, n: int, rng: random.Random) -> dict[str, float]:
    """Paired counts of a trial against the dense model (both right, trial worse, better)."""
    worse, better = rng.randint(10, 120), rng.randint(10, 90)
    both = int(0.78 * n) - better
    return {
        f"{prefix}/examples": n,
        f"{prefix}/pairs_both": both,
        f"{prefix}/pairs_worse": worse,
        f"{prefix}/pairs_better": better,
        f"{prefix}/accuracy": (both + better) / n,
    }


def trial_metrics(rng: random.Random, step: int) -> dict[str, float]:
    size = rng.uniform(0.08, 0.3) * DENSE_BYTES
    ms = rng.uniform(0.12, 0.5) * DENSE_MS
    return {
        **paired("eval", N_VAL, rng),
        **paired("test", N_TEST, rng),
        "eval/loss": rng.uniform(0.4, 0.6),
        "train/step": step,
        "train/loss": rng.uniform(0.3, 0.7),
        "compress/size_bytes": size,
        "compress/weights_bytes": size * 0.98,
        "compress/size_ratio": DENSE_BYTES / size,
        "compress/sparsity": rng.uniform(0.2, 0.45),
        "perf/latency_ms_b32": ms,
        "perf/latency_ms_b1": ms / 20,
        "perf/speedup": DENSE_MS / ms,
        "time/total_s": rng.uniform(200, 400),
        "time/export_s": 0.15,
    }


def make_run(root: Path) -> tuple[RunFolder, Any]:
    spec = load_job(JOB, [f"output.dir={root}", "name=scale"])
    folder = RunFolder(str(root / "scale"))
    folder.local.mkdir(parents=True)
    folder.write_text("job.yaml", dump_job(spec))
    baseline = {"eval/accuracy": 0.78, "test/accuracy": 0.79, "compress/size_bytes": DENSE_BYTES}
    baseline["perf/latency_ms_b32"] = DENSE_MS
    folder.write_text("baseline.json", json.dumps(baseline))
    return folder, spec


def run_size(n: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder, spec = make_run(Path(tmp))
        report_s = [0.0]
        original = results.write_run_report

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                report_s[0] += time.perf_counter() - t0

        results.write_run_report = timed
        try:
            callback = record_trials(folder, spec)
            callback.setup()
            step_end = getattr(callback, "on_step_end", None)
            per_trial: list[float] = []
            report_at: list[float] = []
            t_all = time.perf_counter()
            for i in range(1, n + 1):
                config = {
                    "compress.vocab.min_count": rng.choice([1, 2]),
                    "compress.prune.sparsity": rng.uniform(0.2, 0.45),
                    "compress.quantize": rng.choice(["int8", "int8-emb4"]),
                }
                trial = FakeTrial(f"t{i:03d}_synthetic", config)
                final = trial_metrics(rng, 120)
                t0 = time.perf_counter()
                callback.on_trial_start(i, [], trial)
                for step in (40, 80, 120):
                    trial.last_result = trial_metrics(rng, step)
                    callback.on_trial_result(i, [], trial, trial.last_result)
                # The trial's own files (written by the trial process, not the driver).
                dt_files = time.perf_counter()
                folder.write_text(f"trials/{trial}/metrics.json", json.dumps(final))
                (folder.local / "trials" / str(trial) / "model").mkdir()
                dt_files = time.perf_counter() - dt_files
                trial.last_result = final
                callback.on_trial_complete(i, [], trial)
                if step_end is not None:
                    step_end(i, [])
                per_trial.append(time.perf_counter() - t0 - dt_files)
                report_at.append(report_s[0])
            driver_s = time.perf_counter() - t_all
            tail = max(1, n // 10)
            before_tail = report_at[n - tail - 1] if n > tail else 0.0
            # The end of the search: one last report (as the driver writes it after fit()).
            t0 = time.perf_counter()
            original(folder, running=False, spec=spec)
            final_s = time.perf_counter() - t0
        finally:
            results.write_run_report = original
        html = folder.local / "report.html"
        return {
            "n": n,
            "driver_s": driver_s,
            "per_trial_ms": 1e3 * sum(per_trial) / n,
            "tail_per_trial_ms": 1e3 * sum(per_trial[-tail:]) / tail,
            "report_per_trial_ms": 1e3 * report_s[0] / n,
            "tail_report_per_trial_ms": 1e3 * (report_at[-1] - before_tail) / tail,
            "full_rebuild_s": final_s,
            "html_mb": html.stat().st_size / 1e6,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,5000")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(
        f"# driver_scale {time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()}"
    )
    print(
        "| trials | driver s (all) | ms per trial | ms per trial, last 10 % | report path ms per "
        "trial (amortised) | same, last 10 % | one full rebuild s | report.html MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        r = run_size(n, args.seed)
        print(
            f"| {n:,} | {r['driver_s']:.1f} | {r['per_trial_ms']:.1f} | "
            f"{r['tail_per_trial_ms']:.1f} | {r['report_per_trial_ms']:.1f} | "
            f"{r['tail_report_per_trial_ms']:.1f} | {r['full_rebuild_s']:.2f} | "
            f"{r['html_mb']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

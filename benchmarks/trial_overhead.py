"""Per-trial orchestration overhead of a finished search: each trial's wall time as the search
driver saw it (from Tune starting the trial to Tune recording it finished) minus the time its
workers spent in the training loop (data, model, compression, recovery training, evaluation,
writing and measuring the artifact: the ``time/worker_s`` metric the loop reports).

What remains is what the orchestration costs. Where the trial recorded its own timing
(``time/fit_s``, ``time/trial_fn_s``, measured by the trial function), it is split three ways:

- Train: the Ray Train run outside the workers' loop (``fit()`` minus the loop): Ray starting the
  Train controller, the worker processes and their Python imports, torch's process group, and
  the end of the run;
- trial fn: the trial function outside ``fit()`` (building and checking the trial's job, copying
  the finished model from its checkpoint into the trial folder);
- Tune: the rest (Tune starting the trial on its reused process, the result's way back to the
  driver).

    python benchmarks/trial_overhead.py runs/quickstart

Goal (issue #4): <= 15 % for trials of about a minute.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a search's run directory")
    args = parser.parse_args()
    rows = []
    for path in sorted((args.run_dir / "trials").glob("*/trial.json")):
        record = json.loads(path.read_text())
        metrics = record.get("metrics", {})
        worker = metrics.get("time/worker_s")
        if record.get("status") != "done" or not worker or not record.get("wall_s"):
            continue
        wall, worker = float(record["wall_s"]), float(worker)
        fit, fn = metrics.get("time/fit_s"), metrics.get("time/trial_fn_s")
        split = (fit - worker, fn - fit, wall - fn) if fit and fn else None
        rows.append((record["trial"], wall, worker, wall - worker, split))
    if not rows:
        raise SystemExit(f"no finished trial with time/worker_s under {args.run_dir}/trials")
    width = max(len(r[0]) for r in rows)
    print(
        f"{'trial':<{width}}  wall s  worker s  overhead s  overhead %   Train s  trial fn s  "
        "Tune s"
    )
    for name, wall, worker, over, split in rows:
        parts = (
            "  ".join(f"{v:{w}.1f}" for v, w in zip(split, (8, 10, 6), strict=True))
            if split
            else "       (not recorded)"
        )
        print(
            f"{name:<{width}}  {wall:6.1f}  {worker:8.1f}  {over:10.1f}  {100 * over / wall:9.1f}  "
            f"{parts}"
        )
    walls = sum(r[1] for r in rows)
    overs = sum(r[3] for r in rows)
    print(
        f"\n{len(rows)} trials: median wall {statistics.median(r[1] for r in rows):.1f} s, "
        f"median overhead {statistics.median(r[3] for r in rows):.1f} s; overall overhead "
        f"{100 * overs / walls:.1f} % of trial wall time"
    )
    splits = [r[4] for r in rows if r[4]]
    if splits:
        medians = [statistics.median(s[i] for s in splits) for i in range(3)]
        print(
            f"median split of the overhead ({len(splits)} trials): Train run outside the loop "
            f"{medians[0]:.1f} s, trial function outside fit() {medians[1]:.1f} s, Tune "
            f"{medians[2]:.1f} s"
        )


if __name__ == "__main__":
    main()

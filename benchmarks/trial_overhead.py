"""Per-trial orchestration overhead of a finished search: each trial's wall time as the search
driver saw it (from Tune starting the trial to Tune recording it finished) minus the time its
workers spent in the training loop (data, model, compression, recovery training, evaluation,
writing and measuring the artifact: the ``time/worker_s`` metric the loop reports).

What remains is what the orchestration costs: Tune scheduling the trial, Ray starting the Train
controller and the worker processes (with their Python imports), the process group, persisting
the checkpoint and the result round trip.

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
        worker = record.get("metrics", {}).get("time/worker_s")
        if record.get("status") != "done" or not worker or not record.get("wall_s"):
            continue
        wall = float(record["wall_s"])
        rows.append((record["trial"], wall, float(worker), wall - float(worker)))
    if not rows:
        raise SystemExit(f"no finished trial with time/worker_s under {args.run_dir}/trials")
    width = max(len(r[0]) for r in rows)
    print(f"{'trial':<{width}}  wall s  worker s  overhead s  overhead %")
    for name, wall, worker, over in rows:
        share = 100 * over / wall
        print(f"{name:<{width}}  {wall:6.1f}  {worker:8.1f}  {over:10.1f}  {share:9.1f}")
    walls = sum(r[1] for r in rows)
    overs = sum(r[3] for r in rows)
    print(
        f"\n{len(rows)} trials: median wall {statistics.median(r[1] for r in rows):.1f} s, "
        f"median overhead {statistics.median(r[3] for r in rows):.1f} s; overall overhead "
        f"{100 * overs / walls:.1f} % of trial wall time"
    )


if __name__ == "__main__":
    main()

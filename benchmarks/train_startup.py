"""Where a Ray Train run's time goes outside the training loop: the per-trial cost a search pays.

Runs one quickstart-style trial (the packaged MiniLM, structured pruning 30 % + int8, 2 DDP
workers, a few recovery steps) several times in one embedded Ray, each a fresh ``TorchTrainer``
as a search trial is, and splits each run's wall time into:

- start: ``fit()`` called -> the train function starts on the workers (Ray Train's controller
  process, the worker processes, the Train context with torch's process group);
- imports: the workers importing orchestrator's modules (torch, transformers, datasets);
- loop: ``loop.run`` (data, model, compression, training, evaluation, the artifact and its
  measurement), as the run reports it (``time/worker_s``);
- end: the train function returned -> ``fit()`` returned (the controller noticing, the workers
  shutting down).

Runs alternate between Ray Train's default controller poll interval (2 s) and the one
``orchestrator.launch`` sets (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), side by side in one session.
The controller's own log splits "start" further (its phases are printed too).

The floor: ``--empty-runs`` more runs, interleaved with those, fit a ``TorchTrainer`` whose
train function returns at once (same workers, same poll as ours). Their wall time is what Ray
Train itself costs per run on this machine whatever the trial does; the machine's busy
CPU-seconds during each ``fit()`` (from /proc/stat) and the Ray actors each run started
(from Ray's state API) say where it goes. The empty runs alternate Ray Train's preemption
watcher on (Ray's default) and off (what ``orchestrator`` sets on a Ray it starts itself,
``launch.embedded_defaults``); the trial runs have it off.

Run: python benchmarks/train_startup.py --runs 4 --empty-runs 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def timed_fn(config: dict[str, Any]) -> None:
    """The orchestrator's train function, with the times around it written to a file."""
    t_entry = time.time()
    import ray.train

    from orchestrator import launch  # what the worker needs: torch, transformers, datasets

    t_imported = time.time()
    rank = ray.train.get_context().get_world_rank()
    launch.train_fn_per_worker(config)
    Path(config["stamp_dir"], f"rank{rank}.json").write_text(
        json.dumps({"entry": t_entry, "imported": t_imported, "returned": time.time()})
    )


def empty_fn(config: dict[str, Any]) -> None:
    """A train function that does nothing: the run costs only Ray Train's own start and end."""


def busy_cpu_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (Linux /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def empty_run(work: Path, index: int) -> dict[str, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator import launch

    os.environ[launch.HEALTH_CHECK_ENV] = launch.HEALTH_CHECK_S
    watcher = "1" if index % 2 == 0 else "0"
    os.environ[launch.PREEMPTION_WATCHER_ENV] = watcher
    trainer = TorchTrainer(
        empty_fn,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(work / "empty"), name=f"empty{index}"),
    )
    c0, t0 = busy_cpu_s(), time.time()
    trainer.fit()
    t1, c1 = time.time(), busy_cpu_s()
    return {"wall": t1 - t0, "cpu_s": c1 - c0, "watcher": float(watcher)}


def actors_per_run(runs: int) -> dict[str, float]:
    """Ray actors started in this session by class, per Train run (controller, workers and
    Ray Train's helpers), from Ray's state API."""
    from collections import Counter

    from ray.util.state import list_actors

    counts = Counter(a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False))
    return {name: n / runs for name, n in sorted(counts.items())}


def one_run(work: Path, index: int, interval: str) -> dict[str, float]:
    from ray.train.torch import TorchTrainer

    from orchestrator import launch
    from orchestrator.config import load_job

    overrides = [
        "compress.prune={method: structured, sparsity: 0.3}",
        "compress.quantize={method: dynamic_int8}",
        "train.max_steps=4",
        f"output.dir={work / 'runs'}",
        f"name=run{index}",
        "search=null",
    ]
    spec = launch.resolve_paths(load_job(str(ROOT / "jobs/quickstart.yaml"), overrides))
    launch.preflight(spec)
    launch.claim_run_dir(spec)
    folder = launch.run_dir(spec)
    os.environ[launch.HEALTH_CHECK_ENV] = interval
    os.environ[launch.PREEMPTION_WATCHER_ENV] = "0"
    base = launch.build_trainer(spec, folder)
    stamps = work / f"stamps{index}"
    stamps.mkdir()
    trainer = TorchTrainer(
        timed_fn,
        train_loop_config={**base.train_loop_config, "stamp_dir": str(stamps)},
        scaling_config=base.scaling_config,
        run_config=base.run_config,
    )
    c0, t0 = busy_cpu_s(), time.time()
    result = trainer.fit()
    t1, c1 = time.time(), busy_cpu_s()
    ranks = [json.loads(p.read_text()) for p in sorted(stamps.glob("rank*.json"))]
    loop_s = result.metrics["time/worker_s"]
    entry = min(r["entry"] for r in ranks) - t0
    imports = max(r["imported"] for r in ranks) - t0 - entry
    return {
        "interval_s": float(interval),
        "wall": t1 - t0,
        "start": entry,
        "imports": imports,
        "loop": loop_s,
        "end": t1 - max(r["returned"] for r in ranks),
        "outside_loop": t1 - t0 - loop_s,
        "cpu_s": c1 - c0,
    }


def controller_phases() -> dict[str, list[float]]:
    """Seconds of the start-up phases Ray Train's controller logs, one value per run."""
    import re

    wanted = {
        "worker actors created": "worker processes started",
        "Train context initialized on workers": "Train context (torch process group)",
        "Worker group startup completed": "worker group start in all",
    }
    out: dict[str, list[float]] = {label: [] for label in wanted.values()}
    logs = Path("/tmp/ray/session_latest/logs/train")
    for path in sorted(logs.glob("ray-train-sys-controller-*.log"), key=os.path.getmtime):
        for line in path.read_text().splitlines():
            try:
                message = json.loads(line).get("message", "")
            except ValueError:
                continue
            for key, label in wanted.items():
                found = re.search(rf"{key} in ([0-9.]+)s", message)
                if found:
                    out[label].append(float(found.group(1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4, help="Train runs (alternating intervals)")
    ap.add_argument(
        "--empty-runs", type=int, default=4, help="runs of an empty train function (the floor)"
    )
    args = ap.parse_args()
    import ray

    from orchestrator import launch

    started = time.time()
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    rows: list[dict[str, float]] = []
    empty: list[dict[str, float]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="train-startup-") as tmp:
            for i in range(max(args.runs, args.empty_runs)):
                if i < args.empty_runs:
                    empty.append(empty_run(Path(tmp), i))
                    e = empty[-1]
                    print(
                        f"empty run {i} (preemption watcher {'on' if e['watcher'] else 'off'}): "
                        f"wall {e['wall']:.1f} s, machine busy {e['cpu_s']:.1f} CPU-s",
                        flush=True,
                    )
                if i >= args.runs:
                    continue
                interval = "2.0" if i % 2 == 0 else launch.HEALTH_CHECK_S
                rows.append(one_run(Path(tmp), i, interval))
                r = rows[-1]
                print(
                    f"run {i} (poll {r['interval_s']:g} s): wall {r['wall']:.1f} s | start "
                    f"{r['start']:.1f} | imports {r['imports']:.1f} | loop {r['loop']:.1f} | end "
                    f"{r['end']:.1f} | outside the loop {r['outside_loop']:.1f} | machine busy "
                    f"{r['cpu_s']:.1f} CPU-s",
                    flush=True,
                )
        phases = controller_phases()
        actors = actors_per_run(len(rows) + len(empty))
    finally:
        ray.shutdown()
    print(f"\n- date: {datetime.date.today().isoformat()}, {os.cpu_count()} CPUs")
    print(
        f"- command: `python benchmarks/train_startup.py --runs {args.runs} "
        f"--empty-runs {args.empty_runs}`"
    )
    print(f"- wall time {(time.time() - started) / 60:.1f} min\n")
    for on in (1.0, 0.0):
        sel = [e for e in empty if e["watcher"] == on]
        if sel:
            print(
                f"The floor, an empty train function, preemption watcher {'on' if on else 'off'} "
                f"({len(sel)} runs, poll {launch.HEALTH_CHECK_S} s): median wall "
                f"{statistics.median(e['wall'] for e in sel):.1f} s, median machine busy "
                f"{statistics.median(e['cpu_s'] for e in sel):.1f} CPU-s of "
                f"{os.cpu_count()} cores"
            )
    print()
    print("Ray actors (each its own process) started per Train run, by class:")
    for name, per_run in actors.items():
        print(f"- {name}: {per_run:.2g}")
    print()
    if not rows:
        return
    print(
        "| controller poll | runs | start s | imports s | loop s | end s | outside the loop s "
        "| machine busy CPU-s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for interval in sorted({r["interval_s"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["interval_s"] == interval]
        med = {k: statistics.median(r[k] for r in sel) for k in sel[0]}
        print(
            f"| {interval:g} s | {len(sel)} | {med['start']:.1f} | {med['imports']:.1f} | "
            f"{med['loop']:.1f} | {med['end']:.1f} | {med['outside_loop']:.1f} | "
            f"{med['cpu_s']:.1f} |"
        )
    print("\nRay Train's controller log, the worker group's part of 'start' (median of all runs):")
    for label, values in phases.items():
        if values:
            print(f"- {label}: {statistics.median(values):.1f} s ({len(values)} runs)")


if __name__ == "__main__":
    main()

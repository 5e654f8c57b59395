"""Node loss during a search, measured (issue #17), on a local Ray head started the way users
start one (``cluster/local_head.sh``, token authentication on) plus a second node on this
machine (``ray start --address``, its own working directory and cache).

The debug search with 4 DDP workers per trial (2 on each node, so every trial spans both and
they run one at a time), ``--trials`` trials of ``--steps`` steps with a checkpoint every
``--checkpoint-every``: first undisturbed, then the same search with the second node SIGKILLed
whole ``--kills`` times at seeded steps and started again after each (a seeded 0-3 s later).
Printed: per kill, the step reached, the step resumed from, the steps done twice and the
seconds from the kill to the "resumed" line; the wall time of both searches; whether every
trial finished exactly once with a loadable artifact. ``--preempt`` drains the node as
preempted before each kill, with both failure budgets at 0.

    python benchmarks/node_loss.py [--kills 6] [--trials 3] [--seed 0] [--preempt]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from faults import start_head  # noqa: E402

from orchestrator.testing.nodes import (  # noqa: E402
    SecondNode,
    debug_search,
    search_with_node_kills,
)


def search_cmd(work: Path, name: str, args: argparse.Namespace, failures: int) -> list[str]:
    return debug_search(
        work,
        name,
        steps=args.steps,
        checkpoint_every=args.checkpoint_every,
        failures=failures,
        trials=args.trials,
    )


def check(run: Path, trials: int, steps: int) -> str:
    import json

    import pyarrow.parquet as pq

    from orchestrator.compress.artifact import load_artifact

    rows = pq.read_table(run / "results.parquet").to_pylist()
    names = [r["trial"] for r in rows]
    done = [r for r in rows if r["status"] == "done"]
    for r in done:
        folder = run / "trials" / r["trial"]
        if json.loads((folder / "metrics.json").read_text())["train/step"] != steps:
            return f"{r['trial']} did not reach step {steps}"
        load_artifact(folder / "model")
    if len(done) != trials or len(set(names)) != len(names) or len(rows) != trials:
        return f"{len(done)} of {trials} trials done, {len(rows)} rows"
    return f"yes: {trials} trials done, once each, every artifact loads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preempt", action="store_true")
    args = parser.parse_args()
    print(f"# {platform.node()} | {os.cpu_count()} CPUs | {time.strftime('%Y-%m-%d %H:%M')}")
    env, address = start_head()
    os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported: it reads it once
    import subprocess

    import ray

    ray.init(address=address)
    run_env = {**os.environ, "RAY_ADDRESS": address}
    failures = 0 if args.preempt else args.kills
    try:
        with tempfile.TemporaryDirectory(prefix="node-loss-") as tmp:
            work = Path(tmp)
            node = SecondNode(address, work / "node2", work / "node2-cache")
            node.start()
            try:
                t0 = time.monotonic()
                calm = subprocess.run(
                    search_cmd(work, "calm", args, failures),
                    env=run_env,
                    cwd=work,
                    text=True,
                    capture_output=True,
                )
                calm_s = time.monotonic() - t0
                if calm.returncode != 0:
                    raise SystemExit(calm.stdout[-3000:] + calm.stderr[-3000:])
                run = search_with_node_kills(
                    search_cmd(work, "killed", args, failures),
                    node,
                    kills=args.kills,
                    checkpoint_every=args.checkpoint_every,
                    max_steps=args.steps,
                    seed=args.seed,
                    env=run_env,
                    cwd=work,
                    preempt=args.kills if args.preempt else 0,
                )
            finally:
                node.stop()
            if run.returncode != 0:
                raise SystemExit(run.output[-6000:])
            kind = "drained as preempted, then SIGKILL" if args.preempt else "SIGKILL"
            print(
                f"\n## {len(run.kills)} kills of the second node ({kind}), {args.trials} trials "
                f"x {args.steps} steps, checkpoint every {args.checkpoint_every}, seed {args.seed}"
            )
            print("| kill | step reached | resumed from | steps done twice | kill -> resumed (s) |")
            print("|---|---|---|---|---|")
            for i, k in enumerate(run.kills, 1):
                after = "-" if k.resumed_after_s is None else f"{k.resumed_after_s:.1f}"
                # Training may pass the step last seen (and its checkpoint) before the kill
                # lands: then nothing was done twice (marked *).
                redone = k.steps_redone
                twice = "-" if redone is None else f"{max(0, redone)}{'*' if redone < 0 else ''}"
                print(f"| {i} | {k.last_step} | {k.resumed_step} | {twice} | {after} |")
            print(
                f"\nwall time: undisturbed {calm_s:.0f} s, with {len(run.kills)} kills "
                f"{run.wall_s:.0f} s ({run.wall_s / calm_s:.2f}x)"
            )
            verdict = check(work / "runs" / "killed", args.trials, args.steps)
            print(f"every trial finished once: {verdict}")
            print(f"failure budgets: train.max_failures = search.max_failures = {failures}")
    finally:
        ray.shutdown()
        subprocess.run(
            ["bash", str(ROOT / "cluster/local_head.sh"), "stop"], env=env, capture_output=True
        )


if __name__ == "__main__":
    main()

"""Fault tolerance and limits, measured (issue #5), on a local Ray head started the way users
start one (``cluster/local_head.sh``, token authentication on):

1. worker kill: a debug training run (``train.max_failures=1``, a checkpoint every 5 steps) has
   one Ray Train worker SIGKILLed after step 7; printed: the steps the killed group had done, the
   step it resumed from, the steps done twice, the seconds from the kill to the restart's
   "resumed" line and to its first training step. DDP and DeepSpeed ZeRO-3 bf16.
2. search resume: the debug search with K+1 trials, its driver SIGKILLed once K trials are done,
   then ``orchestrator search --resume``: seconds to restore and reach the remaining trial's
   first step, and to finish; the finished trials must not run again.
3. the bad-input table of ``orchestrator.testing.bad_input`` (exit code and message per case).

    python benchmarks/faults.py [--k 3] [--skip recovery,resume,bad-input]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.testing import bad_input, faults  # noqa: E402
from orchestrator.testing.distributed import free_port  # noqa: E402

JOBS = {"ddp": "jobs/debug/ddp.yaml", "deepspeed ZeRO-3 bf16": "jobs/debug/deepspeed_zero3.yaml"}


def start_head() -> tuple[dict[str, str], str]:
    env = {
        **os.environ,
        "RAY_PORT": str(free_port()),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_NUM_CPUS": "2",
    }
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        ["bash", str(ROOT / "cluster/local_head.sh"), "start"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    address = re.search(r"export RAY_ADDRESS=(\S+)", out).group(1)
    return env, address


def recovery(address: str, work: Path) -> None:
    print("\n## Worker kill (SIGKILL of one Ray Train worker after step 7, checkpoint every 5)")
    print(
        "| strategy | steps done before the kill | resumed from | steps done twice | "
        "kill -> 'resumed' (s) | kill -> first step (s) | run ok |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, job in JOBS.items():
        run = faults.run_and_kill_worker(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "train",
                str(ROOT / job),
                f"name=kill-{label.split()[0]}",
                f"output.dir={work}",
                f"data.cache_dir={work / 'cache'}",
                "train.max_steps=20",
                "train.checkpoint_every=5",
                "train.eval_every=0",
                "train.log_every=1",
                "train.max_failures=1",
            ],
            kill_at_step=7,
            env={**os.environ, "RAY_ADDRESS": address},
            cwd=work,
        )
        resumed = f"{run.resume_time - run.kill_time:.1f}" if run.resume_time else "-"
        first = f"{run.first_step_time - run.kill_time:.1f}" if run.first_step_time else "-"
        print(
            f"| {label} | {run.last_step_before} | {run.resumed_step} | {run.steps_lost} | "
            f"{resumed} | {first} | {run.returncode == 0} |",
            flush=True,
        )


def _done(run: Path) -> set[str]:
    done = set()
    for path in (run / "trials").glob("*/trial.json"):
        try:
            if json.loads(path.read_text())["status"] == "done":
                done.add(path.parent.name)
        except ValueError:
            continue
    return done


def resume(address: str, work: Path, k: int) -> None:
    out = work / "search"
    run = out / "debug-search"
    env = {**os.environ, "RAY_ADDRESS": address}
    command = [
        sys.executable,
        "-m",
        "orchestrator",
        "search",
        str(ROOT / "jobs/debug/search.yaml"),
        f"output.dir={out}",
        f"data.cache_dir={work / 'cache'}",
        f"search.num_samples={k + 1}",
        "search.max_concurrent_trials=1",
    ]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "first.log").open("w") as log:
        proc = subprocess.Popen(command, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
        while len(_done(run)) < k and proc.poll() is None:
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = _done(run)
    stamps = {n: (run / "trials" / n / "metrics.json").stat().st_mtime_ns for n in before}
    started = time.monotonic()
    first_step = None
    proc = subprocess.Popen(
        [*command, "--resume"],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if first_step is None and faults.STEP_LINE.search(line):
            first_step = time.monotonic() - started
    proc.wait()
    total = time.monotonic() - started
    rerun = [
        n for n in before if (run / "trials" / n / "metrics.json").stat().st_mtime_ns != stamps[n]
    ]
    print(f"\n## Search resume (driver SIGKILLed with {len(before)} of {k + 1} trials done)")
    print(
        "| finished trials at the kill | resume -> first training step (s) | resume total (s) "
        "| finished trials run again | trials done at the end | exit |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {len(before)} | {first_step:.1f} | {total:.1f} | {len(rerun)} | "
        f"{len(_done(run))} | {proc.returncode} |",
        flush=True,
    )


def bad_inputs(address: str, work: Path) -> None:
    print(
        "\n## Bad input and limits (`orchestrator train jobs/debug/ddp.yaml ...` on a 2-CPU head)"
    )
    print("| case | exit | message |")
    print("|---|---|---|")
    for i, case in enumerate(bad_input.CASES):
        if case.mount and not bad_input.can_mount():
            print(f"| {case.name} | skipped (needs root) | |")
            continue
        code, message = bad_input.run_case(case, work / f"case{i}", address)
        text = " ".join(message.split()).replace("|", "\\|")
        print(f"| {case.name} | {code} | {text} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3, help="finished trials before the kill")
    parser.add_argument("--skip", default="", help="comma-separated: recovery,resume,bad-input")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    print(f"# {platform.node()} | {os.cpu_count()} CPUs | {time.strftime('%Y-%m-%d %H:%M')}")
    env, address = start_head()
    os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported: it reads it once
    import ray

    ray.init(address=address)
    try:
        with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
            work = Path(tmp)
            if "recovery" not in skip:
                recovery(address, work)
            if "resume" not in skip:
                resume(address, work, args.k)
            if "bad-input" not in skip:
                bad_inputs(address, work)
    finally:
        ray.shutdown()
        subprocess.run(
            ["bash", str(ROOT / "cluster/local_head.sh"), "stop"], env=env, capture_output=True
        )


if __name__ == "__main__":
    main()

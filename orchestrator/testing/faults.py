"""Fault injection for tests and benchmarks: find the processes of a running Ray Train worker
group and SIGKILL one, as a lost machine or an out-of-memory kill would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field


def train_worker_pids(timeout_s: float = 60.0, count: int = 1) -> list[int]:
    """PIDs of the live Ray Train workers (``RayTrainWorker`` actors) on this Ray cluster, in
    actor-creation order; waits until at least ``count`` are alive. Needs ``ray.init`` first."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while True:
        actors = list_actors(
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
            detail=True,
            raise_on_missing_output=False,
        )
        pids = [a.pid for a in actors if a.pid]
        if len(pids) >= count:
            return pids
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pids)} Ray Train workers alive after {timeout_s:.0f} s")
        time.sleep(0.2)


def kill_process(pid: int) -> float:
    """SIGKILL ``pid`` (no clean-up of any kind); returns the time of the kill (monotonic)."""
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


STEP_LINE = re.compile(r"\[orchestrator\] step (\d+)/(\d+)")
RESUMED_LINE = re.compile(r"\[orchestrator\] resumed from step (\d+)")
PID = re.compile(r"pid=(\d+)")  # Ray prefixes worker output with "(RayTrainWorker pid=N)"


@dataclass
class KillRun:
    """What happened in a run whose worker was killed: every output line with its arrival time
    (monotonic seconds) and the restart's figures."""

    returncode: int
    lines: list[tuple[float, str]]
    killed_pid: int
    kill_time: float
    last_step_before: int  # the highest step the killed worker group logged
    resumed_step: int | None  # "resumed from step N" after the kill; None: it started over
    resume_time: float | None  # when that line arrived
    first_step_time: float | None  # when the restarted group logged its first step
    restarted_steps: list[int] = field(default_factory=list)  # steps the new group logged

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    @property
    def steps_lost(self) -> int:
        """Optimizer steps the killed group had done that the restarted group did again."""
        return self.last_step_before - (self.resumed_step or 0)


def run_and_kill_worker(
    command: list[str], kill_at_step: int, *, worker: int = -1, timeout_s: float = 900, **popen
) -> KillRun:
    """Run ``command`` (``orchestrator train`` on the Ray cluster this process is connected to),
    SIGKILL one of its Ray Train worker processes (``worker`` indexes the live workers) once the
    loop has logged step ``kill_at_step``, and follow the output to the end."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )
    lines: list[tuple[float, str]] = []
    old_pids: set[int] = set()
    killed_pid, kill_time, last_before = 0, 0.0, 0
    resumed_step = resume_time = first_step_time = None
    restarted: list[int] = []
    deadline = time.monotonic() + timeout_s
    try:
        for line in proc.stdout or []:
            now = time.monotonic()
            lines.append((now, line))
            if now > deadline:
                raise TimeoutError(f"{command} ran past {timeout_s:.0f} s")
            step = STEP_LINE.search(line)
            pid = PID.search(line)
            if step and (not killed_pid or (pid and int(pid.group(1)) in old_pids)):
                # Lines of the dying group can still arrive after the kill.
                last_before = max(last_before, int(step.group(1)))
                if not killed_pid and last_before >= kill_at_step:
                    pids = train_worker_pids(count=2)
                    old_pids = set(pids)
                    killed_pid = pids[worker]
                    kill_time = kill_process(killed_pid)
                continue
            if not killed_pid:
                continue
            resumed = RESUMED_LINE.search(line)
            if resumed and resumed_step is None:
                resumed_step, resume_time = int(resumed.group(1)), now
            if step:
                restarted.append(int(step.group(1)))
                first_step_time = first_step_time or now
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return KillRun(
        proc.returncode,
        lines,
        killed_pid,
        kill_time,
        last_before,
        resumed_step,
        resume_time,
        first_step_time,
        restarted,
    )

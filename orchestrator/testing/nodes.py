"""Node loss for tests and benchmarks: a second Ray node on this machine, joined to a running
head as another machine would join (its own working directory and cache folder), killed whole
(SIGKILL of its raylet and every process it started, as a lost machine or a kernel OOM kill of
the node would) and started again; and a search driven through such kills at seeded moments.

A kill can first drain the node as preempted: the GCS call Ray's autoscaler makes when a cloud
announces it takes a node back (``DRAIN_NODE_REASON_PREEMPTION`` with a deadline). Ray then
marks the actors that die with the node as preempted, and Ray Tune does not count their loss
against ``FailureConfig.max_failures`` (nor Ray Train against its own; it has a separate
preemption budget, unlimited by default).
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.testing.faults import RESUMED_LINE, STEP_LINE

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parents[2]
# The driver prints this once the dense baseline is done and the trials start.
SEARCH_LINE = re.compile(r"\[orchestrator\] search \S+ \| ")
PREEMPTION_NOTICE_S = 12


def debug_search(
    work: Path, name: str, *, steps: int, checkpoint_every: int, failures: int, trials: int
) -> list[str]:
    """The command of the debug search (``jobs/debug/search.yaml``) that the node-loss test
    and benchmark kill nodes under: 4 DDP workers per trial (2 on each 2-CPU node, so every
    trial spans both and they run one at a time), a progress line every step, both failure
    budgets ``failures``; its run folder is ``work/runs/name``. The dense baseline is the job's
    model evaluated as it is (``search.baseline.train=false``): the kills come in the trials,
    and a fine-tuning run of its own before them would only lengthen the run."""
    return [
        sys.executable,
        "-m",
        "orchestrator",
        "search",
        str(ROOT / "jobs" / "debug" / "search.yaml"),
        f"name={name}",
        f"output.dir={work / 'runs'}",
        f"data.cache_dir={work / 'data-cache'}",
        "train.num_workers=4",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={checkpoint_every}",
        "train.log_every=1",
        f"train.max_failures={failures}",
        f"search.max_failures={failures}",
        f"search.num_samples={trials}",
        "search.baseline.train=false",
    ]


def alive_nodes() -> list[str]:
    """IDs of the cluster's live nodes (needs ``ray.init`` first)."""
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def wait_alive(count: int, timeout_s: float = 180.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while len(nodes := alive_nodes()) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} Ray nodes alive, waited for {count}")
        time.sleep(0.5)
    return nodes


@dataclass
class SecondNode:
    """A Ray node that joins ``gcs_address`` with ``ray start --block``, in its own session so
    that its whole process group (raylet, agents, workers) can be killed at once."""

    gcs_address: str
    workdir: Path
    cache: Path
    num_cpus: int = 2
    proc: subprocess.Popen | None = None
    node_id: str | None = None
    starts: int = 0
    temp_dirs: list[str] = field(default_factory=list)

    def start(self, timeout_s: float = 120.0) -> str:
        before = set(alive_nodes())
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Every start gets a fresh Ray temp folder, as a new machine has its own disk: sharing
        # the head's session folder, a restarted node's log monitor would replay the log
        # files of the workers that died with it. Short, under /tmp: Ray's socket paths
        # must fit in 107 bytes.
        temp = tempfile.mkdtemp(prefix="ray-node-")
        self.temp_dirs.append(temp)
        self.proc = subprocess.Popen(
            [
                RAY,
                "start",
                "--address",
                self.gcs_address,
                "--num-cpus",
                str(self.num_cpus),
                "--temp-dir",
                temp,
                "--disable-usage-stats",
                "--block",
            ],
            cwd=self.workdir,
            env={**os.environ, "ORCHESTRATOR_CACHE": str(self.cache)},  # its workers inherit it
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while not (new := set(alive_nodes()) - before):
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the second node did not join within {timeout_s:.0f} s")
            time.sleep(0.3)
        self.node_id = new.pop()
        self.starts += 1
        return self.node_id

    def drain_as_preempted(self, deadline_s: int) -> None:
        """Tell the GCS the node is taken back in ``deadline_s`` seconds (what the autoscaler
        does on a cloud's notice); the caller kills it then."""
        import ray
        from ray.core.generated import autoscaler_pb2

        client = ray._raylet.GcsClient(address=self.gcs_address)
        accepted, why = client.drain_node(
            self.node_id,
            autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "preempted by the node-loss test",
            time.time_ns() // 1_000_000 + 1000 * deadline_s,
        )
        if not accepted:
            raise RuntimeError(f"the GCS refused to drain {self.node_id}: {why}")

    def kill(self) -> float:
        """SIGKILL every process of the node at once: its process group and every descendant
        of ``ray start`` (the raylet starts its workers in sessions of their own, and a worker
        that outlived its raylet by a few seconds kept training); returns the time of the kill
        (monotonic)."""
        import psutil

        assert self.proc is not None, "the node is not running"
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        os.killpg(self.proc.pid, signal.SIGKILL)
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        when = time.monotonic()
        self.proc.wait(timeout=60)
        self.proc = None
        return when

    def stop(self) -> None:
        """End the node cleanly (``ray start --block`` stops its processes on SIGTERM)."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=60)
            self.proc = None
        for temp in self.temp_dirs:
            shutil.rmtree(temp, ignore_errors=True)
        self.temp_dirs.clear()


@dataclass
class Kill:
    """One kill of the node and what the search did after it."""

    time: float
    last_step: int  # the highest step the running trial had logged before the kill
    preempted: bool
    resumed_step: int | None = None  # the step the trial's next worker group resumed from
    resumed_after_s: float | None = None  # from the kill to that "resumed" line

    @property
    def steps_redone(self) -> int | None:
        return None if self.resumed_step is None else self.last_step - self.resumed_step


@dataclass
class NodeLossRun:
    returncode: int
    wall_s: float
    kills: list[Kill] = field(default_factory=list)
    output: str = ""
    # What the run saw, in order, with seconds since it started: trial steps and resumes as
    # logged, kills and restarts of the node (for a failing test's message).
    events: list[str] = field(default_factory=list)

    def timeline(self) -> str:
        return "\n".join(self.events)


def _start_search(
    cmd: list[str], env: dict[str, str], cwd: Path
) -> tuple[subprocess.Popen, queue.Queue[tuple[float, str] | None]]:
    """Start the search; a thread puts each line of its output on the queue with the time it
    came, then None when the output ends."""
    lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
    proc = subprocess.Popen(
        cmd,
        # Ray folds identical lines from several processes into one and prints the count
        # later ("[repeated 3x across cluster]"): a late copy would read as a new event.
        env={**env, "RAY_DEDUP_LOGS": "0"},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put((time.monotonic(), line))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _kill_node(
    node: SecondNode,
    run: NodeLossRun,
    step: int,
    started: float,
    preempt: bool,
    restart: bool,
    rng: random.Random,
) -> Kill:
    """Kill ``node`` at the trial's ``step`` (after a preemption notice with ``preempt``) and,
    with ``restart``, start it again after a seeded 0-3 s; the events go to ``run``."""
    if preempt:
        # A notice ahead of the kill, as clouds give (30 s to 2 min): Ray Train's preemption
        # watcher (polling every 5 s) sees the node draining in time.
        node.drain_as_preempted(PREEMPTION_NOTICE_S)
        time.sleep(PREEMPTION_NOTICE_S)
    kill = Kill(time=node.kill(), last_step=step, preempted=preempt)
    run.events.append(f"{kill.time - started:7.1f} KILLED the node at step {step}")
    run.kills.append(kill)
    if restart:
        time.sleep(rng.uniform(0, 3))
        node.start()
        run.events.append(f"{time.monotonic() - started:7.1f} node started again")
    return kill


def search_with_node_kills(
    cmd: list[str],
    node: SecondNode,
    *,
    kills: int,
    checkpoint_every: int,
    max_steps: int,
    seed: int,
    env: dict[str, str],
    cwd: Path,
    preempt: int = 0,
    restart: bool = True,
    timeout_s: float = 1500.0,
) -> NodeLossRun:
    """Run the search ``cmd`` and kill ``node`` ``kills`` times while trials train, starting it
    again after each kill (after a seeded 0-3 s). Each kill comes at a seeded step of the
    running trial, past its first checkpoint since its last (re)start: at least
    ``checkpoint_every`` + 1 and at most 2 x ``checkpoint_every`` - 1 steps after the step it
    started or resumed from, so every kill has a checkpoint to resume from and costs the steps
    since it; and at most at step ``max_steps`` - 5, since a kill while a finished trial
    copies its model restarts no training. The trials must run one at a time (their workers
    span both nodes), with ``train.log_every=1``. ``preempt``: the first ``preempt`` kills
    come ``PREEMPTION_NOTICE_S`` after the node was drained as preempted. ``restart=False``: the
    node never comes back."""
    rng = random.Random(seed)
    started = time.monotonic()
    proc, lines = _start_search(cmd, env, cwd)
    run = NodeLossRun(returncode=-1, wall_s=0.0)
    out: list[str] = []
    trials_started = False
    base, last_step = 0, 0
    threshold = None
    waiting: Kill | None = None
    while True:
        try:
            item = lines.get(timeout=max(1.0, timeout_s - (time.monotonic() - started)))
        except queue.Empty:
            proc.kill()
            raise TimeoutError(f"the search ran past {timeout_s:.0f} s") from None
        if item is None:
            break
        when, line = item
        out.append(line)
        if "[repeated " in line:
            continue
        if SEARCH_LINE.search(line):
            trials_started = True
            continue
        if not trials_started:
            continue  # the dense baseline's own steps
        if m := RESUMED_LINE.search(line):
            run.events.append(f"{when - started:7.1f} {line.strip()}")
            base = last_step = int(m.group(1))
            threshold = None
            if waiting is not None:
                waiting.resumed_step, waiting.resumed_after_s = base, when - waiting.time
                waiting = None
            continue
        m = STEP_LINE.search(line)
        if not m:
            continue
        step = int(m.group(1))
        run.events.append(f"{when - started:7.1f} {line.strip()[:120]}")
        if step < last_step and waiting is None:
            base = 0  # the next trial started from scratch
            threshold = None
        last_step = step
        if threshold is None:
            threshold = base + checkpoint_every + rng.randint(1, checkpoint_every - 1)
        if waiting is None and len(run.kills) < kills and threshold <= step <= max_steps - 5:
            preempted = len(run.kills) < preempt
            waiting = _kill_node(node, run, step, started, preempted, restart, rng)
    proc.wait(timeout=60)
    run.returncode = proc.returncode
    run.wall_s = time.monotonic() - started
    run.output = "".join(out)
    return run

"""Losing a whole node during a search: the tier's head plus a second Ray node on this machine
(its own working directory and cache), a debug search whose trials have 4 DDP workers (so every
trial spans both nodes, one at a time), and the second node SIGKILLed whole (raylet, agents,
workers) at seeded steps and started again. Every trial must end finished, once, resumed from
its last checkpoint each time, with its artifact whole; the search's own files intact.

A node drained as preempted first (what Ray's autoscaler does on a cloud's notice) costs no
failure budget: the first of the three kills is one, with both budgets at 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.testing.nodes import (
    SecondNode,
    debug_search,
    search_with_node_kills,
    wait_alive,
)

pytestmark = pytest.mark.integration
CHECKPOINT_EVERY, MAX_STEPS, TRIALS = 10, 60, 2


def _search(
    tmp_path: Path, name: str, failures: int, trials: int = TRIALS, steps: int = MAX_STEPS
) -> list[str]:
    return debug_search(
        tmp_path,
        name,
        steps=steps,
        checkpoint_every=CHECKPOINT_EVERY,
        failures=failures,
        trials=trials,
    )


def _check_run(run: Path, trials: int = TRIALS, steps: int = MAX_STEPS) -> None:
    from orchestrator.compress.artifact import load_artifact

    table = pq.read_table(run / "results.parquet").to_pylist()
    assert [r["status"] for r in table] == ["done"] * trials, table
    assert len({r["trial"] for r in table}) == trials
    for row in table:
        folder = run / "trials" / row["trial"]
        assert json.loads((folder / "metrics.json").read_text())["train/step"] == steps
        load_artifact(folder / "model")  # whole and loadable
    for name in ("job.yaml", "baseline.json", "pareto.parquet", "pareto.png", "report.html"):
        assert (run / name).is_file(), name


@pytest.fixture
def second_node(ray_head, tmp_path: Path):
    wait_alive(1)
    node = SecondNode(ray_head.gcs_address, tmp_path / "node2", tmp_path / "node2-cache")
    node.start()
    try:
        yield node
    finally:
        node.stop()
        wait_alive(1)  # the tier's other tests see the 2-CPU head alone again


def _env(ray_head) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray_head.gcs_address}


def test_a_search_survives_losing_a_node_three_times_and_a_preemption_costs_no_budget(
    ray_head, second_node: SecondNode, tmp_path: Path
) -> None:
    """Three kills of the second node in one trial, the first after a preemption notice; both
    failure budgets are 2. Had the preempted loss counted, the trial would have run out of its
    budget at the third kill and the search would fail. The trial trains on while the notice
    runs (12 s, about 20 steps here), hence its 90 steps: room for the two kills after it."""
    steps = 90
    run = search_with_node_kills(
        _search(tmp_path, "node-loss", failures=2, trials=1, steps=steps),
        second_node,
        kills=3,
        checkpoint_every=CHECKPOINT_EVERY,
        max_steps=steps,
        seed=0,
        env=_env(ray_head),
        cwd=tmp_path,
        preempt=1,
    )
    assert run.returncode == 0, run.output[-6000:]
    assert len(run.kills) == 3, run.timeline()
    assert [k.preempted for k in run.kills] == [True, False, False]
    for kill in run.kills:
        # Resumed from a checkpoint, never from step 0, and from the newest one before the
        # kill (training may have passed the step last seen before the kill landed, and goes
        # on through a preemption notice), so at most the steps since that checkpoint were
        # done twice.
        assert kill.resumed_step is not None, run.timeline()
        assert kill.resumed_step > 0 and kill.resumed_step % CHECKPOINT_EVERY == 0, run.timeline()
        newest_seen = kill.last_step // CHECKPOINT_EVERY * CHECKPOINT_EVERY
        assert kill.resumed_step >= newest_seen, run.timeline()
        assert kill.steps_redone < CHECKPOINT_EVERY, run.timeline()
    _check_run(tmp_path / "runs" / "node-loss", trials=1, steps=steps)


def test_a_node_that_never_comes_back_fails_its_trials_with_the_reason(
    ray_head, second_node: SecondNode, tmp_path: Path
) -> None:
    run = search_with_node_kills(
        [
            *_search(tmp_path, "gone", failures=0),
            "train.max_start_failures=0",
            "train.start_timeout_s=15",
        ],
        second_node,
        kills=1,
        checkpoint_every=CHECKPOINT_EVERY,
        max_steps=MAX_STEPS,
        seed=2,
        env=_env(ray_head),
        cwd=tmp_path,
        restart=False,
    )
    # Each trial waited one start timeout (15 s) for its 4 workers, then failed with the reason; the
    # search went on to its next trial and, with none finished, exits 1 naming the cause.
    assert run.returncode == 1, run.output[-6000:]
    assert len(run.kills) == 1
    run_dir = tmp_path / "runs" / "gone"
    table = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert [r["status"] for r in table] == ["error"] * TRIALS, table
    reason = "did not have the resources for 4 workers"
    assert reason in table[-1]["error"], table[-1]["error"]
    assert "train.max_start_failures=0" in run.output
    assert (run_dir / "report.html").is_file()

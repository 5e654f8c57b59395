"""Two Ray nodes on one machine: the tier's head plus a second node joined with
``ray start --address`` from another working directory. A DDP run of 4 workers must span both
nodes and finish; the driver runs from a third folder with a relative ``output.dir`` (resolved
to an absolute path on the driver before anything reaches a worker), and the run directory lands
there, not under the second node's folder. The second node leaves the cluster afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _alive_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def _wait_nodes(count: int, timeout_s: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while len(nodes := _alive_nodes()) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} Ray nodes alive, waited for {count}")
        time.sleep(0.5)
    return nodes


def _train_worker_nodes() -> dict[str, str]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10_000)
    return {a.actor_id: a.node_id for a in actors}


def test_run_spans_a_second_node(ray_head, tmp_path: Path) -> None:
    before_nodes = _wait_nodes(1)
    node_dir, driver_dir = tmp_path / "node2", tmp_path / "driver"
    node_dir.mkdir()
    driver_dir.mkdir()
    # --block: the node lives as long as this process; ending it takes the node's processes
    # with it, so the tier's other tests see the 2-CPU head alone again.
    node = subprocess.Popen(
        [
            RAY,
            "start",
            "--address",
            ray_head.gcs_address,
            "--num-cpus",
            "2",
            "--disable-usage-stats",
            "--block",
        ],
        cwd=node_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        nodes = _wait_nodes(2)
        second = next(n for n in nodes if n not in before_nodes)
        known = set(_train_worker_nodes())
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "train",
                str(ROOT / "jobs/debug/ddp.yaml"),
                "output.dir=runs",  # relative to the driver's folder, which no node shares
                f"data.cache_dir={tmp_path / 'cache'}",
                "train.num_workers=4",  # 4 x 1 CPU: 2 on the head, 2 on the second node
            ],
            cwd=driver_dir,
            env={**os.environ, "RAY_ADDRESS": ray_head.gcs_address},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        workers = {a: n for a, n in _train_worker_nodes().items() if a not in known}
        assert len(workers) == 4
        assert set(workers.values()) == {before_nodes[0], second}
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
    _wait_nodes(1, timeout_s=180)

    run = driver_dir / "runs" / "debug-ddp"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/step"] == 12 and 0 <= metrics["test/accuracy"] <= 1
    assert (run / "model" / "model.safetensors").is_file()
    assert not (node_dir / "runs").exists()

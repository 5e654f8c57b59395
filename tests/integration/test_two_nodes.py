"""Two Ray nodes on one machine: the tier's head plus a second node joined with
``ray start --address`` from another working directory and with its own cache folder, as a
second machine would have. The debug search, with 4 DDP workers per trial (so every Train run
spans both nodes), writes to a ``file://`` storage URI and is driven from a third folder with a
third cache: everything lands in storage, the driver's mirror holds only records (never a
model), and the workers on the second node fetch the dense baseline model from storage into
their node's cache. The second node leaves the cluster afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.testing.nodes import wait_alive

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _train_worker_nodes() -> dict[str, str]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10_000)
    return {a.actor_id: a.node_id for a in actors}


def test_search_in_storage_spans_a_second_node(ray_head, tmp_path: Path) -> None:
    before_nodes = wait_alive(1)
    node_dir, driver_dir = tmp_path / "node2", tmp_path / "driver"
    node_cache, driver_cache = tmp_path / "node2-cache", tmp_path / "driver-cache"
    node_dir.mkdir()
    driver_dir.mkdir()
    store = tmp_path / "store"
    uri = f"file://{store}"
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
        env={**os.environ, "ORCHESTRATOR_CACHE": str(node_cache)},  # its workers inherit it
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        nodes = wait_alive(2)
        second = next(n for n in nodes if n not in before_nodes)
        known = set(_train_worker_nodes())
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "search",
                str(ROOT / "jobs/debug/search.yaml"),
                f"output.dir={uri}",
                f"data.cache_dir={tmp_path / 'data-cache'}",
                "train.num_workers=4",  # 4 x 1 CPU: 2 on the head, 2 on the second node
                "search.num_samples=1",
            ],
            cwd=driver_dir,
            env={
                **os.environ,
                "RAY_ADDRESS": ray_head.gcs_address,
                "ORCHESTRATOR_CACHE": str(driver_cache),
            },
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        workers = {a: n for a, n in _train_worker_nodes().items() if a not in known}
        # The baseline and the trial: 2 Train runs of 4 workers, each on both nodes.
        assert len(workers) == 8
        assert set(workers.values()) == {before_nodes[0], second}
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
    wait_alive(1, timeout_s=180)
    assert f"report: {uri}/debug-search/report.html" in proc.stdout

    run = store / "debug-search"
    for name in ("job.yaml", "baseline.json", "results.parquet", "pareto.png", "report.html"):
        assert (run / name).is_file(), name
    assert (run / "baseline" / "model" / "config.json").is_file()
    assert (run / "tune").is_dir()  # Ray Tune's experiment state, in storage too
    table = pq.read_table(run / "results.parquet").to_pylist()
    assert [r["status"] for r in table] == ["done"]
    for row in table:
        assert (run / "trials" / row["trial"] / "model" / "manifest.json").is_file()
        assert json.loads((run / "trials" / row["trial"] / "metrics.json").read_text())

    # The driver's side: a mirror of the records, and no model of any kind; the trials' workers
    # read the baseline model from storage (the second node's cache holds its fetched copy).
    mirror = driver_cache / "runs" / "file" / Path(*store.parts[1:]) / "debug-search"
    assert (mirror / "report.html").is_file() and (mirror / "trials" / "names.json").is_file()
    assert not list(mirror.rglob("*.safetensors")) and not (driver_cache / "fetched").exists()
    fetched = node_cache / "fetched" / "file" / Path(*store.parts[1:]) / "debug-search"
    assert (fetched / "baseline" / "model" / "config.json").is_file()
    assert not (node_dir / "runs").exists() and not (driver_dir / "runs").exists()

    # Another machine: export a trial from storage alone.
    env = {**os.environ, "ORCHESTRATOR_CACHE": str(tmp_path / "elsewhere")}
    trial = table[0]["trial"]
    out = tmp_path / "shipped"
    exported = subprocess.run(
        [sys.executable, "-m", "orchestrator", "export", f"{uri}/debug-search", "--trial", trial]
        + ["--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert exported.returncode == 0, exported.stderr
    shipped = (out / "model.safetensors").read_bytes()
    assert shipped == (run / "trials" / trial / "model" / "model.safetensors").read_bytes()
    from orchestrator.compress.artifact import load_artifact

    load_artifact(out)

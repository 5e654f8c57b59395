"""`ray job submit` as the README's "Run on a cluster" shows it: the tier's Ray head was started
by ``cluster/local_head.sh`` (token authentication on); the debug search is submitted with the
repository as working directory and ``cluster/runtime_env.yaml``, runs as a Ray job, and leaves
its run directory. A client with a wrong token is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _submit(head, *entrypoint: str, env: dict | None = None, timeout: int = 600):
    return subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            head.dashboard,
            "--runtime-env",
            "cluster/runtime_env.yaml",
            "--working-dir",
            ".",
            "--",
            *entrypoint,
        ],
        cwd=ROOT,
        env=env or {**os.environ, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_head_script_prints_how_to_connect(ray_head) -> None:
    out = ray_head.start_output
    assert "export RAY_AUTH_MODE=token" in out
    assert f"export RAY_ADDRESS={ray_head.gcs_address}" in out
    assert f"RAY_API_SERVER_ADDRESS={ray_head.dashboard}" in out


def test_wrong_token_is_refused(ray_head) -> None:
    proc = _submit(
        ray_head,
        "echo",
        "never runs",
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
        timeout=120,
    )
    assert proc.returncode != 0
    assert "never runs" not in proc.stdout
    assert "Unauthorized" in proc.stdout + proc.stderr or "Authentication" in proc.stderr


def test_submitted_search_writes_its_run_directory(ray_head, tmp_path: Path) -> None:
    # output.dir must be absolute under `ray job submit`: the entrypoint runs in Ray's unpacked
    # copy of the working directory, which Ray deletes later.
    out = tmp_path / "runs"
    proc = _submit(
        ray_head,
        "orchestrator",
        "search",
        "jobs/debug/search.yaml",
        f"output.dir={out}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "search.num_samples=1",
        # The baseline evaluated as it is: the trial is the Ray Train run started from the
        # submitted driver (the search tests show the baseline's own fine-tuning run).
        "search.baseline.train=false",
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "succeeded" in log
    run = out / "debug-search"
    assert json.loads((run / "baseline.json").read_text())["eval/accuracy"] > 0
    table = pq.read_table(run / "results.parquet").to_pylist()
    assert [row["status"] for row in table] == ["done"]
    for name in ("job.yaml", "pareto.parquet", "pareto.png", "report.html"):
        assert (run / name).is_file(), name

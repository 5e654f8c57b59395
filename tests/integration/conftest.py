"""One Ray head for the whole integration tier, started the way a user starts a dev cluster
(``cluster/local_head.sh start``: ``ray start --head`` with token authentication on) and joined
by the tests, the CLI processes they spawn and the jobs they submit. Start-up costs tens of
seconds on 2 cores, and one Ray per host avoids "multiple active Ray instances" in Ray's
placement-group cleaner."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
# Clients send the token when RAY_AUTH_MODE=token, as the head script tells users to export: Ray
# never turns it on by itself for an explicit address, and reads the variable once, so it is set
# here, before any test connects; the processes the tests start inherit it.
os.environ["RAY_AUTH_MODE"] = "token"
HEAD_SCRIPT = ROOT / "cluster" / "local_head.sh"


@dataclass(frozen=True)
class Head:
    gcs_address: str  # what RAY_ADDRESS / ray.init take
    dashboard: str  # what `ray job submit --address` takes
    start_output: str


def _head_script(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(HEAD_SCRIPT), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Head]:
    import ray

    # Free ports, so a developer's own Ray on the default ports is not joined by mistake; the
    # token is the machine's (~/.ray/auth_token, created by the script when missing).
    gcs_port, dashboard_port = free_port(), free_port()
    env = {
        **os.environ,
        "RAY_PORT": str(gcs_port),
        "RAY_DASHBOARD_PORT": str(dashboard_port),
        "RAY_NUM_CPUS": "2",
    }
    env.pop("RAY_ADDRESS", None)
    started = _head_script("start", env)
    if started.returncode != 0:
        pytest.fail(f"local_head.sh start failed:\n{started.stdout}\n{started.stderr}")
    try:
        address = next(
            line.split("RAY_ADDRESS=", 1)[1].split()[0]
            for line in started.stdout.splitlines()
            if "export RAY_ADDRESS=" in line
        )
        ray.init(address=address, log_to_driver=True)
        yield Head(address, f"http://127.0.0.1:{dashboard_port}", started.stdout)
    finally:
        ray.shutdown()
        stopped = _head_script("stop", env)
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="session")
def ray_cluster(ray_head: Head) -> str:
    """The GCS address of the tier's Ray head (this process is connected to it)."""
    return ray_head.gcs_address

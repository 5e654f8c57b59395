"""Every shipped job under jobs/ validates and says, in its header, how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_job

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
JOBS = sorted((REPO / "jobs").rglob("*.yaml"))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_jobs_exist() -> None:
    assert JOBS, f"no job files under {REPO / 'jobs'}"


@pytest.mark.parametrize("path", JOBS, ids=[_rel(p) for p in JOBS])
def test_job_validates(path: Path) -> None:
    spec = load_job(path)
    assert spec.name


@pytest.mark.parametrize("path", JOBS, ids=[_rel(p) for p in JOBS])
def test_job_header_says_how_to_run_it(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("#"), f"{_rel(path)} must start with a comment line"
    rel = _rel(path)
    commands = [line for line in lines if "orchestrator " in line and rel in line]
    assert commands, (
        f"{rel} needs a line with the command that runs it, e.g. orchestrator train {rel}"
    )


def test_jobs_have_distinct_run_directories() -> None:
    # Two jobs with the same output.dir and name would write into the same run directory.
    run_dirs = [(spec.output.dir, spec.name) for spec in map(load_job, JOBS)]
    assert len(run_dirs) == len(set(run_dirs)), run_dirs

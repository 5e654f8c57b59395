"""The tiers CI runs select every test: tests/unit/test_storage.py is in the unit tier, and the
guard in tests/conftest.py refuses a test that carries no tier marker, even when ``-m`` would
have deselected it (real pytest runs in subprocesses)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

PYTEST_INI = """[pytest]
markers =
    unit: u
    distributed: d
    integration: i
addopts = --strict-markers -p no:cacheprovider
"""

UNMARKED = """import pytest

pytestmark = pytest.mark.unit


def test_marked():
    pass
"""


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_storage_tests_are_in_the_unit_tier() -> None:
    run = _pytest(ROOT, "-m", "unit", "--collect-only", "-q", "tests/unit/test_storage.py")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "deselected" not in run.stdout, run.stdout
    assert "tests/unit/test_storage.py::test_the_same_on_s3" in run.stdout


@pytest.mark.parametrize("select", [[], ["-m", "unit"], ["-m", "distributed or integration"]])
def test_a_test_without_a_tier_marker_fails_collection(tmp_path: Path, select: list[str]) -> None:
    (tmp_path / "pytest.ini").write_text(PYTEST_INI)
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_tiered.py").write_text(UNMARKED)
    (tmp_path / "test_untiered.py").write_text(
        "import pytest\n\n\ndef test_forgotten():\n    pass\n\n\n"
        "@pytest.mark.integration\ndef test_marked_alone():\n    pass\n"
    )
    run = _pytest(tmp_path, *select, "--collect-only", "-q")
    out = run.stdout + run.stderr
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert "1 test(s) carry none of the tier markers" in out, out
    assert "test_untiered.py::test_forgotten" in out, out
    assert "test_untiered.py::test_marked_alone\n" not in out.split("ERROR:")[-1], out

    (tmp_path / "test_untiered.py").unlink()
    run = _pytest(tmp_path, *select, "--collect-only", "-q")
    assert run.returncode in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED), (
        run.stdout + run.stderr
    )

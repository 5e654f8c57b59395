"""Bad input and limits where a job meets a cluster: each row of
``orchestrator.testing.bad_input.CASES`` through the real CLI against the tier's Ray head (a
case that reaches Ray in a process of its own, one refused before Ray starts in this one): the
exit code, an error naming the key or path and the fix, and (exit 2) no run directory written.
benchmarks/faults.py prints the same table into BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.testing import bad_input

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("case", bad_input.CASES, ids=lambda c: c.name)
def test_bad_input(case: bad_input.Case, ray_cluster: str, tmp_path: Path) -> None:
    if case.mount and not bad_input.can_mount():
        pytest.skip("needs root to mount a small tmpfs")
    code, message = bad_input.run_case(case, tmp_path, ray_cluster)
    assert code == case.exit_code, message
    for text in case.says:
        assert text in message, (text, message)
    assert "a run directory was written" not in message
    assert "Traceback" not in message

"""The layering rule: compress/, models/, data/ and results/ never import Ray or DeepSpeed
(results/ reads a run directory: `report` and `export` work on any machine that has it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PKG = Path(__file__).resolve().parents[2] / "orchestrator"
PLAIN = ("compress", "models", "data", "results")


@pytest.mark.parametrize("package", PLAIN)
def test_no_ray_or_deepspeed_imports_in_source(package: str) -> None:
    for path in sorted((PKG / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in ("ray", "deepspeed"), f"{path}: imports {name}"
                if name.startswith("orchestrator."):
                    sub = name.split(".")[1]
                    assert sub not in ("launch", "search", "strategies"), f"{path}: {name}"


def test_importing_plain_packages_loads_neither() -> None:
    code = (
        "import sys; import orchestrator.compress, orchestrator.compress.artifact, "
        "orchestrator.models, orchestrator.data, orchestrator.results; "
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]; "
        "sys.exit(f'imported: {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

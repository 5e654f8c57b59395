"""Every runtime dependency pyproject.toml declares is imported by the project (or is one of the
few that other libraries load on its behalf): an unused one only makes every install larger."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("orchestrator", "benchmarks", "tests")
# Declared for a library that imports them itself, never imported here.
LOADED_BY_OTHERS = {
    "greenlet": "Optuna's GPSampler optimises its acquisition function with it",
    "tensorboardx": "Ray Tune writes the trials' TensorBoard event files with it",
    "gguf": "transformers reads GGUF decoders (the packaged SmolLM2) with it",
    "accelerate": "transformers needs it to load a GGUF decoder",
}


def _declared() -> list[str]:
    # A regular expression, not tomllib: that is Python 3.11+, and the project supports 3.10.
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
    assert block, "no [project] dependencies list in pyproject.toml"
    return re.findall(r'^\s*"([A-Za-z0-9_.-]+)', block.group(1), re.MULTILINE)


def _import_names(dist: str) -> set[str]:
    """The top-level modules an installed distribution provides (its own name if absent)."""
    names = {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if any(d.lower() == dist.lower() for d in dists) and not module.startswith("_")
    }
    return names or {dist.replace("-", "_")}


def _imported() -> set[str]:
    pattern = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
    found: set[str] = set()
    for folder in SOURCES:
        for path in (ROOT / folder).rglob("*.py"):
            found.update(pattern.findall(path.read_text(encoding="utf-8")))
    return found


def test_every_declared_dependency_is_used() -> None:
    imported = _imported()
    unused = [
        dist
        for dist in _declared()
        if dist.lower() not in LOADED_BY_OTHERS and not _import_names(dist) & imported
    ]
    assert unused == [], f"declared in pyproject.toml but imported nowhere in {SOURCES}: {unused}"

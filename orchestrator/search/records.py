"""The driver's record of each trial, ``trials/<name>/trial.json``, and the checks a run folder's
records must pass before a search resumes from it.

The driver alone writes these records (its mirror of the run folder is current); a trial's own
files (``metrics.json``, ``model/``) are written by the trial, maybe on another node.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError, Problem
from orchestrator.results.table import ARTIFACT, STATUSES, TRIALS
from orchestrator.storage import RunFolder

NAMES = f"{TRIALS}/names.json"  # Tune trial id -> trial name
# ``t003_prune-structured_sparsity0.38``: an ordinal (3 digits or more) and a recipe.
TRIAL_NAME = re.compile(r"^t(\d{3,})(_[A-Za-z0-9._-]*)?$")


def write_trial(run_dir: RunFolder, record: dict[str, Any]) -> None:
    rel = f"{TRIALS}/{record['trial']}/trial.json"
    run_dir.write_text(rel, json.dumps(record, indent=2, sort_keys=True))


def read_trial(run_dir: RunFolder, name: str) -> dict[str, Any] | None:
    """The driver's record of a trial, or None when there is none (yet) or it is unreadable."""
    path = run_dir.local / TRIALS / name / "trial.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics (slash-namespaced keys) of a result."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if "/" in k
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(float(v))
    }


def error_text(trial: Any) -> str:
    """The last lines of a Tune trial's error (Tune keeps the traceback in a file)."""
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-3:]) or "the trial failed (see the driver log)"


def trial_ordinal(name: str) -> int | None:
    match = TRIAL_NAME.match(name)
    return int(match.group(1)) if match else None


def check_records(run_dir: RunFolder) -> None:
    """Before a search resumes: the records this tool wrote are what it writes (``names.json``
    maps trial ids to trial names; each ``trial.json`` is a record of the trial its folder is
    named after, with a known status and artifact). A folder that fails is refused, naming the
    file, before Ray Tune reads its own experiment state from the run folder."""
    problems = []
    fix = "restore the run folder from a copy you trust, or start the search under a new name"
    names_path = run_dir.local / NAMES
    if names_path.is_file():
        try:
            names = json.loads(names_path.read_text())
        except (OSError, ValueError) as e:
            names = None
            problems.append(Problem("RUN_DIR", str(names_path), f"is not valid JSON ({e})", fix))
        if names is not None and not (
            isinstance(names, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in names.items())
            and all(trial_ordinal(v) is not None for v in names.values())
        ):
            problems.append(
                Problem(
                    "RUN_DIR",
                    str(names_path),
                    "is not a mapping of trial ids to trial names (t001_...)",
                    fix,
                )
            )
    root = run_dir.local / TRIALS
    for path in sorted(root.glob("*/trial.json")) if root.is_dir() else []:
        record = read_trial(run_dir, path.parent.name)
        if not (
            isinstance(record, dict)
            and record.get("trial") == path.parent.name
            and record.get("status") in STATUSES
            and record.get("artifact") in (None, ARTIFACT)
        ):
            problems.append(
                Problem(
                    "RUN_DIR",
                    str(path),
                    f"is not a record of trial {path.parent.name} as this tool writes them "
                    f"(trial name, status one of {', '.join(STATUSES)}, artifact "
                    f"{ARTIFACT!r} or null)",
                    fix,
                )
            )
    if problems:
        raise ConfigError(problems, source="run directory")

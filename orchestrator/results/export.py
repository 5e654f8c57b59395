"""``orchestrator export RUN_DIR (--best | --trial NAME) --out DIR``: ship one trial's model.

The trial's artifact folder (safetensors + manifest + config + tokenizer, written by
``orchestrator.compress.artifact.save_artifact``) is copied as is, so the export loads with
``load_artifact`` like the original, plus a ``trial.json`` saying which run and trial it came
from and what was measured. The copy goes to a temporary sibling folder that is renamed into
place, so ``--out`` is either absent or complete, never half-written.
"""

from __future__ import annotations

import difflib
import json
import math
import shutil
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError, CorruptFileError, Problem
from orchestrator.files import write_dir_atomic
from orchestrator.results.report import read_run
from orchestrator.results.table import best_trial, build_table

RECORD = "trial.json"


def _error(key: str, value: Any, message: str, fix: str) -> ConfigError:
    return ConfigError(Problem(key, value, message, fix), source="export")


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _error(
            "--out",
            str(out),
            "exists and is not empty; an export never overwrites files",
            "pass a new folder with --out, or remove this one first",
        )


def _pick(rows: dict[str, dict[str, Any]], trial: str | None, best: dict | None) -> str:
    """The trial name to export, or a ``ConfigError`` that says why none can be."""
    if trial is None:
        if best is None:
            done = [r for r in rows.values() if r["status"] == "done"]
            broken = [f"{r['trial']}: {r.get('violations') or 'no selection metric'}" for r in done]
            why = "; ".join(broken) if done else "no trial has finished"
            raise _error(
                "--best",
                True,
                f"no trial met the search constraints ({why})",
                "pick a trial yourself with --trial NAME (see the trial table in report.html), "
                "or relax search.constraints and search again",
            )
        return best["trial"]
    if trial not in rows:
        names = sorted(rows)
        close = difflib.get_close_matches(trial, names, n=1, cutoff=0.5)
        known = ", ".join(names) if names else "none yet"
        hint = f"did you mean {close[0]}? " if close else ""
        raise _error("--trial", trial, "no such trial in the run", f"{hint}known trials: {known}")
    return trial


def export_trial(run_dir: str | Path, out: str | Path, trial: str | None = None) -> dict[str, Any]:
    """Copy a trial's compressed model to ``out`` and return its trial record.

    ``trial=None`` exports the best feasible trial (``best_trial``), as ``--best`` does; the
    same table and rule as the report pick it, so the report's "best" is what gets shipped.
    Raises ``ConfigError`` for a non-empty ``out``, an unknown trial (with a did-you-mean), no
    feasible trial, or a trial that has no finished artifact."""
    run = read_run(run_dir)
    out = Path(out)
    _check_out(out)
    table = build_table(run.trials, run.search, run.baseline)
    rows = {r["trial"]: r for r in table.to_pylist()}
    name = _pick(rows, trial, best_trial(table, run.search))
    record = next(t for t in run.trials if t["trial"] == name)
    if record["status"] != "done":
        finished = [n for n, r in rows.items() if r["status"] == "done"]
        raise _error(
            "--trial",
            name,
            f"is {record['status']}, not done, so it has no final model",
            f"export a finished trial: {', '.join(finished) or 'none has finished yet'}",
        )
    src = run.run_dir / "trials" / name / (record["artifact"] or "")
    if record["artifact"] is None or not src.is_dir():
        raise _error(
            "--trial",
            name,
            f"has no exported model ({src} is missing)",
            "re-run the search with --resume, or export another trial",
        )
    # Imported here: it brings torch, which `orchestrator report` does not need.
    from orchestrator.compress.artifact import check_artifact

    try:
        check_artifact(src)  # never ship a truncated or garbled model
    except CorruptFileError as e:
        raise _error(
            "--trial",
            name,
            f"has a damaged model: {e.what} {e.path} {e.problem}",
            "export another trial, or run that trial again",
        ) from None
    provenance = {
        **record,
        "run_dir": str(run.run_dir.resolve()),
        "job": run.spec.name,
        "source": str(src.resolve()),
        "row": _json_safe(rows[name]),
    }

    def fill(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        (tmp / RECORD).write_text(json.dumps(provenance, indent=2, sort_keys=True))

    # A hidden sibling folder renamed into place (``out`` is absent or empty, checked above).
    write_dir_atomic(out, fill)
    return record

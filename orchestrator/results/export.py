"""``orchestrator export RUN_DIR (--best | --trial NAME) --out DIR [--format F]``: ship one
trial's model.

``--format artifact`` (default): the trial's artifact folder (safetensors + manifest + config +
tokenizer, written by ``orchestrator.compress.artifact.save_artifact``) is copied as is, so the
export loads with ``load_artifact`` like the original. ``onnx``: ``model.onnx`` for ONNX Runtime
(``compress.onnx_export``); ``hf``: a plain transformers folder (``compress.hf_export``); both
checked against the artifact on the trial's test split (``onnx_check.json`` /
``hf_check.json``). Every format adds a ``trial.json`` saying which run and trial it came
from and what was measured. The export is written to a temporary sibling folder that is
renamed into place, so ``--out`` is either absent or complete, never half-written.
"""

from __future__ import annotations

import difflib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError, CorruptFileError, Problem
from orchestrator.files import write_dir_atomic
from orchestrator.results.report import RunData, read_run, run_table
from orchestrator.results.table import best_trial, not_selected_why
from orchestrator.storage import RunFolder, StorageError, fetch, is_uri, kind, unreachable, upload

RECORD = "trial.json"


def _error(key: str, value: Any, message: str, fix: str, source: str = "export") -> ConfigError:
    return ConfigError(Problem(key, value, message, fix), source=source)


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _check_out(out: str) -> None:
    if is_uri(out):
        try:
            taken = kind(out) is not None
        except StorageError as e:
            raise unreachable("--out", out, e, source="export") from None
    else:
        path = Path(out)
        taken = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if taken:
        raise _error(
            "--out",
            str(out),
            "exists and is not empty; an export never overwrites files",
            "pass a new folder with --out, or remove this one first",
        )


def pick_trial(
    rows: dict[str, dict[str, Any]], trial: str | None, best: dict | None, command: str = "export"
) -> str:
    """The trial name ``command`` (export, confirm) takes: ``trial``, or the best one when it
    is None; else a ``ConfigError`` that says why none can be."""
    if trial is None:
        if best is None:
            done = [r for r in rows.values() if r["status"] == "done"]
            broken = [f"{r['trial']}: {not_selected_why(r, 'selection metric')}" for r in done]
            why = "; ".join(broken) if done else "no trial has finished"
            raise _error(
                "--best" if command == "export" else "--trial",
                True if command == "export" else None,
                f"no trial met the search constraints ({why})",
                "pick a trial yourself with --trial NAME (see the trial table in report.html), "
                "or relax search.constraints and search again",
                command,
            )
        return best["trial"]
    if trial not in rows:
        names = sorted(rows)
        close = difflib.get_close_matches(trial, names, n=1, cutoff=0.5)
        known = ", ".join(names) if names else "none yet"
        hint = f"did you mean {close[0]}? " if close else ""
        fix = f"{hint}known trials: {known}"
        raise _error("--trial", trial, "no such trial in the run", fix, command)
    return trial


def finished_trial(
    run: RunData, trial: str | None, command: str, why: str
) -> tuple[str, dict[str, dict[str, Any]]]:
    """The finished trial ``command`` (export, confirm) takes, ``pick_trial``'s, and the
    results-table rows by trial; a ``ConfigError`` saying ``why`` one not done will not do."""
    table, _ = run_table(run)
    rows = {r["trial"]: r for r in table.to_pylist()}
    name = pick_trial(rows, trial, best_trial(table, run.search), command)
    if rows[name]["status"] != "done":
        finished = [n for n, r in rows.items() if r["status"] == "done"]
        raise _error(
            "--trial",
            name,
            f"is {rows[name]['status']}, not done, {why}",
            f"{command} a finished trial: {', '.join(finished) or 'none has finished yet'}",
            command,
        )
    return name, rows


FORMATS = ("artifact", "onnx", "hf")
CHECK_BATCH = 64


def _test_batches(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """The trial's test split in batches, as its job tokenizes it (an export's check)."""
    from orchestrator import data as data_lib
    from orchestrator import models
    from orchestrator.config.loader import read_yaml, validate_job

    spec = validate_job(read_yaml(run_dir / "trials" / name / "job.yaml"), source=f"trial {name}")
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data_lib.build(spec.data, tokenizer, models.task_of(spec.model))
    test = bundle.splits["test"]
    rows = [test[i] for i in range(len(test))]
    return [bundle.collate(rows[i : i + CHECK_BATCH]) for i in range(0, len(rows), CHECK_BATCH)]


def _copy_tokenizer(src: Path, tmp: Path, skip: tuple[str, ...]) -> None:
    """The artifact's tokenizer (and what else ``skip`` leaves): the model takes raw text."""
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in skip:
            shutil.copy2(path, tmp / path.name)


def _onnx_fill(tmp: Path, src: Path, run_dir: Path, name: str) -> dict[str, Any]:
    """Fill ``tmp`` with the ONNX model of the artifact ``src``, its tokenizer and config;
    returns its agreement check on the trial's test split."""
    from orchestrator.compress import onnx_export
    from orchestrator.compress.artifact import load_artifact

    onnx_export.require_runtime()
    model = load_artifact(src).eval()
    batches = _test_batches(run_dir, name)
    steps = onnx_export.manifest_steps(src)
    done = onnx_export.to_onnx(model, steps, tmp / onnx_export.ONNX_FILE, batches[0])
    check = {
        **done,
        "split": "test",
        **onnx_export.agreement(model, tmp / onnx_export.ONNX_FILE, batches),
    }
    _copy_tokenizer(src, tmp, ("manifest.json",))
    return check


def _hf_fill(tmp: Path, src: Path, run_dir: Path, name: str) -> dict[str, Any]:
    """Fill ``tmp`` with the plain transformers model of the artifact ``src`` (safetensors,
    config, tokenizer); returns the check of the folder, as transformers alone loads it, against
    the artifact on the trial's test split."""
    from orchestrator.compress import hf_export
    from orchestrator.compress.agreement import agreement, torch_logits
    from orchestrator.compress.artifact import load_artifact
    from orchestrator.compress.onnx_export import manifest_steps

    model = load_artifact(src).eval()
    plain = hf_export.to_transformers(model, manifest_steps(src))
    _copy_tokenizer(src, tmp, ("manifest.json", "config.json"))
    plain.save_pretrained(str(tmp), safe_serialization=True)
    loaded = hf_export.load_plain(tmp)
    check = {
        "split": "test",
        "bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()),
        **agreement(model, torch_logits(loaded), _test_batches(run_dir, name), "hf"),
    }
    return check


# Each format other than the artifact: (folder to fill, artifact, run dir, trial) -> its check.
CONVERTERS = {"onnx": _onnx_fill, "hf": _hf_fill}


def export_trial(
    run_dir: str | Path | RunFolder,
    out: str | Path,
    trial: str | None = None,
    fmt: str = "artifact",
) -> dict[str, Any]:
    """Copy a trial's compressed model to ``out`` and return its trial record.

    ``trial=None`` exports the best feasible trial (``best_trial``), as ``--best`` does; the
    same table and rule as the report pick it, so the report's "best" is what gets shipped.
    Raises ``ConfigError`` for a non-empty ``out``, an unknown trial (with a did-you-mean), no
    feasible trial, or a trial that has no finished artifact. ``run_dir`` in storage (a
    ``RunFolder`` whose records are pulled): the model is fetched from there; ``out`` may be a
    storage URI too. ``fmt="onnx"`` / ``"hf"``: see the module doc; the trial record then
    holds the agreement check under ``onnx_check`` / ``hf_check``."""
    if fmt not in FORMATS:
        raise _error("--format", fmt, "is not a format this tool writes", f"use one of {FORMATS}")
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(str(run_dir))
    run = read_run(folder.local)
    out = str(out)
    _check_out(out)
    name, rows = finished_trial(run, trial, "export", "so it has no final model")
    record = next(t for t in run.trials if t["trial"] == name)
    rel = f"trials/{name}/{record['artifact'] or ''}"
    if record["artifact"] is None or not folder.exists(rel):
        raise _error(
            "--trial",
            name,
            f"has no exported model ({folder.uri(rel)} is missing)",
            "re-run the search with --resume, or export another trial",
        )
    src = fetch(folder.uri(rel)) if folder.remote else folder.local / rel
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
        "run_dir": folder.location if folder.remote else str(run.run_dir.resolve()),
        "job": run.spec.name,
        "source": folder.uri(rel) if folder.remote else str(src.resolve()),
        "row": _json_safe(rows[name]),
    }

    if fmt != "artifact":
        folder.pull(f"trials/{name}/job.yaml")  # the trial's data, for the agreement check

    def fill(tmp: Path) -> None:
        if fmt == "artifact":
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:
            from orchestrator.compress.agreement import write_check

            check = CONVERTERS[fmt](tmp, Path(src), folder.local, name)
            write_check(tmp, fmt, check)
            provenance[f"{fmt}_check"] = check
        (tmp / RECORD).write_text(json.dumps(provenance, indent=2, sort_keys=True))

    if is_uri(out):
        with tempfile.TemporaryDirectory() as tmp:
            fill(Path(tmp))
            upload(Path(tmp), out)
    else:
        # A hidden sibling folder renamed into place (``out`` is absent or empty, checked above).
        write_dir_atomic(Path(out), fill)
    return record if fmt == "artifact" else provenance

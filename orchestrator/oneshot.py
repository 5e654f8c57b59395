"""``orchestrator compress``: one-shot compression of a model, no training. Evaluates and
measures the artifact and writes ``compress_report.json`` and ``model/`` into the run directory.
One process, no Ray: calibration, compression and measurement are single-machine work."""

from __future__ import annotations

import json

from orchestrator import launch
from orchestrator.config.schema import JobSpec
from orchestrator.errors import ConfigError, Problem
from orchestrator.files import write_atomic
from orchestrator.finalize import build_compressed, calibration_batches, finalize
from orchestrator.results.plot import render_sensitivity_png
from orchestrator.results.report import allocations_in


def compress_job(spec: JobSpec) -> dict:
    """Compress ``spec.model`` with ``spec.compress``; returns the CompressionReport as a dict."""
    if not spec.compress.enabled:
        raise ConfigError(
            Problem(
                "compress",
                None,
                "the job has no compress.prune, compress.factorize or "
                "compress.quantize section: nothing to do",
                "add one, e.g. compress.quantize.method=dynamic_int8",
            )
        )
    spec = launch.resolve_paths(spec)
    tokenizer, bundle = launch.preflight(spec)
    calib = calibration_batches(spec, bundle)
    model, report = build_compressed(spec, bundle, tokenizer, calib)
    # Only now, with the recipe applied without error, does anything get written.
    launch.claim_run_dir(spec)
    folder = launch.run_dir(spec)
    finalize(spec, model, report, bundle, tokenizer, folder.local / "model")
    folder.push("model")  # to storage, when output.dir is a URI
    out = {"job": spec.name, **report.to_dict()}
    folder.write_text("compress_report.json", json.dumps(out, indent=2))
    allocations = allocations_in(out["steps"])
    if allocations:  # per-layer allocation: the heatmaps of the sensitivity profiles
        write_atomic(folder.local / "sensitivity.png", render_sensitivity_png(allocations))
        folder.push("sensitivity.png")
    return out

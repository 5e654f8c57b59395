"""The debug decoder search (``jobs/debug/decoder_search.yaml``) through a real Ray cluster:
a tiny Llama fine-tuned once as the dense baseline, then 2 trials x 2 DDP workers, each
pruning (SparseGPT or Wanda), quantizing (GPTQ or int8 kernels) and recovering it; the trials
are scored on their perplexity paired with the dense model's, and the exported best model is
the trial's own: it scores the perplexity the trial reported and continues the report's prompt
with the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "debug" / "decoder_search.yaml"


def test_a_decoder_search_through_ray(ray_cluster: str, tmp_path: Path) -> None:
    from orchestrator import data, finalize, models
    from orchestrator.cli import main
    from orchestrator.compress.artifact import load_artifact
    from orchestrator.config import load_job

    overrides = [f"output.dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "search", str(JOB), *overrides],
        cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": ray_cluster},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "dense baseline: eval/perplexity" in proc.stdout
    assert "val ppl" in proc.stdout and "Pareto front" in proc.stdout
    run = tmp_path / "debug-decoder-search"
    rows = pq.read_table(run / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["done", "done"]
    for r in rows:
        assert r["compress/sparsity"] == pytest.approx(0.5, abs=0.02)
        assert r["eval/perplexity_ratio_lo"] <= r["eval/perplexity_ratio"]
        assert r["eval/perplexity_ratio"] <= r["eval/perplexity_ratio_hi"]
        assert r["perplexity_increase"] == pytest.approx(r["eval/perplexity_ratio"] - 1)
        assert r["perf/decode_tokens_per_s"] > 0 and r["feasible"] is not None
        assert "eval/accuracy" not in r and "accuracy_drop" not in r
    best = next(r for r in rows if r["best"])

    out = tmp_path / "best"
    assert main(["export", str(run), "--best", "--out", str(out)]) == 0
    model = load_artifact(out)
    spec = load_job(JOB, overrides)
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data.build(spec.data, tokenizer, models.task_of(spec.model))
    here = finalize.evaluate_plain(model, bundle, "test")["test/perplexity"]
    assert here == pytest.approx(best["test/perplexity"], rel=1e-4)
    report = json.loads((run / "trials" / best["trial"] / "compress_report.json").read_text())
    said = next(n for n in report["notes"] if n.startswith("compressed, greedy: "))
    assert said == f"compressed, greedy: {finalize.continuation(model, tokenizer)!r}"

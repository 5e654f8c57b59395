"""The debug jobs through real Ray Train with 2 workers (DDP and DeepSpeed ZeRO-3 bf16): the run
directory of docs/contracts.md, a final model that loads back from safetensors and predicts, and a
re-run of the same job that resumes instead of starting over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from orchestrator.config import load_job

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _check_run_dir(run: Path) -> dict:
    assert (run / "job.yaml").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "eval/accuracy",
        "eval/loss",
        "test/accuracy",
        "train/loss",
        "train/samples_per_s",
        "mem/peak_mb",
    ):
        assert key in metrics, key
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert metrics["train/step"] == 12
    saved = yaml.safe_load((run / "job.yaml").read_text())
    assert saved["name"] == run.name
    return metrics


def _check_model_loads(run: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = run / "model"
    weights = load_file(str(folder / "model.safetensors"))  # safetensors: no pickle
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    batch = tok(["a gorgeous, moving film", "dull and lifeless"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert set(model.config.id2label.values()) == {"negative", "positive"}


def test_cli_train_ddp_joins_cluster(ray_cluster: str, tmp_path: Path) -> None:
    """`orchestrator train` as a user runs it, joining the running Ray through RAY_ADDRESS."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "train",
            str(ROOT / "jobs/debug/ddp.yaml"),
            f"output.dir={tmp_path}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "final metrics:" in proc.stdout
    run = tmp_path / "debug-ddp"
    _check_run_dir(run)
    _check_model_loads(run)


def test_deepspeed_zero3_bf16_and_resume(
    ray_cluster: str, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    from orchestrator import launch

    spec = load_job(
        ROOT / "jobs/debug/deepspeed_zero3.yaml",
        [f"output.dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    first = launch.train(spec)
    run = tmp_path / "debug-zero3"
    metrics = _check_run_dir(run)
    assert metrics["test/accuracy"] == pytest.approx(first["test/accuracy"])
    _check_model_loads(run)

    # The same job again resumes from its last checkpoint, the final one: it reports that
    # checkpoint again, and no step is re-run.
    capfd.readouterr()
    again = launch.train(spec)
    out = capfd.readouterr().out
    assert "resuming run" in out and "the run had finished (step 12)" in out
    assert "step 1/12" not in out
    assert again == first

    # A different job under the same name is refused rather than silently mixed in.
    changed = load_job(
        ROOT / "jobs/debug/deepspeed_zero3.yaml", [f"output.dir={tmp_path}", "train.lr=0.01"]
    )
    from orchestrator.errors import ConfigError

    with pytest.raises(ConfigError, match="different job"):
        launch.train(changed)


def test_compression_with_recovery_through_ray(ray_cluster: str, tmp_path: Path) -> None:
    """`train` with a compress section: gradual pruning + 4-bit QAT on 2 DDP workers; the run
    directory holds the packed artifact and the CompressionReport, measured on the artifact."""
    from orchestrator import launch
    from orchestrator.compress.artifact import load_artifact

    spec = load_job(
        ROOT / "jobs/debug/recover.yaml",
        [f"output.dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    metrics = launch.train(spec)
    run = tmp_path / "debug-recover"
    saved = json.loads((run / "metrics.json").read_text())
    report = json.loads((run / "compress_report.json").read_text())
    for m in (metrics, saved, report["metrics"]):
        assert m["compress/sparsity"] == pytest.approx(0.5, abs=0.005)
        assert m["compress/size_bytes"] * 4 < m["compress/dense_size_bytes"]
    model = load_artifact(run / "model")
    assert model.config.id2label[0] == "negative"

"""The real pretrained decoder SmolLM2-135M, from the packaged GGUF file: made into a float32
folder once (no quantization left in its config), cut to its first 2 blocks, GPTQ-quantized
one-shot through `orchestrator compress`, and the artifact scored against the dense model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import models
from orchestrator.config.schema import ModelConfig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_smollm2_converts_once_and_compresses(tmp_path: Path) -> None:
    folder = models.model_dir(ModelConfig(name="smollm2-135m"))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config and config["num_key_value_heads"] == 3
    assert models.model_dir(ModelConfig(name="smollm2-135m")) == folder  # converted once
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "compress",
            str(ROOT / "jobs/smollm2_gptq.yaml"),
            "model.num_layers=2",
            "data.limit=40",
            "data.max_length=64",
            "compress.calib_batches=2",
            f"output.dir={tmp_path}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "smollm2-gptq" / "compress_report.json").read_text())
    metrics = report["metrics"]
    # 2 blocks of GPTQ 4-bit weights and the tied 49,152 x 576 table at 8 bits: the table,
    # stored once, is most of the bytes.
    assert metrics["compress/size_ratio"] > 3.5
    assert 1.0 <= metrics["test/perplexity_ratio_hi"]
    assert metrics["test/perplexity_ratio"] < 1.5
    assert any(
        n.startswith("compressed, greedy: 'The history of the United Kingdom")
        for n in report["notes"]
    )
    rows = [r for r in report["modules"] if "output_error" in r["details"]]
    assert len(rows) == 14  # 7 Linears in each of the 2 blocks
    head = next(r for r in report["modules"] if r["name"] == "lm_head")
    assert head["details"]["tied_to"] == "model.embed_tokens" and head["details"]["bits"] == 8
    assert all(r["details"]["output_error"] < r["details"]["rtn_output_error"] for r in rows)

"""ONNX export of a compressed artifact: physically smaller layers, factorized layers, a trimmed
vocabulary and int8 kernels in ONNX Runtime, against the artifact; low-bit weights refused."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
import torch

from orchestrator.cli import main
from orchestrator.compress import onnx_export
from orchestrator.compress.artifact import load_artifact
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit
JOB = str(Path(__file__).resolve().parents[3] / "jobs/debug/compress.yaml")


def test_pruned_factorized_int8_with_a_trimmed_vocabulary(
    tmp_path: Path, make_artifact, batches
) -> None:
    art = make_artifact(tmp_path, "compress.vocab={method: trim}")
    model = load_artifact(art).eval()
    out = tmp_path / "model.onnx"
    done = onnx_export.to_onnx(model, onnx_export.manifest_steps(art), out, batches(1)[0])
    # The traced float graph is the model (float rounding only) ...
    assert done["float_graph_max_diff"] < 1e-4
    # ... and every int8 Linear is an int8 MatMul in ONNX Runtime.
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    int8 = sum(isinstance(m, dynamic) for m in model.modules())
    assert int8 > 0 and done["int8_matmuls"] == int8
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    check = onnx_export.agreement(model, out, batches())
    assert check["examples"] == 24
    # Two int8 runtimes quantize activations differently (torch.ao: 7 bits); nearly the same.
    assert check["agreement"] >= 0.9 and check["max_logit_diff"] < 0.5, check


def test_low_bit_weights_are_refused_with_the_reason(
    tmp_path: Path, make_artifact, batches
) -> None:
    art = make_artifact(
        tmp_path,
        "compress.quantize={method: weight_only, bits: 4, granularity: group, group_size: 32}",
        "compress.factorize=null",
    )
    with pytest.raises(ConfigError) as e:
        steps = onnx_export.manifest_steps(art)
        onnx_export.to_onnx(load_artifact(art), steps, tmp_path / "m.onnx", batches(1)[0])
    text = str(e.value)
    assert "--format" in text and "quantize.method=weight_only (4-bit)" in text
    assert "--format artifact" in text
    assert not (tmp_path / "m.onnx").exists()


def test_a_missing_runtime_names_the_flag_and_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(ConfigError) as e:
        onnx_export.require_runtime()
    text = str(e.value)
    assert "--format" in text and "onnxruntime" in text and "pip install -e '.[onnx]'" in text


def test_latency_measured_in_onnx_runtime(
    tmp_path: Path, capsys: pytest.CaptureFixture, make_artifact
) -> None:
    import json

    art = make_artifact(tmp_path, "measure.backend=onnxruntime")
    capsys.readouterr()
    report = json.loads((art.parent / "compress_report.json").read_text())
    m = report["metrics"]
    assert m["perf/onnxruntime"] == 1.0 and m["perf/threads"] == 1.0
    for key in ("perf/latency_ms_b1", "perf/latency_ms_b32", "perf/dense_latency_ms_b32"):
        assert m[key] > 0, key
    assert m["perf/speedup"] == pytest.approx(
        m["perf/dense_latency_ms_b32"] / m["perf/latency_ms_b32"]
    )
    assert any("ONNX Runtime" in note for note in report["notes"])


def test_a_recipe_onnx_runtime_cannot_run_is_refused_for_its_latency(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["compress", JOB, f"output.dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"]
    quantize = (
        "compress.quantize={method: weight_only, bits: 4, granularity: group, group_size: 32}"
    )
    assert main([*args, "measure.backend=onnxruntime", quantize]) == 2
    err = capsys.readouterr().err
    assert "measure.backend = 'onnxruntime'" in err and "weight_only" in err
    assert not (tmp_path / "debug-compress").exists()

"""The compressed artifact: true sizes, and a reload that gives the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator.compress import CompressionReport, compress_
from orchestrator.compress.artifact import artifact_bytes, load_artifact, save_artifact
from orchestrator.config.compress import CompressConfig

pytestmark = pytest.mark.unit


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _roundtrip(
    model: nn.Module, spec: CompressConfig, report: CompressionReport, tmp_path: Path, tokenizer
) -> nn.Module:
    save_artifact(
        model,
        tmp_path / "art",
        quantize=spec.quantize,
        structure=report.structure,
        tokenizer=tokenizer,
    )
    return load_artifact(tmp_path / "art")


RECIPES = {
    "magnitude": {"prune": {"method": "magnitude", "sparsity": 0.5}},
    "structured+svd": {
        "prune": {"method": "structured", "sparsity": 0.5},
        "factorize": {"rank": 8},
    },
    "fake4-group": {
        "quantize": {"method": "fake", "bits": 4, "granularity": "group", "group_size": 32}
    },
    "wanda+asym3": {
        "prune": {"method": "wanda", "sparsity": 0.6},
        "quantize": {"method": "weight_only", "bits": 3, "symmetric": False},
    },
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_reload_gives_the_same_outputs(recipe, tiny_bert, calib, tokenizer, tmp_path) -> None:
    spec = CompressConfig.model_validate(RECIPES[recipe])
    report = compress_(tiny_bert, spec, calib=calib)
    expected = _logits(tiny_bert, calib[0])
    reloaded = _roundtrip(tiny_bert, spec, report, tmp_path, tokenizer)
    assert torch.allclose(_logits(reloaded, calib[0]), expected, atol=1e-4)


def test_int8_reload_runs_int8_kernels_and_matches(tiny_bert, calib, tokenizer, tmp_path) -> None:
    spec = CompressConfig.model_validate({"quantize": {"method": "dynamic_int8"}})
    report = compress_(tiny_bert, spec, calib=calib)
    expected = _logits(tiny_bert, calib[0])  # fake-quant training form
    reloaded = _roundtrip(tiny_bert, spec, report, tmp_path, tokenizer)
    got = _logits(reloaded, calib[0])
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), 0) > 0.99
    assert not any(
        type(m) is nn.Linear
        for n, m in reloaded.named_modules()
        if "classifier" not in n and "pooler" not in n
    )


def test_sizes_are_true_sizes(minilm2, calib, tokenizer, tmp_path) -> None:
    dense = save_artifact(minilm2, tmp_path / "dense")
    assert dense == artifact_bytes(tmp_path / "dense")
    fp32_bytes = sum(p.numel() * 4 for p in minilm2.parameters())
    assert fp32_bytes < dense < fp32_bytes * 1.01  # safetensors + manifest overhead only
    spec = CompressConfig.model_validate({"quantize": {"method": "fake", "bits": 4}})
    compress_(minilm2, spec, calib=calib)
    packed = save_artifact(minilm2, tmp_path / "q4", quantize=spec.quantize)
    # 4-bit weights and embeddings with per-row scales: about 8x smaller than fp32.
    assert dense / packed > 6.0


def test_sparse_storage_pays_off_only_when_sparse(minilm2, calib, tokenizer, tmp_path) -> None:
    dense = save_artifact(minilm2, tmp_path / "dense")
    compress_(
        minilm2,
        CompressConfig.model_validate({"prune": {"method": "magnitude", "sparsity": 0.9}}),
        calib=calib,
    )
    sparse = save_artifact(minilm2, tmp_path / "sparse")
    assert sparse < dense  # bitmap + non-zero values beat dense at 90 % zeros


def test_not_an_artifact_is_refused(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a"):
        load_artifact(tmp_path)

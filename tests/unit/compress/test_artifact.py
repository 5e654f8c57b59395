"""The compressed artifact: true sizes, a reload that gives the same outputs, and the skeleton
rebuilt from the applied steps alone (what the end of a training run loads its weights into)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator.compress import CompressionReport, compress_, skeleton
from orchestrator.compress.artifact import (
    MANIFEST,
    WEIGHTS,
    artifact_bytes,
    load_artifact,
    save_artifact,
    weights_bytes,
)
from orchestrator.config.compress import CompressConfig
from orchestrator.errors import CorruptFileError

pytestmark = pytest.mark.unit


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _roundtrip(model: nn.Module, report: CompressionReport, tmp_path: Path, tokenizer) -> nn.Module:
    save_artifact(model, tmp_path / "art", steps=report.steps, tokenizer=tokenizer)
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
    "depth+structured+int8": {
        "depth": {"method": "similarity", "blocks": 1},
        "prune": {"method": "structured", "sparsity": 0.5},
        "quantize": {"method": "dynamic_int8"},
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
    reloaded = _roundtrip(tiny_bert, report, tmp_path, tokenizer)
    assert torch.allclose(_logits(reloaded, calib[0]), expected, atol=1e-4)


@pytest.mark.parametrize("recipe", [*RECIPES, "int8"])
def test_skeleton_from_steps_holds_the_trained_weights(recipe, tiny_bert, calib) -> None:
    """No second calibration, SVD or pruning: the manifest entries alone give a model whose
    state dict the compressed model's loads into strictly, with the same outputs."""
    raw = RECIPES.get(recipe, {"quantize": {"method": "dynamic_int8"}})
    report = compress_(tiny_bert, CompressConfig.model_validate(raw), calib=calib)
    with torch.no_grad():  # as if trained: every weight moved
        for p in tiny_bert.parameters():
            p.add_(0.01 * torch.randn_like(p) * (p != 0))
    rebuilt = skeleton(tiny_bert.config, report.steps)
    rebuilt.load_state_dict(tiny_bert.state_dict())  # strict: the same structure
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in tiny_bert.modules()]
    assert torch.equal(_logits(rebuilt, calib[0]), _logits(tiny_bert, calib[0]))


def test_int8_reload_runs_int8_kernels_and_matches(tiny_bert, calib, tokenizer, tmp_path) -> None:
    spec = CompressConfig.model_validate({"quantize": {"method": "dynamic_int8"}})
    report = compress_(tiny_bert, spec, calib=calib)
    expected = _logits(tiny_bert, calib[0])  # fake-quant training form
    reloaded = _roundtrip(tiny_bert, report, tmp_path, tokenizer)
    got = _logits(reloaded, calib[0])
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), 0) > 0.99
    assert not any(
        type(m) is nn.Linear
        for n, m in reloaded.named_modules()
        if "classifier" not in n and "pooler" not in n
    )


def test_sizes_are_true_sizes(minilm2, calib, tokenizer, tmp_path) -> None:
    folder = tmp_path / "dense"
    dense = save_artifact(minilm2, folder, tokenizer=tokenizer)
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert {WEIGHTS, MANIFEST, "config.json", "tokenizer.json"} <= set(files)
    assert dense == sum(files.values())  # every file on disk, tokenizer included
    assert weights_bytes(folder) == files[WEIGHTS] + files[MANIFEST]
    fp32_bytes = sum(p.numel() * 4 for p in minilm2.parameters())
    # The weights file is the fp32 tensors plus the safetensors header and the manifest.
    assert fp32_bytes < weights_bytes(folder) < fp32_bytes * 1.01
    spec = CompressConfig.model_validate({"quantize": {"method": "fake", "bits": 4}})
    report = compress_(minilm2, spec, calib=calib)
    packed = save_artifact(minilm2, tmp_path / "q4", steps=report.steps, tokenizer=tokenizer)
    assert packed == artifact_bytes(tmp_path / "q4")
    # 4-bit weights and embeddings with per-row scales: about 8x smaller than fp32, less with
    # the tokenizer (the same ~0.9 MB on both sides).
    assert weights_bytes(folder) / weights_bytes(tmp_path / "q4") > 6.0
    assert dense / packed > 5.0


def test_sparse_storage_pays_off_only_when_sparse(minilm2, calib, tokenizer, tmp_path) -> None:
    dense = save_artifact(minilm2, tmp_path / "dense")
    report = compress_(
        minilm2,
        CompressConfig.model_validate({"prune": {"method": "magnitude", "sparsity": 0.9}}),
        calib=calib,
    )
    sparse = save_artifact(minilm2, tmp_path / "sparse", steps=report.steps)
    assert sparse < dense  # bitmap + non-zero values beat dense at 90 % zeros


def test_not_an_artifact_is_refused(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text('{"format": "orchestrator-compressed/1"}')
    with pytest.raises(CorruptFileError, match="export it again with this version"):
        load_artifact(tmp_path)


def test_the_tokenizer_ships_compact_and_tokenizes_as_before(tokenizer, tmp_path) -> None:
    """tokenizer.json without indentation: the same tokenizer in fewer bytes, alone (no legacy
    vocabulary file repeating it), as the dense model's folder and every artifact ship it."""
    from transformers import AutoTokenizer

    from orchestrator.models import save_tokenizer

    save_tokenizer(tokenizer, tmp_path / "compact")
    tokenizer.save_pretrained(str(tmp_path / "pretty"), legacy_format=False)
    compact = (tmp_path / "compact" / "tokenizer.json").read_bytes()
    assert b"\n" not in compact
    assert len(compact) < 0.8 * (tmp_path / "pretty" / "tokenizer.json").stat().st_size
    assert not (tmp_path / "compact" / "vocab.txt").exists()
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "compact"), local_files_only=True)
    text = ["An unforgettable, quietly devastating film.", "meh"]
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]

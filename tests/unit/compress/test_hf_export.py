"""``--format hf``: a compressed artifact as a folder that transformers alone loads (depth and
FFN-only structured pruning as a smaller config, quantized weights as float), checked against
the artifact; recipes a transformers config cannot describe refused with the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.compress import hf_export
from orchestrator.compress.agreement import agreement, torch_logits
from orchestrator.compress.artifact import load_artifact
from orchestrator.compress.onnx_export import manifest_steps
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit


def _export(art: Path, out: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = load_artifact(art).eval()
    plain = hf_export.to_transformers(model, manifest_steps(art))
    plain.save_pretrained(str(out), safe_serialization=True)
    return model, hf_export.load_plain(out)


def test_depth_and_ffn_pruning_export_exactly(tmp_path: Path, make_artifact, batches) -> None:
    art = make_artifact(
        tmp_path,
        "compress.prune={method: structured, sparsity: 0.5, heads: false}",
        "compress.depth={method: named, remove: [1]}",
        "compress.factorize=null",
        "compress.quantize=null",
    )
    model, loaded = _export(art, tmp_path / "hf")
    assert loaded.config.num_hidden_layers == len(model.bert.encoder.layer) == 1  # of 2
    width = loaded.bert.encoder.layer[0].intermediate.dense.out_features
    assert width == model.bert.encoder.layer[0].intermediate.dense.out_features
    assert loaded.config.intermediate_size == width
    check = agreement(model, torch_logits(loaded), batches(), "hf")
    assert check["agreement"] == 1.0 and check["max_logit_diff"] < 1e-4, check


def test_int8_and_int8_embeddings_export_as_float(tmp_path: Path, make_artifact, batches) -> None:
    art = make_artifact(
        tmp_path,
        "compress.prune={method: structured, sparsity: 0.5, heads: false}",
        "compress.factorize=null",
        "compress.quantize={method: dynamic_int8, embeddings: true}",
    )
    model, loaded = _export(art, tmp_path / "hf")
    # The artifact quantizes activations on the fly; the float model does not: close, not equal.
    check = agreement(model, torch_logits(loaded), batches(), "hf")
    assert check["agreement"] >= 0.9 and check["max_logit_diff"] < 0.5, check
    # Loaded by transformers alone: this package is never imported.
    code = (
        "import sys; from transformers import AutoModelForSequenceClassification as A; "
        f"m = A.from_pretrained({str(tmp_path / 'hf')!r}); "
        "assert not any(n.startswith('orchestrator') for n in sys.modules); print(type(m).__name__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0 and "BertForSequenceClassification" in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ((), "compress.prune.heads: attention heads were removed"),
        (("compress.prune.heads=false",), "compress.factorize (svd): each factorized Linear"),
        (
            (
                "compress.prune.heads=false",
                "compress.factorize=null",
                "compress.vocab={method: trim}",
            ),
            "compress.vocab: the trimmed embedding",
        ),
    ],
)
def test_what_a_config_cannot_describe_is_refused(
    tmp_path: Path, overrides: tuple[str, ...], says: str, make_artifact
) -> None:
    art = make_artifact(tmp_path, *overrides)
    with pytest.raises(ConfigError) as e:
        hf_export.to_transformers(load_artifact(art), manifest_steps(art))
    text = str(e.value)
    assert "--format = 'hf'" in text and says in text and "--format onnx" in text


def test_gpt2_with_a_narrower_mlp(tmp_path: Path, make_artifact, batches) -> None:
    art = make_artifact(
        tmp_path,
        "model.name=tiny-gpt2",
        "compress.prune={method: structured, sparsity: 0.5, heads: false}",
        "compress.factorize=null",
        "compress.quantize=null",
    )
    model, loaded = _export(art, tmp_path / "hf")
    assert loaded.config.n_inner == loaded.transformer.h[0].mlp.c_fc.nf
    check = agreement(model, torch_logits(loaded), batches(), "hf")
    assert check["agreement"] == 1.0 and check["max_logit_diff"] < 1e-4, check

"""Depth pruning: whole blocks removed (the most input-preserving ones, or named), renumbered,
the config saying the new depth; the model still trains; removing every block or a block that
does not exist is an error naming the key, caught before anything runs (check_patterns)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.compress import check_patterns, compress_
from orchestrator.compress.techniques.depth import block_similarity, find_blocks
from orchestrator.config.compress import CompressConfig
from orchestrator.config.schema import ModelConfig
from orchestrator.errors import ConfigError
from orchestrator.models import build_model

pytestmark = pytest.mark.unit


def _spec(**depth) -> CompressConfig:
    return CompressConfig.model_validate({"depth": depth})


def test_similarity_removes_the_most_input_preserving_blocks(minilm2, calib) -> None:
    _, blocks = find_blocks(minilm2)
    similarity = block_similarity(minilm2, blocks, calib)
    report = compress_(minilm2, _spec(blocks=1), calib=calib)
    (step,) = report.steps
    keep = min(range(2), key=lambda i: similarity[i])  # the block that changes its input most
    assert step.entry == {"blocks": "bert.encoder.layer", "kept": [keep], "total": 2}
    assert len(minilm2.bert.encoder.layer) == 1 and minilm2.config.num_hidden_layers == 1
    assert report.metrics["compress/params"] < report.metrics["compress/params_before"]
    minilm2.train()
    loss = minilm2(**calib[0]).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_named_blocks_and_decoder_layer_indices(tokenizer) -> None:
    model = build_model(ModelConfig(name="tiny-gpt2", num_layers=2), 2, tokenizer)
    report = compress_(model, _spec(method="named", remove=[0]))
    assert report.steps[0].entry["kept"] == [1]
    (block,) = model.transformer.h
    assert all(m.layer_idx == 0 for m in block.modules() if hasattr(m, "layer_idx"))
    ids = torch.randint(1000, 2000, (2, 8))
    assert torch.isfinite(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits).all()


@pytest.mark.parametrize(
    ("depth", "key", "words"),
    [
        ({"blocks": 2}, "compress.depth.blocks", "would remove all 2 blocks"),
        ({"ratio": 0.99}, "compress.depth.ratio", "would remove all 2 blocks"),
        ({"method": "named", "remove": [0, 1]}, "compress.depth.remove", "would remove all"),
        ({"method": "named", "remove": [5]}, "compress.depth.remove", "the model has 2"),
    ],
)
def test_bad_depth_is_caught_before_anything_runs(tiny_bert, depth, key, words) -> None:
    with pytest.raises(ConfigError) as e:
        check_patterns(tiny_bert, _spec(**depth))
    (problem,) = e.value.problems
    assert problem.key == key and words in problem.message
    assert len(tiny_bert.bert.encoder.layer) == 2  # nothing changed


def test_similarity_needs_calibration(tiny_bert) -> None:
    with pytest.raises(ConfigError, match="calibration"):
        compress_(tiny_bert, _spec(blocks=1))

"""Vocabulary trimming: the embedding keeps the rows of the tokens the training split uses and
the special tokens; every other token reads the unknown token's row; texts made of kept tokens
give exactly the dense model's outputs; the trimmed table trains, quantizes to packed 4-bit
rows and round-trips through the artifact; a model without a token table is refused."""

from __future__ import annotations

import pytest
import torch

from orchestrator.compress import check_patterns, compress_, skeleton
from orchestrator.compress.artifact import load_artifact, save_artifact
from orchestrator.compress.qmodules import PackedEmbedding
from orchestrator.compress.techniques.vocab import IdMappedEmbedding
from orchestrator.config.compress import CompressConfig
from orchestrator.config.schema import ModelConfig
from orchestrator.errors import ConfigError
from orchestrator.models import build_model

pytestmark = pytest.mark.unit


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("unseen", ["unknown", "nearest"])
def test_kept_tokens_read_their_own_rows(tiny_bert, bundle, calib, tokenizer, unseen) -> None:
    counts = bundle.token_counts("train")
    dense = _logits(tiny_bert, calib[0])
    table = tiny_bert.bert.embeddings.word_embeddings.weight.detach().clone()
    spec = CompressConfig.model_validate({"vocab": {"method": "trim", "unseen": unseen}})
    report = compress_(tiny_bert, spec, tokenizer=tokenizer, token_counts=lambda: counts)
    emb = tiny_bert.bert.embeddings.word_embeddings
    assert isinstance(emb, IdMappedEmbedding) and emb.num_embeddings == len(tokenizer)
    kept = set(counts) | set(tokenizer.all_special_ids)
    assert emb.inner.num_embeddings == len(kept) < len(tokenizer) / 2
    assert emb.id_map.dtype == torch.int32  # every collective backend broadcasts it
    token = next(t for t in range(1000, len(tokenizer)) if t not in kept)
    ids = torch.tensor([[tokenizer.cls_token_id, token, tokenizer.unk_token_id]])
    got = emb(ids)
    assert torch.equal(got[0, 0], table[tokenizer.cls_token_id])
    if unseen == "unknown":  # an unseen token reads the unknown token's row
        assert torch.equal(got[0, 1], got[0, 2])
    else:  # or the kept row closest to its own embedding
        kept_ids = sorted(kept)
        cos = torch.nn.functional.cosine_similarity(table[kept_ids], table[token].unsqueeze(0))
        assert torch.equal(got[0, 1], table[kept_ids[int(cos.argmax())]])
    # The calibration batch comes from the training split: every token kept, same outputs.
    assert torch.equal(_logits(tiny_bert, calib[0]), dense)
    assert report.metrics["compress/params"] < report.metrics["compress/params_before"] * 0.6
    tiny_bert.train()
    tiny_bert(**calib[0]).loss.backward()
    assert emb.inner.weight.grad is not None


def test_trimmed_4_bit_table_round_trips(tiny_bert, bundle, calib, tokenizer, tmp_path) -> None:
    counts = bundle.token_counts("train")
    spec = CompressConfig.model_validate(
        {"vocab": {"method": "trim", "min_count": 2}, "quantize": {"method": "fake", "bits": 4}}
    )
    report = compress_(tiny_bert, spec, tokenizer=tokenizer, token_counts=lambda: counts)
    expected = _logits(tiny_bert, calib[0])
    rebuilt = skeleton(tiny_bert.config, report.steps)
    rebuilt.load_state_dict(tiny_bert.state_dict())
    assert torch.equal(_logits(rebuilt, calib[0]), expected)
    save_artifact(tiny_bert, tmp_path / "art", steps=report.steps, tokenizer=tokenizer)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "art" / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("bert.embeddings.word_embeddings.id_map")
    assert stored.dtype == torch.int16  # fewer than 32,768 rows: half the bytes of int32
    shipped = load_artifact(tmp_path / "art")
    assert isinstance(shipped.bert.embeddings.word_embeddings.inner, PackedEmbedding)
    torch.testing.assert_close(_logits(shipped, calib[0]), expected, atol=1e-4, rtol=0)
    assert (tmp_path / "art" / "tokenizer.json").is_file()
    assert not (tmp_path / "art" / "vocab.txt").exists()  # tokenizer.json alone loads it


def test_a_model_without_a_token_table_is_refused() -> None:
    mlp = build_model(ModelConfig(name="mlp"), 10, None)
    with pytest.raises(ConfigError) as e:
        check_patterns(mlp, CompressConfig.model_validate({"vocab": {"method": "trim"}}))
    assert e.value.problems[0].key == "compress.vocab.method"
    assert "no token embedding table" in e.value.problems[0].message

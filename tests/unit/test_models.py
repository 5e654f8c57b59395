"""Models: tiny from-config classifiers run a forward, the packaged MiniLM keeps its pretrained
first N layers, bad local folders name model.path, and seeding makes initial weights identical."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from orchestrator.config import ModelConfig
from orchestrator.data.corpora import read_corpus
from orchestrator.errors import ConfigError
from orchestrator.models import build_model, build_tokenizer, packaged_model_dir

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelConfig(name="minilm-l6"))


@pytest.fixture(scope="module")
def batch(tokenizer):
    # What DataBundle.collate yields: right-padded input_ids and attention_mask, no token types.
    texts = read_corpus("mr")["text"].head(5).tolist()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module")
def pretrained():
    return load_file(str(packaged_model_dir("minilm-l6") / "model.safetensors"))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("num_labels", [2, 5])
def test_tiny_model_forward(tokenizer, batch, name, num_labels) -> None:
    model = build_model(ModelConfig(name=name), num_labels, tokenizer, seed=0).eval()
    labels = torch.arange(5) % num_labels
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert out.logits.shape == (5, num_labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000  # tiny: fast tests


def test_tiny_gpt2_uses_a_pad_token(tokenizer, batch) -> None:
    # GPT-2 picks the last non-pad token per row, so padding must not change a row's logits.
    model = build_model(ModelConfig(name="tiny-gpt2"), 3, tokenizer, seed=0).eval()
    assert model.config.pad_token_id == tokenizer.pad_token_id
    lengths = batch["attention_mask"].sum(1)
    short = int(lengths.argmin())
    n = int(lengths[short])
    with torch.no_grad():
        padded = model(**batch).logits[short]
        alone = model(
            input_ids=batch["input_ids"][short : short + 1, :n],
            attention_mask=batch["attention_mask"][short : short + 1, :n],
        ).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_tiny_model_num_layers(tokenizer, name) -> None:
    model = build_model(ModelConfig(name=name, num_layers=1), 2, tokenizer)
    assert model.config.num_hidden_layers == 1


def test_minilm_keeps_first_layers_pretrained(tokenizer, batch, pretrained) -> None:
    model = build_model(ModelConfig(name="minilm-l6", num_layers=2), 3, tokenizer, seed=0)
    assert model.config.num_hidden_layers == 2
    assert len(model.bert.encoder.layer) == 2
    state = model.state_dict()
    for key in (
        "embeddings.word_embeddings.weight",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.output.dense.bias",
        "encoder.layer.1.intermediate.dense.weight",
    ):
        assert torch.equal(state[f"bert.{key}"], pretrained[key]), key
    assert not any(k.startswith("bert.encoder.layer.2.") for k in state)
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.shape == (5, 3)


def test_minilm_full_depth(tokenizer) -> None:
    model = build_model(ModelConfig(name="minilm-l6"), 2, tokenizer)
    assert len(model.bert.encoder.layer) == 6


def test_model_path_to_packaged_folder(tokenizer, pretrained) -> None:
    folder = str(packaged_model_dir("minilm-l6"))
    model = build_model(ModelConfig(path=folder, num_layers=1), 2, tokenizer)
    assert len(model.bert.encoder.layer) == 1
    key = "encoder.layer.0.attention.output.dense.weight"
    assert torch.equal(model.state_dict()[f"bert.{key}"], pretrained[key])
    assert len(build_tokenizer(ModelConfig(path=folder))) == len(tokenizer)


def test_too_many_layers(tokenizer) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(name="minilm-l6", num_layers=7), 2, tokenizer)
    (problem,) = info.value.problems
    assert problem.key == "model.num_layers"
    assert problem.value == 7
    assert "1..6" in problem.fix


def test_model_path_without_config(tmp_path, tokenizer) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    spec = ModelConfig(path=str(tmp_path))
    with pytest.raises(ConfigError) as info:
        build_model(spec, 2, tokenizer)
    assert [p.key for p in info.value.problems] == ["model.path"]
    assert str(tmp_path) in str(info.value)
    assert "never" in str(info.value)  # says it will not fetch the model from a hub
    with pytest.raises(ConfigError) as info:
        build_tokenizer(spec)
    assert [p.key for p in info.value.problems] == ["model.path"]


def test_bad_tokenizer_path(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        build_tokenizer(ModelConfig(name="tiny-bert", tokenizer_path=str(tmp_path)))
    assert [p.key for p in info.value.problems] == ["model.tokenizer_path"]


def test_tiny_models_use_packaged_tokenizer(tokenizer) -> None:
    for name in ("tiny-bert", "tiny-gpt2"):
        tok = build_tokenizer(ModelConfig(name=name))
        assert tok.get_vocab() == tokenizer.get_vocab()
        assert tok.pad_token_id is not None


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2"])
def test_same_seed_same_initial_weights(tokenizer, name) -> None:
    a = build_model(ModelConfig(name=name), 3, tokenizer, seed=7)
    b = build_model(ModelConfig(name=name), 3, tokenizer, seed=7)
    c = build_model(ModelConfig(name=name), 3, tokenizer, seed=8)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_same_seed_same_minilm_head(tokenizer) -> None:
    # The pretrained body is loaded; only the fresh classifier head depends on the seed.
    spec = ModelConfig(name="minilm-l6", num_layers=1)
    a = build_model(spec, 4, tokenizer, seed=1)
    b = build_model(spec, 4, tokenizer, seed=1)
    c = build_model(spec, 4, tokenizer, seed=2)
    assert _same_weights(a, b)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert a.classifier.weight.shape == (4, a.config.hidden_size)


def test_saved_from_bf16_training_loads_in_fp32(tokenizer, tmp_path) -> None:
    """A model saved at the end of bf16 training records "bfloat16" in config.json although its
    weights are fp32; every later stage (a search trial, compression, export) must get fp32."""
    model = build_model(ModelConfig(name="tiny-bert"), 2, tokenizer)
    state = {k: v.float() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16).save_pretrained(str(tmp_path), state_dict=state)
    tokenizer.save_pretrained(str(tmp_path))
    again = build_model(ModelConfig(path=str(tmp_path)), 2, tokenizer)
    assert {p.dtype for p in again.parameters()} == {torch.float32}

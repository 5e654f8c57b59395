"""Decoders trained as causal language models: the task follows from the model, text is packed
into blocks, perplexity is token-weighted and paired with the dense model's, the artifact keeps
a tied output head once and generates what the trained model generates."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orchestrator import data, models
from orchestrator.compress.artifact import load_artifact, save_artifact
from orchestrator.config.loader import validate_job
from orchestrator.config.schema import DataConfig, ModelConfig
from orchestrator.errors import ConfigError
from orchestrator.finalize import (
    build_compressed,
    calibration_batches,
    evaluate_answers,
    paired,
    score,
)
from orchestrator.stats import PairedPerplexity

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer():
    return models.build_tokenizer(ModelConfig(name="tiny-llama"))


@pytest.fixture(scope="module")
def bundle(tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lm-data")
    spec = DataConfig(name="bbc_news", limit=60, max_length=32, cache_dir=str(cache))
    return data.build(spec, tokenizer, models.CAUSAL_LM)


def _job(tmp_path, **compress) -> object:
    return validate_job(
        {
            "name": "lm",
            "model": {"name": "tiny-llama"},
            "data": {"name": "bbc_news", "limit": 60, "max_length": 32},
            "train": {"num_workers": 1, "batch_size": 4},
            "compress": {"calib_batches": 4, **compress},
            "output": {"dir": str(tmp_path)},
        },
        source="test",
    )


def test_the_task_follows_from_the_model(tmp_path):
    assert models.task_of(ModelConfig(name="tiny-llama")) == models.CAUSAL_LM
    assert models.task_of(ModelConfig(name="smollm2-135m")) == models.CAUSAL_LM
    assert models.task_of(ModelConfig(name="tiny-bert")) == models.CLASSIFY
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert models.task_of(ModelConfig(path=str(folder))) == models.CAUSAL_LM
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    assert models.task_of(ModelConfig(path=str(folder))) == models.CLASSIFY


def test_tiny_llama_has_grouped_query_attention_and_a_tied_head(tokenizer):
    model = models.build_model(ModelConfig(name="tiny-llama"), 0, tokenizer)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert model.lm_head.weight is model.model.embed_tokens.weight
    short = models.build_model(ModelConfig(name="tiny-llama", num_layers=1), 0, tokenizer)
    assert len(short.model.layers) == 1


def test_text_is_packed_into_blocks_split_by_document(bundle, tokenizer):
    assert bundle.task == models.CAUSAL_LM and bundle.label_names == []
    for split in data.SPLITS:
        lengths = {len(r) for r in bundle.splits[split]["input_ids"]}
        assert lengths == {32}, split
    # Documents are split before packing: the splits' documents are disjoint (6 + 12 of 60).
    frames = data.load_frames(DataConfig(name="bbc_news", limit=60), labels=False)
    assert {len(f) for f in frames.values()} == {6, 12, 42}
    assert not set(frames["test"]["text"]) & set(frames["train"]["text"])
    # Every document ends with the end-of-text token (here the WordPiece [SEP]).
    ids = [t for r in bundle.splits["test"]["input_ids"] for t in r]
    assert ids.count(tokenizer.sep_token_id) >= 1
    batch = bundle.collate([bundle.splits["train"][i] for i in range(3)])
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["attention_mask"].all()


def test_a_split_shorter_than_one_block_is_refused(tokenizer, tmp_path):
    spec = DataConfig(name="bbc_news", limit=10, max_length=4096, cache_dir=str(tmp_path))
    with pytest.raises(data.bundle.DataError) as err:
        data.build(spec, tokenizer, models.CAUSAL_LM)
    assert "less than one block" in str(err.value)


def test_perplexity_is_the_token_weighted_loss(bundle, tokenizer):
    model = models.build_model(ModelConfig(name="tiny-llama"), 0, tokenizer).eval()
    correct, tokens, loss_sum = score(model, bundle.eval_batches("test", 4, 0, 1))
    assert tokens == bundle.sizes["test"] * 31  # every position but the last predicts one
    with torch.no_grad():
        batch = bundle.collate([bundle.splits["test"][i] for i in range(bundle.sizes["test"])])
        hf_loss = model(**batch).loss.item()  # transformers' own mean over predicted tokens
    assert loss_sum / tokens == pytest.approx(hf_loss, rel=1e-4)
    metrics, answers = evaluate_answers(model, bundle, "test")
    assert metrics["test/perplexity"] == pytest.approx(math.exp(hf_loss), rel=1e-4)
    assert len(answers) == bundle.sizes["test"] and sum(answers) == pytest.approx(loss_sum)
    same = paired(bundle, answers, answers)
    assert same.ratio == 1.0 and same.interval() == (1.0, 1.0)


def test_the_paired_perplexity_interval():
    dense = [100.0, 120.0, 90.0, 110.0]
    worse = [d + 3.1 for d in dense]  # 0.1 nats more per token on every block of 31 tokens
    p = PairedPerplexity.of(dense, worse, tokens_per_block=31)
    assert p.ratio == pytest.approx(math.exp(0.1))
    assert p.interval() == pytest.approx((math.exp(0.1), math.exp(0.1)))  # no spread
    noisy = PairedPerplexity.of(
        dense, [d + e for d, e in zip(dense, [0, 6.2, 0, 6.2], strict=True)], 31
    )
    lo, hi = noisy.interval()
    assert lo < noisy.ratio < hi and lo < math.exp(0.1) < hi
    assert noisy.metrics("test")["test/perplexity_ratio_hi"] == hi


@pytest.mark.parametrize(
    "compress",
    [
        {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
        {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}},
        {"prune": {"method": "wanda", "sparsity": 0.5}, "quantize": {"method": "weight_only"}},
        {"prune": {"method": "structured", "sparsity": 0.5}, "quantize": {"method": "gptq"}},
        {"prune": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}},
        {"quantize": {"method": "gptq", "bits": 3, "group_size": 32, "activation_scaling": True}},
    ],
    ids=[
        "sparsegpt",
        "gptq",
        "wanda+int8-weights",
        "structured-gqa+gptq",
        "sparsegpt-2:4",
        "awq+gptq",
    ],
)
def test_the_artifact_reloads_and_generates_the_same_tokens(tmp_path, compress):
    spec = _job(tmp_path, **compress)
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data.build(spec.data, tokenizer, models.task_of(spec.model))
    model, report = build_compressed(spec, bundle, tokenizer, calibration_batches(spec, bundle))
    save_artifact(model, tmp_path / "a", steps=report.steps, tokenizer=tokenizer)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "lm_head.weight" not in manifest["tensors"]  # tied: stored once, as the embeddings
    shipped = load_artifact(tmp_path / "a")
    assert type(shipped).__name__ == "LlamaForCausalLM"
    prompt = bundle.collate([bundle.splits["test"][0]])["input_ids"][:, :8]
    model.eval()
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        got = shipped.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(want, got)


def test_a_gguf_path_that_is_missing_or_not_gguf_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as err:
        models.model_dir(ModelConfig(path=str(tmp_path / "nope.gguf")))
    assert err.value.problems[0].key == "model.path"
    assert "does not exist" in str(err.value)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ConfigError) as err:
        models.model_dir(ModelConfig(path=str(fake)))
    assert "is not a GGUF file" in str(err.value)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)
    with pytest.raises(ConfigError) as err:
        models.model_dir(ModelConfig(path=str(truncated)))
    assert "cannot be read as a GGUF model" in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.tmp")), "nothing half-written is left behind"


@pytest.mark.parametrize(
    "change,key",
    [
        ({"data": {"label_column": "sentiment"}}, "data.label_column"),
        ({"data": {"max_length": 1024}}, "data.max_length"),
        ({"compress": {"vocab": {"method": "trim"}}}, "compress.vocab"),
        ({"measure": {"backend": "onnxruntime"}}, "measure.backend"),
        (
            {
                "search": {
                    "space": {"compress.prune.sparsity": {"choice": [0.3, 0.5]}},
                    "num_samples": 2,
                }
            },
            "search.objectives[0].metric",
        ),
        (
            {
                "search": {
                    "space": {"compress.prune.sparsity": {"choice": [0.3, 0.5]}},
                    "objectives": [{"metric": "eval/perplexity_ratio", "mode": "min"}],
                    "constraints": {"max_accuracy_drop": 0.01},
                }
            },
            "search.constraints.max_accuracy_drop",
        ),
        (
            {
                "search": {
                    "space": {"compress.prune.sparsity": {"choice": [0.3, 0.5]}},
                    "objectives": [{"metric": "compress/size_bytes", "mode": "min"}],
                }
            },
            "search.objectives",
        ),
    ],
    ids=[
        "label-column",
        "longer-than-context",
        "vocab-trim",
        "onnx-latency",
        "search-default-objective",
        "search-accuracy-constraint",
        "search-scoring-no-perplexity",
    ],
)
def test_keys_a_language_model_cannot_take_are_refused(tmp_path, change, key):
    from orchestrator.launch import check_task

    raw = {
        "name": "lm",
        "model": {"name": "tiny-llama"},
        "data": {"name": "bbc_news", "limit": 60, "max_length": 32},
        "compress": {"prune": {"method": "magnitude", "sparsity": 0.5}},
        "output": {"dir": str(tmp_path)},
    }
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError) as err:
        check_task(validate_job(raw, source="test"))
    assert [p.key for p in err.value.problems] == [key]
    # The same keys on a classifier pass this check (not the perplexity objective).
    raw["model"] = {"name": "tiny-bert"}
    if key not in ("data.max_length", "measure.backend", "search.constraints.max_accuracy_drop"):
        check_task(validate_job(raw, source="test"))


def test_a_tied_head_is_quantized_on_its_tables_grid(tmp_path):
    """With the embeddings quantized, the output head (the same tensor) computes with the
    table's rounded rows in training too, and ships on int8 kernels: the reloaded artifact
    scores what the trained form scores."""
    spec = _job(tmp_path, quantize={"method": "dynamic_int8"})
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data.build(spec.data, tokenizer, models.task_of(spec.model))
    model, report = build_compressed(spec, bundle, tokenizer, calibration_batches(spec, bundle))
    head = next(r for r in report.rows if r.name == "lm_head")
    assert head.details["tied_to"] == "model.embed_tokens" and not head.skipped
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert report.steps[0].entry["tied"] == {"lm_head": "model.embed_tokens"}
    save_artifact(model, tmp_path / "a", steps=report.steps, tokenizer=tokenizer)
    shipped = load_artifact(tmp_path / "a")
    from orchestrator.compress.qmodules import dynamic_linear_type

    assert isinstance(shipped.lm_head, dynamic_linear_type())  # the int8 kernel
    trained = evaluate_answers(model, bundle, "test")[0]["test/loss"]
    loaded = evaluate_answers(shipped, bundle, "test")[0]["test/loss"]
    assert loaded == pytest.approx(trained, abs=0.02)  # int8 activations at inference only


@pytest.mark.parametrize(
    "search,key",
    [
        (
            {"objectives": [{"metric": "eval/perplexity_ratio", "mode": "min"}]},
            "search.objectives[0].metric",
        ),
        (
            {"constraints": {"max_perplexity_increase": 0.1}},
            "search.constraints.max_perplexity_increase",
        ),
    ],
    ids=["perplexity-objective", "perplexity-constraint"],
)
def test_a_classifier_search_scored_on_perplexity_is_refused(tmp_path, search, key):
    from orchestrator.launch import check_task

    raw = {
        "name": "cls",
        "model": {"name": "tiny-bert"},
        "data": {"name": "mr", "limit": 60, "max_length": 32},
        "search": {"space": {"compress.prune.sparsity": {"choice": [0.3, 0.5]}}, **search},
        "output": {"dir": str(tmp_path)},
    }
    with pytest.raises(ConfigError) as err:
        check_task(validate_job(raw, source="test"))
    assert [p.key for p in err.value.problems] == [key]

"""The image path: the packaged MNIST digits (seeded splits, [0, 1] pixels, cache, per-rank
shards), the from-config MLP as a transformers model (forward / backward, save / load through
the Auto classes), and compression, the artifact and its measurement on it, tokenizer-free."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from orchestrator import data, finalize, models
from orchestrator.compress import compress_
from orchestrator.compress.artifact import load_artifact, save_artifact
from orchestrator.compress.measure import example_inputs, measure_latency
from orchestrator.config.compress import CompressConfig
from orchestrator.config.loader import validate_job
from orchestrator.config.schema import DataConfig, ModelConfig
from orchestrator.data.corpora import read_corpus
from orchestrator.errors import ConfigError, DataError
from orchestrator.models.mlp import MLPForImageClassification

pytestmark = pytest.mark.unit

MLP = ModelConfig(name="mlp")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist-cache")


@pytest.fixture(scope="module")
def bundle(cache: Path) -> data.DataBundle:
    return data.build(DataConfig(name="mnist", cache_dir=str(cache)), None)


@pytest.fixture(scope="module")
def small(cache: Path) -> data.DataBundle:
    # 205 digits: test 41 (odd, so eval shards differ in length), validation 20, train 144.
    return data.build(DataConfig(name="mnist", limit=205, cache_dir=str(cache)), None)


@pytest.fixture(scope="module")
def calib(bundle: data.DataBundle) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(bundle.train_batches(32, 0, 1, seed=0, epoch=0), 4))


@pytest.fixture
def mlp() -> nn.Module:
    return models.build_model(MLP, 10, None, seed=0)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=batch["pixel_values"]).logits


def _keys(ds) -> list[bytes]:
    """Each example's identity: its pixels (the 5,000 digits are all distinct images)."""
    return [np.asarray(p, dtype=np.float32).tobytes() for p in ds["pixel_values"]]


# --- data ------------------------------------------------------------------------------------


def test_corpus_is_5000_digits_500_per_class() -> None:
    df = read_corpus("mnist")
    assert len(df) == 5000
    assert Counter(df["label"].tolist()) == {d: 500 for d in range(10)}
    pixels = np.stack(df["pixel_values"].to_numpy())
    assert pixels.shape == (5000, 784) and pixels.dtype == np.uint8 and pixels.max() == 255


def test_splits_sizes_labels_and_pixels(bundle: data.DataBundle) -> None:
    assert bundle.sizes == {"train": 3500, "validation": 500, "test": 1000}
    assert bundle.label_names == [str(d) for d in range(10)]
    for split in data.SPLITS:
        ds = bundle.splits[split]
        assert ds.column_names == ["pixel_values", "labels"]
        pixels = np.asarray(ds["pixel_values"], dtype=np.float32)
        assert pixels.shape == (bundle.sizes[split], 784)
        assert pixels.min() == 0.0 and pixels.max() == 1.0
        assert set(ds["labels"]) == set(range(10))


def test_splits_are_disjoint(bundle: data.DataBundle) -> None:
    keys = {split: set(_keys(bundle.splits[split])) for split in data.SPLITS}
    assert sum(len(k) for k in keys.values()) == 5000
    assert len(keys["train"] | keys["validation"] | keys["test"]) == 5000


def test_splits_are_seeded(bundle: data.DataBundle, tmp_path: Path) -> None:
    again = data.build(DataConfig(name="mnist", cache_dir=str(tmp_path / "a")), None)
    other = data.build(DataConfig(name="mnist", seed=1, cache_dir=str(tmp_path / "b")), None)
    assert again.cache_path != bundle.cache_path  # really rebuilt, not read from the cache
    for split in data.SPLITS:
        assert _keys(again.splits[split]) == _keys(bundle.splits[split])
        assert again.splits[split]["labels"] == bundle.splits[split]["labels"]
    assert _keys(other.splits["test"]) != _keys(bundle.splits["test"])


def test_limit_takes_a_seeded_subset(small: data.DataBundle) -> None:
    assert small.sizes == {"train": 144, "validation": 20, "test": 41}


def test_cache_is_reused(bundle: data.DataBundle, cache: Path) -> None:
    assert bundle.cache_path is not None and (bundle.cache_path / "meta.json").is_file()
    meta = json.loads((bundle.cache_path / "meta.json").read_text())
    assert meta["label_names"] == bundle.label_names
    again = data.build(DataConfig(name="mnist", cache_dir=str(cache)), None)
    assert again.cache_path == bundle.cache_path
    assert _keys(again.splits["validation"]) == _keys(bundle.splits["validation"])


@pytest.mark.parametrize(("world", "batch_size"), [(2, 16), (3, 5)])
def test_train_shards_equal_and_disjoint(small: data.DataBundle, world, batch_size) -> None:
    shards = []
    for rank in range(world):
        batches = list(small.train_batches(batch_size, rank, world, seed=0, epoch=0))
        assert len(batches) == small.batches_per_epoch(batch_size, world)
        for b in batches:
            assert b["pixel_values"].shape == (batch_size, 784)
            assert b["pixel_values"].dtype == torch.float32 and b["labels"].dtype == torch.long
        shards.append([p.numpy().tobytes() for b in batches for p in b["pixel_values"]])
    assert len({len(s) for s in shards}) == 1
    seen = [k for s in shards for k in s]
    assert len(set(seen)) == len(seen)  # no digit on two ranks


def test_eval_shards_cover_every_example_once(small: data.DataBundle) -> None:
    per_rank = [list(small.eval_batches("test", 4, rank, 2)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])  # a ZeRO-3 forward is a collective
    seen = Counter(
        p.numpy().tobytes()
        for batches in per_rank
        for b, real in batches
        for p in b["pixel_values"][:real]
    )
    assert seen == Counter(_keys(small.splits["test"]))


def test_collate_stacks_rows(small: data.DataBundle) -> None:
    rows = small.splits["train"].select(range(3)).to_list()
    batch = small.collate(rows)
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (3, 784)
    assert batch["labels"].tolist() == [r["labels"] for r in rows]


def test_images_need_a_model_without_tokenizer(cache: Path) -> None:
    tokenizer = models.build_tokenizer(ModelConfig(name="tiny-bert"))
    with pytest.raises(DataError) as e:
        data.build(DataConfig(name="mnist", cache_dir=str(cache)), tokenizer)
    assert e.value.problems[0].key == "data.name"
    with pytest.raises(DataError) as e:
        data.build(DataConfig(name="mr", limit=50, cache_dir=str(cache)), None)
    assert e.value.problems[0].key == "data.name"
    assert "mnist" in e.value.problems[0].fix


# --- model -----------------------------------------------------------------------------------


def test_mlp_has_no_tokenizer_and_refuses_token_options(tmp_path: Path) -> None:
    assert models.build_tokenizer(MLP) is None
    with pytest.raises(ConfigError) as e:
        models.build_model(ModelConfig(name="mlp", num_layers=1), 10, None)
    assert e.value.problems[0].key == "model.num_layers"
    with pytest.raises(ConfigError) as e:
        models.build_tokenizer(ModelConfig(name="mlp", tokenizer_path=str(tmp_path)))
    assert e.value.problems[0].key == "model.tokenizer_path"


def test_mlp_forward_backward(mlp: nn.Module, calib) -> None:
    batch = calib[0]
    out = mlp(**batch)
    assert out.logits.shape == (32, 10)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
    shapes = [tuple(m.weight.shape) for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(256, 784), (128, 256), (10, 128)]


def test_mlp_init_is_seeded() -> None:
    a, b = (models.build_model(MLP, 10, None, seed=3) for _ in range(2))
    c = models.build_model(MLP, 10, None, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)


def test_save_load_round_trip(mlp: nn.Module, calib, tmp_path: Path) -> None:
    mlp.save_pretrained(str(tmp_path))
    back = AutoModelForSequenceClassification.from_pretrained(str(tmp_path))
    assert isinstance(back, MLPForImageClassification)
    assert torch.equal(_logits(back, calib[0]), _logits(mlp, calib[0]))
    # A search's trials load the trained baseline by model.path: no tokenizer there either.
    spec = ModelConfig(path=str(tmp_path))
    assert models.build_tokenizer(spec) is None
    again = models.build_model(spec, 10, None)
    assert torch.equal(_logits(again, calib[0]), _logits(mlp, calib[0]))


# --- compression, artifact, measurement ------------------------------------------------------

RECIPES = {
    "magnitude-80": {"prune": {"method": "magnitude", "sparsity": 0.8}},
    "wanda-50": {"prune": {"method": "wanda", "sparsity": 0.5}},
    "svd-25": {"factorize": {"method": "svd", "rank_ratio": 0.25}},
    "asvd-25": {"factorize": {"method": "asvd", "rank_ratio": 0.25}},
    "fake-4bit": {"quantize": {"method": "fake", "bits": 4}},
    "magnitude+weight-only-3bit": {
        "prune": {"method": "magnitude", "sparsity": 0.5},
        "quantize": {"method": "weight_only", "bits": 3, "symmetric": False},
    },
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_artifact_reload_gives_the_same_logits(recipe, mlp, calib, tmp_path: Path) -> None:
    spec = CompressConfig.model_validate(RECIPES[recipe])
    report = compress_(mlp, spec, calib=calib)
    assert report.metrics["compress/skipped_modules"] == 0
    assert not [r for r in report.rows if r.name == "classifier"]  # the head stays dense
    dense_bytes = save_artifact(models.build_model(MLP, 10, None), tmp_path / "dense")
    size = save_artifact(mlp, tmp_path / "art", steps=report.steps)
    assert size < dense_bytes
    assert not (tmp_path / "art" / "tokenizer_config.json").exists()
    reloaded = load_artifact(tmp_path / "art")
    # Equal up to float rounding (dequantized weights are recomputed from the packed codes).
    torch.testing.assert_close(
        _logits(reloaded, calib[0]), _logits(mlp, calib[0]), atol=1e-4, rtol=0
    )


def test_int8_artifact_runs_int8_kernels(mlp, calib, tmp_path: Path) -> None:
    spec = CompressConfig.model_validate({"quantize": {"method": "dynamic_int8"}})
    report = compress_(mlp, spec, calib=calib)
    save_artifact(mlp, tmp_path / "art", steps=report.steps)
    reloaded = load_artifact(tmp_path / "art")
    assert [type(m) is nn.Linear for m in (reloaded.layers[0], reloaded.classifier)] == [
        False,
        True,
    ]
    got, expected = _logits(reloaded, calib[0]), _logits(mlp, calib[0])
    # int8 kernels also round the activations: close to the fake-quant form, not bit-equal.
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), 0) > 0.99
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_structured_pruning_is_refused(mlp, calib) -> None:
    spec = CompressConfig.model_validate({"prune": {"method": "structured"}})
    with pytest.raises(ConfigError) as e:
        compress_(mlp, spec, calib=calib)
    assert e.value.problems[0].key == "compress.prune.method"


def test_measure_latency_on_pixels(mlp) -> None:
    inputs = example_inputs(mlp, 4, seq_len=64)
    assert set(inputs) == {"pixel_values"} and inputs["pixel_values"].shape == (4, 784)
    out = measure_latency({"dense": mlp}, seq_len=64, repeats=2, warmup=1)["dense"]
    assert out["perf/latency_ms_b1"] > 0 and out["perf/latency_ms_b32"] > 0


def test_finalize_measures_the_artifact(small, tmp_path: Path, monkeypatch) -> None:
    """The whole rank-0 export path with no tokenizer: artifact, reload, accuracy paired with
    the dense model on the same examples, latency."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    spec = validate_job(
        {
            "name": "mnist-finalize",
            "model": {"name": "mlp"},
            "data": {"name": "mnist", "limit": 205},
            "compress": {"prune": {"method": "wanda", "sparsity": 0.5}},
        },
        source="test",
    )
    calib = finalize.calibration_batches(spec, small)
    model, report = finalize.build_compressed(spec, small, None, calib)
    metrics = finalize.finalize(spec, model, report, small, None, tmp_path / "model")
    assert 0.0 <= metrics["test/accuracy"] <= 1.0
    assert metrics["compress/size_bytes"] < metrics["compress/dense_size_bytes"]
    assert metrics["perf/latency_ms_b32"] > 0 and metrics["perf/speedup"] > 0
    assert json.loads((tmp_path / "model" / "config.json").read_text())["id2label"]["3"] == "3"
    for key, split in (("eval", "validation"), ("test", "test")):
        assert metrics[f"{key}/examples"] == small.sizes[split]
        lo, drop, hi = (metrics[f"{key}/accuracy_drop{s}"] for s in ("_lo", "", "_hi"))
        assert lo <= drop <= hi
        assert metrics[f"{key}/accuracy"] == pytest.approx(metrics[f"{key}/dense_accuracy"] - drop)
    # The dense model's answers were cached on this node; the baseline measure reuses them.
    (cached,) = (tmp_path / "cache" / "dense_answers").glob("*.json")
    dense = finalize.measure_dense(spec, models.build_model(MLP, 10, None), small, None)
    assert dense["compress/size_ratio"] == 1.0
    assert dense["eval/accuracy"] == pytest.approx(metrics["eval/dense_accuracy"])
    assert list((tmp_path / "cache" / "dense_answers").glob("*.json")) == [cached]

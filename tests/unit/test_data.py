"""Data: seeded disjoint splits of the packaged corpora, local CSV / TSV / JSON lines / Parquet
files and folders, DataError with the right key, the tokenization cache, and per-rank shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from orchestrator.config import DataConfig, ModelConfig
from orchestrator.data.bundle import _cache_key, build, load_frames
from orchestrator.data.corpora import read_corpus
from orchestrator.errors import ConfigError, DataError
from orchestrator.models import build_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    """Reading a local file through ``datasets.load_dataset`` writes an Arrow copy into the
    library's own cache (``data.cache_dir`` does not cover it): keep that in tmp too."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelConfig(name="minilm-l6"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tokenizer):
    # 205 examples: test 41 (odd, so eval shards differ in length), validation 20, train 144.
    cache = tmp_path_factory.mktemp("bundle-cache")
    return build(DataConfig(name="mr", limit=205, max_length=32, cache_dir=str(cache)), tokenizer)


def _mr(tmp: Path, **kw) -> DataConfig:
    fields = {"name": "mr", "limit": 200, "max_length": 32, "cache_dir": str(tmp / "cache")}
    return DataConfig(**{**fields, **kw})


def _rows(ds: datasets.Dataset) -> list[tuple[tuple[int, ...], int]]:
    return [(tuple(r["input_ids"]), r["labels"]) for r in ds]


def _batch_rows(batch, n: int | None = None) -> list[tuple[tuple[int, ...], int]]:
    """The unpadded (input_ids, label) rows of a collated batch (the first ``n`` ones)."""
    out = []
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    for i in range(len(labels) if n is None else n):
        length = int(mask[i].sum())
        assert int(mask[i, :length].min()) == 1  # padding only at the end
        out.append((tuple(ids[i, :length].tolist()), int(labels[i])))
    return out


# --- splits of a packaged corpus -------------------------------------------------------------


def test_splits_are_deterministic(tmp_path, tokenizer, bundle) -> None:
    # The same spec built into a second cache folder: tokenized again, not read back.
    again = build(_mr(tmp_path, limit=205), tokenizer)
    assert again.cache_path != bundle.cache_path
    for split in ("train", "validation", "test"):
        assert again.splits[split]["input_ids"] == bundle.splits[split]["input_ids"]
        assert again.splits[split]["labels"] == bundle.splits[split]["labels"]
    assert again.sizes == bundle.sizes
    frames = [load_frames(_mr(tmp_path, seed=3)) for _ in range(2)]
    for split in ("train", "validation", "test"):
        pd.testing.assert_frame_equal(frames[0][split], frames[1][split])


def test_split_sizes_add_up_and_splits_are_disjoint(tmp_path) -> None:
    corpus = read_corpus("mr")
    counts = Counter(corpus["text"])
    duplicated = {t for t, c in counts.items() if c > 1}

    frames = load_frames(_mr(tmp_path, limit=400))
    assert {k: len(v) for k, v in frames.items()} == {"test": 80, "validation": 40, "train": 280}
    # Without a limit the three splits are exactly the corpus, each row in exactly one split.
    full = load_frames(_mr(tmp_path, limit=None))
    assert sum(len(f) for f in full.values()) == len(corpus)
    assert Counter(t for f in full.values() for t in f["text"]) == counts

    for parts in (frames, full):
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
            shared = set(parts[a]["text"]) & set(parts[b]["text"])
            # Only sentences the corpus itself holds more than once may appear in two splits.
            assert shared <= duplicated, shared - duplicated
        # A limited subset is a sub-multiset of the corpus: no row was used twice.
        assert not Counter(t for f in parts.values() for t in f["text"]) - counts


def test_frames_keep_text_label_pairs(tmp_path) -> None:
    corpus = read_corpus("mr")
    labels_of: dict[str, set] = {}
    for text, label in zip(corpus["text"], corpus["label"], strict=True):
        labels_of.setdefault(text, set()).add(label)
    frames = load_frames(_mr(tmp_path, limit=100))
    for frame in frames.values():
        assert list(frame.columns) == ["text", "label"]
        for text, label in zip(frame["text"], frame["label"], strict=True):
            assert label in labels_of[text]


def test_different_seed_gives_a_different_split(tmp_path) -> None:
    a = load_frames(_mr(tmp_path, seed=0))
    b = load_frames(_mr(tmp_path, seed=1))
    assert set(a["test"]["text"]) != set(b["test"]["text"])
    assert {k: len(v) for k, v in a.items()} == {k: len(v) for k, v in b.items()}


def test_label_names_mr(bundle, tokenizer) -> None:
    assert bundle.label_names == ["negative", "positive"]
    assert bundle.num_labels == 2
    assert set(bundle.splits["train"]["labels"]) == {0, 1}
    assert all(len(ids) <= 32 for ids in bundle.splits["train"]["input_ids"])
    assert bundle.pad_token_id == tokenizer.pad_token_id


def test_label_names_trec(tmp_path, tokenizer) -> None:
    spec = DataConfig(name="trec", limit=1000, max_length=32, cache_dir=str(tmp_path / "cache"))
    bundle = build(spec, tokenizer)
    assert bundle.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert bundle.num_labels == 6
    # Labels are indices into label_names, consistent with the untokenized frames.
    frames = load_frames(spec)
    for split in ("train", "test"):
        expected = [bundle.label_names.index(v) for v in frames[split]["label"]]
        assert bundle.splits[split]["labels"] == expected


# --- local files -----------------------------------------------------------------------------


def _reviews(n: int = 40) -> pd.DataFrame:
    """Distinct sentences whose first word gives the label away, with custom column names."""
    rows = [
        (f"good movie number {i} with a happy ending", "pos")
        if i % 2 == 0
        else (f"bad film number {i} and a dull plot", "neg")
        for i in range(n)
    ]
    return pd.DataFrame(rows, columns=["sentence", "sentiment"])


def _write_table(df: pd.DataFrame, path: Path) -> Path:
    suffix = path.suffix
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        raise AssertionError(suffix)
    return path


def _local(tmp: Path, path: Path, **kw) -> DataConfig:
    fields = {
        "path": str(path),
        "text_column": "sentence",
        "label_column": "sentiment",
        "max_length": 32,
        "cache_dir": str(tmp / "cache"),
    }
    return DataConfig(**{**fields, **kw})


def _check_review_frames(frames: dict[str, pd.DataFrame]) -> None:
    assert {k: len(v) for k, v in frames.items()} == {"test": 8, "validation": 4, "train": 28}
    for frame in frames.values():
        for text, label in zip(frame["text"], frame["label"], strict=True):
            assert label == ("pos" if text.startswith("good") else "neg")
    assert Counter(t for f in frames.values() for t in f["text"]) == Counter(_reviews(40).sentence)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_local_file_loads(tmp_path, suffix) -> None:
    path = _write_table(_reviews(40), tmp_path / f"reviews{suffix}")
    _check_review_frames(load_frames(_local(tmp_path, path)))


def test_local_file_builds(tmp_path, tokenizer) -> None:
    # Tokenizing does not depend on the file format (load_frames above covers each format).
    spec = _local(tmp_path, _write_table(_reviews(40), tmp_path / "reviews.csv"))
    frames = load_frames(spec)
    _check_review_frames(frames)
    bundle = build(spec, tokenizer)
    assert bundle.label_names == ["neg", "pos"]
    assert bundle.sizes == {"train": 28, "validation": 4, "test": 8}
    for split, frame in frames.items():
        assert bundle.splits[split]["labels"] == [
            bundle.label_names.index(v) for v in frame["label"]
        ]
    first = tokenizer.decode(bundle.splits["test"]["input_ids"][0], skip_special_tokens=True)
    assert first == frames["test"]["text"][0]


def test_explicit_format_overrides_suffix(tmp_path) -> None:
    path = _write_table(_reviews(40), tmp_path / "reviews.tsv")
    renamed = path.rename(tmp_path / "reviews.txt")
    _check_review_frames(load_frames(_local(tmp_path, renamed, format="tsv")))


def test_integer_labels_sorted_numerically(tmp_path, tokenizer) -> None:
    df = pd.DataFrame(
        {"text": [f"example sentence {i}" for i in range(30)], "label": [2, 10, 7] * 10}
    )
    path = _write_table(df, tmp_path / "ints.csv")
    spec = DataConfig(path=str(path), max_length=32, cache_dir=str(tmp_path / "cache"))
    bundle = build(spec, tokenizer)
    assert bundle.label_names == ["2", "7", "10"]
    frames = load_frames(spec)
    for split, frame in frames.items():
        assert bundle.splits[split]["labels"] == [
            bundle.label_names.index(str(v)) for v in frame["label"]
        ]


def test_boolean_labels(tmp_path, tokenizer) -> None:
    path = tmp_path / "bools.jsonl"
    with path.open("w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": f"sentence number {i}", "label": i % 2 == 0}) + "\n")
    spec = DataConfig(path=str(path), max_length=32, cache_dir=str(tmp_path / "cache"))
    bundle = build(spec, tokenizer)
    assert bundle.num_labels == 2


def test_folder_with_train_and_test_files(tmp_path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    df = _reviews(50)
    _write_table(df.iloc[:40], folder / "train.csv")
    _write_table(df.iloc[40:], folder / "test.csv")
    spec = _local(tmp_path, folder)
    frames = load_frames(spec)
    # test.csv is the test split as given; validation is carved out of train.csv.
    assert list(frames["test"]["text"]) == list(df.iloc[40:]["sentence"])
    assert len(frames["validation"]) == 4
    assert len(frames["train"]) == 36
    train_texts = set(df.iloc[:40]["sentence"])
    assert set(frames["validation"]["text"]) | set(frames["train"]["text"]) == train_texts
    assert not set(frames["validation"]["text"]) & set(frames["train"]["text"])


def test_folder_validation_file_is_used(tmp_path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    df = _reviews(50)
    _write_table(df.iloc[:30], folder / "train.jsonl")
    _write_table(df.iloc[30:40], folder / "val.jsonl")
    _write_table(df.iloc[40:], folder / "test.jsonl")
    frames = load_frames(_local(tmp_path, folder))
    assert list(frames["validation"]["text"]) == list(df.iloc[30:40]["sentence"])
    assert list(frames["train"]["text"]) == list(df.iloc[:30]["sentence"])


def test_folder_without_test_file(tmp_path, tokenizer) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    _write_table(_reviews(20), folder / "train.csv")
    with pytest.raises(DataError) as info:
        build(_local(tmp_path, folder), tokenizer)
    assert [p.key for p in info.value.problems] == ["data.path"]
    assert "test" in str(info.value)


# --- data errors -----------------------------------------------------------------------------


def _data_error(spec: DataConfig, tokenizer) -> DataError:
    with pytest.raises(DataError) as info:
        build(spec, tokenizer)
    assert isinstance(info.value, ConfigError)
    assert info.value.exit_code == 2
    return info.value


def test_missing_file(tmp_path, tokenizer) -> None:
    err = _data_error(_local(tmp_path, tmp_path / "nope.csv"), tokenizer)
    assert [p.key for p in err.problems] == ["data.path"]
    assert "nope.csv" in str(err)


def test_unknown_suffix(tmp_path, tokenizer) -> None:
    path = tmp_path / "reviews.xlsx"
    path.write_text("not a table")
    err = _data_error(_local(tmp_path, path), tokenizer)
    assert [p.key for p in err.problems] == ["data.path"]
    assert ".xlsx" in str(err)


@pytest.mark.parametrize(
    ("columns", "key", "value"),
    [
        ({"text_column": "review"}, "data.text_column", "review"),
        ({"label_column": "stars"}, "data.label_column", "stars"),
    ],
)
def test_missing_column(tmp_path, tokenizer, columns, key, value) -> None:
    path = _write_table(_reviews(20), tmp_path / "reviews.csv")
    err = _data_error(_local(tmp_path, path, **columns), tokenizer)
    assert [p.key for p in err.problems] == [key]
    assert err.problems[0].value == value
    assert "sentence" in err.problems[0].fix  # lists the columns that exist


def test_single_label_value(tmp_path, tokenizer) -> None:
    df = _reviews(20).assign(sentiment="pos")
    path = _write_table(df, tmp_path / "reviews.csv")
    err = _data_error(_local(tmp_path, path), tokenizer)
    assert [p.key for p in err.problems] == ["data.label_column"]


@pytest.mark.parametrize(
    ("fields", "key", "split"),
    [
        ({"limit": 10, "test_fraction": 0.01}, "data.limit", "test"),
        ({"limit": 10, "val_fraction": 0.01}, "data.val_fraction", "validation"),
    ],
)
def test_empty_split(tmp_path, tokenizer, fields, key, split) -> None:
    err = _data_error(_mr(tmp_path, **fields), tokenizer)
    assert [p.key for p in err.problems] == [key]
    assert f"the {split} split is empty" in str(err)
    assert not list((tmp_path / "cache").glob("*/meta.json"))  # nothing cached


def test_zero_val_fraction_rejected_by_schema(tmp_path, tokenizer) -> None:
    with pytest.raises(ValidationError):
        _mr(tmp_path, limit=50, val_fraction=0.0)  # the schema refuses an empty validation split


def test_corpus_name_rejected_before_reading(tmp_path) -> None:
    with pytest.raises(ValidationError):
        DataConfig(name="imdb", cache_dir=str(tmp_path))


# --- the tokenization cache ------------------------------------------------------------------


def test_cache_is_written_once_and_reused(tmp_path, tokenizer) -> None:
    spec = _mr(tmp_path, limit=60)
    first = build(spec, tokenizer)
    cache_root = tmp_path / "cache"
    assert first.cache_path is not None and first.cache_path.parent == cache_root
    assert (first.cache_path / "meta.json").is_file()
    assert [p.name for p in cache_root.iterdir()] == [first.cache_path.name]  # no temp leftovers

    # Mark the cached metadata: a build that reuses the cache returns the mark.
    meta_path = first.cache_path / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["label_names"] == first.label_names
    meta["label_names"] = ["cached-negative", "cached-positive"]
    meta_path.write_text(json.dumps(meta))

    second = build(spec, tokenizer)
    assert second.cache_path == first.cache_path
    assert second.label_names == ["cached-negative", "cached-positive"]
    assert second.sizes == first.sizes
    for split in ("train", "validation", "test"):
        assert second.splits[split]["input_ids"] == first.splits[split]["input_ids"]
        assert second.splits[split]["labels"] == first.splits[split]["labels"]


def test_cache_key_follows_the_spec(tmp_path, tokenizer) -> None:
    def key(**kw) -> str:
        return _cache_key(_mr(tmp_path, **{"limit": 60, **kw}), tokenizer, "classify")

    assert key() == key()
    # The same text packed for a language model is another cache.
    assert key() != _cache_key(_mr(tmp_path, limit=60), tokenizer, "causal_lm")
    assert key() == key(cache_dir=str(tmp_path / "elsewhere"))  # where, not what
    assert len({key(), key(max_length=16), key(seed=1), key(limit=61), key(test_fraction=0.3)}) == 5


# --- per-rank batches ------------------------------------------------------------------------


def test_bundle_sizes(bundle) -> None:
    assert bundle.sizes == {"train": 144, "validation": 20, "test": 41}


def test_collate_pads_to_longest(bundle) -> None:
    rows = bundle.splits["train"].select(range(6)).to_list()
    batch = bundle.collate(rows)
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (6, width)
    assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in rows]
    assert (batch["input_ids"][batch["attention_mask"] == 0] == bundle.pad_token_id).all()
    assert _batch_rows(batch) == [(tuple(r["input_ids"]), r["labels"]) for r in rows]


@pytest.mark.parametrize(("world", "batch_size"), [(2, 8), (2, 5), (3, 4)])
def test_train_shards_disjoint_and_equal(bundle, world, batch_size) -> None:
    all_rows = Counter(_rows(bundle.splits["train"]))
    shards = []
    for rank in range(world):
        batches = list(bundle.train_batches(batch_size, rank, world, seed=0, epoch=0))
        assert all(len(b["labels"]) == batch_size for b in batches)  # full batches only
        assert len(batches) == bundle.batches_per_epoch(batch_size, world)
        shards.append([row for b in batches for row in _batch_rows(b)])
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == (144 // world) // batch_size * batch_size
    # Together the shards are a sub-multiset of the split: no example is on two ranks.
    used = Counter(row for shard in shards for row in shard)
    assert not used - all_rows
    assert sum(used.values()) == world * len(shards[0])


def test_train_order_is_seeded_per_epoch(bundle) -> None:
    def order(seed: int, epoch: int) -> list:
        return [row for b in bundle.train_batches(8, 0, 2, seed, epoch) for row in _batch_rows(b)]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_train_batches_skip_resumes_mid_epoch(bundle) -> None:
    full = list(bundle.train_batches(8, 1, 2, seed=0, epoch=0))
    resumed = list(bundle.train_batches(8, 1, 2, seed=0, epoch=0, skip=3))
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert _batch_rows(a) == _batch_rows(b)


@pytest.mark.parametrize(
    ("split", "world", "batch_size"),
    [("test", 2, 4), ("test", 2, 8), ("validation", 2, 3), ("test", 3, 4)],
)
def test_eval_shards_cover_every_example_once(bundle, split, world, batch_size) -> None:
    per_rank = [list(bundle.eval_batches(split, batch_size, rank, world)) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of batches
    real_rows = [
        row for batches in per_rank for batch, real in batches for row in _batch_rows(batch, real)
    ]
    assert sum(real for batches in per_rank for _, real in batches) == len(bundle.splits[split])
    assert Counter(real_rows) == Counter(_rows(bundle.splits[split]))
    for batches in per_rank:
        for batch, real in batches:
            assert 0 <= real <= batch_size
            assert len(batch["labels"]) == max(real, 1)


def test_eval_padding_batch_on_short_rank(bundle) -> None:
    # 41 test rows over 2 ranks: rank 0 holds 21 (6 batches of 4), rank 1 holds 20 (5 + 1 empty).
    reals = [[real for _, real in bundle.eval_batches("test", 4, r, 2)] for r in range(2)]
    assert reals == [[4, 4, 4, 4, 4, 1], [4, 4, 4, 4, 4, 0]]
    assert np.sum(reals) == 41

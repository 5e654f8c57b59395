"""Labelled text (or images, or plain text for a language model) -> model-ready, seeded train /
validation / test splits, sharded per worker.

Sources: a packaged corpus by name (``corpora.py``) or local CSV / TSV / JSON lines / Parquet
files read through Hugging Face ``datasets``. Text is tokenized; an image corpus (``mnist``)
becomes ``pixel_values`` scaled to [0, 1] and needs no tokenizer. For a causal language model
(``task="causal_lm"``) only the text is read: each split's documents are tokenized, joined with
the end-of-text token and cut into blocks of ``max_length`` tokens (the last partial block
dropped), so the splits stay disjoint at the document level. Either way the splits, the
``limit`` subset, the on-disk cache (keyed by everything that changes it, written atomically so
concurrent workers never see half a cache) and the per-rank sharding are the same code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from orchestrator.config.schema import DataConfig
from orchestrator.data.corpora import IMAGE_CORPORA, corpus_files, read_corpus
from orchestrator.errors import DataError, Problem

SPLITS = ("train", "validation", "test")
_SUFFIX_FORMAT = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
CACHE_VERSION = 1  # bump when tokenization or splitting changes, so old caches are not reused
CAUSAL_LM = "causal_lm"  # the task of a decoder (orchestrator.models.task_of)


@dataclass
class DataBundle:
    """Model-ready splits and label names. Text splits hold ``input_ids`` and ``labels`` (batches
    add ``attention_mask``); image splits hold ``pixel_values`` and ``labels``; a causal-LM
    bundle's splits hold blocks of ``input_ids`` only (batches add ``labels``, the same ids:
    the model shifts them) and have no label names."""

    splits: dict[str, datasets.Dataset]
    label_names: list[str]
    pad_token_id: int  # 0 for images (nothing is padded)
    cache_path: Path | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    task: str = "classify"

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad a batch to its longest example (dynamic padding: short sentences run faster);
        images all have the same size and are stacked as they are, as are a language model's
        blocks (whose labels are their own ids)."""
        if self.task == CAUSAL_LM:
            ids = torch.as_tensor([r["input_ids"] for r in rows], dtype=torch.long)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        labels = torch.as_tensor([r["labels"] for r in rows], dtype=torch.long)
        if "pixel_values" in rows[0]:
            pixels = np.asarray([r["pixel_values"] for r in rows], dtype=np.float32)
            return {"pixel_values": torch.from_numpy(pixels), "labels": labels}
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _batch(self, ds: datasets.Dataset, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows ``idx`` of ``ds`` as one collated batch."""
        if "pixel_values" in ds.column_names:
            # Whole numpy columns, not row dicts of 784 Python floats each, which made reading
            # the data cost more than training the MLP.
            cols = ds.with_format("numpy")[idx]
            return {
                "pixel_values": torch.from_numpy(cols["pixel_values"]),
                "labels": torch.from_numpy(cols["labels"]).long(),
            }
        return self.collate(ds.select(idx).to_list())

    def train_batches(
        self, batch_size: int, rank: int, world_size: int, seed: int, epoch: int, skip: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's shard of one epoch: a seeded permutation, cut so every rank gets the same
        number of full batches (DDP and ZeRO need every rank to take the same number of steps).
        ``skip`` batches already consumed (a resumed run continues mid-epoch)."""
        ds = self.splits["train"]
        order = np.random.default_rng([seed, epoch]).permutation(len(ds))
        per_rank = len(ds) // world_size
        per_rank -= per_rank % batch_size
        shard = order[rank * per_rank : (rank + 1) * per_rank]
        for start in range(skip * batch_size, len(shard), batch_size):
            yield self._batch(ds, shard[start : start + batch_size])

    def batches_per_epoch(self, batch_size: int, world_size: int) -> int:
        return (len(self.splits["train"]) // world_size) // batch_size

    def token_counts(self, split: str) -> dict[int, int]:
        """How often each token id occurs in ``split`` (padding excluded: the splits hold
        unpadded ids); empty for an image corpus."""
        ds = self.splits[split]
        if "input_ids" not in ds.column_names:
            return {}
        counts = np.bincount(np.concatenate([np.asarray(r) for r in ds["input_ids"]]))
        return {int(t): int(counts[t]) for t in np.nonzero(counts)[0]}

    def eval_batches(
        self, split: str, batch_size: int, rank: int, world_size: int
    ) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        """This rank's strided shard of ``split`` as (batch, number of real rows). Every rank
        yields the same number of batches (padding with repeated rows that count 0) because a
        ZeRO-3 forward is a collective: a rank that stopped early would hang the others."""
        ds = self.splits[split]
        idx = np.arange(rank, len(ds), world_size)
        longest = -(-len(ds) // world_size)
        for b in range(-(-longest // batch_size)):
            chunk = idx[b * batch_size : (b + 1) * batch_size]
            real = len(chunk)
            if real == 0:
                chunk = np.zeros(1, dtype=np.int64)  # a stand-in row whose result is discarded
            yield self._batch(ds, chunk), real


def _read_file(path: Path, spec: DataConfig, key: str, labels: bool = True) -> datasets.Dataset:
    fmt = spec.format or _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            Problem(
                key,
                str(path),
                f"unknown file type '{path.suffix}'",
                f"use one of {sorted(_SUFFIX_FORMAT)} or set data.format",
            )
        )
    builder = {"tsv": "csv"}.get(fmt, fmt)
    kwargs = {"delimiter": "\t"} if fmt == "tsv" else {}
    try:
        # cache_dir: datasets copies a local file into its cache; keep that under ours.
        ds = datasets.load_dataset(
            builder,
            data_files=str(path),
            split="train",
            cache_dir=str(cache_root(spec) / "hf"),
            **kwargs,
        )
    except Exception as e:  # datasets raises many types for a malformed file
        raise DataError(
            Problem(
                key,
                str(path),
                f"could not be read as {fmt}: {e}",
                "check the file, or set data.format",
            )
        ) from None
    wanted = (spec.text_column, spec.label_column) if labels else (spec.text_column,)
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        col_key = "data.text_column" if spec.text_column in missing else "data.label_column"
        raise DataError(
            Problem(
                col_key,
                missing[0],
                f"no such column in {path.name}",
                f"set {col_key} to one of {ds.column_names}",
            )
        )
    return ds


def _frame(ds: datasets.Dataset, spec: DataConfig, labels: bool = True) -> pd.DataFrame:
    if not labels:  # a language model reads the text alone
        df = ds.select_columns([spec.text_column]).to_pandas()
        df.columns = ["text"]
        return df.assign(label="").dropna().reset_index(drop=True)
    df = ds.select_columns([spec.text_column, spec.label_column]).to_pandas()
    df.columns = ["text", "label"]
    return df.dropna().reset_index(drop=True)


def _split_frame(df: pd.DataFrame, spec: DataConfig) -> dict[str, pd.DataFrame]:
    """Seeded shuffle, optional subset, then disjoint test / validation / train slices."""
    order = np.random.default_rng(spec.seed).permutation(len(df))
    if spec.limit is not None:
        order = order[: spec.limit]
    n = len(order)
    n_test = int(round(n * spec.test_fraction))
    n_val = int(round(n * spec.val_fraction))
    parts = {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    return {k: df.iloc[v].reset_index(drop=True) for k, v in parts.items()}


def load_frames(spec: DataConfig, labels: bool = True) -> dict[str, pd.DataFrame]:
    """Untokenized splits as DataFrames with columns ``text`` (``pixel_values`` for an image
    corpus) and ``label`` (empty strings with ``labels=False``: a language model's files need
    no label column)."""
    if spec.name is not None:
        return _split_frame(read_corpus(spec.name), spec)
    path = Path(spec.path).expanduser()
    if path.is_file():
        return _split_frame(_frame(_read_file(path, spec, "data.path", labels), spec, labels), spec)
    if not path.is_dir():
        raise DataError(
            Problem(
                "data.path",
                spec.path,
                "no such file or folder",
                "point data.path at a .csv/.tsv/.jsonl/.parquet file or a folder of them",
            )
        )
    found = {}
    for split in SPLITS:
        files = [
            p
            for p in sorted(path.iterdir())
            if p.stem in (split, {"validation": "val"}.get(split, split))
            and p.suffix.lower() in _SUFFIX_FORMAT
        ]
        if files:
            found[split] = _frame(_read_file(files[0], spec, "data.path", labels), spec, labels)
    if "train" not in found or "test" not in found:
        raise DataError(
            Problem(
                "data.path",
                spec.path,
                "a data folder needs train.* and test.* files",
                "add train.csv and test.csv (validation.csv optional), or point at one file",
            )
        )
    rng = np.random.default_rng(spec.seed)
    if "validation" not in found:
        # Carve validation out of train, so test stays the user's own held-out set.
        train = found["train"].iloc[rng.permutation(len(found["train"]))]
        n_val = int(round(len(train) * spec.val_fraction))
        found["validation"], found["train"] = train.iloc[:n_val], train.iloc[n_val:]
    if spec.limit is not None:
        caps = {"test": spec.test_fraction, "validation": spec.val_fraction}
        for split, frame in found.items():
            cap = int(round(spec.limit * caps.get(split, 1 - sum(caps.values()))))
            found[split] = frame.iloc[rng.permutation(len(frame))[:cap]]
    return {k: v.reset_index(drop=True) for k, v in found.items()}


def _label_names(frames: dict[str, pd.DataFrame]) -> list[str]:
    values = pd.concat([f["label"] for f in frames.values()]).unique().tolist()
    integral = all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values
    )
    if integral:
        return [str(v) for v in sorted(int(v) for v in values)]
    return sorted(str(v) for v in values)


def _cache_key(spec: DataConfig, tokenizer: PreTrainedTokenizerBase | None, task: str) -> str:
    if spec.name is not None:
        sources = corpus_files(spec.name)
    else:
        p = Path(spec.path).expanduser()
        sources = sorted(p.iterdir()) if p.is_dir() else [p]
    stamps = [(str(s), s.stat().st_size, int(s.stat().st_mtime)) for s in sources if s.exists()]
    fields = spec.model_dump(exclude={"cache_dir"})
    vocab = (
        None
        if tokenizer is None
        else hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    )
    blob = json.dumps(
        [CACHE_VERSION, fields, stamps, vocab, type(tokenizer).__name__, task],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ORCHESTRATOR_CACHE", "~/.cache/orchestrator")).expanduser() / "data"


def cache_root(spec: DataConfig) -> Path:
    """The folder the job's caches live in (``data.cache_dir``, or the default)."""
    return Path(spec.cache_dir).expanduser() if spec.cache_dir else default_cache_dir()


def _check_modality(spec: DataConfig, tokenizer: PreTrainedTokenizerBase | None) -> bool:
    """True for an image corpus. Images go with a model that has no tokenizer (``mlp``) and text
    with one that has: a mismatch would only fail later, inside the model's forward."""
    image = spec.name in IMAGE_CORPORA
    if image and tokenizer is not None:
        raise DataError(
            Problem(
                "data.name",
                spec.name,
                "holds images (pixel values), but the model reads text through a tokenizer",
                "use model.name=mlp for images, or a text corpus for this model",
            )
        )
    if not image and tokenizer is None:
        key = "data.name" if spec.name is not None else "data.path"
        raise DataError(
            Problem(
                key,
                spec.name or spec.path,
                "is text, but the model reads pixel values (it has no tokenizer)",
                f"use data.name={IMAGE_CORPORA[0]} with this model, or a text model for this "
                "data (e.g. model.name=tiny-bert)",
            )
        )
    return image


def _encode_images(frame: pd.DataFrame, index: dict[str, int]) -> datasets.Dataset:
    """float32 pixels scaled to [0, 1] (the range the model is trained on) and class indices."""
    pixels = np.stack(frame["pixel_values"].to_numpy()).astype(np.float32) / 255.0
    labels = [index[str(v)] for v in frame["label"]]
    return datasets.Dataset.from_dict({"pixel_values": pixels, "labels": labels})


def _check_nonempty(frames: dict[str, pd.DataFrame], spec: DataConfig) -> None:
    for split, frame in frames.items():
        if len(frame) > 0:
            continue
        key = (
            "data.val_fraction"
            if split == "validation"
            else "data.limit"
            if spec.limit is not None
            else "data.path"
        )
        raise DataError(
            Problem(
                key,
                getattr(spec, key.split(".")[1]),
                f"the {split} split is empty",
                "use more data (raise data.limit) or a larger fraction",
            )
        )


def _pack(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, spec: DataConfig, split: str
) -> datasets.Dataset:
    """A language model's split: the documents' tokens, each document followed by the
    end-of-text token, cut into blocks of ``max_length`` (the last partial block dropped)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for row in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids += row
        if eos is not None:
            ids.append(eos)
    length = spec.max_length
    blocks = len(ids) // length
    if blocks == 0:
        key = "data.limit" if spec.limit is not None else "data.max_length"
        raise DataError(
            Problem(
                key,
                getattr(spec, key.split(".")[1]),
                f"the {split} split holds {len(ids)} tokens, less than one block of "
                f"data.max_length={length}",
                "use more text (raise data.limit or the split's fraction) or a shorter "
                "data.max_length",
            )
        )
    arr = np.asarray(ids[: blocks * length], dtype=np.int64).reshape(blocks, length)
    return datasets.Dataset.from_dict({"input_ids": arr.tolist()})


def build(
    spec: DataConfig, tokenizer: PreTrainedTokenizerBase | None, task: str = "classify"
) -> DataBundle:
    """Load, split, label-encode and tokenize ``spec``'s data (or scale its pixels: an image
    corpus takes ``tokenizer=None``; or pack its text into blocks for ``task="causal_lm"``),
    reusing the on-disk cache."""
    datasets.disable_progress_bars()
    image = _check_modality(spec, tokenizer)
    causal = task == CAUSAL_LM
    if causal and image:
        raise DataError(
            Problem(
                "data.name",
                spec.name,
                "holds images, and the model is a language model that reads text",
                "use a text corpus (e.g. data.name=bbc_news) or your own text files",
            )
        )
    cache = cache_root(spec) / _cache_key(spec, tokenizer, task)
    pad = 0 if tokenizer is None else int(tokenizer.pad_token_id)
    if (cache / "meta.json").is_file():
        meta = json.loads((cache / "meta.json").read_text())
        splits = {s: datasets.load_from_disk(str(cache / s)) for s in SPLITS}
        return DataBundle(splits, meta["label_names"], pad, cache, meta["sizes"], task)

    frames = load_frames(spec, labels=not causal)
    _check_nonempty(frames, spec)
    if causal:
        splits = {s: _pack(frames[s]["text"].tolist(), tokenizer, spec, s) for s in SPLITS}
        sizes = {s: len(d) for s, d in splits.items()}
        _write_cache(cache, splits, {"label_names": [], "sizes": sizes})
        return DataBundle(splits, [], pad, cache, sizes, task)
    names = _label_names(frames)
    if len(names) < 2:
        raise DataError(
            Problem(
                "data.label_column",
                spec.label_column,
                f"holds a single label value {names}",
                "point it at a column with 2+ classes",
            )
        )
    index = {n: i for i, n in enumerate(names)}

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out = tokenizer(batch["text"], truncation=True, max_length=spec.max_length)
        return {"input_ids": out["input_ids"], "labels": [index[str(v)] for v in batch["label"]]}

    splits = {}
    for split in SPLITS:
        if image:
            splits[split] = _encode_images(frames[split], index)
            continue
        frame = frames[split].assign(label=frames[split]["label"].map(str))
        ds = datasets.Dataset.from_pandas(frame, preserve_index=False)
        # An explicit fingerprint: deriving one would pickle the whole tokenizer per split.
        splits[split] = ds.map(
            encode,
            batched=True,
            remove_columns=ds.column_names,
            new_fingerprint=f"{cache.name}-{split}",
        )
    sizes = {s: len(d) for s, d in splits.items()}
    _write_cache(cache, splits, {"label_names": names, "sizes": sizes})
    return DataBundle(splits, names, pad, cache, sizes)


def _write_cache(cache: Path, splits: dict[str, datasets.Dataset], meta: dict) -> None:
    """Write to a temporary sibling then rename: a reader sees a whole cache or none."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp", dir=cache.parent))
    try:
        for split, ds in splits.items():
            ds.save_to_disk(str(tmp / split))
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.rename(tmp, cache)
    except OSError:
        # Another worker won the race and its cache is complete: keep that one.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cache / "meta.json").is_file():
            raise

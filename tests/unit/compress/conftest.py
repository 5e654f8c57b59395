"""Shared fixtures for the compression tests: the packaged tokenizer, real MR calibration
batches, tiny from-config models and the real MiniLM cut to 2 layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator import data, models
from orchestrator.config.schema import DataConfig, ModelConfig


@pytest.fixture(scope="session")
def tokenizer():
    return models.build_tokenizer(ModelConfig(name="minilm-l6"))


@pytest.fixture(scope="session")
def bundle(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> data.DataBundle:
    cache: Path = tmp_path_factory.mktemp("data-cache")
    return data.build(
        DataConfig(name="mr", limit=300, max_length=32, cache_dir=str(cache)), tokenizer
    )


@pytest.fixture(scope="session")
def calib(bundle) -> list[dict[str, torch.Tensor]]:
    train = bundle.splits["train"]
    return [bundle.collate(train.select(range(i * 16, i * 16 + 16)).to_list()) for i in range(4)]


@pytest.fixture
def tiny_bert(tokenizer):
    return models.build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=0)


@pytest.fixture
def minilm2(tokenizer):
    return models.build_model(ModelConfig(name="minilm-l6", num_layers=2), 2, tokenizer, seed=0)


def hidden(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder's last hidden state (the classifier head is random in these tests)."""
    model.eval()
    with torch.no_grad():
        return model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state


def relative_error(tokenizer, calib, compress) -> float:
    """||h - h_dense|| / ||h_dense|| of the MiniLM cut to 2 layers after ``compress(model)``,
    on a calibration batch: how far a compression moves the encoder's output."""
    dense = models.build_model(ModelConfig(name="minilm-l6", num_layers=2), 2, tokenizer)
    model = models.build_model(ModelConfig(name="minilm-l6", num_layers=2), 2, tokenizer)
    compress(model)
    ref, out = hidden(dense, calib[-1]), hidden(model, calib[-1])
    return ((out - ref).norm() / ref.norm()).item()


# --- compressed artifacts as `orchestrator compress` writes them (the export tests) ------------

COMPRESS_JOB = str(Path(__file__).resolve().parents[3] / "jobs/debug/compress.yaml")


def compressed_artifact(tmp_path: Path, *overrides: str) -> Path:
    """``orchestrator compress jobs/debug/compress.yaml`` (tiny BERT, structured pruning, SVD,
    int8) with ``overrides``; returns the artifact folder."""
    from orchestrator.cli import main

    args = ["compress", COMPRESS_JOB, f"output.dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"]
    assert main([*args, *overrides]) == 0
    return tmp_path / "debug-compress" / "model"


def token_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    """Up to 3 batches of 8 random token rows, 7, 19 and 32 tokens wide, some rows padded."""
    g = torch.Generator().manual_seed(0)
    out = []
    for width in (7, 19, 32)[:n]:
        ids = torch.randint(5, 1000, (8, width), generator=g)
        mask = torch.ones_like(ids)
        mask[:3, width // 2 :] = 0  # padded rows
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(8).long()})
    return out


@pytest.fixture
def make_artifact():
    return compressed_artifact


@pytest.fixture
def batches():
    return token_batches

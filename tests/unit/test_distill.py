"""Knowledge distillation's loss: with alpha 0 it is the task loss; a student identical to its
teacher has no distillation or hidden-state loss to pay; a different one does, and its
gradients reach the student only (the teacher stays frozen). A bf16 teacher gives nearly the
fp32 teacher's loss, and says when its CPU only emulates bf16. Bad distillation jobs name
train.distill."""

from __future__ import annotations

import copy

import pytest
import torch

from orchestrator import distill
from orchestrator.config import validate_job
from orchestrator.config.schema import DistillConfig, ModelConfig
from orchestrator.distill import Distiller, emulated_bf16_note, prepare_teacher
from orchestrator.errors import ConfigError
from orchestrator.models import build_model, build_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelConfig(name="tiny-bert"))


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}


def test_alpha_zero_is_the_task_loss(tokenizer) -> None:
    teacher = build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=1)
    student = build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=2).eval()
    batch = _batch()
    out = student(**batch)
    loss = Distiller(teacher, DistillConfig(alpha=0.0)).loss(out, batch)
    assert torch.allclose(loss, out.loss)


def test_a_student_equal_to_its_teacher_pays_nothing_extra(tokenizer) -> None:
    teacher = build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=1)
    student = copy.deepcopy(teacher).eval()
    batch = _batch()
    out = student(**batch, output_hidden_states=True)
    d = Distiller(teacher, DistillConfig(alpha=1.0, hidden=5.0))
    assert d.loss(out, batch).abs().item() < 1e-5


def test_gradients_reach_the_student_only(tokenizer) -> None:
    teacher = build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=1)
    student = build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=2).train()
    batch = _batch()
    d = Distiller(teacher, DistillConfig(alpha=0.5, temperature=3.0, hidden=1.0))
    loss = d.loss(student(**batch, output_hidden_states=True), batch)
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert student.classifier.weight.grad.abs().sum() > 0
    # The hidden-state term reaches the encoder's first block.
    block = student.bert.encoder.layer[0].output.dense.weight
    assert block.grad is not None and block.grad.abs().sum() > 0


def test_a_bf16_teacher_gives_nearly_the_fp32_teachers_loss(tokenizer) -> None:
    teacher = build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=1)
    student = build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=2).eval()
    batch = _batch()
    out = student(**batch, output_hidden_states=True)
    cfg = DistillConfig(alpha=0.5, temperature=2.0, hidden=1.0)
    fp32 = Distiller(copy.deepcopy(teacher), cfg).loss(out, batch)
    half = prepare_teacher(teacher, "bf16", torch.device("cpu"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    # Integer buffers (BERT's position and token type ids) keep their type.
    assert {b.dtype for b in half.buffers()} <= {torch.int64, torch.bfloat16}
    bf16 = Distiller(half, cfg).loss(out, batch)
    assert bf16.dtype == torch.float32
    assert bf16.item() == pytest.approx(fp32.item(), rel=0.02)
    assert bf16.item() != fp32.item()  # the teacher really ran in bf16


def test_an_emulated_bf16_teacher_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(distill, "native_bf16", lambda device: False)
    note = emulated_bf16_note("bf16", cpu)
    assert note is not None and "teacher_precision=fp32" in note and "cpu" in note
    assert emulated_bf16_note("fp32", cpu) is None
    monkeypatch.setattr(distill, "native_bf16", lambda device: True)
    assert emulated_bf16_note("bf16", cpu) is None


def test_an_unknown_teacher_precision_is_refused() -> None:
    job = {
        "name": "x",
        "model": {"path": "/nonexistent"},
        "data": {"name": "mr"},
        "train": {"distill": {"teacher_precision": "int4"}},
        "compress": {"prune": {"method": "structured"}},
    }
    with pytest.raises(ConfigError) as e:
        validate_job(job)
    assert [p.key for p in e.value.problems] == ["train.distill.teacher_precision"]
    assert "bf16" in str(e.value)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({}, "compresses nothing"),
        ({"compress": {"prune": {"method": "structured"}}}, "no fine-tuned model to distil"),
    ],
)
def test_distillation_without_a_teacher_is_refused(changes: dict, words: str) -> None:
    job = {
        "name": "x",
        "model": {"name": "minilm-l6"},
        "data": {"name": "mr"},
        "train": {"distill": {"alpha": 0.5}},
        **changes,
    }
    with pytest.raises(ConfigError) as e:
        validate_job(job)
    assert [p.key for p in e.value.problems] == ["train.distill"]
    assert words in str(e.value)

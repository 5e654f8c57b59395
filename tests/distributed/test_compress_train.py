"""Compression inside distributed recovery training (2 gloo processes, no Ray): pruning masks
survive optimizer steps on DDP and DeepSpeed ZeRO-2 (bf16, where the fp32 master copy must be
masked too), the gradual schedule reaches its target, and the final artifact reloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.testing import run_job_worker, run_workers

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    "train",
    [
        {"strategy": "ddp"},
        {"strategy": "deepspeed", "zero_stage": 0, "precision": "bf16"},
        {"strategy": "deepspeed", "zero_stage": 1, "precision": "bf16"},
        {"strategy": "deepspeed", "zero_stage": 2, "precision": "bf16"},
    ],
    ids=["ddp", "zero0-bf16", "zero1-bf16", "zero2-bf16"],
)
def test_masks_survive_recovery_training(tmp_path: Path, train: dict) -> None:
    job = {
        "name": "recover",
        "model": {"name": "tiny-bert"},
        "data": {
            "name": "mr",
            "limit": 300,
            "max_length": 32,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {
            "num_workers": 2,
            "batch_size": 8,
            "max_steps": 10,
            "lr": 1e-2,
            "log_every": 5,
            **train,
        },
        "compress": {
            "prune": {
                "method": "magnitude",
                "sparsity": 0.5,
                "schedule": "gradual",
                "initial_sparsity": 0.2,
                "end_step": 6,
                "update_every": 2,
            },
            "calib_batches": 2,
        },
        "output": {"dir": str(tmp_path / "runs")},
    }
    store = tmp_path / "final"
    m0, m1 = run_workers(run_job_worker, 2, job, str(store))
    assert m0 == m1  # rank 0 measured, then broadcast: every rank reports the same
    # Measured on the trained weights, after 10 AdamW steps at a high learning rate.
    assert m0["compress/sparsity"] == pytest.approx(0.5, abs=0.005)
    assert m0["compress/size_bytes"] < m0["compress/dense_size_bytes"]
    report = json.loads((store / "compress_report.json").read_text())
    assert report["metrics"]["compress/sparsity"] == pytest.approx(0.5, abs=0.005)

    from orchestrator.compress.artifact import load_artifact

    model = load_artifact(store / "model")
    linears = [
        m.weight
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "classifier" not in n and "pooler" not in n
    ]
    zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    assert zeros == pytest.approx(0.5, abs=0.005)


@pytest.mark.parametrize(
    ("train", "teacher_precision"),
    [
        ({"strategy": "ddp"}, "bf16"),
        ({"strategy": "deepspeed", "zero_stage": 3, "precision": "bf16"}, "fp32"),
    ],
    ids=["ddp-bf16-teacher", "zero3-bf16"],
)
def test_distillation_from_the_dense_teacher(
    tmp_path: Path, train: dict, teacher_precision: str
) -> None:
    """A trimmed, shallower, structurally pruned student recovers with the dense model (a saved,
    trained one) as a frozen teacher on every worker: soft targets and block outputs matched to
    the blocks it kept; DDP in fp32 with the teacher's weights in bf16, and ZeRO-3 bf16 with an
    fp32 teacher under autocast."""
    from orchestrator import models
    from orchestrator.config.schema import ModelConfig

    tokenizer = models.build_tokenizer(ModelConfig(name="tiny-bert"))
    teacher = models.build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=3)
    teacher.save_pretrained(str(tmp_path / "teacher"))
    tokenizer.save_pretrained(str(tmp_path / "teacher"))
    job = {
        "name": "distil",
        "model": {"path": str(tmp_path / "teacher")},
        "data": {"name": "mr", "limit": 300, "max_length": 32, "cache_dir": str(tmp_path / "c")},
        "train": {
            "num_workers": 2,
            "batch_size": 8,
            "max_steps": 6,
            "lr": 1e-3,
            "log_every": 3,
            "distill": {
                "alpha": 0.7,
                "temperature": 2.0,
                "hidden": 1.0,
                "teacher_precision": teacher_precision,
            },
            **train,
        },
        # Every stage that changes the structure: the trimmed table's integer id map is a buffer
        # DDP broadcasts and ZeRO-3 leaves whole.
        "compress": {
            "vocab": {"method": "trim"},
            "depth": {"method": "named", "remove": [0]},
            "prune": {"method": "structured", "sparsity": 0.5},
            "calib_batches": 2,
        },
        "output": {"dir": str(tmp_path / "runs")},
    }
    m0, m1 = run_workers(run_job_worker, 2, job, str(tmp_path / "final"))
    assert m0 == m1
    assert m0["train/loss"] > 0 and m0["eval/accuracy"] > 0
    assert -1 <= m0["eval/accuracy_drop"] <= 1


def allocation_worker(rank: int, world: int, job: dict) -> dict:
    """Compress with a per-layer allocation as a training worker does (the first worker's
    choice on all, the profile's layers split among the workers); rank 0 then profiles a fresh
    copy of the model alone, to compare."""
    import torch.distributed as dist

    from orchestrator import data, finalize, loop, models
    from orchestrator.compress.qtensor import fake_quantize
    from orchestrator.compress.sensitivity import profile
    from orchestrator.compress.technique import Workers
    from orchestrator.compress.techniques.quantize import linear_spec, quantizable
    from orchestrator.config import validate_job

    spec = validate_job(job)
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data.build(spec.data, tokenizer)
    calib = finalize.calibration_batches(spec, bundle)
    _, report = finalize.build_compressed(
        spec,
        bundle,
        tokenizer,
        calib,
        agree=lambda v: loop._broadcast(v, rank == 0),
        workers=Workers(rank, world, loop._gather),
    )
    entry = next(s.entry for s in report.steps if s.config.stage == "quantize")["allocation"]
    alone = None
    if rank == 0:
        cfg = spec.compress.quantize
        model = models.build_model(spec.model, bundle.num_labels, tokenizer, seed=spec.train.seed)
        chosen = entry["choice"]
        layers = [(n, m) for n, m, why in quantizable(model, cfg) if not why and n in chosen]

        def variants(_name, layer):
            return lambda b: fake_quantize(layer.weight.data, *linear_spec(cfg, int(b)).as_args())

        alone = profile(model, layers, "bits", sorted(cfg.allocate.bits), variants, calib[:2]).kl
    dist.barrier()
    return {"choice": entry["choice"], "profile": entry["profile"], "alone": alone}


def test_workers_split_the_profile_and_apply_one_allocation(tmp_path: Path) -> None:
    job = {
        "name": "allocate",
        # Real pretrained weights: an untrained model's outputs barely move at any width.
        "model": {"name": "minilm-l6"},
        "data": {"name": "mr", "limit": 300, "max_length": 32, "cache_dir": str(tmp_path)},
        "compress": {
            "quantize": {
                "method": "weight_only",
                "granularity": "group",
                "group_size": 32,
                "include": ["*layer.[01].*"],  # 12 Linears: the profile twice stays short
                "allocate": {"avg_bits": 3.0, "calib_batches": 2},
            },
            "calib_batches": 2,
        },
    }
    r0, r1 = run_workers(allocation_worker, 2, job)
    assert r0["choice"] == r1["choice"] and len(r0["choice"]) == 12
    # Each worker measured half the layers; both hold the whole profile, the one a single
    # process measures.
    assert r0["profile"]["workers"] == r1["profile"]["workers"] == 2
    assert r0["profile"]["kl"] == r1["profile"]["kl"]
    split = [kl for row in r0["profile"]["kl"] for kl in row]
    assert split == pytest.approx([kl for row in r0["alone"] for kl in row], rel=1e-3, abs=1e-10)


def node_cache_worker(rank: int, world: int, folder: str) -> dict:
    """A profile on workers whose nodes keep separate caches: the first worker's node measured
    it before (alone), the second's never did. Then the same profile once more, when both
    nodes hold it."""
    import torch.distributed as dist

    from orchestrator import loop
    from orchestrator.compress.qtensor import fake_quantize
    from orchestrator.compress.sensitivity import profile
    from orchestrator.compress.technique import Workers
    from orchestrator.testing import tiny_classifier

    model = tiny_classifier(vocab_size=100).eval()  # seeded: the same on both workers
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:4]
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 100, (4, 12))} for _ in range(2)]
    cache = Path(folder) / f"node{rank}"  # each worker's node has its own cache folder

    def measure(workers: Workers | None):
        return profile(
            model,
            layers,
            "bits",
            [2, 3, 8],
            lambda _n, layer: lambda b: fake_quantize(layer.weight.data, int(b), "channel", 1),
            batches,
            cache_dir=cache,
            workers=workers,
        )

    alone = measure(None).kl if rank == 0 else None
    dist.barrier()
    shared = Workers(rank, world, loop._gather)
    first, again = measure(shared), measure(shared)
    return {"alone": alone, "first": first.to_json(), "again": again.to_json()}


def test_a_profile_cached_on_one_node_only_is_measured_by_all(tmp_path: Path) -> None:
    """A worker must not read its node's cached profile while another waits for its share:
    all measure (split) unless every worker has it, and from then on all read it back."""
    r0, r1 = run_workers(node_cache_worker, 2, str(tmp_path))
    for r in (r0, r1):
        assert not r["first"]["cached"] and r["first"]["workers"] == 2
        assert r["again"]["cached"] and r["again"]["kl"] == r["first"]["kl"]
    assert r0["first"]["kl"] == r1["first"]["kl"]
    split = [kl for row in r0["first"]["kl"] for kl in row]
    assert split == pytest.approx([kl for row in r0["alone"] for kl in row], rel=1e-3, abs=1e-10)

"""The worker loop on 2 gloo processes (no Ray): metrics agree on every rank, bf16 tracks fp32,
a run restored from a checkpoint continues from that step instead of step 0, and one restored
from its final checkpoint reports it again without training."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.testing import run_workers

pytestmark = pytest.mark.distributed


def _job(tmp: Path, **train) -> dict:
    return {
        "name": "dist",
        "model": {"name": "tiny-bert"},
        "data": {"name": "mr", "limit": 300, "max_length": 32, "cache_dir": str(tmp / "cache")},
        "train": {
            "num_workers": 2,
            "batch_size": 8,
            "max_steps": 8,
            "lr": 1e-3,
            "log_every": 2,
            "warmup_ratio": 0.0,
            **train,
        },
        "output": {"dir": str(tmp / "runs")},
    }


def loop_worker(rank: int, world: int, job: dict, store: str, restore: str | None) -> dict:
    """Run the loop; copy each reported checkpoint into ``store/step-N`` the way Ray merges the
    ranks' folders into one checkpoint, and record what was reported."""
    from orchestrator import loop
    from orchestrator.config import validate_job

    reports = []

    def report(metrics: dict, folder: Path | None) -> None:
        step = int(metrics["train/step"])
        reports.append(metrics)
        if folder is not None:
            shutil.copytree(folder, Path(store) / f"step-{step}", dirs_exist_ok=True)

    ctx = loop.WorkerContext(
        rank=rank,
        world_size=world,
        report=report,
        restore_dir=Path(restore) if restore else None,
    )
    final = loop.run(validate_job(job), ctx)
    return {"final": final, "steps": [int(m["train/step"]) for m in reports], "reports": reports}


@pytest.mark.parametrize(
    "train",
    [{"strategy": "ddp"}, {"strategy": "deepspeed", "zero_stage": 3, "precision": "bf16"}],
    ids=["ddp", "zero3-bf16"],
)
def test_metrics_identical_on_every_rank_and_resume(tmp_path: Path, train: dict) -> None:
    job = _job(tmp_path, checkpoint_every=4, eval_every=4, **train)
    store = tmp_path / "ckpts"
    r0, r1 = run_workers(loop_worker, 2, job, str(store), None)
    assert r0["final"] == r1["final"]  # all-reduced before reporting: bit-identical
    for key in ("eval/accuracy", "test/accuracy", "train/loss"):
        assert key in r0["final"]
    assert r0["reports"] == r1["reports"]
    assert (store / "step-4").is_dir() and (store / "step-8" / "model" / "config.json").is_file()
    # The final checkpoint holds the model and the final metrics, not the training state
    # (weights, optimizer moments, ZeRO shards) that the step-4 one holds.
    final_files = {p.name for p in (store / "step-8").iterdir()}
    assert "final.json" in final_files
    assert len(final_files - {"model", "final.json", "job.yaml"}) == 0, final_files
    assert len({p.name for p in (store / "step-4").iterdir()} - {"job.yaml"}) > 0

    # Restart from the step-4 checkpoint: the first report is after step 4, never step 1..4.
    resumed, _ = run_workers(loop_worker, 2, job, str(tmp_path / "ckpts2"), str(store / "step-4"))
    assert resumed["steps"][0] > 4
    assert resumed["final"]["train/step"] == 8
    assert resumed["final"]["test/accuracy"] == pytest.approx(
        r0["final"]["test/accuracy"], abs=0.05
    )

    # Restored from the final checkpoint (the same job started again after it finished): no
    # training, the same metrics and model reported again.
    again = tmp_path / "ckpts3"
    done, other = run_workers(loop_worker, 2, job, str(again), str(store / "step-8"))
    assert done["steps"] == other["steps"] == [8]
    assert done["final"] == other["final"] == r0["final"]
    same = {p.name: p.read_bytes() for p in (store / "step-8" / "model").iterdir()}
    assert {p.name: p.read_bytes() for p in (again / "step-8" / "model").iterdir()} == same


def test_bf16_loss_tracks_fp32(tmp_path: Path) -> None:
    losses = {}
    for precision in ("fp32", "bf16"):
        job = _job(tmp_path, strategy="ddp", precision=precision, max_steps=6, log_every=1)
        r0, _ = run_workers(loop_worker, 2, job, str(tmp_path / precision), None)
        losses[precision] = [m["train/loss"] for m in r0["reports"] if "train/loss" in m]
    assert len(losses["fp32"]) == len(losses["bf16"]) >= 6
    for a, b in zip(losses["fp32"], losses["bf16"], strict=True):
        assert abs(a - b) < 0.02 * abs(a) + 0.01, (losses["fp32"], losses["bf16"])


def test_every_report_carries_its_own_step(tmp_path: Path) -> None:
    """Logging, evaluation and checkpoint steps that do not coincide: each report holds the
    training figures of the step it was sent at, and the examples counted in every window add
    up (ASHA reads train/step as its clock)."""
    job = _job(tmp_path, max_steps=10, log_every=4, eval_every=3, checkpoint_every=5)
    r0, r1 = run_workers(loop_worker, 2, job, str(tmp_path / "ckpts"), None)
    assert r0["steps"] == [1, 3, 4, 5, 6, 8, 9, 10]
    assert r0["reports"] == r1["reports"]
    per_step = 8 * 2  # batch_size x workers
    for m in r0["reports"]:
        step = int(m["train/step"])
        assert m["train/samples_seen"] == step * per_step, m
        assert ("eval/accuracy" in m) == (step % 3 == 0 or step == 10), m
    assert [bool(m.get("final_report")) for m in r0["reports"]] == [False] * 7 + [True]


def test_dense_run_is_scored_on_the_saved_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final accuracy and loss of a run without compression are those of the fp32 model it
    saved, not of the live bf16-autocast one; its answers are cached under the key a search
    that takes this model as its baseline looks them up by, so it does not evaluate it again."""
    import torch

    from orchestrator import data, finalize, models
    from orchestrator.config import validate_job
    from orchestrator.config.schema import DataConfig, ModelConfig

    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "node-cache"))  # the workers' too
    job = _job(tmp_path, strategy="ddp", precision="bf16", max_steps=6)
    store = tmp_path / "ckpts"
    r0, _ = run_workers(loop_worker, 2, job, str(store), None)
    saved = models.load_saved(store / "step-6" / "model")
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    bundle = data.build(
        DataConfig(**job["data"]), models.build_tokenizer(ModelConfig(**job["model"]))
    )
    for split, key in (("validation", "eval"), ("test", "test")):
        expected = finalize.evaluate_plain(saved, bundle, split)
        assert r0["final"][f"{key}/loss"] == expected[f"{key}/loss"]
        assert r0["final"][f"{key}/accuracy"] == expected[f"{key}/accuracy"]

    def evaluated_again(*args: object) -> None:
        raise AssertionError("the saved dense model was evaluated a second time")

    monkeypatch.setattr(finalize, "evaluate_answers", evaluated_again)
    key = finalize.saved_model_spec(validate_job(job), str(store / "step-6" / "model"))
    cached, answers = finalize.dense_answers(key, saved, bundle)
    assert {k: cached[k] for k in ("eval/accuracy", "test/loss")} == {
        k: r0["final"][k] for k in ("eval/accuracy", "test/loss")
    }
    assert [len(answers[s]) for s in ("validation", "test")] == [
        bundle.sizes["validation"],
        bundle.sizes["test"],
    ]

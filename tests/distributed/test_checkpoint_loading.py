"""DeepSpeed resume never runs a pickle: on 2 gloo processes, ZeRO-2 and ZeRO-3 in bf16, every
file DeepSpeed reads back goes through ``torch.load(weights_only=True)`` with only DeepSpeed's
own few classes allowed; a resumed engine continues exactly where the saved one was (same next
step: weights, Adam moments and step counters restored); a truncated, missing or malicious
shard is a ``CorruptFileError`` naming the file on every rank, and the malicious one never runs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.testing import (
    deepspeed_bf16,
    random_token_batches,
    run_workers,
    tiny_classifier,
    train_steps,
)

pytestmark = pytest.mark.distributed


class _Payload:
    """Unpickling this would create ``marker`` (the harmless stand-in for an attacker's code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _damage(folder: Path, case: str) -> list[str]:
    """Damage ``folder`` (a copy of a good checkpoint) the way ``case`` says; returns the names
    of the files damaged."""
    state = folder / "state"
    shards = sorted(state.glob("*optim_states.pt"))
    models = sorted(state.glob("*model_states.pt"))
    if case == "no-checkpoint":
        shutil.rmtree(state)
        return ["state"]
    if case == "no-model-states":
        for path in models:
            path.unlink()
        return [p.name for p in models]
    targets = models if case == "truncated-model-states" else shards
    for path in targets:
        if case in ("truncated-shard", "truncated-model-states"):
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif case == "missing-shard":
            path.unlink()
        elif case == "malicious-shard":
            marker = str(folder / f"PWNED-{path.name}")
            torch.save({"optimizer_state_dict": _Payload(marker), "ds_version": "0.19.8"}, path)
    return [p.name for p in targets]


CASES = ("truncated-shard", "truncated-model-states", "missing-shard", "malicious-shard")


def resume_worker(rank: int, world: int, root: str) -> dict[int, dict]:
    # Both stages in one pair of processes: their start-up (imports, DeepSpeed's first
    # initialize loading its comm op) costs more than the checks themselves.
    return {stage: _resume(rank, world, Path(root) / f"zero{stage}", stage) for stage in (2, 3)}


def _resume(rank: int, world: int, root_p: Path, stage: int) -> dict:
    import torch.distributed as dist

    from orchestrator import strategies
    from orchestrator.errors import CorruptFileError

    spec = deepspeed_bf16(stage, world, lr=1e-2)
    batches = random_token_batches(100 + rank)

    def build():
        st = strategies.build(spec, torch.device("cpu"))
        st.prepare(tiny_classifier(200), total_steps=10)
        return st

    good = root_p / "good"
    saved = build()
    train_steps(saved, batches[:2])
    saved.save_checkpoint(good, {"step": 2, "epoch": 0, "samples_seen": 16})
    dist.barrier()
    train_steps(saved, batches[2:])  # the step a resumed run must reproduce
    want = saved.full_state_dict()

    resumed = build()
    calls: list = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    errors: dict[str, tuple[str, str]] = {}
    damaged: dict[str, list[str]] = {}
    torch.load = spy
    try:
        for case in (*CASES, "no-model-states", "no-checkpoint"):
            folder = root_p / case
            if rank == 0:
                shutil.copytree(good, folder)
                damaged[case] = _damage(folder, case)
            dist.barrier()
            try:
                resumed.load_checkpoint(folder)
                errors[case] = ("", "loaded")
            except CorruptFileError as e:
                errors[case] = (e.path.name, str(e))
            dist.barrier()
        client = resumed.load_checkpoint(good)
    finally:
        torch.load = real_load
    train_steps(resumed, batches[2:])
    got = resumed.full_state_dict()
    return {
        "client": client,
        "global_steps": (saved.engine.global_steps, resumed.engine.global_steps),
        "max_diff": max((want[k].float() - got[k].float()).abs().max().item() for k in want),
        "weights_only": calls,
        "errors": errors,
        "damaged": damaged,
        "pwned": sorted(p.name for p in root_p.rglob("PWNED*")),
    }


def test_deepspeed_resume_loads_weights_only(tmp_path: Path) -> None:
    by_rank = run_workers(resume_worker, 2, str(tmp_path), timeout=300)
    for stage in (2, 3):
        damaged = by_rank[0][stage]["damaged"]
        assert all(damaged[c] for c in CASES), damaged  # each case really damaged files
        for rank, r in enumerate(res[stage] for res in by_rank):
            where = f"ZeRO-{stage} rank {rank}"
            # Every file DeepSpeed read went through the weights-only unpickler.
            assert r["weights_only"] and set(r["weights_only"]) == {True}, (where, r)
            # Resumed exactly: the same next step from the same weights, moments and counters.
            assert r["client"] == {"step": 2, "epoch": 0, "samples_seen": 16}, where
            assert r["global_steps"] == (3, 3), where
            assert r["max_diff"] == 0.0, f"{where}: resumed step differs by {r['max_diff']}"
            assert r["pwned"] == [], where  # the malicious shard never ran
            errors = r["errors"]
            for case in CASES:
                name, text = errors[case]
                assert name in damaged[case], (where, case, name, text)
                assert f"/{case}/state/{name}" in text and "train/ folder" in text, text
                assert "weights_only=False" not in text
            assert "is truncated or corrupt" in errors["truncated-shard"][1]
            assert "is truncated or corrupt" in errors["truncated-model-states"][1]
            assert "is missing" in errors["missing-shard"][1]
            text = errors["malicious-shard"][1]
            assert "never writes (posix.system)" in text and "refused without running" in text
            assert errors["no-checkpoint"][0] == "state"
            assert "is missing" in errors["no-checkpoint"][1]
            assert errors["no-model-states"][0] == "state"
            assert "holds no DeepSpeed model states file" in errors["no-model-states"][1]


def test_safe_engine_refuses_what_deepspeeds_own_engine_would_run(tmp_path: Path) -> None:
    """One process, no training: the checkpoint engine swapped into every DeepSpeed engine
    refuses a malicious file that DeepSpeed's stock engine would execute, and still loads the
    DeepSpeed classes its shards really hold."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from orchestrator.errors import CorruptFileError
    from orchestrator.strategies.deepspeed import _safe_checkpoint_engine

    safe = _safe_checkpoint_engine(None)
    shard = tmp_path / "shard.pt"
    state = {
        "loss_scaler": LossScaler(1.0),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
        "exp_avg": torch.randn(4),
    }
    safe.save(state, str(shard))
    assert [p.name for p in tmp_path.iterdir()] == ["shard.pt"]  # written via a temporary
    loaded = safe.load(str(shard), map_location="cpu")
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["loss_scaler"].cur_scale == 1.0
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)

    evil, marker = tmp_path / "evil.pt", tmp_path / "PWNED"
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, evil)
    with pytest.raises(CorruptFileError, match=r"never writes \(posix.system\)"):
        safe.load(str(evil), map_location="cpu")
    assert not marker.exists()
    TorchCheckpointEngine(None).load(str(evil), map_location="cpu")  # the stock engine runs it
    assert marker.exists()

"""Loading what a run wrote never runs a pickle, and a damaged file is one clear error.

- a crafted ``torch.save`` file whose pickle calls ``os.system`` (harmless: it would create a
  marker file) is refused, and the marker is never created; the same file loaded the unsafe way
  does create it, so the payload is live;
- a truncated, emptied or garbled checkpoint file (``trainer_state.pt``, ``model.safetensors``,
  ``client_state.json``), artifact file (``model.safetensors``, ``manifest.json``,
  ``config.json``) or model folder is a ``CorruptFileError`` / ``ConfigError`` that names the file
  and says what to do, not a pickle or safetensors traceback;
- DDP checkpoints round-trip (weights, optimizer moments, schedule, counters).
DeepSpeed's shards are covered in tests/distributed/test_checkpoint_loading.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.errors import ConfigError, CorruptFileError
from orchestrator.safeload import CHECKPOINT_FIX, load_json, load_safetensors, load_torch

pytestmark = pytest.mark.unit


class _Payload:
    """Unpickling this runs ``touch MARKER``: what an attacker's checkpoint would do, made
    harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def write_malicious(path: Path, marker: Path) -> None:
    """A real ``torch.save`` zip file that looks like a trainer state."""
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "x": _Payload(marker)}, path)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _assert_clear(e: CorruptFileError, path: Path, problem: str) -> None:
    text = str(e)
    assert str(path) in text and problem in text, text
    assert "weights_only=False" not in text and "Traceback" not in text
    assert e.path == path
    assert e.__context__ is None or e.__suppress_context__  # no chained pickle traceback


def test_a_malicious_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    evil, marker = tmp_path / "trainer_state.pt", tmp_path / "PWNED"
    write_malicious(evil, marker)
    # The payload is live: the unsafe load runs it.
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CorruptFileError) as e:
        load_torch(evil, what="checkpoint file", fix=CHECKPOINT_FIX)
    assert not marker.exists()
    _assert_clear(e.value, evil, "holds pickled objects this tool never writes (posix.system)")
    assert "refused without running anything" in str(e.value)
    assert "tampered" in e.value.fix and "train/" in e.value.fix

    # An allow-list for other classes does not let it through either.
    with pytest.raises(CorruptFileError, match="posix.system"):
        load_torch(evil, what="checkpoint file", fix="x", allow=[torch.nn.Linear])
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    ["half", "last-bytes", "empty", "garbage", "missing"],
)
def test_a_damaged_torch_file_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "trainer_state.pt"
    state = {"step": torch.tensor(3), "exp_avg": torch.randn(64, 64), "lr": [1e-3]}
    torch.save(state, path)
    loaded = load_torch(path, what="checkpoint file", fix=CHECKPOINT_FIX)
    assert torch.equal(loaded["exp_avg"], state["exp_avg"]) and loaded["lr"] == [1e-3]

    if damage == "half":
        truncate(path)
    elif damage == "last-bytes":
        path.write_bytes(path.read_bytes()[:-8])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    else:
        path.unlink()
    with pytest.raises(CorruptFileError) as e:
        load_torch(path, what="checkpoint file", fix=CHECKPOINT_FIX)
    _assert_clear(e.value, path, "is missing" if damage == "missing" else "is truncated or corrupt")
    assert str(e.value).startswith(f"checkpoint file {path} ")
    assert str(e.value).endswith(CHECKPOINT_FIX)


def test_damaged_safetensors_and_json(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(128, 128)}, str(weights))
    assert load_safetensors(weights, what="weights file", fix="f")["w"].shape == (128, 128)
    truncate(weights)
    with pytest.raises(CorruptFileError) as e:
        load_safetensors(weights, what="weights file", fix="f")
    _assert_clear(e.value, weights, "is truncated or corrupt")
    assert "incomplete metadata" in str(e.value)

    # A pickle renamed to .safetensors is not a safetensors file: refused, never unpickled.
    marker = tmp_path / "PWNED"
    write_malicious(weights, marker)
    with pytest.raises(CorruptFileError, match="is truncated or corrupt"):
        load_safetensors(weights, what="weights file", fix="f")
    assert not marker.exists()

    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format": "x", "tensors": {"a": 1}})[:-5])
    with pytest.raises(CorruptFileError) as e:
        load_json(manifest, what="the artifact's manifest", fix="f")
    _assert_clear(e.value, manifest, "is truncated or corrupt")
    manifest.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CorruptFileError, match="UnicodeDecodeError"):
        load_json(manifest, what="the artifact's manifest", fix="f")


# ---------------------------------------------------------------- DDP checkpoints


def _ddp(tiny_model_factory, steps: int):
    from orchestrator.config.schema import TrainConfig
    from orchestrator.strategies import DDPStrategy

    spec = TrainConfig(strategy="ddp", batch_size=4, lr=1e-2, warmup_ratio=0.0)
    strategy = DDPStrategy(spec, torch.device("cpu"))
    strategy.prepare(tiny_model_factory(), total_steps=10)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(1, 100, (4, 8), generator=g)
        labels = torch.randint(0, 2, (4,), generator=g)
        strategy.backward(strategy.model(input_ids=ids, labels=labels).loss)
        strategy.step()
    return strategy


@pytest.fixture(scope="module")
def tiny_model_factory():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )

    def build():
        torch.manual_seed(0)
        return BertForSequenceClassification(config)

    return build


def test_ddp_checkpoint_round_trip_and_damage(tmp_path: Path, tiny_model_factory) -> None:
    trained = _ddp(tiny_model_factory, steps=3)
    good = tmp_path / "good"
    trained.save_checkpoint(good, {"step": 3, "epoch": 0})
    assert sorted(p.name for p in good.iterdir()) == [
        "client_state.json",
        "model.safetensors",
        "trainer_state.pt",
    ]  # no temporaries left

    restored = _ddp(tiny_model_factory, steps=0)
    assert restored.load_checkpoint(good) == {"step": 3, "epoch": 0}
    want, got = trained.module.state_dict(), restored.module.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    moments = [s["exp_avg"] for s in trained.optimizer.state.values()]
    assert all(
        torch.equal(a, s["exp_avg"])
        for a, s in zip(moments, restored.optimizer.state.values(), strict=True)
    )
    assert restored.scheduler.last_epoch == trained.scheduler.last_epoch == 3

    def damaged(name: str, how) -> Path:
        folder = tmp_path / f"bad-{name}-{how.__name__}"
        shutil.copytree(good, folder)
        how(folder / name)
        return folder / name

    def garble(p: Path) -> None:
        p.write_text('{"step": 3, "ep')

    marker = tmp_path / "PWNED"
    cases = [
        (damaged("trainer_state.pt", truncate), "is truncated or corrupt"),
        (damaged("model.safetensors", truncate), "is truncated or corrupt"),
        (damaged("client_state.json", garble), "is truncated or corrupt"),
        (damaged("trainer_state.pt", Path.unlink), "is missing"),
        (damaged("trainer_state.pt", lambda p: write_malicious(p, marker)), "never writes"),
    ]
    for path, problem in cases:
        with pytest.raises(CorruptFileError) as e:
            _ddp(tiny_model_factory, steps=0).load_checkpoint(path.parent)
        _assert_clear(e.value, path, problem)
        assert CHECKPOINT_FIX in str(e.value)
    assert not marker.exists()


# ---------------------------------------------------------------- artifacts and model folders


@pytest.fixture(scope="module")
def tokenizer():
    from orchestrator import models
    from orchestrator.config.schema import ModelConfig

    return models.build_tokenizer(ModelConfig(name="minilm-l6"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    from orchestrator import models
    from orchestrator.compress.artifact import save_artifact
    from orchestrator.config.schema import ModelConfig

    model = models.build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=0)
    folder = tmp_path_factory.mktemp("artifact") / "model"
    save_artifact(model, folder, tokenizer=tokenizer)
    return folder


def _copy(artifact: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(artifact, folder)
    return folder


def test_artifact_truncated_weights(artifact: Path, tmp_path: Path) -> None:
    from orchestrator.compress.artifact import check_artifact, load_artifact

    folder = _copy(artifact, tmp_path)
    check_artifact(folder)
    load_artifact(folder)
    truncate(folder / "model.safetensors", 0.9)
    for fn in (check_artifact, load_artifact):
        with pytest.raises(CorruptFileError) as e:
            fn(folder)
        _assert_clear(e.value, folder / "model.safetensors", "is truncated or corrupt")
        assert str(e.value).startswith("the artifact's weights file")
        assert "export it again" in str(e.value)


def test_artifact_manifest_and_config_damage(artifact: Path, tmp_path: Path) -> None:
    from orchestrator.compress.artifact import load_artifact

    folder = _copy(artifact, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())

    truncate(folder / "manifest.json")
    with pytest.raises(CorruptFileError) as e:
        load_artifact(folder)
    _assert_clear(e.value, folder / "manifest.json", "is truncated or corrupt")

    # Valid JSON that no longer fits the weights: a dense tensor claimed to be stored sparse.
    name = "classifier.weight"
    assert manifest["tensors"][name] == {"format": "dense"}
    manifest["tensors"][name] = {"format": "sparse", "shape": [3, 3]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError) as e:
        load_artifact(folder)
    _assert_clear(e.value, folder, "do not match")

    del manifest["tensors"][name]  # a tensor missing from the manifest
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="lacks tensors"):
        load_artifact(folder)

    shutil.copy(artifact / "manifest.json", folder / "manifest.json")
    (folder / "config.json").write_text('{"model_type": "bert", "hidden')
    with pytest.raises(CorruptFileError) as e:
        load_artifact(folder)
    _assert_clear(e.value, folder / "config.json", "cannot be read")


def test_model_folder_never_loads_pickled_weights(tmp_path: Path, tokenizer) -> None:
    from orchestrator import models
    from orchestrator.config.schema import ModelConfig

    model = models.build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=0)
    good = tmp_path / "good"
    model.save_pretrained(str(good))
    tokenizer.save_pretrained(str(good))
    reloaded = models.build_model(ModelConfig(path=str(good)), 2, tokenizer)
    assert torch.equal(reloaded.classifier.weight, model.classifier.weight)

    # Only a pickle (pytorch_model.bin) that would run code: refused, never unpickled.
    pickled = tmp_path / "pickled"
    shutil.copytree(good, pickled)
    (pickled / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    write_malicious(pickled / "pytorch_model.bin", marker)
    with pytest.raises(ConfigError) as e:
        models.build_model(ModelConfig(path=str(pickled)), 2, tokenizer)
    assert not marker.exists()
    problem = e.value.problems[0]
    assert problem.key == "model.path" and "pytorch_model.bin) are never loaded" in problem.message

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    truncate(truncated / "model.safetensors")
    with pytest.raises(ConfigError) as e:
        models.build_model(ModelConfig(path=str(truncated)), 2, tokenizer)
    problem = e.value.problems[0]
    assert problem.key == "model.path"
    assert f"{truncated / 'model.safetensors'} is truncated or corrupt" in problem.message

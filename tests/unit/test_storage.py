"""Storage URIs through pyarrow's file systems (``file://`` here; ``s3://`` and ``gs://`` take
the same code path), the run folder's mirror, and fetching model folders once per node."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator import storage
from orchestrator.storage import RunFolder

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(root))
    return root


def _uri(path: Path) -> str:
    return f"file://{path}"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_join_keeps_scheme_host_and_query() -> None:
    assert storage.join("s3://b/runs", "job", "trials") == "s3://b/runs/job/trials"
    assert storage.join("s3://b/runs/", "/job") == "s3://b/runs/job"
    assert (
        storage.join("s3://b/runs?endpoint_override=localhost:9000", "job")
        == "s3://b/runs/job?endpoint_override=localhost:9000"
    )
    assert storage.join("file:///data/runs", "a") == "file:///data/runs/a"
    assert storage.join("runs", "a", "b") == str(Path("runs", "a", "b"))


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("ftp://host/runs", "is not one of"),
        ("file://runs", "three slashes"),
        ("file:///", "root folder"),
        ("s3://b/my runs", "percent-encode"),
    ],
)
def test_check_uri_says_why(uri: str, why: str) -> None:
    assert why in storage.check_uri(uri)


def test_check_uri_accepts_the_usual_stores() -> None:
    for uri in ("s3://bucket/runs", "gs://bucket/runs", "file:///srv/runs", "hdfs://nn:8020/r"):
        assert storage.check_uri(uri) is None


def test_write_read_and_kind(tmp_path: Path) -> None:
    uri = _uri(tmp_path / "store" / "a" / "b.json")
    assert storage.kind(uri) is None
    storage.write_bytes(uri, b"{}")
    assert storage.read_bytes(uri) == b"{}"
    assert storage.kind(uri) == "file"
    assert storage.kind(_uri(tmp_path / "store" / "a")) == "dir"
    storage.write_bytes(uri, b"[1]")  # replaced whole, no temporary file left beside it
    assert sorted(p.name for p in (tmp_path / "store" / "a").iterdir()) == ["b.json"]
    with pytest.raises(storage.StorageError, match="cannot read"):
        storage.read_bytes(_uri(tmp_path / "missing"))


def test_upload_replaces_a_folder_whole(tmp_path: Path) -> None:
    dst = tmp_path / "store" / "model"
    storage.upload(_tree(tmp_path / "v1", {"a.txt": "1", "sub/b.txt": "2"}), _uri(dst))
    assert (dst / "sub" / "b.txt").read_text() == "2"
    storage.upload(_tree(tmp_path / "v2", {"a.txt": "new"}), _uri(dst))
    assert (dst / "a.txt").read_text() == "new"
    assert not (dst / "sub").exists()  # nothing stale of the first copy
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model"]

    back = tmp_path / "back"
    storage.download(_uri(dst), back)
    assert (back / "a.txt").read_text() == "new"


def test_fetch_downloads_once_and_again_after_a_change(tmp_path: Path, cache: Path) -> None:
    src = _tree(tmp_path / "store" / "baseline" / "model", {"config.json": "{}", "w": "x"})
    local = storage.fetch(_uri(src))
    assert local.is_relative_to(cache) and (local / "w").read_text() == "x"
    (local / "w").write_text("edited here")  # a second fetch of unchanged storage keeps it
    assert storage.fetch(_uri(src)) == local and (local / "w").read_text() == "edited here"
    (src / "w").write_text("new weights")
    os.utime(src / "w", (1, 1))  # a different modification time, even within one tick
    assert (storage.fetch(_uri(src)) / "w").read_text() == "new weights"
    with pytest.raises(storage.StorageError, match="no such folder"):
        storage.fetch(_uri(tmp_path / "store" / "nothing"))


def test_a_local_run_folder_is_the_folder_itself(tmp_path: Path) -> None:
    folder = RunFolder(str(tmp_path / "run"))
    assert not folder.remote and folder.local == tmp_path / "run"
    folder.write_text("trials/t1/trial.json", "{}")
    assert (tmp_path / "run" / "trials" / "t1" / "trial.json").read_text() == "{}"
    folder.pull("trials/t1/trial.json")  # nothing to pull: the file stays
    folder.pull_records()
    assert folder.exists("trials/t1/trial.json")
    assert folder.uri("model") == str(tmp_path / "run" / "model")


def test_a_run_folder_in_storage_is_mirrored(tmp_path: Path, cache: Path) -> None:
    store = tmp_path / "store" / "job"
    folder = RunFolder(_uri(store))
    assert folder.remote and folder.local.is_relative_to(cache / "runs" / "file")
    folder.write_text("job.yaml", "name: job\n")
    assert (store / "job.yaml").read_text() == "name: job\n"  # pushed
    # What other processes wrote to storage: records, models, Ray's folders.
    _tree(
        store,
        {
            "baseline.json": "{}",
            "trials/names.json": "{}",
            "trials/t1/trial.json": "{}",
            "trials/t1/metrics.json": "{}",
            "trials/t1/model/config.json": "{}",
            "trials/t1/train/checkpoint_000001/state.json": "{}",
            "tune/experiment_state.json": "{}",
            "baseline/model/model.safetensors": "weights",
            "trials/.t2.tmp/trial.json": "{}",
        },
    )
    (folder.local / "stale.json").write_text("from an earlier run deleted in storage")
    folder.pull_records()
    pulled = sorted(str(p.relative_to(folder.local)) for p in folder.local.rglob("*.*"))
    assert pulled == [
        "baseline.json",
        "job.yaml",
        "trials/names.json",
        "trials/t1/metrics.json",
        "trials/t1/trial.json",
    ]
    assert folder.exists("trials/t1/model") and not (folder.local / "trials/t1/model").exists()

    (store / "trials" / "t1" / "metrics.json").write_text('{"eval/accuracy": 0.8}')
    (store / "baseline.json").unlink()
    folder.pull("trials/t1/metrics.json", "baseline.json")
    assert (folder.local / "trials/t1/metrics.json").read_text() == '{"eval/accuracy": 0.8}'
    assert not (folder.local / "baseline.json").exists()


def test_a_model_path_uri_is_fetched(tmp_path: Path, cache: Path) -> None:
    """A search's trials load the baseline model from output.dir's storage like this."""
    from orchestrator import models
    from orchestrator.config.schema import ModelConfig
    from orchestrator.errors import ConfigError

    tokenizer = models.build_tokenizer(ModelConfig(name="minilm-l6"))
    model = models.build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=0)
    saved = tmp_path / "store" / "baseline" / "model"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    spec = ModelConfig(path=_uri(saved))
    local = models.model_dir(spec)
    assert local.is_relative_to(cache / "fetched")
    again = models.build_model(spec, 2, models.build_tokenizer(spec), seed=0)
    assert all((a == b).all() for a, b in zip(model.parameters(), again.parameters(), strict=True))
    with pytest.raises(ConfigError) as e:
        models.model_dir(ModelConfig(path=_uri(tmp_path / "store" / "nothing")))
    assert e.value.problems[0].key == "model.path" and "cannot be fetched" in str(e.value)


def test_the_same_on_s3(tmp_path: Path, cache: Path, s3_root: str) -> None:
    """Whole-file writes, folder copies that replace, fetching once and again after a change,
    and the run folder's mirror, against an S3 server (moto's, on this machine)."""
    run = storage.join(s3_root, "runs", "job")
    folder = RunFolder(run)
    assert folder.remote and folder.local.is_relative_to(cache / "runs" / "s3")
    # The endpoint's query marks the store's tree, and paths below it stay in that tree.
    trials = RunFolder(folder.uri("trials"))
    assert trials.local == folder.local / "trials"
    folder.write_text("job.yaml", "name: job\n")
    assert storage.read_bytes(folder.uri("job.yaml")) == b"name: job\n"
    assert storage.kind(folder.uri("job.yaml")) == "file" and storage.kind(run) == "dir"

    model = folder.uri("baseline", "model")
    storage.upload(_tree(tmp_path / "v1", {"config.json": "{}", "sub/w": "1"}), model)
    storage.upload(_tree(tmp_path / "v2", {"config.json": "{}", "w": "22"}), model)
    assert sorted(rel for rel, _, _ in storage.walk(model)) == ["config.json", "w"]
    local = storage.fetch(model)
    assert local.is_relative_to(cache / "fetched" / "s3") and (local / "w").read_text() == "22"
    assert storage.fetch(model) == local
    storage.write_bytes(folder.uri("baseline", "model", "w"), b"333")  # another size
    assert (storage.fetch(model) / "w").read_text() == "333"

    # Another process's records, a trial's model and Ray's folders; then the mirror.
    for rel in ("trials/t1/trial.json", "trials/t1/metrics.json", "tune/state.json"):
        storage.write_bytes(folder.uri(rel), b"{}")
    storage.upload(tmp_path / "v2", folder.uri("trials", "t1", "model"))
    folder.pull_records()
    pulled = sorted(str(p.relative_to(folder.local)) for p in folder.local.rglob("*.*"))
    assert pulled == ["job.yaml", "trials/t1/metrics.json", "trials/t1/trial.json"]
    assert folder.exists("trials/t1/model") and not folder.exists("trials/t2")
    folder.pull("trials/t2/metrics.json")  # not there: nothing in the mirror either
    assert not (folder.local / "trials/t2/metrics.json").exists()

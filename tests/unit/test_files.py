"""orchestrator.files: a process SIGKILLed in the middle of writing a file or a folder leaves
the previous whole one in place (never a truncated one), and its leftover temporary is a hidden
sibling that no reader takes for the file."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator import files
from orchestrator.files import copy_dir_atomic, replace_dir, write_atomic, write_dir_atomic

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
OLD = b'{"trial": "t001", "status": "done"}\n'  # the previous, good file
MiB = 1 << 20


def _child(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the child never got to the point to kill it at"
        time.sleep(0.001)


def _visible(folder: Path) -> list[str]:
    """What a reader listing the folder sees (hidden temporaries left out, as by every reader
    of a run directory)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _temps(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.*.tmp"))


# The child blocks on its stdin (which the parent never writes) after half of the payload is
# flushed: the kill lands mid-write every time, not by luck of timing.
BLOCKING_FILE = """
    import sys
    from pathlib import Path
    from orchestrator.files import write_atomic

    def fill(tmp):
        with open(tmp, "wb") as f:
            f.write(b"N" * (64 << 20))
            f.flush()
            print("half", flush=True)
            sys.stdin.read()
            f.write(b"N" * (64 << 20))

    write_atomic(Path(sys.argv[1]), fill)
"""


def test_kill_mid_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "trial.json"
    target.write_bytes(OLD)
    proc = _child(BLOCKING_FILE, str(target))
    try:
        assert proc.stdout.readline() == b"half\n"  # 64 MiB written and flushed, 64 to go
    finally:
        _kill(proc)
    assert target.read_bytes() == OLD
    # The half-written payload lies in a hidden temporary beside the target.
    leftover = _temps(tmp_path, target.name)
    assert [p.stat().st_size for p in leftover] == [64 * MiB]
    assert _visible(tmp_path) == ["trial.json"]  # the leftover shadows nothing
    write_atomic(target, b"new")  # and does not get in the way of the next write
    assert target.read_bytes() == b"new"


BYTES_PAYLOAD = """
    import sys
    from pathlib import Path
    from orchestrator.files import write_atomic

    write_atomic(Path(sys.argv[1]), b"N" * (int(sys.argv[2]) << 20))
"""


def test_kill_during_a_large_write_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """The plain ``write_atomic(path, bytes)`` call, killed as soon as the new content starts
    to land on disk: the target is the old file, or (if the kill came after the rename) the
    whole new one, never a prefix."""
    target = tmp_path / "results.parquet"
    target.write_bytes(OLD)
    size_mb = 256
    proc = _child(BYTES_PAYLOAD, str(target), str(size_mb))
    try:

        def writing() -> bool:  # any file of the folder, the target included, growing
            sizes = [p.stat().st_size for p in tmp_path.iterdir() if p.is_file()]
            return proc.poll() is not None or any(s not in (0, len(OLD)) for s in sizes)

        _wait_for(writing)
    finally:
        if proc.poll() is None:
            _kill(proc)
    data = target.read_bytes()
    if data != OLD:  # killed after the rename: the whole new file
        assert len(data) == size_mb * MiB and data.count(b"N") == len(data)
    assert _visible(tmp_path) == ["results.parquet"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_bytes(OLD)

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    write_atomic(target, "text")
    assert target.read_text() == "text" and oct(target.stat().st_mode & 0o777) == "0o644"


# ---------------------------------------------------------------- folders


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _old_folder(path: Path) -> dict[str, str]:
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"W" * 1000)
    (path / "manifest.json").write_bytes(OLD)
    return _tree(path)


BLOCKING_DIR = """
    import sys
    from pathlib import Path
    from orchestrator.files import write_dir_atomic

    def fill(tmp):
        (tmp / "manifest.json").write_text("{}")
        with open(tmp / "model.safetensors", "wb") as f:
            f.write(b"N" * (32 << 20))
            f.flush()
            print("half", flush=True)
            sys.stdin.read()

    write_dir_atomic(Path(sys.argv[1]), fill)
"""


def test_kill_mid_folder_write_keeps_the_previous_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    before = _old_folder(target)
    proc = _child(BLOCKING_DIR, str(target))
    try:
        assert proc.stdout.readline() == b"half\n"
    finally:
        _kill(proc)
    assert _tree(target) == before
    [leftover] = _temps(tmp_path, "model")  # the half-written new folder, hidden
    assert (leftover / "model.safetensors").stat().st_size == 32 * MiB
    assert _visible(tmp_path) == ["model"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replace_dir_swaps_a_full_folder(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    used = []
    real = files._exchange

    def spy(a: Path, b: Path) -> bool:
        used.append(real(a, b) if exchange else False)
        return used[-1]

    monkeypatch.setattr(files, "_exchange", spy)
    target = tmp_path / "model"
    _old_folder(target)
    new = tmp_path / ".model.new.tmp"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"V" * 10)
    replace_dir(new, target)
    if exchange and used != [True]:
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert (target / "model.safetensors").read_bytes() == b"V" * 10
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # old folder and temp gone


def test_write_dir_atomic_failure_and_copy(tmp_path: Path) -> None:
    target = tmp_path / "model"
    before = _old_folder(target)

    def fail(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_dir_atomic(target, fail)
    assert _tree(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    out = tmp_path / "sub" / "copy"
    copy_dir_atomic(target, out)  # creates missing parents
    assert _tree(out) == before and oct(out.stat().st_mode & 0o777) == "0o755"
    (tmp_path / "empty").mkdir()
    copy_dir_atomic(target, tmp_path / "empty")  # an empty folder is replaced
    assert _tree(tmp_path / "empty") == before

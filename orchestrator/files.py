"""Writing files and folders so that a reader (a browser reloading report.html, a resumed run
reading trial.json, a kill mid-write) sees the old whole file or the new whole file, never half
of one: everything is written under a hidden temporary name beside the target (``.NAME.*.tmp``),
flushed to disk, then renamed over it. A kill mid-write leaves the previous file untouched and at
most a hidden temporary sibling, which no reader looks at. No Ray, no torch: every layer may use
it."""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk, so that after a crash of the machine the
    renamed file holds its data; best effort where the file system cannot (some network ones)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> tuple[str, str]:
    return f".{path.name}.", ".tmp"


def write_atomic(path: Path, content: str | bytes | Callable[[Path], None]) -> None:
    """Write ``content`` (text, bytes, or a function that writes the given temporary path) to a
    temporary name beside ``path``, then rename it over ``path``."""
    path = Path(path)
    prefix, suffix = _temp_name(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        if isinstance(content, str):
            Path(tmp).write_text(content)
        elif isinstance(content, bytes):
            Path(tmp).write_bytes(content)
        else:
            content(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are meant to be read
        _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the C library or the file system does not offer it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def replace_dir(src: Path, dst: Path) -> None:
    """Put the complete folder ``src`` at ``dst`` (a sibling), replacing what is there.

    An absent or empty ``dst`` is replaced by one rename. A non-empty one is swapped with
    ``src`` in one atomic step where the system can (Linux), so a reader sees the old folder or
    the new one, never neither; elsewhere the old folder is first renamed to a hidden sibling
    (a kill between the two renames leaves it there, whole). The old folder is then deleted."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
    elif dst.is_dir() and not any(dst.iterdir()):
        os.replace(src, dst)  # rename(2) replaces an empty folder
    elif _exchange(src, dst):
        shutil.rmtree(src)  # ``src`` now holds the old folder
    else:
        prefix, _ = _temp_name(dst)
        old = dst.parent / f"{prefix}{uuid.uuid4().hex[:8]}.old"
        os.rename(dst, old)
        os.replace(src, dst)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    _fsync(dst.parent)


def write_dir_atomic(path: Path, fill: Callable[[Path], None], mode: int = 0o755) -> None:
    """Create the folder ``path`` whole: ``fill(tmp)`` writes its content into a hidden
    temporary folder beside ``path``, which then replaces ``path`` (``replace_dir``). If
    ``fill`` fails or the process is killed, ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_name(path)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    try:
        fill(tmp)
        os.chmod(tmp, mode)  # mkdtemp makes it private; run folders are meant to be read
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_dir_atomic(src: Path, dst: Path) -> None:
    """Copy the folder ``src`` to ``dst`` whole (``write_dir_atomic``), replacing ``dst``."""
    write_dir_atomic(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))

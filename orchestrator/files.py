"""Writing files so that a reader (a browser reloading report.html, a resumed run reading
trial.json, a kill mid-write) sees the old whole file or the new whole file, never half of one.
No Ray, no torch: every layer may use it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, content: str | bytes | Callable[[Path], None]) -> None:
    """Write ``content`` (text, bytes, or a function that writes the given temporary path) to a
    temporary name beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if isinstance(content, str):
            Path(tmp).write_text(content)
        elif isinstance(content, bytes):
            Path(tmp).write_bytes(content)
        else:
            content(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""Reading back what this tool wrote (checkpoints, artifacts, manifests) without ever running a
pickle, and with one clear error when a file is missing, truncated, garbled or tampered with.

- torch files: ``torch.load(weights_only=True)``. Its restricted unpickler builds tensors,
  containers and plain values only and refuses any other global (a class, ``os.system``) before
  anything runs; ``allow`` names the few extra classes a caller's files are known to hold.
- safetensors: a JSON header and raw bytes, no code at all.
- JSON: ``json.loads``.

Every failure becomes a ``CorruptFileError`` that names the file, says what is wrong with it and
what to do, instead of a pickle or safetensors traceback (and never torch's advice to retry with
``weights_only=False``). No Ray, no DeepSpeed: every layer may use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator.errors import CorruptFileError

# What a resumed run should do when one of its checkpoint files cannot be read. Ray Train keeps
# a list of the run's checkpoints under the run directory's train/ folder and refuses a run whose
# listed checkpoint folder was deleted, so the way out is a fresh train/ (or run directory).
CHECKPOINT_FIX = (
    "this checkpoint cannot be resumed from; delete the run directory's train/ folder (Ray "
    "Train's checkpoints) to train again from step 0, or the whole run directory to start over"
)


def _detail(e: BaseException) -> str:
    """The first sentence of an exception's message, short enough for one line."""
    text = " ".join(str(e).split())
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] if text else ""
    first = first[:200].rstrip(".")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size} bytes"
    except OSError:
        return "unreadable"


def _missing(path: Path, what: str, fix: str) -> None:
    if not path.is_file():
        raise CorruptFileError(path, what, "is missing", fix)


def _unsafe_globals(path: Path) -> list[str]:
    """The pickle GLOBALs in a torch zip file that the weights-only unpickler would refuse
    (read statically from the pickle's opcodes: nothing is executed)."""
    import torch

    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip file, no data.pkl, garbled opcodes: simply corrupt
        return []


def load_torch(
    path: str | Path,
    *,
    what: str,
    fix: str,
    allow: Iterable[type] = (),
    map_location: Any = None,
) -> Any:
    """``torch.load(path, weights_only=True)`` with ``allow`` added to the unpickler's allowed
    classes for this call only. A file naming any other global is refused unread."""
    import torch

    path = Path(path)
    _missing(path, what, fix)
    allowed = list(allow)
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            unsafe = _unsafe_globals(path)
            if unsafe or re.search(r"unsupported global", str(e), re.IGNORECASE):
                names = ", ".join(unsafe) or _detail(e)
                raise CorruptFileError(
                    path,
                    what,
                    f"holds pickled objects this tool never writes ({names}); it was refused "
                    "without running anything in it",
                    f"it was tampered with or does not come from this tool; {fix}",
                ) from None
            problem = f"is truncated or corrupt ({_size(path)}; {_detail(e)})"
            raise CorruptFileError(path, what, problem, fix) from None


def load_safetensors(
    path: str | Path, *, what: str, fix: str, device: str = "cpu"
) -> dict[str, Any]:
    """Every tensor of a safetensors file (the header is checked against the file's length)."""
    from safetensors.torch import load_file

    path = Path(path)
    _missing(path, what, fix)
    try:
        return load_file(str(path), device=device)
    except Exception as e:
        problem = f"is truncated or corrupt ({_size(path)}; {_detail(e)})"
        raise CorruptFileError(path, what, problem, fix) from None


def check_safetensors(path: str | Path, *, what: str, fix: str) -> None:
    """Parse a safetensors file's header and check that it covers the file exactly, without
    reading the tensors (cheap on a large file)."""
    from safetensors import safe_open

    path = Path(path)
    _missing(path, what, fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:
        problem = f"is truncated or corrupt ({_size(path)}; {_detail(e)})"
        raise CorruptFileError(path, what, problem, fix) from None


def load_json(path: str | Path, *, what: str, fix: str) -> Any:
    """A JSON file's content."""
    path = Path(path)
    _missing(path, what, fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        problem = f"is truncated or corrupt ({_size(path)}; {_detail(e)})"
        raise CorruptFileError(path, what, problem, fix) from None

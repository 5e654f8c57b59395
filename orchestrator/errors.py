"""Exception types. User-facing errors carry the dotted key, the bad value and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One problem in a job: where (dotted key), what was given, why it is wrong, how to fix it."""

    key: str
    value: Any
    message: str
    fix: str = ""

    def __str__(self) -> str:
        shown = "<missing>" if self.value is _MISSING else repr(self.value)
        text = f"{self.key or '<job>'} = {shown}: {self.message}"
        return f"{text}. Fix: {self.fix}" if self.fix else text


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
MISSING: Any = _MISSING


class OrchestratorError(Exception):
    """Base class: errors the CLI turns into a message and an exit code."""

    exit_code = 1


class ConfigError(OrchestratorError):
    """Bad user input (job file, override, path). Holds every problem found, reported at once."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | Problem, source: str = "job") -> None:
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class DataError(ConfigError):
    """The data a job points at is missing, malformed or empty."""


class RunError(OrchestratorError):
    """A run failed after it started (a worker crashed, Ray could not schedule it, ...)."""

    exit_code = 1


class CorruptFileError(RunError):
    """A file this tool wrote (a checkpoint shard, ``trainer_state.pt``, an artifact's
    ``model.safetensors`` or ``manifest.json``) cannot be read back: missing, truncated, garbled,
    or holding objects this tool never writes (then it was refused unread, nothing in it ran)."""

    def __init__(self, path: str | Path, what: str, problem: str, fix: str) -> None:
        self.path = Path(path)
        self.what = what
        self.problem = problem
        self.fix = fix
        super().__init__(f"{what} {self.path} {problem}: {fix}")

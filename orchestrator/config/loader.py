"""Loading a job: YAML file + dotted ``key=value`` overrides -> validated ``JobSpec``.

One override syntax everywhere: the command line and (later) the search space use
``apply_overrides``. Every problem is collected and raised once as a ``ConfigError``.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config.schema import JobSpec
from orchestrator.errors import MISSING, ConfigError, Problem


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; read it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``. Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            Problem(
                text,
                MISSING,
                "an override must look like dotted.key=value",
                "write e.g. train.lr=1e-4 or compress.prune.sparsity=0.5",
            ),
            source="overrides",
        )
    try:
        value = _load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the literal string; validation judges it
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each dotted key set. Unknown keys are left for validation
    to reject (with a "did you mean"), so an override and a YAML key fail the same way."""
    out = copy.deepcopy(raw)
    problems = []
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(
                    Problem(
                        ".".join(parts[: i + 1]),
                        child,
                        f"is a value, not a section, so {dotted} cannot be set",
                        f"override {'.'.join(parts[: i + 1])} itself",
                    )
                )
                break
            node = child
        else:
            # A copy: a later, deeper key must not write into the caller's value (a search
            # space's section choice is shared by every trial).
            node[parts[-1]] = copy.deepcopy(value)
    if problems:
        raise ConfigError(problems, source="overrides")
    return out


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model found at ``loc``; used for "did you mean"."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_type(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_type(annotation: Any) -> Any:
    """The BaseModel inside ``X``, ``X | None`` or ``Annotated[X, ...]`` annotations."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_type(arg)
        if found is not None:
            return found
    return None


def _field_description(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    current: Any = model
    description = ""
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return description
        field = current.model_fields.get(str(part))
        if field is None:
            return description
        description = field.description or ""
        current = _model_type(field.annotation)
    return description


def problems_from_validation(
    exc: ValidationError, model: type[BaseModel] = JobSpec, prefix: str = ""
) -> list[Problem]:
    """Turn pydantic's errors into ``Problem`` rows with dotted keys, values and fixes."""
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        key = f"{prefix}.{dotted}" if prefix and dotted else (prefix or dotted)
        etype = err["type"]
        ctx = err.get("ctx") or {}
        if etype == "cross_field":
            for field, value, message, fix in ctx["problems"]:
                # Relative to the model that raised; JobSpec's own (loc "") are already absolute.
                sub = f"{dotted}.{field}" if dotted else field
                problems.append(Problem(f"{prefix}.{sub}" if prefix else sub, value, message, fix))
            continue
        if etype == "extra_forbidden":
            known = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
            parent = ".".join(str(p) for p in loc[:-1]) or "the job"
            fix = f"did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?" if close else ""
            fix = fix or f"remove it; keys allowed under {parent}: {', '.join(known)}"
            problems.append(Problem(key, err["input"], "unknown key", fix))
            continue
        if etype == "missing":
            desc = _field_description(model, loc)
            problems.append(
                Problem(key, MISSING, "is required", f"set {key}" + (f" ({desc})" if desc else ""))
            )
            continue
        desc = _field_description(model, loc)
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        problems.append(Problem(key, err.get("input"), message, f"{key}: {desc}" if desc else ""))
    return problems


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            Problem("<job file>", str(p), "no such file", "pass the path of a job YAML file"),
            source=str(p),
        )
    try:
        raw = _load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            Problem("<job file>", str(p), f"is not valid YAML{where}: {e}", "fix the YAML syntax"),
            source=str(p),
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            Problem(
                "<job file>",
                str(p),
                "must hold a mapping of sections at top level",
                "start the file with keys like name:, model:, data:, train:",
            ),
            source=str(p),
        )
    return raw


def validate_job(raw: dict[str, Any], source: str = "job") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(problems_from_validation(e), source=source) from None


def load_job(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> JobSpec:
    """Read a job file, apply dotted overrides, validate. Raises ``ConfigError`` (all problems)."""
    raw = read_yaml(path)
    if isinstance(overrides, list):
        pairs: dict[str, Any] = {}
        for text in overrides:
            k, v = parse_override(text)
            pairs[k] = v
        overrides = pairs
    return validate_job(apply_overrides(raw, overrides or {}), source=str(path))


def dump_job(spec: JobSpec) -> str:
    """The resolved job as YAML (every default written out), as saved with runs and checkpoints."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)

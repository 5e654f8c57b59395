"""Loading a job: YAML file + dotted ``key=value`` overrides -> validated ``JobSpec``.

Loading is three steps: read the YAML, apply the overrides (``overrides.apply_overrides``, the
same function the search space uses), validate: the job spec itself (pydantic), then its search
section against the job (``space_check``). Every problem is collected and raised once as a
``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config.overrides import apply_overrides, load_yaml, parse_override
from orchestrator.config.problems import field_target, problems_from_validation
from orchestrator.config.schema import JobSpec
from orchestrator.config.space_check import search_problems
from orchestrator.errors import ConfigError, Problem


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            Problem("<job file>", str(p), "no such file", "pass the path of a job YAML file"),
            source=str(p),
        )
    try:
        raw = load_yaml(p.read_text(encoding="utf-8"))
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


def exclusive_groups(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[tuple[str, ...]]:
    """Dotted groups of keys of which a job sets one (a model's ``exclusive`` class variable:
    ``model.name`` / ``model.path``), for ``apply_overrides``."""
    groups: list[tuple[str, ...]] = []
    own = getattr(model, "exclusive", ())
    if own:
        groups.append(tuple(f"{prefix}{k}" for k in own))
    for name, field in model.model_fields.items():
        inner = field_target(field.annotation)
        members = inner.values() if isinstance(inner, dict) else [inner]
        for member in members:
            if isinstance(member, type) and issubclass(member, BaseModel):
                for group in exclusive_groups(member, f"{prefix}{name}."):
                    if group not in groups:
                        groups.append(group)
    return groups


EXCLUSIVE = exclusive_groups()


def _problems(raw: dict[str, Any]) -> list[Problem]:
    try:
        JobSpec.model_validate(raw)
    except ValidationError as e:
        return problems_from_validation(e)
    return []


def validate_job(raw: dict[str, Any], source: str = "job") -> JobSpec:
    """Validate a raw job: the spec, then its search space and baseline against the job."""
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(problems_from_validation(e), source=source) from None
    if spec.search is not None:
        base = spec.model_dump(mode="json", exclude={"search"})
        problems = search_problems(base, spec.search, _problems, EXCLUSIVE)
        if problems:
            raise ConfigError(problems, source=source)
    return spec


def load_job(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> JobSpec:
    """Read a job file, apply dotted overrides, validate. Raises ``ConfigError`` (all problems).
    An override of one of two exclusive keys (``data.path`` over a job's ``data.name``)
    replaces the other."""
    raw = read_yaml(path)
    if isinstance(overrides, list):
        pairs: dict[str, Any] = {}
        for text in overrides:
            k, v = parse_override(text)
            pairs[k] = v
        overrides = pairs
    return validate_job(apply_overrides(raw, overrides or {}, EXCLUSIVE), source=str(path))


def dump_job(spec: JobSpec) -> str:
    """The resolved job as YAML (every default written out), as saved with runs and checkpoints."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


__all__ = [
    "EXCLUSIVE",
    "apply_overrides",
    "dump_job",
    "load_job",
    "parse_override",
    "problems_from_validation",
    "read_yaml",
    "validate_job",
]

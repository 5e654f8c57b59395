"""pydantic's validation errors as ``Problem`` rows: the dotted key a user writes, the value,
what is wrong and how to fix it (with a "did you mean" for unknown keys).

A technique section is a discriminated union on ``method``: pydantic puts the method's tag into
an error's location (``compress.prune.structured.scope``); the tag is taken out again here and
named in the message instead ("not a key of method structured").
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, Tag, ValidationError

from orchestrator.config.schema import JobSpec
from orchestrator.errors import MISSING, Problem


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _tagged_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """``{tag: model}`` of a discriminated union (inside ``X | None`` / ``Annotated``)."""
    out: dict[str, type[BaseModel]] = {}
    if get_origin(annotation) is Annotated:
        inner, *meta = get_args(annotation)
        tag = next((m.tag for m in meta if isinstance(m, Tag)), None)
        if tag is not None and _is_model(inner):
            return {tag: inner}
        return _tagged_members(inner)
    if get_origin(annotation) in (Union, types.UnionType):
        for arg in get_args(annotation):
            out.update(_tagged_members(arg))
    return out


def field_target(annotation: Any) -> Any:
    """What a field holds, seen through ``X | None`` and ``Annotated``: a model class, a
    ``{tag: model}`` dict for a discriminated union, ``("items", X)`` for a dict or list of X,
    or None for plain values."""
    tagged = _tagged_members(annotation)
    if tagged:
        return tagged
    if _is_model(annotation):
        return annotation
    origin = get_origin(annotation)
    if origin is Annotated:
        return field_target(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            found = field_target(arg)
            if found is not None:
                return found
    if origin in (dict, list):
        args = get_args(annotation)
        return ("items", args[-1]) if args else None
    return None


class _Where:
    """An error location resolved against the model tree."""

    def __init__(self, root: type[BaseModel], loc: tuple[Any, ...]) -> None:
        self.parts: list[str] = []  # the dotted key, tags taken out
        self.owner: type[BaseModel] | None = root  # the model holding the last part
        self.method: str | None = None  # the method tag of the innermost union on the way
        self.union: dict[str, type[BaseModel]] = {}  # that union's methods by tag
        self.description = ""
        current: Any = root
        rest = list(loc)
        while rest:
            part = rest.pop(0)
            self.parts.append(str(part))
            if _is_model(current):
                self.owner = current
                field = current.model_fields.get(str(part))
                if field is None:
                    current = None
                    continue
                self.description = field.description or ""
                current = field_target(field.annotation)
            elif isinstance(current, tuple):  # a dict key or list index
                current = field_target(current[1]) or None
            else:
                current = None
            if isinstance(current, dict):
                self.union = current
                if rest and str(rest[0]) in current:
                    self.method = str(rest.pop(0))
                    current = current[self.method]

    @property
    def key(self) -> str:
        return ".".join(self.parts)

    def section(self) -> str:
        return ".".join(self.parts[:-1]) or "the job"


def _unknown_key(where: _Where, value: Any) -> Problem:
    owner, name = where.owner, where.parts[-1]
    known = list(owner.model_fields) if owner is not None else []
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    section = where.section()
    takes = [t for t, cls in where.union.items() if name in cls.model_fields and t != where.method]
    if takes:
        # A key of another method of this stage (``bits`` under dynamic_int8).
        return Problem(
            where.key,
            value,
            f"is not a key of {section} with method={where.method}",
            f"remove it, or use a method that takes it ({', '.join(takes)})",
        )
    fix = f"did you mean {section}.{close[0]}?" if close and section != "the job" else ""
    if close and section == "the job":
        fix = f"did you mean {close[0]}?"
    if where.method is not None:
        section = f"{section} with method={where.method}"
    fix = fix or f"remove it; keys allowed under {section}: {', '.join(known)}"
    return Problem(where.key, value, "unknown key", fix)


def problems_from_validation(
    exc: ValidationError, model: type[BaseModel] = JobSpec, prefix: str = ""
) -> list[Problem]:
    """Turn pydantic's errors into ``Problem`` rows with dotted keys, values and fixes."""
    problems: list[Problem] = []

    def full(key: str) -> str:
        return f"{prefix}.{key}" if prefix and key else (prefix or key)

    for err in exc.errors(include_url=False):
        where = _Where(model, tuple(err["loc"]))
        dotted = where.key
        etype = err["type"]
        ctx = err.get("ctx") or {}
        if etype == "cross_field":
            for field, value, message, fix in ctx["problems"]:
                # Relative to the model that raised; JobSpec's own (loc "") are already absolute.
                sub = f"{dotted}.{field}" if dotted else field
                problems.append(Problem(full(sub), value, message, fix))
        elif etype in ("union_tag_invalid", "union_tag_not_found"):
            tags = ", ".join(where.union)
            problems.append(
                Problem(
                    full(f"{dotted}.method"),
                    ctx.get("tag", MISSING),
                    f"is not a method of {dotted}",
                    f"use one of {tags}",
                )
            )
        elif etype == "extra_forbidden":
            p = _unknown_key(where, err["input"])
            problems.append(Problem(full(p.key), p.value, p.message, p.fix))
        elif etype == "missing":
            desc = where.description
            key = full(dotted)
            problems.append(
                Problem(key, MISSING, "is required", f"set {key}" + (f" ({desc})" if desc else ""))
            )
        else:
            message = err["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
            key = full(dotted)
            desc = where.description
            problems.append(
                Problem(key, err.get("input"), message, f"{key}: {desc}" if desc else "")
            )
    return problems

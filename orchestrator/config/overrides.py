"""Dotted ``key=value`` overrides: one syntax for the command line, the search space and the
baseline's overrides, applied by one function (``apply_overrides``)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any

import yaml

from orchestrator.errors import MISSING, ConfigError, Problem


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads ``1e-4`` as a string; read it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text (safe: plain data only, never objects)."""
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
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML: keep the literal string; validation judges it
    return key, value


def _drop(raw: dict[str, Any], dotted: str) -> None:
    node: Any = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(leaf, None)


def apply_overrides(
    raw: dict[str, Any],
    overrides: dict[str, Any],
    exclusive: Iterable[tuple[str, ...]] = (),
) -> dict[str, Any]:
    """Return a copy of ``raw`` with each dotted key set. Unknown keys are left for validation
    to reject (with a "did you mean"), so an override and a YAML key fail the same way.

    ``exclusive``: groups of dotted keys of which a job sets one (``model.name`` /
    ``model.path``). Overriding one of them with a value removes the others that ``raw`` holds
    and that are not overridden too: ``data.path=x.csv`` over a job naming a packaged corpus
    means "use this file instead"."""
    out = copy.deepcopy(raw)
    for group in exclusive:
        chosen = [k for k in group if overrides.get(k) is not None]
        if chosen:
            for other in group:
                if other not in overrides:
                    _drop(out, other)
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

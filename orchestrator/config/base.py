"""Shared pieces of the config models."""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticCustomError


def cross_field_error(problems: list[tuple[str, Any, str, str]]) -> PydanticCustomError:
    """Build the error a model validator raises for one or more cross-field problems.

    Each problem is ``(field, value, message, fix)`` with ``field`` relative to the model that
    raises; the loader prefixes the model's own dotted location.
    """
    return PydanticCustomError(
        "cross_field",
        "; ".join(p[2] for p in problems),
        {"problems": [list(p) for p in problems]},
    )

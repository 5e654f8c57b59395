"""What every section of the job shares: the base model and the cross-field error."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


class ConfigModel(BaseModel):
    """Base of every section of the job spec: unknown keys are errors (a typo never silently
    does nothing) and a validated section never changes (the resolved job saved with a run is
    the job that ran)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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

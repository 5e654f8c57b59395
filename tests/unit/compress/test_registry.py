"""The registry of techniques: every method of every stage has exactly one handler, looked up
by the config's type; a step (config + manifest entry) survives its JSON form."""

from __future__ import annotations

import pytest

from orchestrator.compress import Step, Technique, register, technique_for
from orchestrator.compress.technique import registered
from orchestrator.config.compress import STAGE_METHODS, STAGES, technique_config

pytestmark = pytest.mark.unit

# The keys a section needs besides its method (a factorization needs a rank rule).
REQUIRED = {"factorize": {"rank_ratio": 0.5}, "depth": {"blocks": 1}}
METHODS = [(stage, method) for stage in STAGES for method in STAGE_METHODS[stage]]


@pytest.mark.parametrize(("stage", "method"), METHODS)
def test_every_method_has_its_handler(stage: str, method: str) -> None:
    keys = {"remove": [0]} if method == "named" else REQUIRED.get(stage, {})
    cfg = technique_config(stage, {"method": method, **keys})
    assert type(cfg) is STAGE_METHODS[stage][method] and cfg.stage == stage
    handler = technique_for(cfg)
    assert isinstance(handler, Technique) and handler.config_type is type(cfg)
    assert len(handler.note(cfg)) > 20  # says which savings are real
    step = Step(cfg, {"anything": [1, 2]})
    assert Step.from_json(step.to_json()) == step


def test_registry_holds_exactly_the_configs() -> None:
    configs = {cls for methods in STAGE_METHODS.values() for cls in methods.values()}
    assert set(registered()) == configs


def test_a_config_type_has_one_handler() -> None:
    cls = next(iter(registered()))

    class Again(Technique):
        config_type = cls

    with pytest.raises(RuntimeError, match="two handlers"):
        register(Again)

"""The registry of compression techniques: one handler per technique config type, looked up by
the config's type (the shape of torchao's ``quantize_(model, config)``).

A handler (a ``Technique``) owns everything about its technique:

- ``apply_``: the training form (masks, fake-quant, thinner layers) on a model, with one report
  row per module, the manifest entry that describes the change, and an optional hook the
  training loop calls after every optimizer step (a pruner re-applying its masks);
- ``rebuild_``: the same structural change on a freshly built dense model, from the manifest
  entry alone (no calibration, no SVD, no pruning), before the saved weights are loaded;
- ``to_inference_``: the inference form (real int8 kernels, dequantized weights);
- ``encodings`` / ``decode``: storage forms of the weights it owns in the artifact, and how to
  read them back;
- ``stored_bits``, ``sparsity_scope``: the bit width a module's weights are stored with, and
  the modules a technique sparsified (for the measured figures); ``kept_hidden_states``: which
  of the dense model's hidden states remain (for distillation);
- ``note``: which savings are real (bytes, kernels) and which only nominal.

Handlers live one family per module in ``orchestrator.compress.techniques`` and register with
``@register``; every module of that package is imported when a handler is first looked up, so
adding a technique is its config class, its handler module and its tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from orchestrator.compress.common import FilterFn, ModuleRow, per_layer, select_modules
from orchestrator.config.compress import TechniqueConfig, technique_config

Batch = dict[str, torch.Tensor]
MaskApplier = Callable[[dict[str, torch.Tensor]], None]  # a strategy's apply_masks_


class TrainingHook(Protocol):
    """What a technique asks of the training loop (the unstructured pruner's masks)."""

    def after_step(self, step: int, total_steps: int, apply_masks: MaskApplier) -> None:
        """After every optimizer step: advance a schedule, re-apply masks."""

    def after_restore(self) -> None:
        """After a checkpoint was loaded into the model."""

    def sync(self, model: nn.Module) -> list[str]:
        """A later technique changed ``model``: forget the modules it replaced; returns them."""


def _alone(value: Any) -> list[Any]:
    return [value]


@dataclass(frozen=True)
class Workers:
    """The workers of a distributed run that compress the same model together: this one's
    ``rank`` of ``size``, and ``gather(value)``: every worker's value, by rank (a collective:
    every worker calls it, in the same order). One process: rank 0 of 1."""

    rank: int = 0
    size: int = 1
    gather: Callable[[Any], list[Any]] = _alone


@dataclass
class Context:
    """What ``apply_`` may use besides the model and its config."""

    calib: list[Batch] | None = None  # calibration batches (Wanda, ASVD, structured importance)
    filter_fn: FilterFn | None = None  # an extra module filter (torchao's filter_fn)
    total_steps: int = 0  # recovery training steps (sizes a gradual schedule)
    tokenizer: Any = None  # the model's tokenizer, None for a model that reads pixels
    # How often each token id occurs in the training split (vocabulary trimming); computed on
    # demand, since only one technique needs it.
    token_counts: Callable[[], dict[int, int]] | None = None
    # A choice every worker of a distributed run must make alike (a per-layer allocation from
    # measured floats, where a near-tie could fall either way): the first worker's, on all.
    # Identity in a single process.
    agree: Callable[[Any], Any] = lambda value: value
    # Where measured sensitivity profiles are kept, by the hash of everything they depend on
    # (the model's weights, the calibration batches, the layers and settings): trials of a
    # search that profile the same model at other budgets measure it once. None: not kept.
    cache_dir: Path | None = None
    # The workers compressing this model together: a sensitivity profile's layers are split
    # among them (layers are independent), each measures its share and all receive the whole.
    workers: Workers = field(default_factory=Workers)


@dataclass
class Applied:
    """What ``apply_`` did: a row per module, the manifest entry, an optional training hook."""

    rows: list[ModuleRow]
    entry: dict[str, Any] = field(default_factory=dict)
    hook: TrainingHook | None = None


@dataclass
class Step:
    """One technique as applied to a model: its config and its manifest entry (JSON-able),
    which is all ``rebuild_`` needs to recreate the change."""

    config: TechniqueConfig
    entry: dict[str, Any] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return self.config.stage

    @property
    def technique(self) -> Technique:
        return technique_for(self.config)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "config": self.config.model_dump(mode="json"),
            "entry": self.entry,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Step:
        return cls(technique_config(raw["stage"], raw["config"]), dict(raw.get("entry") or {}))


class Technique(ABC):
    """Base of the handlers; see the module docstring for what each method owns."""

    config_type: ClassVar[type[TechniqueConfig]]
    # Module types ``include`` / ``exclude`` select among.
    module_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    # Refused (a ConfigError naming the method) when no calibration batches are given.
    needs_calibration: ClassVar[bool] = False

    def select(
        self, model: nn.Module, cfg: TechniqueConfig, filter_fn: FilterFn | None = None
    ) -> list[tuple[str, nn.Module]]:
        """The modules ``cfg`` targets; a pattern that matches nothing (of ``include``,
        ``exclude``, or the per-layer settings ``layers``) is a ConfigError."""
        modules = select_modules(
            model,
            cfg.include,
            cfg.exclude,
            self.types(cfg),
            f"compress.{cfg.stage}",
            filter_fn=filter_fn,
        )
        if getattr(cfg, "layers", None):
            linears = (n for n, m in modules if isinstance(m, nn.Linear))
            per_layer(linears, cfg.layers, f"compress.{cfg.stage}.layers")
        return modules

    def types(self, cfg: TechniqueConfig) -> tuple[type[nn.Module], ...]:
        """Module types ``include`` / ``exclude`` select among for ``cfg``."""
        return self.module_types

    @abstractmethod
    def apply_(self, model: nn.Module, cfg: TechniqueConfig, ctx: Context) -> Applied:
        """Change ``model`` in place as ``cfg`` says; what changed, for the manifest."""

    def rebuild_(self, model: nn.Module, cfg: TechniqueConfig, entry: dict[str, Any]) -> None:
        """Nothing to rebuild by default (the weights alone carry the change)."""
        return None

    def to_inference_(self, model: nn.Module, cfg: TechniqueConfig) -> list[ModuleRow]:
        """The training form is the inference form by default."""
        return []

    def encodings(
        self, module: nn.Module, pname: str, tensor: torch.Tensor
    ) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        """Storage forms this technique offers for ``module``'s parameter ``pname`` (tensors by
        suffix, meta with a ``format``); the artifact keeps the smallest of all forms."""
        return []

    def decode(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} stores no tensor format {meta.get('format')!r}")

    def stored_bits(self, module: nn.Module) -> int | None:
        """Bits per weight ``module`` is stored with, if this technique decides it."""
        return None

    def sparsity_scope(self, model: nn.Module, entry: dict[str, Any]) -> list[nn.Module] | None:
        """The modules whose weights ``compress/sparsity`` is measured over, if this technique
        sparsifies (None: it does not)."""
        return None

    def kept_hidden_states(self, entry: dict[str, Any]) -> list[int] | None:
        """Which of the dense model's hidden states (0: the embeddings, i: block i's output)
        the compressed model's correspond to, when this technique removes blocks (hidden-state
        distillation matches them); None: it keeps them all."""
        return None

    @abstractmethod
    def note(self, cfg: TechniqueConfig) -> str:
        """In words, what ``cfg`` does to the model's bytes and latency (the compress
        report's note)."""


_HANDLERS: dict[type[TechniqueConfig], Technique] = {}
_DISCOVERED = False


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: make ``cls`` the handler of ``cls.config_type``."""
    if cls.config_type in _HANDLERS:
        raise RuntimeError(f"two handlers for {cls.config_type.__name__}")
    _HANDLERS[cls.config_type] = cls()
    return cls


def _discover() -> None:
    """Import every module of ``orchestrator.compress.techniques`` (they register themselves).
    The package's own listing, never a path from a job file."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    from orchestrator.compress import techniques

    for info in pkgutil.iter_modules(techniques.__path__):
        importlib.import_module(f"{techniques.__name__}.{info.name}")
    _DISCOVERED = True


def technique_for(cfg: TechniqueConfig) -> Technique:
    """The handler registered for ``type(cfg)``."""
    _discover()
    handler = _HANDLERS.get(type(cfg))
    if handler is None:
        raise KeyError(f"no compression handler is registered for {type(cfg).__name__}")
    return handler


def registered() -> dict[type[TechniqueConfig], Technique]:
    """Every handler by config type (all technique modules imported)."""
    _discover()
    return dict(_HANDLERS)

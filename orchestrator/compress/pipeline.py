"""``compress_(model, spec)``: apply the job's techniques in stage order (prune -> factorize ->
quantize), each through its registered handler, and return a ``CompressionReport``.

The order is fixed by the config's sub-sections, so no order can be wrong: pruning decides
which weights exist, factorization reshapes what is left, quantization rounds the final weights.
Plain torch: this package never imports Ray or DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.compress.common import FilterFn, ModuleRow, forward_eval, param_count, sqnr_db
from orchestrator.compress.technique import (
    Batch,
    Context,
    Step,
    TrainingHook,
    Workers,
    technique_for,
)
from orchestrator.config.compress import CompressConfig
from orchestrator.errors import ConfigError, Problem

SQNR_TOKENS = 512  # positions the per-layer output SQNR is measured on


@dataclass
class CompressionReport:
    """What compression did: per-module rows, model-level metrics (the ``compress/*`` keys of
    docs/contracts.md), plain-language notes on which savings are real, the applied steps (what
    the artifact's manifest records) and the hooks the training loop calls after each step."""

    rows: list[ModuleRow] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    hooks: list[TrainingHook] = field(default_factory=list)
    # What the shipped model's layers run on (filled when the artifact is measured).
    kernels: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": dict(self.metrics),
            "notes": list(self.notes),
            "kernels": dict(self.kernels),
            "steps": [s.to_json() for s in self.steps],
            "modules": [r.to_dict() for r in self.rows],
        }


def _capture_outputs(
    model: nn.Module, batch: Batch | None, names: list[str]
) -> dict[str, torch.Tensor]:
    """Each named module's output on one calibration batch (for per-layer SQNR), cut to its
    first rows holding at most ``SQNR_TOKENS`` positions: every output is kept twice (before
    and after), which for a 30-block decoder on a full batch would be gigabytes."""
    if batch is None:
        return {}
    ids = batch.get("input_ids")
    if ids is not None and ids.dim() == 2:
        rows = max(1, SQNR_TOKENS // ids.shape[1])
        batch = {k: v[:rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue

        def hook(_m: nn.Module, _a: tuple, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                outputs[name] = out.detach().float().cpu()

        hooks.append(module.register_forward_hook(hook))
    try:
        forward_eval(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def check_patterns(model: nn.Module, spec: CompressConfig) -> None:
    """Raise ``ConfigError`` for every include / exclude glob that matches no module, without
    changing the model: the driver calls it before any worker starts or anything is written."""
    problems = []
    for cfg in spec.techniques():
        try:
            technique_for(cfg).select(model, cfg)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)


def compress_(
    model: nn.Module,
    spec: CompressConfig,
    *,
    filter_fn: FilterFn | None = None,
    calib: list[Batch] | None = None,
    total_steps: int = 0,
    tokenizer: Any = None,
    token_counts: Callable[[], dict[int, int]] | None = None,
    agree: Callable[[Any], Any] | None = None,
    cache_dir: Path | None = None,
    workers: Workers | None = None,
) -> CompressionReport:
    """Apply ``spec`` to ``model`` in place (training form). ``calib`` batches feed Wanda, ASVD,
    structured importance, block similarity, allocation and SQNR; ``total_steps`` sizes a
    gradual pruning schedule; ``tokenizer`` and ``token_counts`` (the training split's) feed
    vocabulary trimming; ``agree``, ``cache_dir``, ``workers``: see ``Context``."""
    report = CompressionReport()
    params_before = param_count(model)
    targets = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    reference = _capture_outputs(model, calib[0] if calib else None, targets)
    ctx = Context(
        calib=calib,
        filter_fn=filter_fn,
        total_steps=total_steps,
        tokenizer=tokenizer,
        token_counts=token_counts,
        **({"agree": agree} if agree is not None else {}),
        cache_dir=cache_dir,
        workers=workers or Workers(),
    )
    for cfg in spec.techniques():
        technique = technique_for(cfg)
        if technique.needs_calibration and not calib:
            raise ConfigError(
                Problem(
                    f"compress.{cfg.stage}.method",
                    cfg.method,
                    "needs calibration batches",
                    "pass calib batches (compress.calib_batches of the training data)",
                )
            )
        applied = technique.apply_(model, cfg, ctx)
        # Earlier techniques' hooks forget modules this one replaced (a pruned layer that was
        # factorized is dense again: its sparsity is superseded).
        for hook in report.hooks:
            superseded = set(hook.sync(model))
            for row in report.rows:
                if row.name in superseded:
                    row.details["superseded_by"] = cfg.stage
        report.rows += applied.rows
        report.steps.append(Step(cfg, applied.entry))
        if applied.hook is not None:
            report.hooks.append(applied.hook)
        report.notes.append(technique.note(cfg))

    after = _capture_outputs(model, calib[0] if calib else None, list(reference))
    for row in report.rows:
        ref, out = reference.get(row.name), after.get(row.name)
        if ref is not None and out is not None and ref.shape == out.shape and not row.skipped:
            row.details["output_sqnr_db"] = sqnr_db(ref, out)
    report.metrics.update(summary_metrics(model, report.steps, params_before))
    report.metrics["compress/skipped_modules"] = float(sum(r.skipped for r in report.rows))
    return report


def weight_params(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters that are weights of Linear / Embedding-like layers (not biases or norms)."""
    return [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]


def effective_bits(model: nn.Module, steps: list[Step] = ()) -> float:
    """Mean stored bits per parameter: modules a step quantized count their bit width, the
    rest 32."""
    techniques = [s.technique for s in steps]
    total = bits = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        b = next((x for t in techniques if (x := t.stored_bits(module)) is not None), None)
        for p in own:
            n = p.numel()
            total += n
            bits += n * (b if (b is not None and p.ndim >= 2) else 32)
    return bits / max(total, 1)


def measured_sparsity(model: nn.Module, steps: list[Step] = ()) -> float:
    """zeros / total, measured on the weights: over the modules the steps sparsified, or over
    every weight matrix when none did."""
    scopes = [s.technique.sparsity_scope(model, s.entry) for s in steps]
    modules = [m for scope in scopes if scope is not None for m in scope]
    if any(scope is not None for scope in scopes):
        weights = [m.weight.detach() for m in modules]
    else:
        weights = [p.detach() for _, p in weight_params(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


def summary_metrics(model: nn.Module, steps: list[Step], params_before: int) -> dict[str, float]:
    """Model-level figures measured on the weights themselves (not the requested values)."""
    return {
        "compress/params_before": float(params_before),
        "compress/params": float(param_count(model)),
        "compress/nonzero_params": float(sum(int((p != 0).sum()) for p in model.parameters())),
        "compress/sparsity": float(measured_sparsity(model, steps)),
        "compress/bits": float(effective_bits(model, steps)),
    }

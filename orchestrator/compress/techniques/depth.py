"""Depth pruning: whole transformer blocks removed, so the model is physically shallower (fewer
bytes, proportionally less time per token).

Which blocks: the ones the user names, or (``similarity``) the ones that change their input
least: for each block, the mean over the non-padding calibration tokens of the cosine
similarity between its input and output hidden states; the most similar blocks go first
(ShortGPT's block influence, Men et al. 2024). At least one block always stays.

The blocks are the longest ``nn.ModuleList`` of same-type modules in the model (BERT's
``encoder.layer``, GPT-2's ``transformer.h``, Llama's ``model.layers``). The kept blocks are
renumbered and the config's ``num_hidden_layers`` is set to their count, so the saved
config.json describes the model as it is and a fresh model built from it already has the
right depth; the manifest entry records which of the original blocks were kept (distillation
uses it to match hidden states). Plain torch + transformers: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from torch import nn

from orchestrator.compress.common import ModuleRow, first_param, param_count
from orchestrator.compress.technique import Applied, Context, Technique, register
from orchestrator.config.compress import (
    DepthMethod,
    NamedDepthConfig,
    SimilarityDepthConfig,
    TechniqueConfig,
)
from orchestrator.errors import ConfigError, Problem


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ``nn.ModuleList`` of same-type modules holding the most
    parameters. ConfigError when the model has none."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            if len({type(m) for m in module}) == 1:
                size = param_count(module)
                if best is None or size > best[0]:
                    best = (size, name, module)
    if best is None:
        raise ConfigError(
            Problem(
                "compress.depth.method",
                "",
                f"{type(model).__name__} has no list of transformer blocks to remove from",
                "remove compress.depth for this model",
            )
        )
    return best[1], best[2]


def _candidates(list_name: str, blocks: nn.ModuleList, cfg: DepthMethod) -> list[int]:
    """Blocks ``include`` / ``exclude`` allow removing (all of them by default)."""
    out = []
    for i in range(len(blocks)):
        name = f"{list_name}.{i}"
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in cfg.exclude
        ):
            out.append(i)
    return out


def _count(cfg: TechniqueConfig, n: int) -> int:
    if isinstance(cfg, NamedDepthConfig):
        return len(set(cfg.remove))
    return cfg.blocks if cfg.blocks is not None else round(cfg.ratio * n)


def _check(list_name: str, blocks: nn.ModuleList, cfg: TechniqueConfig) -> None:
    n = len(blocks)
    key = "compress.depth"
    if isinstance(cfg, NamedDepthConfig):
        wrong = sorted(i for i in set(cfg.remove) if i >= n)
        if wrong:
            raise ConfigError(
                Problem(
                    f"{key}.remove",
                    cfg.remove,
                    f"names blocks {wrong}; the model has {n}",
                    f"use block indices 0..{n - 1}",
                )
            )
    remove = _count(cfg, n)
    if remove >= n:
        which = (
            "remove"
            if isinstance(cfg, NamedDepthConfig)
            else ("blocks" if cfg.blocks is not None else "ratio")
        )
        raise ConfigError(
            Problem(
                f"{key}.{which}",
                getattr(cfg, which),
                f"would remove all {n} blocks of {list_name} (at least one must stay)",
                f"remove at most {n - 1} blocks",
            )
        )
    allowed = _candidates(list_name, blocks, cfg)
    if isinstance(cfg, NamedDepthConfig):
        barred = sorted(i for i in set(cfg.remove) if i not in allowed)
        if barred:
            raise ConfigError(
                Problem(
                    f"{key}.remove",
                    cfg.remove,
                    f"names blocks {barred} that compress.depth.include / exclude keep",
                    "name other blocks",
                )
            )
    elif remove > len(allowed):
        raise ConfigError(
            Problem(
                f"{key}.include",
                cfg.include,
                f"allows removing {len(allowed)} blocks, fewer than the {remove} asked for",
                "widen include or ask for fewer",
            )
        )


@torch.no_grad()
def block_similarity(
    model: nn.Module, blocks: nn.ModuleList, calib: list[dict[str, torch.Tensor]]
) -> list[float]:
    """Per block: mean cosine similarity of its input and output hidden states over the
    non-padding calibration tokens."""
    sums = [0.0] * len(blocks)
    count = [0] * len(blocks)
    state: dict[str, torch.Tensor] = {}
    hooks = []

    def make(i: int) -> Any:
        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            y = out[0] if isinstance(out, tuple) else out
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                return
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            mask = state.get("mask")
            if mask is not None and mask.shape == cos.shape:
                cos = cos[mask.bool()]
            sums[i] += float(cos.sum())
            count[i] += cos.numel()

        return hook

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(make(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = first_param(model).device
    try:
        for batch in calib:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            if "attention_mask" in inputs:
                state["mask"] = inputs["attention_mask"]
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [s / max(1, c) for s, c in zip(sums, count, strict=True)]


def _keep(model: nn.Module, list_name: str, blocks: nn.ModuleList, kept: list[int]) -> None:
    """Keep only the blocks ``kept`` (in order), renumbered; the config says the new depth."""
    new = nn.ModuleList([blocks[i] for i in kept])
    for position, block in enumerate(new):
        for sub in block.modules():  # decoder attention indexes its cache by layer_idx
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = position
    parent_name, _, child = list_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)


@register
class SimilarityDepth(Technique):
    config_type = SimilarityDepthConfig
    needs_calibration = True

    def select(
        self, model: nn.Module, cfg: TechniqueConfig, filter_fn: Any = None
    ) -> list[tuple[str, nn.Module]]:
        list_name, blocks = find_blocks(model)
        _check(list_name, blocks, cfg)
        return [(f"{list_name}.{i}", blocks[i]) for i in _candidates(list_name, blocks, cfg)]

    def removed(
        self, model: nn.Module, cfg: TechniqueConfig, ctx: Context
    ) -> tuple[list[int], list[float] | None]:
        """The blocks to remove, and the per-block similarity they were chosen by."""
        list_name, blocks = find_blocks(model)
        allowed = _candidates(list_name, blocks, cfg)
        similarity = block_similarity(model, blocks, ctx.calib or [])
        ranked = sorted(allowed, key=lambda i: -similarity[i])
        return sorted(ranked[: _count(cfg, len(blocks))]), similarity

    def apply_(self, model: nn.Module, cfg: TechniqueConfig, ctx: Context) -> Applied:
        list_name, blocks = find_blocks(model)
        _check(list_name, blocks, cfg)
        chosen, scores = self.removed(model, cfg, ctx)
        removed = set(chosen)
        # A row per removed block (a kept block is not one the technique declined).
        rows = [
            ModuleRow(
                name=f"{list_name}.{i}",
                technique="depth",
                kind=type(block).__name__,
                shape_before=[],
                shape_after=[],
                params_before=param_count(block),
                params_after=0,
                details={"method": cfg.method}
                | ({"similarity": scores[i]} if scores is not None else {}),
            )
            for i, block in enumerate(blocks)
            if i in removed
        ]
        kept = [i for i in range(len(blocks)) if i not in removed]
        _keep(model, list_name, blocks, kept)
        return Applied(rows, entry={"blocks": list_name, "kept": kept, "total": len(blocks)})

    def rebuild_(self, model: nn.Module, cfg: TechniqueConfig, entry: dict[str, Any]) -> None:
        """The saved config already has the kept depth; check it is the one recorded."""
        blocks = model.get_submodule(entry["blocks"])
        if len(blocks) != len(entry["kept"]):
            raise ValueError(
                f"the config builds {len(blocks)} blocks; the manifest kept {len(entry['kept'])}"
            )

    def kept_hidden_states(self, entry: dict[str, Any]) -> list[int]:
        return [0] + [i + 1 for i in entry["kept"]]

    def note(self, cfg: TechniqueConfig) -> str:
        return (
            "depth pruning: whole blocks removed, so bytes and latency drop for real "
            "(about in proportion to the blocks removed)"
        )


@register
class NamedDepth(SimilarityDepth):
    config_type = NamedDepthConfig
    needs_calibration = False

    def removed(
        self, model: nn.Module, cfg: TechniqueConfig, ctx: Context
    ) -> tuple[list[int], list[float] | None]:
        return sorted(set(cfg.remove)), None

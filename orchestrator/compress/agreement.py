"""How closely an exported model predicts like the artifact it came from: the share of examples
with the same predicted label, the largest logit difference, and the accuracy of both, on the
same batches (an export's check on the test split, written as ``<format>_check.json``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


def torch_logits(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    """A torch classifier as a batch -> logits function."""

    def logits(b: Batch) -> torch.Tensor:
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    return logits


def agreement(
    model: nn.Module,
    other: Callable[[Batch], torch.Tensor],
    batches: Iterable[Batch],
    name: str,
) -> dict[str, Any]:
    """``model`` (the artifact) against ``other`` (a batch -> logits); the other's accuracy is
    ``accuracy_<name>``."""
    n = same = right_ref = right_other = 0
    max_diff = 0.0
    reference = torch_logits(model.eval())
    with torch.no_grad():
        for b in batches:
            ref, got = reference(b), other(b)
            max_diff = max(max_diff, float((got - ref).abs().max()))
            p_ref, p_got = ref.argmax(-1), got.argmax(-1)
            n += len(p_ref)
            same += int((p_ref == p_got).sum())
            if "labels" in b:
                right_ref += int((p_ref == b["labels"]).sum())
                right_other += int((p_got == b["labels"]).sum())
    return {
        "examples": n,
        "agreement": same / n if n else None,
        "max_logit_diff": max_diff,
        "accuracy_artifact": right_ref / n if n else None,
        f"accuracy_{name}": right_other / n if n else None,
    }


def write_check(folder: Path, fmt: str, check: dict[str, Any]) -> None:
    """``check`` as ``<fmt>_check.json`` in the exported ``folder``."""
    (folder / f"{fmt}_check.json").write_text(json.dumps(check, indent=2, sort_keys=True))

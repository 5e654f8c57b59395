"""A compressed artifact as a plain transformers model folder
(``orchestrator export RUN --best --format hf``): ``AutoModelForSequenceClassification
.from_pretrained(folder)`` loads it with transformers alone, no code of this package.

A transformers BERT or GPT-2 describes its structure with a few numbers in its config (blocks,
FFN width, heads, vocabulary), the same for every block. So a recipe exports when what it
changed fits those numbers, and its weights are stored as float:

- depth pruning: fewer blocks (``num_hidden_layers`` / ``n_layer``);
- structured pruning of FFN neurons only (``heads: false``): a narrower FFN, the same width in
  every block (``intermediate_size`` / ``n_inner``);
- unstructured pruning: the weights with their zeros (no smaller on disk than dense);
- quantization: the weights dequantized to float32, int8 kernels included. Those models run
  in float, so their predictions differ a little from the artifact's (which quantizes
  activations on the fly, or fake-quantizes them): the export's check measures it.

Refused, with the reason: removed attention heads (transformers derives the head size from the
hidden size and the head count, so fewer heads of the same size cannot be described), a
trimmed vocabulary (the embedding holds only the kept tokens and maps the others through an
id map), factorization (each Linear becomes two thinner ones, which a transformers block has
no place for), and models other than BERT and GPT-2 classifiers. A recipe that a config
describes but whose weights do not fit the model built from it is refused too, naming the
first weights that do not fit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from orchestrator.errors import ConfigError, Problem


@dataclass(frozen=True)
class Layout:
    blocks: str  # dotted path of the module list of blocks
    layers_key: str  # config key: number of blocks
    ffn_key: str  # config key: FFN width
    ffn_module: str  # dotted path, inside a block, of the FFN's first layer


LAYOUTS = {
    "bert": Layout(
        "bert.encoder.layer", "num_hidden_layers", "intermediate_size", "intermediate.dense"
    ),
    "gpt2": Layout("transformer.h", "n_layer", "n_inner", "mlp.c_fc"),
}


def _refuse(message: str) -> ConfigError:
    return ConfigError(
        Problem(
            "--format",
            "hf",
            message,
            "export it as an artifact (--format artifact) or as ONNX (--format onnx), or pick "
            "a trial whose recipe changes only what a transformers config describes: depth "
            "pruning, FFN-only structured pruning (heads: false), unstructured pruning, "
            "quantization (stored as float)",
        ),
        source="export",
    )


def unsupported(model: nn.Module, steps: list[dict[str, Any]]) -> list[str]:
    """Why ``model`` (a loaded artifact whose manifest records ``steps``) cannot be written as
    a plain transformers model, one line per reason (empty: it can)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    reasons = []
    if model_type not in LAYOUTS:
        reasons.append(
            f"model type {model_type!r}: this export writes BERT and GPT-2 classifiers "
            f"({', '.join(LAYOUTS)})"
        )
    for step in steps:
        stage, cfg = step.get("stage"), step.get("config", {})
        if stage == "vocab":
            reasons.append(
                "compress.vocab: the trimmed embedding holds only the kept tokens and reads "
                "the others through an id map; a transformers embedding takes the tokenizer's "
                "ids directly"
            )
        elif stage == "prune" and cfg.get("method") == "structured" and cfg.get("heads"):
            reasons.append(
                "compress.prune.heads: attention heads were removed; transformers derives the "
                "head size from hidden_size / num_attention_heads, so fewer heads of the same "
                "size cannot be described in its config"
            )
        elif stage == "factorize":
            reasons.append(
                f"compress.factorize ({cfg.get('method')}): each factorized Linear is two "
                "thinner Linears, which a transformers block has no place for"
            )
    return reasons


def _get(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _ffn_width(layer: nn.Module) -> int:
    if hasattr(layer, "nf"):  # transformers' Conv1D (GPT-2)
        return int(layer.nf)
    if hasattr(layer, "out_features"):
        return int(layer.out_features)
    return int(layer.weight().shape[0])  # torch.ao dynamic int8 Linear


def float_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in plain float modules: int8 Linears (torch.ao) and activation
    fake-quant Linears as ``nn.Linear``, int8 and packed embedding tables as ``nn.Embedding``,
    their weights dequantized."""
    from orchestrator.compress.onnx_export import float_graph
    from orchestrator.compress.qmodules import ActQuantLinear, Int8Embedding, PackedEmbedding
    from orchestrator.compress.qtensor import dequantize

    out, _ = float_graph(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8Embedding | PackedEmbedding):
                table = dequantize(child.qtensor()).float()
                plain = nn.Embedding.from_pretrained(
                    table, freeze=False, padding_idx=child.padding_idx
                )
                setattr(parent, name, plain)
            elif isinstance(child, ActQuantLinear):
                plain = nn.Linear(child.in_features, child.out_features, child.bias is not None)
                plain.load_state_dict(
                    {k: v for k, v in child.state_dict().items() if k in ("weight", "bias")}
                )
                setattr(parent, name, plain)
    return out


def to_transformers(model: nn.Module, steps: list[dict[str, Any]]) -> nn.Module:
    """The plain transformers model of ``model`` (a loaded artifact whose manifest records
    ``steps``), its weights loaded; raises ``ConfigError`` (``--format``) when the recipe
    cannot be described by a transformers config."""
    from transformers import AutoModelForSequenceClassification

    reasons = unsupported(model, steps)
    if reasons:
        raise _refuse(
            "this recipe cannot be written as a plain transformers model: " + "; ".join(reasons)
        )
    layout = LAYOUTS[model.config.model_type]
    plain = float_model(model)
    blocks = _get(plain, layout.blocks)
    widths = {_ffn_width(_get(b, layout.ffn_module)) for b in blocks}
    if len(widths) != 1:
        raise _refuse(
            f"the blocks' FFNs have different widths ({sorted(widths)}); a transformers config "
            "has one"
        )
    config = copy.deepcopy(model.config)
    setattr(config, layout.layers_key, len(blocks))
    setattr(config, layout.ffn_key, widths.pop())
    target = AutoModelForSequenceClassification.from_config(config).eval()
    want = target.state_dict()
    have = plain.state_dict()
    state = {}
    for key, tensor in want.items():
        got = have.get(key)
        if got is None or got.shape != tensor.shape:
            raise _refuse(
                f"the weights do not fit the transformers model its config describes: {key} "
                f"is {None if got is None else tuple(got.shape)} here, {tuple(tensor.shape)} there"
            )
        state[key] = got.detach().to(tensor.dtype).contiguous()
    extra = sorted(k for k in have if k not in want)
    if extra:
        raise _refuse(
            f"the model has weights a transformers {config.model_type} has no place for "
            f"({', '.join(extra[:3])}{'...' if len(extra) > 3 else ''})"
        )
    target.load_state_dict(state, strict=True)
    return target


def load_plain(folder: Path) -> nn.Module:
    """The exported folder as transformers alone loads it (safetensors weights)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True
    ).eval()

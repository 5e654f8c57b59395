"""A compressed artifact as an ONNX model that ONNX Runtime runs on CPU
(``orchestrator export RUN --best --format onnx``).

How each part of a recipe is expressed:

- physically smaller layers (structured pruning, depth pruning, factorization into two Linears,
  a trimmed vocabulary behind its id map) are exported as they are: smaller MatMuls, fewer
  blocks, a Gather through the id map;
- int8 Linear layers (``dynamic_int8``: torch.ao dynamic quantized Linear) become ONNX Runtime's
  int8 operators (``DynamicQuantizeLinear`` + ``MatMulInteger``, per-channel int8 weights,
  quantized by ONNX Runtime's ``quantize_dynamic`` from the artifact's dequantized int8 weights,
  so the codes are re-derived, not copied). ONNX Runtime quantizes activations to 8 bits,
  torch.ao's x86 kernels to 7 (``reduce_range``), so the two int8 models do not give identical
  logits: the export's check measures the agreement on the test split;
- int8 embedding tables stay int8 in the graph (an int8 table, a Gather and a per-row scale);
- refused, with the reason: low-bit Linear weights (``weight_only`` 2-4 bit, and 8-bit
  weight-only) and packed low-bit embeddings (``embedding_bits`` below 8). ONNX Runtime has
  low-bit weight operators (``MatMulNBits``), but this exporter does not emit them yet, and
  exporting those weights as float would make the model larger than the artifact.

Needs the ``onnx`` extra (``onnx``, ``onnxruntime``, ``onnxscript``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.errors import ConfigError, Problem

ONNX_FILE = "model.onnx"
OPSET = 18
INPUTS = ("input_ids", "attention_mask")


def _refuse(message: str, fix: str) -> ConfigError:
    return ConfigError(Problem("--format", "onnx", message, fix), source="export")


def require_runtime(key: str = "--format", value: str = "onnx") -> None:
    """The ONNX packages, or a ``ConfigError`` naming ``key`` (the flag or config key that asked
    for them) and how to install them."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        other = "export the artifact itself (--format artifact)"
        if key != "--format":
            other = f"set {key} to its default"
        raise ConfigError(
            Problem(
                key,
                value,
                f"needs the packages {', '.join(missing)}, which are not installed",
                "pip install -e '.[onnx]' (or pip install onnx onnxruntime onnxscript), or "
                + other,
            ),
            source="export" if key == "--format" else "job",
        )


def manifest_steps(folder: Path) -> list[dict[str, Any]]:
    """The compression steps an artifact's manifest records, in order."""
    return list(json.loads((Path(folder) / "manifest.json").read_text()).get("steps", []))


def unsupported(model: nn.Module, steps: list[dict[str, Any]]) -> list[str]:
    """Why ``model`` (loaded from an artifact whose manifest records ``steps``) cannot be
    exported, one line per reason (empty: it can)."""
    from orchestrator.compress.qmodules import PackedEmbedding

    reasons = []
    for step in steps:
        cfg = step.get("config", {})
        if step.get("stage") == "quantize" and cfg.get("method") != "dynamic_int8":
            bits = cfg.get("bits")
            reasons.append(
                f"quantize.method={cfg.get('method')}"
                + (f" ({bits}-bit)" if bits else "")
                + ": low-bit or weight-only Linear weights; ONNX Runtime's MatMulNBits is not "
                "emitted by this exporter, and float weights would be larger than the artifact"
            )
    packed = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedEmbedding)]
    if packed:
        reasons.append(
            f"quantize.embedding_bits={packed[0][1].bits}: low-bit packed embedding tables "
            f"({', '.join(n for n, _ in packed)}); as float they would be larger than the "
            "artifact"
        )
    return reasons


def _float_linear(q: nn.Module) -> nn.Linear:
    w = q.weight().dequantize()
    b = q.bias()
    linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        linear.weight.copy_(w)
        if b is not None:
            linear.bias.copy_(b)
    return linear


def float_graph(model: nn.Module) -> tuple[nn.Module, list[torch.Tensor]]:
    """A copy of ``model`` whose torch.ao int8 Linears are float Linears holding the
    dequantized int8 weights (for the exporter to trace), and those weights."""
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    out = copy.deepcopy(model).eval()
    weights = []
    for parent in list(out.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, dynamic):
                linear = _float_linear(child)
                setattr(parent, child_name, linear)
                weights.append(linear.weight.detach())
    return out, weights


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _int8_matmuls(graph: Any, weights: list[torch.Tensor]) -> list[str]:
    """The MatMul nodes whose constant weight is one of the int8 Linears' dequantized weights.
    Found by value, not by name: the exporter folds the Linear's transpose into a new, unnamed
    constant."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    wanted = [w.t().contiguous().numpy() for w in weights]  # a MatMul's B is [in, out]
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        b = numpy_helper.to_array(inits[node.input[1]])
        if any(b.shape == w.shape and (b == w).all() for w in wanted):
            nodes.append(node.name)
    return nodes


def to_onnx(
    model: nn.Module,
    steps: list[dict[str, Any]],
    out_file: Path,
    example: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """Write ``model`` (a loaded artifact whose manifest records ``steps``) as ONNX to
    ``out_file``; returns what was done. Raises ``ConfigError`` (``--format``) when a part of
    the recipe cannot be expressed."""
    require_runtime()
    reasons = unsupported(model, steps)
    if reasons:
        raise _refuse(
            "this recipe cannot be exported to ONNX: " + "; ".join(reasons),
            "export it as an artifact (--format artifact), or pick a trial whose recipe uses "
            "pruning, factorization, vocabulary trimming and dynamic_int8 (8-bit embeddings)",
        )
    import onnx

    graph_model, int8_linears = float_graph(model)
    with tempfile.TemporaryDirectory() as tmp:
        float_file = Path(tmp) / "float.onnx"
        export_float(graph_model, float_file, example)
        graph_diff = _graph_diff(graph_model, float_file, example)
        nodes = _int8_matmuls(onnx.load(str(float_file)).graph, int8_linears)
        if len(nodes) < len(int8_linears):
            raise _refuse(
                f"found {len(nodes)} of the {len(int8_linears)} int8 Linear layers in the "
                "exported graph, so their int8 kernels could not be kept",
                "export it as an artifact (--format artifact)",
            )
        if nodes:
            quantize_matmuls(float_file, out_file, nodes)
        else:
            shutil.copyfile(float_file, out_file)
    return {
        "int8_matmuls": len(nodes),
        "opset": OPSET,
        "bytes": out_file.stat().st_size,
        "float_graph_max_diff": graph_diff,
    }


def export_float(model: nn.Module, out_file: Path, example: dict[str, torch.Tensor]) -> None:
    """A float classifier (``input_ids``, ``attention_mask`` -> ``logits``) as ONNX, batch and
    sequence length dynamic, through torch.onnx's dynamo exporter."""
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=getattr(model.config, "max_position_embeddings", 512))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter prints its progress, and warns
        torch.onnx.export(
            _Logits(model).eval(),
            tuple(example[k] for k in INPUTS),
            str(out_file),
            dynamo=True,
            input_names=list(INPUTS),
            output_names=["logits"],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
            opset_version=OPSET,
            external_data=False,
        )


def quantize_matmuls(float_file: Path, out_file: Path, nodes: list[str] | None = None) -> None:
    """ONNX Runtime's dynamic int8 quantization (per-channel int8 weights, activations
    quantized at run time): of the MatMul nodes ``nodes``, or, ``None``, of every MatMul and
    Gemm with a constant weight (what a deployer does to a dense model)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    kwargs: dict[str, Any] = (
        {"nodes_to_quantize": nodes}
        if nodes is not None
        else {"op_types_to_quantize": ["MatMul", "Gemm"]}
    )
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        quantize_dynamic(
            str(float_file), str(out_file), weight_type=QuantType.QInt8, per_channel=True, **kwargs
        )


def session(onnx_file: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``onnx_file``; ``threads``: its intra-op threads (one
    inter-op thread), else ONNX Runtime's default."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])


def _graph_diff(
    graph_model: nn.Module, float_file: Path, example: dict[str, torch.Tensor]
) -> float:
    """The exported float graph against the float model it was traced from, on ``example``:
    float rounding only, so the graph itself is faithful; what remains of the difference
    from the artifact is the int8 kernels' (ONNX Runtime's and torch's quantize activations
    differently)."""
    with torch.no_grad():
        ref = graph_model(input_ids=example["input_ids"], attention_mask=example["attention_mask"])
    got = session(float_file).run(None, {k: example[k].numpy() for k in INPUTS})[0]
    return float((torch.from_numpy(got) - ref.logits).abs().max())


def agreement(
    model: nn.Module, onnx_file: Path, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """The ONNX model against the artifact on the same batches (``compress.agreement``)."""
    from orchestrator.compress.agreement import agreement as compare

    runtime = session(onnx_file)

    def logits(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(runtime.run(None, {k: b[k].numpy() for k in INPUTS})[0])

    return compare(model, logits, batches, "onnx")

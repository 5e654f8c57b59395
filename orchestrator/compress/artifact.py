"""The compressed artifact: what is shipped, measured in bytes, and loaded back.

A folder with ``model.safetensors`` (tensors only: no pickle), ``manifest.json`` (how each tensor
is stored and how the model's structure was changed), ``config.json`` and the tokenizer (text
models; an image model has none). Each
weight is stored in whichever of these is smallest, so the artifact's size is the true size:

- ``dense``: the float32 tensor;
- ``sparse``: a bitmap of the non-zeros (1 bit per weight) and the non-zero float32 values;
- ``quant``: packed low-bit codes plus scales (and zero points);
- ``sparse_quant``: the bitmap plus packed codes of the non-zeros only.

``load_artifact`` rebuilds a runnable model from the folder with transformers and this package
alone (no training code), giving the same outputs as the model that was saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from orchestrator.compress.common import set_module
from orchestrator.compress.factorize import LowRankLinear
from orchestrator.config.compress import QuantizeConfig
from orchestrator.errors import CorruptFileError
from orchestrator.files import write_dir_atomic
from orchestrator.safeload import check_safetensors, load_json, load_safetensors

FORMAT = "orchestrator-compressed/1"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


def _bitmap(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.flatten().cpu().numpy().astype(np.uint8)))


def _unbitmap(bits: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy())[:numel].astype(bool))


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def encode_weight(t: torch.Tensor, module: nn.Module, pname: str) -> tuple[dict, dict]:
    """The smallest storage of one parameter: (tensors by suffix, meta)."""
    from orchestrator.compress.quantize import encode, pack_codes, quantized_weight

    t = t.detach().float().cpu().contiguous()
    options: list[tuple[dict, dict]] = [({"": t}, {"format": "dense"})]
    mask = t != 0
    nnz = int(mask.sum())
    sparse_ok = t.ndim >= 2 and nnz < t.numel()
    if sparse_ok:
        options.append(
            (
                {"bitmap": _bitmap(mask), "values": t[mask]},
                {"format": "sparse", "shape": list(t.shape)},
            )
        )
    q = quantized_weight(module) if pname == "weight" else None
    if q is not None:
        qt, meta = encode(q)
        options.append((dict(qt), {"format": "quant", "quant": meta}))
        if sparse_ok:
            nz_codes = pack_codes(q.codes.flatten()[mask.flatten()].contiguous(), q.bits)
            sq = {k: v for k, v in qt.items() if k != "codes"}
            sq.update(bitmap=_bitmap(mask), nzcodes=nz_codes)
            options.append(
                (sq, {"format": "sparse_quant", "quant": meta, "nnz": nnz, "shape": list(t.shape)})
            )
    return min(options, key=lambda o: _nbytes(o[0]))


def decode_weight(tensors: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    from orchestrator.compress.quantize import decode, pack_codes, unpack_codes

    fmt = meta["format"]
    if fmt == "dense":
        return tensors[""]
    if fmt == "sparse":
        shape = meta["shape"]
        numel = int(np.prod(shape))
        mask = _unbitmap(tensors["bitmap"], numel)
        out = torch.zeros(numel, dtype=tensors["values"].dtype)
        out[mask] = tensors["values"]
        return out.view(shape)
    if fmt == "quant":
        return decode(tensors, meta["quant"])
    if fmt == "sparse_quant":
        q = meta["quant"]
        shape = meta["shape"]
        numel = int(np.prod(shape))
        mask = _unbitmap(tensors["bitmap"], numel)
        codes = torch.zeros(numel, dtype=torch.uint8)
        codes[mask] = unpack_codes(tensors["nzcodes"], q["bits"], int(meta["nnz"]))
        dense = {k: v for k, v in tensors.items() if k not in ("bitmap", "nzcodes")}
        dense["codes"] = pack_codes(codes, q["bits"])
        return decode(dense, q) * mask.view(shape).float()
    raise ValueError(f"unknown tensor format {fmt!r} in the manifest")


def _plain_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, nn.Module, str]]:
    """Every persistent tensor of the model with the module and attribute that own it."""
    out = {}
    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            out[f"{mod_name}.{pname}" if mod_name else pname] = (p, module, pname)
        for bname, b in module.named_buffers(recurse=False):
            if bname in module._non_persistent_buffers_set:
                continue
            out[f"{mod_name}.{bname}" if mod_name else bname] = (b, module, bname)
    return out


def save_artifact(
    model: nn.Module,
    folder: str | Path,
    *,
    quantize: QuantizeConfig | None = None,
    structure: dict | None = None,
    extra: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> int:
    """Write ``model`` (in its training form: masks applied, fake-quant modules still in place)
    to ``folder`` atomically; returns the artifact's size in bytes (weights + manifest)."""
    from orchestrator.compress.quantize import quantized_weight

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, (t, module, pname) in _plain_state(model).items():
        parts, meta = encode_weight(t, module, pname)
        entries[name] = meta
        for suffix, value in parts.items():
            tensors[f"{name}.{suffix}" if suffix else name] = value.contiguous()
    manifest = {
        "format": FORMAT,
        "structure": structure,
        "low_rank": {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)},
        "quantize": quantize.model_dump(mode="json") if quantize is not None else None,
        "quantized_modules": {
            n: type(m).__name__ for n, m in model.named_modules() if quantized_weight(m) is not None
        },
        "tensors": entries,
        **(extra or {}),
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    # Written beside ``folder`` and swapped in whole: a kill mid-write leaves the old artifact.
    write_dir_atomic(folder, fill)
    return artifact_bytes(folder)


def artifact_bytes(folder: str | Path) -> int:
    """Bytes that make up the model: the weights file and the manifest (config and tokenizer
    are the same for a dense and a compressed model and are not counted for either)."""
    folder = Path(folder)
    return (folder / WEIGHTS).stat().st_size + (folder / MANIFEST).stat().st_size


_FIX = (
    "the artifact was damaged or altered after it was written; export it again from its run "
    "(orchestrator export RUN_DIR --trial NAME) or re-run the job that wrote it"
)


def _read_manifest(folder: Path) -> dict[str, Any]:
    manifest = load_json(folder / MANIFEST, what="the artifact's manifest", fix=_FIX)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{folder} is not a {FORMAT} artifact")
    return manifest


def check_artifact(folder: str | Path) -> None:
    """Cheap check that ``folder`` is a whole artifact (the manifest parses, the weights file's
    header covers the file exactly) without building the model; ``CorruptFileError`` if not."""
    folder = Path(folder)
    _read_manifest(folder)
    check_safetensors(folder / WEIGHTS, what="the artifact's weights file", fix=_FIX)


def load_artifact(folder: str | Path) -> nn.Module:
    """Rebuild the compressed model in its inference form (real int8 kernels where the recipe
    asked for them). Weights load from safetensors: no pickle is ever read. A damaged artifact
    (truncated weights, garbled or altered manifest) raises ``CorruptFileError`` naming the file."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    flat = load_safetensors(folder / WEIGHTS, what="the artifact's weights file", fix=_FIX)
    try:
        model = _rebuild(folder, manifest, flat)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
        # Both files parse but do not fit each other or the model: one was altered or swapped.
        raise CorruptFileError(
            folder,
            "artifact",
            f"has a {WEIGHTS} and a {MANIFEST} that do not match ({type(e).__name__}: {e})",
            _FIX,
        ) from None
    return model.eval()


def _rebuild(folder: Path, manifest: dict[str, Any], flat: dict[str, torch.Tensor]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    # Importing it registers the project's own model types (the MLP) with the Auto classes.
    import orchestrator.models.mlp  # noqa: F401
    from orchestrator.compress.quantize import QuantEmbedding, QuantLinear, to_inference_

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        problem = f"cannot be read ({' '.join(str(e).split())[:200]})"
        raise CorruptFileError(
            folder / "config.json", "the artifact's config", problem, _FIX
        ) from None
    model = AutoModelForSequenceClassification.from_config(config)
    if manifest.get("structure"):
        from orchestrator.compress.structured import rebuild_structure_

        rebuild_structure_(model, manifest["structure"])
    for name, rank in manifest["low_rank"].items():
        old = model.get_submodule(name)
        set_module(
            model,
            name,
            LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None),
        )
    qcfg = QuantizeConfig(**manifest["quantize"]) if manifest.get("quantize") else None
    for name, kind in manifest["quantized_modules"].items():
        old = model.get_submodule(name)
        new = (
            QuantEmbedding.from_embedding(old, qcfg)
            if kind == "QuantEmbedding"
            else QuantLinear.from_linear(old, qcfg)
        )
        set_module(model, name, new)
    state = {}
    for name, meta in manifest["tensors"].items():
        prefix = name + "."
        parts = {
            k[len(prefix) :]: v
            for k, v in flat.items()
            if k.startswith(prefix)
            and k[len(prefix) :] in ("bitmap", "values", "codes", "scale", "zero_point", "nzcodes")
        }
        if meta["format"] == "dense":
            parts = {"": flat[name]}
        state[name] = decode_weight(parts, meta)
    model.load_state_dict(state, strict=False)
    missing = set(_plain_state(model)) - set(state)
    if missing:
        raise KeyError(f"the artifact lacks tensors {sorted(missing)[:5]}")
    if qcfg is not None:
        to_inference_(model, qcfg)
    return model

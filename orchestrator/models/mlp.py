"""A small MLP image classifier written as a transformers model, for the MNIST seed demo.

It is a ``PreTrainedModel`` with its own ``PretrainedConfig`` and is registered with
``AutoConfig`` / ``AutoModelForSequenceClassification`` when this module is imported, so every
path that handles the text classifiers handles it too: ``save_pretrained`` / ``from_pretrained``
(the search's baseline -> trials hand-off), ``load_artifact`` (which rebuilds models through the
Auto classes), DDP, and compression, whose prune / factorize / quantize target its ``nn.Linear``
layers. The output head is named ``classifier`` so the techniques' default exclude keeps it dense.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "orchestrator-mlp"


class MLPConfig(PretrainedConfig):
    """Shape of the MLP: ``input_size`` features (784 = 28 x 28 pixels) -> ``hidden_sizes``
    (ReLU after each) -> ``num_labels`` logits. ``num_labels`` and the label names are the
    standard ``PretrainedConfig`` fields."""

    model_type = MODEL_TYPE

    def __init__(
        self, input_size: int = 784, hidden_sizes: list[int] | None = None, **kwargs: object
    ) -> None:
        self.input_size = input_size
        # 784 -> 256 -> 128 -> 10 is about 0.24 M parameters: a training epoch over a few
        # thousand digits takes about a second on one CPU core.
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [256, 128]
        super().__init__(**kwargs)


class MLPForImageClassification(PreTrainedModel):
    """``forward(pixel_values, labels=None)`` -> ``SequenceClassifierOutput(loss, logits)``;
    ``pixel_values`` is ``[batch, input_size]`` (or any shape that flattens to it)."""

    config_class = MLPConfig
    base_model_prefix = "mlp"
    main_input_name = "pixel_values"

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        widths = [config.input_size, *config.hidden_sizes]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.classifier = nn.Linear(widths[-1], config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's own Linear init (Kaiming-uniform) instead of transformers' N(0, 0.02), which
        # is meant for residual transformer stacks and starts a plain ReLU MLP needlessly slowly.
        if isinstance(module, nn.Linear):
            module.reset_parameters()

    def example_inputs(self, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
        """A batch of random images in [0, 1], for timing a forward pass."""
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.rand((batch_size, self.config.input_size), generator=g)}

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        x = pixel_values.flatten(1)
        # Pixels come as fp32 while DeepSpeed bf16 / fp16 casts the weights: follow the first
        # layer's dtype, as transformers' models do. A first layer without float weights (int8
        # kernels) takes its input as it comes.
        first = self.layers[0] if len(self.layers) else self.classifier
        dtype = next((p.dtype for p in first.parameters() if p.is_floating_point()), None)
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)
        for layer in self.layers:
            x = torch.relu(layer(x))
        logits = self.classifier(x)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


# Registration makes AutoConfig.from_pretrained / AutoModelForSequenceClassification (and so
# load_artifact) rebuild the model from a saved config.json whose model_type is MODEL_TYPE.
AutoConfig.register(MODEL_TYPE, MLPConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MLPConfig, MLPForImageClassification, exist_ok=True)

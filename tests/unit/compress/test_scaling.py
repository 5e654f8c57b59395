"""Activation-aware scaling before quantization (``compress.scaling``): folding the scales
keeps the model's function, the searched strength lowers the output error that rounding
leaves where inputs have outlier channels (AWQ-style for low-bit weights, SmoothQuant-style for
int8 kernels), and the key is refused where it cannot work."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from orchestrator import models
from orchestrator.compress import compress_
from orchestrator.compress.qtensor import fake_quantize
from orchestrator.compress.scaling import _fold, decoder_groups, scale_activations_
from orchestrator.config.compress import CompressConfig
from orchestrator.config.loader import validate_job
from orchestrator.config.schema import ModelConfig
from orchestrator.errors import ConfigError

pytestmark = pytest.mark.unit


def _llama(kv_heads: int, outliers: bool = False) -> LlamaForCausalLM:
    """2 blocks, hidden 64, 4 query heads; with ``outliers`` a few channels of each norm's
    output are 30x larger than the rest, as in trained LLMs."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    if outliers:
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[[3, 17, 40]] = 30.0
    return model


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 300, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 10:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _linears(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}


def test_the_groups_follow_the_attention_layout():
    groups, skipped = decoder_groups(_llama(kv_heads=4))
    producers = [g.producer for g in groups]
    assert "model.layers.0.self_attn.v_proj" in producers  # one value head per query head
    assert len(groups) == 8 and not skipped
    groups, skipped = decoder_groups(_llama(kv_heads=2))
    assert len(groups) == 6 and all("self_attn.v_proj" not in g.producer for g in groups)
    assert [name for name, _ in skipped] == [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]
    assert decoder_groups(torch.nn.Sequential(torch.nn.Linear(4, 4))) == ([], [])


def test_folding_any_scales_keeps_the_function():
    model = _llama(kv_heads=4)
    batch = _batches(1)[0]
    with torch.no_grad():
        before = model(**batch).logits
        groups, _ = decoder_groups(model)
        g = torch.Generator().manual_seed(2)
        for group in groups:
            width = model.get_submodule(group.consumers[0]).in_features
            _fold(model, group, torch.rand(width, generator=g) * 4 + 0.25)
        after = model(**batch).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def _scaled(model, rounding, act_quant: bool, alpha=None):
    return scale_activations_(
        model, _batches(), rounding, act_quant=act_quant, selected=_linears(model), alpha=alpha
    )


def test_smoothquant_lowers_the_int8_error_of_outlier_inputs():
    model = _llama(kv_heads=2, outliers=True)
    batch = _batches(1)[0]
    with torch.no_grad():
        before = model(**batch).logits
    details, _ = _scaled(model, lambda _n, w: fake_quantize(w, 8, "channel", 1, True), True)
    qkv = details["model.layers.0.self_attn.q_proj"]
    assert qkv["scaling_alpha"] is not None
    assert qkv["scaling_error"] < 0.5 * qkv["unscaled_error"]
    assert all(d["scaling_error"] <= d["unscaled_error"] for d in details.values())
    with torch.no_grad():  # scaled, not yet rounded: the same function
        assert torch.allclose(before, model(**batch).logits, atol=1e-3, rtol=1e-3)


def test_awq_lowers_the_3_bit_error_and_never_raises_it():
    model = _llama(kv_heads=2, outliers=True)
    details, _ = _scaled(model, lambda _n, w: fake_quantize(w, 3, "group", 32, False), False)
    errors = [(d["scaling_error"], d["unscaled_error"]) for d in details.values()]
    assert all(e <= base for e, base in errors)
    assert any(e < 0.9 * base for e, base in errors)


def test_a_fixed_strength_is_used_as_given():
    model = _llama(kv_heads=2, outliers=True)
    details, _ = _scaled(model, lambda _n, w: fake_quantize(w, 4, "channel", 1, True), True, 0.5)
    assert {d["scaling_alpha"] for d in details.values()} <= {0.5, None}


def test_through_the_registry_with_its_report_and_manifest():
    model = _llama(kv_heads=2, outliers=True)
    spec = CompressConfig.model_validate(
        {"quantize": {"method": "dynamic_int8", "embeddings": False, "activation_scaling": True}}
    )
    report = compress_(model, spec, calib=_batches())
    entry = report.steps[0].entry["activation_scaling"]
    assert entry["alphas"]["model.layers.0.input_layernorm"] is not None
    assert set(entry["skipped"]) == {f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)}
    row = next(r for r in report.rows if r.name == "model.layers.1.mlp.down_proj")
    assert row.details["scaled_by"] == "model.layers.1.mlp.up_proj"


def test_a_strength_without_scaling_is_refused():
    job = {
        "name": "j",
        "model": {"name": "tiny-llama"},
        "data": {"name": "bbc_news"},
        "compress": {"quantize": {"method": "gptq", "scaling_alpha": 0.5}},
    }
    with pytest.raises(ConfigError) as err:
        validate_job(job, source="test")
    message = str(err.value)
    assert "compress.quantize.scaling_alpha" in message and "activation_scaling: true" in message


def test_a_model_without_decoder_blocks_is_refused(tokenizer, calib):
    model = models.build_model(ModelConfig(name="tiny-bert"), 2, tokenizer, seed=0)
    spec = CompressConfig.model_validate(
        {"quantize": {"method": "dynamic_int8", "activation_scaling": True}}
    )
    with pytest.raises(ConfigError) as err:
        compress_(model, spec, calib=calib)
    message = str(err.value)
    assert (
        "compress.quantize.activation_scaling" in message
        and "BertForSequenceClassification" in message
    )


def test_a_named_classifier_is_refused_before_anything_runs(tmp_path):
    from orchestrator.launch import check_task

    job = {
        "name": "j",
        "model": {"name": "minilm-l6"},
        "data": {"name": "mr"},
        "compress": {"quantize": {"method": "dynamic_int8", "activation_scaling": True}},
        "output": {"dir": str(tmp_path)},
    }
    with pytest.raises(ConfigError) as err:
        check_task(validate_job(job, source="test"))
    assert "compress.quantize.activation_scaling" in str(err.value)


class _OffsetRMSNorm(torch.nn.Module):
    """A norm whose output is (1 + weight) * normalized, as Gemma's: dividing its weight
    would not divide its output."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_a_norm_whose_output_does_not_scale_with_its_weight_is_left_out():
    model = _llama(kv_heads=2)
    model.model.layers[0].input_layernorm = _OffsetRMSNorm(64)
    groups, skipped = decoder_groups(model)
    assert "model.layers.0.input_layernorm" not in [g.producer for g in groups]
    assert "model.layers.1.input_layernorm" in [g.producer for g in groups]
    reason = dict(skipped)["model.layers.0.self_attn.q_proj"]
    assert "_OffsetRMSNorm" in reason and "does not scale" in reason

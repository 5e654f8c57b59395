"""GPTQ and SparseGPT (``orchestrator.compress.hessian``): on correlated calibration inputs they
leave less output error than round-to-nearest and magnitude pruning at the same bits and
sparsity, keep the grid and the sparsity they promise, and run block by block on real models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestrator import models
from orchestrator.compress import compress_
from orchestrator.compress.hessian import (
    _round_to,
    clipped_grid,
    gptq,
    output_error,
    sequential_,
    sparsegpt,
)
from orchestrator.compress.qtensor import fake_quantize, quantize_tensor
from orchestrator.config.compress import CompressConfig
from orchestrator.config.schema import ModelConfig

pytestmark = pytest.mark.unit


def _layer_and_hessian(rows: int = 64, cols: int = 256, n: int = 2048):
    """A weight and the Hessian 2 X^T X / n of inputs with correlated channels of uneven
    energy (as real activations are; with white inputs there is nothing to compensate)."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    energy = torch.logspace(0, 1, cols)[torch.randperm(cols, generator=g)]
    x = (torch.randn(n, cols, generator=g) @ mix) * energy
    w = torch.randn(rows, cols, generator=g)
    return w, 2 * x.T @ x / n


@pytest.mark.parametrize("bits,granularity", [(4, "group"), (3, "group"), (4, "channel")])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [True, False], ids=["act-order", "natural-order"])
def test_gptq_leaves_less_output_error_than_rounding(bits, granularity, symmetric, act_order):
    w, h = _layer_and_hessian()
    args = (bits, granularity, 64, symmetric)
    q = gptq(w, h, *args, act_order=act_order)
    rtn = fake_quantize(w, *args)
    assert output_error(w, q, h) < (0.5 if act_order else 0.9) * output_error(w, rtn, h)
    # On the grid the artifact derives from it: rounding the result again changes nothing.
    assert torch.allclose(fake_quantize(q, *args), q, rtol=1e-5, atol=1e-7)


def test_clipping_a_groups_range_rounds_it_with_less_error():
    w, h = _layer_and_hessian()
    w[:, 5] *= 8.0  # an outlier input: a full range wastes the steps of its groups
    importance = torch.diag(h)
    for symmetric in (True, False):
        args = (4, "group", 64, symmetric)
        clipped = clipped_grid(w, importance, *args)
        full = quantize_tensor(w, *args)
        assert (clipped.scale <= full.scale + 1e-12).all()
        assert (clipped.scale < full.scale).any()

        def error(grid):
            x = w.reshape(64, 4, 64)
            return (importance.reshape(1, 4, 64) * (x - _round_to(x, grid)) ** 2).sum()

        assert error(clipped) < error(full)


def test_gptq_keeps_pruned_weights_at_zero():
    w, h = _layer_and_hessian()
    w[:, ::2] = 0.0
    q = gptq(w, h, 4, "group", 64, True)
    assert (q[:, ::2] == 0).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_reaches_the_sparsity_and_beats_magnitude(sparsity):
    w, h = _layer_and_hessian()
    p = sparsegpt(w, h, sparsity)
    assert (p == 0).float().mean().item() == pytest.approx(sparsity, abs=1e-3)
    k = int(w.numel() * sparsity)
    cut = w.abs().flatten().kthvalue(k).values
    magnitude = torch.where(w.abs() > cut, w, torch.zeros_like(w))
    assert output_error(w, p, h) < 0.85 * output_error(w, magnitude, h)


def _groups_keep(w: torch.Tensor, n: int, m: int) -> bool:
    """Every row's groups of ``m`` consecutive inputs hold at most ``n`` non-zeros."""
    return bool(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) <= n).all())


def test_sparsegpt_2_4_keeps_the_pattern_and_beats_magnitude_2_4():
    """2:4 with second-order updates: every group of 4 inputs keeps 2 weights (at most: an
    update may itself land on zero), half the weights go, and the output error is below that
    of keeping the 2 largest of every 4."""
    from orchestrator.compress.techniques.prune import n_m_mask

    w, h = _layer_and_hessian()
    p = sparsegpt(w, h, 0.5, n_m=(2, 4), block_size=126)  # blocks cut to whole groups
    assert _groups_keep(p, 2, 4)
    assert (p == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    magnitude = w * n_m_mask(w.abs(), 2, 4)
    assert _groups_keep(magnitude, 2, 4)
    assert output_error(w, p, h) < 0.9 * output_error(w, magnitude, h)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_a_2_4_pattern_through_the_registry(method, calib, tokenizer):
    """compress_ with pattern 2:4: every pruned layer keeps 2 of every 4 inputs per row."""
    model = models.build_model(ModelConfig(name="minilm-l6", num_layers=2), 2, tokenizer)
    cfg = CompressConfig.model_validate(
        {"prune": {"method": method, "sparsity": 0.5, "pattern": "2:4"}, "calib_batches": 2}
    )
    report = compress_(model, cfg, calib=calib)
    rows = [r for r in report.rows if r.technique == "prune"]
    assert rows
    for row in rows:
        weight = model.get_submodule(row.name).weight
        assert _groups_keep(weight, 2, 4), row.name
        assert row.details["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert any("2:4 sparsity" in n for n in report.notes)


def test_sequential_visits_every_layer_block_by_block_with_compressed_inputs():
    """The second block's Hessian is taken on the outputs of the already-compressed first
    block: zeroing block 0's layers changes what block 1 sees."""
    tok = models.build_tokenizer(ModelConfig(name="tiny-llama"))
    model = models.build_model(ModelConfig(name="tiny-llama"), 0, tok)
    ids = torch.randint(1000, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    calib = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    layers = [(n, m) for n, m in layers if n != "lm_head"]
    seen: dict[str, torch.Tensor] = {}

    def record(name, layer, h):
        seen[name] = h
        layer.weight.data.zero_()  # the next blocks must see this block's new outputs

    sequential_(model, layers, calib, record)
    assert list(seen) == [n for n, _ in layers]  # in order, each once
    # Block 0's layers zeroed: block 1 receives its input unchanged (residual only), so its
    # q_proj Hessian equals the normalised input's; block 0's input was the same embedding.
    h0 = seen["model.layers.0.self_attn.q_proj"]
    h1 = seen["model.layers.1.self_attn.q_proj"]
    assert h0.shape == h1.shape == (64, 64)
    assert torch.allclose(h0, h1, rtol=1e-3, atol=1e-5)


def test_the_handlers_report_their_errors_against_the_simple_methods(calib, tokenizer):
    model = models.build_model(ModelConfig(name="minilm-l6", num_layers=2), 2, tokenizer)
    cfg = CompressConfig.model_validate(
        {
            "prune": {"method": "sparsegpt", "sparsity": 0.5},
            "quantize": {"method": "gptq", "bits": 4, "group_size": 128, "embeddings": False},
        }
    )
    report = compress_(model, cfg, calib=calib)
    pruned = [r for r in report.rows if r.technique == "prune"]
    quantized = [r for r in report.rows if r.technique == "quantize"]
    assert pruned and quantized
    for row in pruned:
        assert row.details["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert row.details["output_error"] < row.details["magnitude_output_error"]
    for row in quantized:
        assert row.details["output_error"] <= row.details["rtn_output_error"] * 1.01
    # The quantizer kept the pruned zeros: the layers are still half sparse.
    lin = model.bert.encoder.layer[0].attention.self.query
    assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize(
    "prune,key",
    [
        ({"sparsity": 0.5, "pattern": "1:4"}, "sparsity"),
        ({"sparsity": 0.5, "pattern": "4:4"}, "pattern"),
        ({"sparsity": 0.5, "pattern": "2-4"}, "pattern"),
        ({"sparsity": 0.5, "pattern": "2:4", "schedule": "gradual"}, "schedule"),
        ({"sparsity": 0.5, "pattern": "2:4", "scope": "global"}, "scope"),
    ],
    ids=["sparsity-off-pattern", "keeps-all", "not-n-colon-m", "gradual", "global"],
)
def test_a_bad_n_m_pattern_names_its_key(prune, key):
    from orchestrator.config.loader import validate_job
    from orchestrator.errors import ConfigError

    raw = {"name": "x", "model": {"name": "tiny-bert"}, "data": {"name": "mr"}}
    with pytest.raises(ConfigError) as err:
        validate_job({**raw, "compress": {"prune": {"method": "wanda", **prune}}}, "test")
    assert f"compress.prune.{key}" in str(err.value)


def test_a_layer_the_pattern_does_not_divide_is_refused(calib, tokenizer):
    from orchestrator.errors import ConfigError

    model = models.build_model(ModelConfig(name="minilm-l6", num_layers=2), 2, tokenizer)
    cfg = CompressConfig.model_validate({"prune": {"sparsity": 0.8, "pattern": "1:5"}})
    with pytest.raises(ConfigError) as err:
        compress_(model, cfg, calib=calib)
    assert "compress.prune.pattern" in str(err.value) and "not a multiple of 5" in str(err.value)

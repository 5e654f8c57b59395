"""Structured pruning on real models: physically smaller BERT / GPT-2 blocks that still run
forward and backward with padding, include / exclude per block, the structure round trip
through a fresh model and a strict state dict, and on the packaged MiniLM: close to the dense
model, and activation-aware importance at least as good as weight norms (the speed-up is
measured by benchmarks/kernel_speed.py, not asserted in a test)."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
from torch import nn
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from orchestrator import data
from orchestrator.compress.techniques.structured import (
    prune_structured_,
    rebuild_structure_,
    structure_of,
)
from orchestrator.config.compress import StructuredPruneConfig
from orchestrator.config.schema import DataConfig, ModelConfig
from orchestrator.errors import ConfigError
from orchestrator.models import build_model, build_tokenizer

pytestmark = pytest.mark.unit

TINY = ("tiny-bert", "tiny-gpt2")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and on a small shared machine two OpenMP
    threads spend more time synchronising than computing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelConfig(name="minilm-l6"))


def _tiny(name: str, tokenizer, attn: str | None = None) -> nn.Module:
    model = build_model(ModelConfig(name=name), 2, tokenizer, seed=0)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


def _batch(n: int = 4, width: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random batch: row i has width - 2 * i real tokens (padding in all but one)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, width), generator=g)
    mask = torch.ones(n, width, dtype=torch.long)
    for i in range(n):
        mask[i, width - 2 * i :] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 2}


def _calib(k: int = 3) -> list[dict[str, torch.Tensor]]:
    return [_batch(seed=10 + i) for i in range(k)]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _block(model: nn.Module, i: int) -> nn.Module:
    return model.bert.encoder.layer[i] if hasattr(model, "bert") else model.transformer.h[i]


def _shapes(model: nn.Module, i: int) -> dict[str, list[int]]:
    """Weight shapes of block i's projections, by role."""
    b = _block(model, i)
    if hasattr(model, "bert"):
        return {
            "q": list(b.attention.self.query.weight.shape),
            "v": list(b.attention.self.value.weight.shape),
            "o": list(b.attention.output.dense.weight.shape),
            "up": list(b.intermediate.dense.weight.shape),
            "down": list(b.output.dense.weight.shape),
        }
    return {
        "qkv": list(b.attn.c_attn.weight.shape),
        "o": list(b.attn.c_proj.weight.shape),
        "up": list(b.mlp.c_fc.weight.shape),
        "down": list(b.mlp.c_proj.weight.shape),
    }


# tiny models: hidden 64, 4 heads of 16, FFN 256. BERT Linear weights are [out, in]; GPT-2
# Conv1D weights are [in, out] and c_attn holds q | k | v.
DENSE = {
    "tiny-bert": {"q": [64, 64], "v": [64, 64], "o": [64, 64], "up": [256, 64], "down": [64, 256]},
    "tiny-gpt2": {"qkv": [64, 192], "o": [64, 64], "up": [64, 256], "down": [256, 64]},
}
HALF = {
    "tiny-bert": {"q": [32, 64], "v": [32, 64], "o": [64, 32], "up": [128, 64], "down": [64, 128]},
    "tiny-gpt2": {"qkv": [64, 96], "o": [32, 64], "up": [64, 128], "down": [128, 64]},
}


def _heads_attrs(model: nn.Module, i: int) -> tuple[int, ...]:
    b = _block(model, i)
    if hasattr(model, "bert"):
        a = b.attention.self
        return a.num_attention_heads, a.attention_head_size, a.all_head_size
    return b.attn.num_heads, b.attn.head_dim, b.attn.split_size


def _train_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.train()
    model.zero_grad()
    out = model(**batch)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    return out.logits


@pytest.mark.parametrize("use_calib", [False, True], ids=["weights", "calib"])
@pytest.mark.parametrize("name", TINY)
def test_half_prunes_heads_and_neurons_and_still_trains(name, use_calib, tokenizer):
    model = _tiny(name, tokenizer)
    before = _params(model)
    classifier = {
        k: v.clone() for k, v in model.state_dict().items() if "classifier" in k or "score" in k
    }
    rows = prune_structured_(
        model, StructuredPruneConfig(sparsity=0.5), calib=_calib() if use_calib else None
    )

    assert _params(model) < before
    for i in range(2):
        assert _shapes(model, i) == HALF[name]
        assert _heads_attrs(model, i) == (2, 16, 32)
    assert structure_of(model) == {
        "arch": name.split("-")[1],
        "blocks": {"0": {"heads": 2, "ffn": 128}, "1": {"heads": 2, "ffn": 128}},
    }
    # One row per pruned projection: BERT q, k, v, o, up, down; GPT-2 c_attn, c_proj, c_fc, c_proj.
    assert len(rows) == (12 if name == "tiny-bert" else 8)
    assert not any(r.skipped for r in rows)
    assert sum(r.params_before - r.params_after for r in rows) == before - _params(model)
    for r in rows:
        assert r.technique == "prune" and r.shape_after != r.shape_before
        assert r.details in (
            {"heads_before": 4, "heads_after": 2},
            {"neurons_before": 256, "neurons_after": 128},
        )
    json.dumps([r.to_dict() for r in rows])
    # The classification head is untouched (excluded by default, and not in a block anyway).
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in classifier.items())

    _train_step(model, _batch())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", TINY)
def test_pruned_forward_matches_between_attention_implementations(name, attn, tokenizer):
    """Both attention paths read the shrunk attributes; with padding they agree on real tokens."""
    model = _tiny(name, tokenizer, attn)
    prune_structured_(model, StructuredPruneConfig(sparsity=0.5), calib=_calib())
    other = _tiny(name, tokenizer, "sdpa" if attn == "eager" else "eager")
    rebuild_structure_(other, structure_of(model))
    other.load_state_dict(model.state_dict())
    batch = _batch()
    model.eval()
    other.eval()
    with torch.no_grad():
        a, b = model(**batch).logits, other(**batch).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    _train_step(model, batch)


@pytest.mark.parametrize("name", TINY)
def test_sparsity_zero_is_a_noop_also_after_pruning(name, tokenizer):
    model = _tiny(name, tokenizer)
    dense = copy.deepcopy(model.state_dict())
    zero = StructuredPruneConfig(sparsity=0.0)
    rows = prune_structured_(model, zero, calib=_calib())
    assert rows and all(r.skipped and r.shape_before == r.shape_after for r in rows)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())

    prune_structured_(model, StructuredPruneConfig(sparsity=0.5))
    pruned, structure = copy.deepcopy(model.state_dict()), structure_of(model)
    rows = prune_structured_(model, zero, calib=_calib())
    assert all(r.skipped for r in rows) and {
        r.details["heads_after"] for r in rows if "heads_after" in r.details
    } == {2}
    assert structure_of(model) == structure
    state = model.state_dict()
    assert state.keys() == pruned.keys()
    assert all(torch.equal(v, state[k]) for k, v in pruned.items())


@pytest.mark.parametrize("name,pattern", [("tiny-bert", "*layer.0.*"), ("tiny-gpt2", "*h.0.*")])
def test_include_limits_pruning_to_block_zero(name, pattern, tokenizer):
    model = _tiny(name, tokenizer)
    block1 = {k: v.clone() for k, v in _block(model, 1).state_dict().items()}
    rows = prune_structured_(
        model, StructuredPruneConfig(sparsity=0.5, include=[pattern]), calib=_calib()
    )
    assert rows and all(".0." in r.name for r in rows)
    assert _shapes(model, 0) == HALF[name]
    assert _shapes(model, 1) == DENSE[name]
    assert _heads_attrs(model, 1) == (4, 16, 64)
    assert all(torch.equal(v, _block(model, 1).state_dict()[k]) for k, v in block1.items())
    assert structure_of(model)["blocks"]["1"] == {"heads": 4, "ffn": 256}
    _train_step(model, _batch())


def test_exclude_and_switches_act_per_group(tokenizer):
    """A group (heads, or FFN) is pruned only when all its projections are selected."""
    model = _tiny("tiny-bert", tokenizer)
    cfg = StructuredPruneConfig(sparsity=0.5, exclude=["*classifier*", "*layer.1.intermediate*"])
    prune_structured_(model, cfg)
    assert structure_of(model)["blocks"] == {
        "0": {"heads": 2, "ffn": 128},
        "1": {"heads": 2, "ffn": 256},
    }

    model = _tiny("tiny-gpt2", tokenizer)
    prune_structured_(model, StructuredPruneConfig(sparsity=0.5, heads=False))
    assert structure_of(model)["blocks"]["0"] == {"heads": 4, "ffn": 128}
    model = _tiny("tiny-gpt2", tokenizer)
    prune_structured_(
        model,
        StructuredPruneConfig(sparsity=0.5, ffn=False),
        filter_fn=lambda _m, n: ".1." not in n,
    )
    assert structure_of(model)["blocks"] == {
        "0": {"heads": 2, "ffn": 256},
        "1": {"heads": 4, "ffn": 256},
    }


@pytest.mark.parametrize("name", TINY)
def test_at_least_one_head_and_neuron_stay(name, tokenizer):
    model = _tiny(name, tokenizer)
    prune_structured_(model, StructuredPruneConfig(sparsity=0.99), calib=_calib())
    assert structure_of(model)["blocks"]["0"] == {"heads": 1, "ffn": 3}  # round(253.44) gone
    _train_step(model, _batch())


def test_unsupported_architecture_and_bad_pattern_are_config_errors(tokenizer):
    distil = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    )
    for call in (
        lambda: prune_structured_(distil, StructuredPruneConfig()),
        lambda: structure_of(distil),
    ):
        with pytest.raises(ConfigError) as e:
            call()
        (problem,) = e.value.problems
        assert problem.key == "compress.prune.method" and "GPT-2" in problem.message
        assert "magnitude or wanda" in problem.fix

    with pytest.raises(ConfigError) as e:
        prune_structured_(_tiny("tiny-bert", tokenizer), StructuredPruneConfig(include=["*nope*"]))
    assert e.value.problems[0].key == "compress.prune.include"


@pytest.mark.parametrize("name,pattern", [("tiny-bert", "*layer.1.*"), ("tiny-gpt2", "*")])
def test_rebuild_structure_round_trip(name, pattern, tokenizer):
    pruned = _tiny(name, tokenizer)
    prune_structured_(
        pruned, StructuredPruneConfig(sparsity=0.5, include=[pattern]), calib=_calib()
    )
    prune_structured_(
        pruned, StructuredPruneConfig(sparsity=0.5, heads=False, include=[pattern])
    )  # sizes differ from the heads'
    structure = json.loads(json.dumps(structure_of(pruned)))

    fresh = _tiny(name, tokenizer)
    rebuild_structure_(fresh, structure)
    assert structure_of(fresh) == structure
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    pruned.eval()
    fresh.eval()
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(pruned(**batch).logits, fresh(**batch).logits)

    with pytest.raises(ConfigError):  # already smaller than what is recorded
        rebuild_structure_(
            fresh,
            {**structure, "blocks": {k: {"heads": 4, "ffn": 256} for k in structure["blocks"]}},
        )
    with pytest.raises(ConfigError):
        rebuild_structure_(_tiny(name, tokenizer), {"arch": "other", "blocks": {}})


# --- the real packaged MiniLM, 2 blocks: hidden 384, 12 heads of 32, FFN 1536 ------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, tokenizer):
    with pytest.MonkeyPatch.context() as mp:
        tmp = tmp_path_factory.mktemp("structured-data")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp / "hf-datasets"))
        bundle = data.build(
            DataConfig(name="mr", limit=200, max_length=32, cache_dir=str(tmp / "cache")), tokenizer
        )
    model = build_model(
        ModelConfig(name="minilm-l6", num_layers=2), bundle.num_labels, tokenizer
    ).eval()
    return model, bundle


def _mean_pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Masked mean of the last hidden state: the sentence embedding MiniLM is trained for."""
    with torch.inference_mode():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        )
    h, mask = out.hidden_states[-1], batch["attention_mask"].unsqueeze(-1).float()
    return (h * mask).sum(1) / mask.sum(1)


def test_minilm_half_stays_close_and_calibration_helps(minilm):
    dense, bundle = minilm
    train = bundle.splits["train"]
    calib = [bundle.collate(train.select(range(i * 16, i * 16 + 16)).to_list()) for i in range(4)]
    held_out = bundle.collate(bundle.splits["test"].to_list())  # not seen by calibration
    reference = _mean_pooled(dense, held_out)
    cfg = StructuredPruneConfig(sparsity=0.5)

    similarity = {}
    for which, batches in (("weights", None), ("calib", calib)):
        model = copy.deepcopy(dense)
        prune_structured_(model, cfg, calib=batches)
        assert structure_of(model)["blocks"] == {
            "0": {"heads": 6, "ffn": 768},
            "1": {"heads": 6, "ffn": 768},
        }
        similarity[which] = (
            torch.nn.functional.cosine_similarity(_mean_pooled(model, held_out), reference, dim=-1)
            .mean()
            .item()
        )
    print(f"\nMiniLM-2L, 50% structured, held-out pooled cosine to dense: {similarity}")
    assert similarity["weights"] > 0.5
    assert similarity["calib"] > 0.5
    assert similarity["calib"] >= similarity["weights"]


# --- a Llama with grouped-query attention: tiny-llama, 2 blocks, 4 query heads of 16 sharing 2
# key/value heads, FFN 128 (gate and up), tied head ---------------------------------------------


def _llama(tokenizer) -> nn.Module:
    return build_model(
        ModelConfig(name="tiny-llama"), 0, build_tokenizer(ModelConfig(name="tiny-llama")), seed=0
    ).eval()


def _lm_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_llama_units_are_key_value_heads_with_their_query_heads(tokenizer):
    """A key/value head whose query heads write nothing (their output-projection columns
    zeroed) scores 0 and goes first, as does an FFN neuron whose down column is zero: the
    pruned model computes exactly what the model did, so every index (query rows, key / value
    rows, output columns, gate and up rows) was taken from the right head and neuron. Sparsity
    0 changes nothing."""
    model = _llama(tokenizer)
    batch = _lm_batch()
    untouched = copy.deepcopy(model)
    assert prune_structured_(untouched, StructuredPruneConfig(sparsity=0.0))
    with torch.no_grad():
        assert torch.equal(untouched(**batch).logits, model(**batch).logits)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 32:64] = 0  # key/value head 1: query heads 2, 3
            layer.mlp.down_proj.weight[:, ::2] = 0  # every other neuron
        before = model(**batch).logits
    rows = prune_structured_(model, StructuredPruneConfig(sparsity=0.5), calib=[batch])
    attn = model.model.layers[0].self_attn
    assert list(attn.q_proj.weight.shape) == [32, 64]  # 2 query heads of 16
    assert list(attn.k_proj.weight.shape) == [16, 64] == list(attn.v_proj.weight.shape)
    assert list(attn.o_proj.weight.shape) == [64, 32]
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight.shape[0] == mlp.up_proj.weight.shape[0] == 64
    assert list(mlp.down_proj.weight.shape) == [64, 64]
    q_row = next(r for r in rows if r.name.endswith("layers.0.self_attn.q_proj"))
    assert q_row.details == {
        "heads_before": 4,
        "heads_after": 2,
        "kv_heads_before": 2,
        "kv_heads_after": 1,
    }
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.allclose(after, before, atol=1e-5)
    # Decoding with a key/value cache sized by the pruned projections.
    out = model.generate(batch["input_ids"][:1, :4], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_llama_structure_round_trip(tokenizer):
    pruned = _llama(tokenizer)
    prune_structured_(pruned, StructuredPruneConfig(sparsity=0.5), calib=[_lm_batch()])
    structure = json.loads(json.dumps(structure_of(pruned)))
    assert structure["arch"] == "llama"
    assert structure["blocks"]["0"] == {"heads": 2, "ffn": 64}
    fresh = _llama(tokenizer)
    rebuild_structure_(fresh, structure)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    batch = _lm_batch()
    with torch.no_grad():
        assert torch.equal(pruned(**batch).logits, fresh(**batch).logits)
    with pytest.raises(ConfigError, match="not a multiple"):
        rebuild_structure_(
            _llama(tokenizer),
            {**structure, "blocks": {"0": {"heads": 3, "ffn": 64}, "1": {"heads": 2, "ffn": 64}}},
        )

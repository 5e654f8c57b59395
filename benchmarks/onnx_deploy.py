"""What a CPU deployer gets without this product against the search's answer, both in ONNX
Runtime (issue #16): the dense fine-tuned model exported to ONNX and quantized with ONNX
Runtime's dynamic int8 (every MatMul and Gemm, per-channel weights), against the search's
selected recipe exported with ``orchestrator export --best --format onnx``. Side by side in one
run, the same ONNX Runtime, threads and inputs: bytes of ``model.onnx``, test accuracy with the
paired drop against the dense fp32 model (95 % interval), latency at batch 1 and 32 (median of
``--repeats`` after a warm-up, sentences of the test split padded to the batch's longest).

    python benchmarks/onnx_deploy.py RUN_DIR [--threads 1] [--repeats 20]

RUN_DIR: a finished search of a MiniLM classifier (e.g. runs/quickstart).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from orchestrator import data as data_lib  # noqa: E402
from orchestrator import models  # noqa: E402
from orchestrator.compress import onnx_export  # noqa: E402
from orchestrator.config.loader import read_yaml, validate_job  # noqa: E402
from orchestrator.results import export_trial  # noqa: E402
from orchestrator.stats import PairedCounts  # noqa: E402


def predict(s, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:  # noqa: ANN001
    feeds = ({k: b[k].numpy() for k in onnx_export.INPUTS} for b in batches)
    return np.concatenate([s.run(None, f)[0].argmax(-1) for f in feeds])


def latency_ms(s, batch: dict[str, torch.Tensor], repeats: int) -> float:  # noqa: ANN001
    feed = {k: batch[k].numpy() for k in onnx_export.INPUTS}
    for _ in range(3):
        s.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        s.run(None, feed)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    run = args.run_dir
    print(f"# {platform.node()} | {time.strftime('%Y-%m-%d %H:%M')} | {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        record = export_trial(run, tmp / "best", None, "onnx")
        name = record["trial"]
        spec = validate_job(read_yaml(run / "trials" / name / "job.yaml"), source=name)
        tokenizer = models.build_tokenizer(spec.model)
        bundle = data_lib.build(spec.data, tokenizer)
        test = bundle.splits["test"]
        rows = [test[i] for i in range(len(test))]
        batches = [bundle.collate(rows[i : i + 64]) for i in range(0, len(rows), 64)]
        labels = np.asarray([r["labels"] for r in rows])

        from transformers import AutoModelForSequenceClassification

        dense = AutoModelForSequenceClassification.from_pretrained(run / "baseline" / "model")
        onnx_export.export_float(dense.eval(), tmp / "dense.onnx", batches[0])
        onnx_export.quantize_matmuls(tmp / "dense.onnx", tmp / "dense_int8.onnx")
        files = {
            "dense fp32 (ONNX Runtime)": tmp / "dense.onnx",
            "dense + ONNX Runtime dynamic int8": tmp / "dense_int8.onnx",
            f"search's selected recipe ({name})": tmp / "best" / onnx_export.ONNX_FILE,
        }
        b1 = bundle.collate(rows[:1])
        b32 = bundle.collate(rows[:32])
        sessions = {k: onnx_export.session(f, args.threads) for k, f in files.items()}
        right = {k: predict(s, batches) == labels for k, s in sessions.items()}
        ref = right["dense fp32 (ONNX Runtime)"]
        print(
            "\n| model | model.onnx MB | test accuracy | drop vs dense fp32, points [95 %] | "
            "latency b1 ms | latency b32 ms |"
        )
        print("|---|---|---|---|---|---|")
        for label, s in sessions.items():
            r = right[label]
            counts = PairedCounts.of(ref.tolist(), r.tolist())
            lo, hi = counts.interval(0.95)
            print(
                f"| {label} | {files[label].stat().st_size / 1e6:.2f} | {r.mean():.4f} | "
                f"{100 * counts.drop:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
                f"{latency_ms(s, b1, args.repeats):.2f} | {latency_ms(s, b32, args.repeats):.2f} |",
                flush=True,
            )
        check = record["onnx_check"]
        print(
            f"\nselected recipe, ONNX against its artifact on {check['examples']} test sentences: "
            f"{check['agreement']:.2%} same labels, largest logit difference "
            f"{check['max_logit_diff']:.3g} (float graph {check['float_graph_max_diff']:.2g})"
        )


if __name__ == "__main__":
    main()

"""Recovery with and without knowledge distillation, at equal steps, over several seeds.

The quickstart's data (MR, the quickstart's splits) and a dense MiniLM-L6 fine-tuned once on it
(``--epochs``, cached in ``--work``); then for each recipe and seed, the compressed model
recovers for ``--steps`` optimizer steps with plain fine-tuning and with distillation from the
dense model (``train.distill``), and the artifact is measured as every trial is: the paired
accuracy drop against the dense model on the validation and test splits, with its 95 % interval.
One process (no Ray): recovery quality, not orchestration, is what is compared.

``--teacher-precision fp32 bf16`` distils once per teacher precision (``train.distill.
teacher_precision``), side by side: the same recovery with the teacher's weights in fp32 and in
bf16, and each run's wall time; first it times the teacher's forward at each precision, as a
worker of the quickstart runs it (``--time-teacher``: only that).

Run: python benchmarks/distill_recovery.py [--seeds 0 1 2] [--steps 40] [--work /tmp/distill]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator import loop
from orchestrator.config.loader import load_job, validate_job

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "quickstart.yaml"
FFN = ["*intermediate.dense", "*layer.?.output.dense"]
RECIPES: dict[str, dict[str, Any]] = {
    # The most aggressive corner of the quickstart's search space (the vocabulary at min_count
    # 1 since run D of BENCHMARKS.md).
    "quickstart's most aggressive: trim + structured 0.45 + int8, 4-bit emb": {
        "vocab": {"method": "trim", "min_count": 1},
        "prune": {"method": "structured", "sparsity": 0.45},
        "quantize": {"method": "dynamic_int8", "embedding_bits": 4},
    },
    # The same corner before run D (min_count 2 in the space).
    "trim (min 2) + structured 0.45 + int8, 4-bit emb": {
        "vocab": {"method": "trim", "min_count": 2},
        "prune": {"method": "structured", "sparsity": 0.45},
        "quantize": {"method": "dynamic_int8", "embedding_bits": 4},
    },
    # Every stage on (the vocabulary trim as it was then: unseen tokens read the unknown row).
    "trim + 1 block + structured 0.4 + int8 (4-bit emb)": {
        "vocab": {"method": "trim", "unseen": "unknown"},
        "depth": {"method": "similarity", "blocks": 1},
        "prune": {"method": "structured", "sparsity": 0.4},
        "quantize": {"method": "dynamic_int8", "embedding_bits": 4},
    },
    "trim + structured 0.3 + int8": {
        "vocab": {"method": "trim"},
        "prune": {"method": "structured", "sparsity": 0.3},
        "quantize": {"method": "dynamic_int8"},
    },
    "trim + structured 0.3 + int8 (4-bit emb)": {
        "vocab": {"method": "trim"},
        "prune": {"method": "structured", "sparsity": 0.3},
        "quantize": {"method": "dynamic_int8", "embedding_bits": 4},
    },
    "structured 0.46 + ASVD-FFN 0.5 + int8": {
        "prune": {"method": "structured", "sparsity": 0.46},
        "factorize": {"method": "asvd", "rank_ratio": 0.5, "include": FFN},
        "quantize": {"method": "dynamic_int8"},
    },
    # Beyond the quickstart's space: a recipe that plain fine-tuning does not recover at 180
    # steps, to see what distillation gains where there is accuracy left to win back.
    "beyond the quickstart: trim + structured 0.7 + int8, 4-bit emb": {
        "vocab": {"method": "trim", "min_count": 1},
        "prune": {"method": "structured", "sparsity": 0.7},
        "quantize": {"method": "dynamic_int8", "embedding_bits": 4},
    },
}
DISTILL = {"alpha": 0.5, "temperature": 2.0, "hidden": 1.0}


def _job(name: str, work: Path, **changes: Any) -> dict[str, Any]:
    """The quickstart's job (data, training) in one process; no compression or distillation
    unless ``changes`` give them; ``compress`` replaces the section, other sections merge."""
    base = load_job(JOB).model_dump(mode="json", exclude={"search", "compress"})
    base.update(name=name, output={"dir": str(work / "runs")})
    base["train"].update(num_workers=1, batch_size=32, log_every=20, distill=None)
    for key, value in changes.items():
        merge = isinstance(value, dict) and key != "compress"
        base[key] = {**base.get(key, {}), **value} if merge else value
    return base


def _run(raw: dict[str, Any]) -> dict[str, float]:
    return loop.run(validate_job(raw, source=raw["name"]), loop.WorkerContext())


def dense_model(work: Path, epochs: float) -> Path:
    """The fine-tuned dense model (the teacher and the starting point), trained once."""
    folder = work / "dense"
    if not (folder / "config.json").is_file():
        # As the quickstart's baseline: its own learning rate and epochs.
        job = _job(
            "dense", work, train={"epochs": epochs, "max_steps": None, "seed": 0, "lr": 5e-5}
        )
        store: dict[str, Any] = {}

        def keep(metrics: dict[str, Any], ckpt: Path | None) -> None:
            if ckpt is not None and (ckpt / "model").is_dir():
                import shutil

                shutil.copytree(ckpt / "model", folder, dirs_exist_ok=True)
                store.update(metrics)

        spec = validate_job(job, source="dense")
        loop.run(spec, loop.WorkerContext(report=keep))
        print(f"dense: eval/accuracy {store['eval/accuracy']:.4f}", flush=True)
    return folder


def time_teachers(dense: Path, precisions: list[str], repeats: int = 12) -> dict[str, dict]:
    """The teacher's forward (hidden states included, as distillation runs it) on the
    quickstart's training batches as one of its workers sees them (16 sentences, one thread),
    at each precision, interleaved so machine noise hits them alike: ``{precision: {"ms": the
    median forward, "logits": the largest absolute logit difference from fp32's, "hidden": the
    median relative error (in norm) of the last hidden state against fp32's}}``."""
    from orchestrator import data, models
    from orchestrator.compress.measure import torch_threads
    from orchestrator.distill import prepare_teacher

    spec = validate_job(_job("time", Path("/tmp"), model={"name": None, "path": str(dense)}))
    tokenizer = models.build_tokenizer(spec.model)
    bundle = data.build(spec.data, tokenizer)
    teachers = {
        p: prepare_teacher(
            models.build_model(spec.model, bundle.num_labels, tokenizer, seed=0).eval(),
            p,
            torch.device("cpu"),
        )
        for p in dict.fromkeys(["fp32", *precisions])
    }
    batches = list(itertools.islice(bundle.train_batches(16, 0, 2, 0, 0), repeats + 2))
    out = {p: {"ms": [], "logits": [], "hidden": []} for p in teachers}
    with torch_threads(1), torch.inference_mode():
        for i, batch in enumerate(batches):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            answers = {}
            for p, teacher in teachers.items():
                start = time.perf_counter()
                answers[p] = teacher(**inputs, output_hidden_states=True)
                if i >= 2:  # after warm-up
                    out[p]["ms"].append(1000 * (time.perf_counter() - start))
            ref = answers["fp32"]
            for p, got in answers.items():
                logits = (got.logits.float() - ref.logits).abs().max()
                last, ref_last = got.hidden_states[-1].float(), ref.hidden_states[-1]
                out[p]["logits"].append(float(logits))
                out[p]["hidden"].append(float((last - ref_last).norm() / ref_last.norm()))
    return {
        p: {
            "ms": statistics.median(v["ms"]),
            "logits": max(v["logits"]),
            "hidden": statistics.median(v["hidden"]),
        }
        for p, v in out.items()
        if p in precisions
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/distill-recovery"))
    parser.add_argument("--recipes", nargs="*", default=[list(RECIPES)[0]])
    parser.add_argument("--lr", type=float, default=None, help="default: the quickstart's")
    parser.add_argument("--only", choices=["both", "distill", "fine-tune"], default="both")
    parser.add_argument("--alpha", type=float, default=DISTILL["alpha"], help="train.distill")
    parser.add_argument("--temperature", type=float, default=DISTILL["temperature"])
    parser.add_argument("--hidden", type=float, default=DISTILL["hidden"])
    parser.add_argument(
        "--teacher-precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"]
    )
    parser.add_argument(
        "--time-teacher", action="store_true", help="only time the teacher's forward, then stop"
    )
    args = parser.parse_args()
    distill_cfg = {"alpha": args.alpha, "temperature": args.temperature, "hidden": args.hidden}
    print(f"distillation: {distill_cfg}, teacher {args.teacher_precision}", flush=True)
    kds = [distill_cfg | {"teacher_precision": p} for p in args.teacher_precision]
    torch.set_num_threads(2)
    dense = dense_model(args.work, args.epochs)
    if len(args.teacher_precision) > 1 or args.time_teacher:
        print(
            "teacher forward (16 sentences, 1 thread, 12 batches): precision | median ms | "
            "largest logit difference from fp32 | last hidden state's error from fp32 (median)"
        )
        for p, v in time_teachers(dense, args.teacher_precision).items():
            print(f"{p} | {v['ms']:.1f} | {v['logits']:.4f} | {v['hidden']:.4f}", flush=True)
        if args.time_teacher:
            return
    rows = []
    for label in args.recipes:
        for seed in args.seeds:
            modes = {"both": [None, *kds], "distill": kds, "fine-tune": [None]}
            for distill in modes[args.only]:
                mode = f"kd-{distill['teacher_precision']}" if distill else "ft"
                name = f"r{list(RECIPES).index(label)}-s{seed}-{mode}"
                raw = _job(
                    name,
                    args.work,
                    model={"name": None, "path": str(dense)},
                    train={"max_steps": args.steps, "seed": seed, "distill": distill}
                    | ({"lr": args.lr} if args.lr else {}),
                    compress=RECIPES[label],
                )
                start = time.perf_counter()
                m = _run(raw)
                row = {
                    "recipe": label,
                    "seed": seed,
                    "distill": bool(distill),
                    "teacher": distill["teacher_precision"] if distill else None,
                    "wall_s": time.perf_counter() - start,
                    **{
                        k: v for k, v in m.items() if k.startswith(("eval/", "test/", "compress/s"))
                    },
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        "\nrecipe | recovery | test drop, points (mean +- sd over seeds) | val drop | each seed"
        " | wall s (mean)"
    )
    for label in args.recipes:
        for teacher in (None, *args.teacher_precision):
            these = [r for r in rows if r["recipe"] == label and r["teacher"] == teacher]
            if not these:
                continue
            test = [100 * r["test/accuracy_drop"] for r in these]
            val = [100 * r["eval/accuracy_drop"] for r in these]
            sd = statistics.stdev(test) if len(test) > 1 else 0.0
            how = f"distill ({teacher} teacher)" if teacher else "fine-tune"
            print(
                f"{label} | {how} | "
                f"{statistics.mean(test):+.2f} +- {sd:.2f} | {statistics.mean(val):+.2f} | "
                + ", ".join(f"{t:+.2f}" for t in test)
                + f" | {statistics.mean(r['wall_s'] for r in these):.1f}"
            )


if __name__ == "__main__":
    main()

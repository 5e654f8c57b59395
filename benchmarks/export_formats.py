"""Which export formats each Pareto trial of a search supports (issue #16): every trial of
``pareto.parquet`` exported with ``orchestrator export --trial NAME --format F`` for F in
artifact, onnx and hf, as a user runs it. For each: written or refused (with the reason the
export gives), the folder's bytes, and for onnx and hf the check against the artifact on the
trial's test split (share of the same predicted labels, largest logit difference, accuracy).

    python benchmarks/export_formats.py RUN_DIR

RUN_DIR: a finished search (e.g. runs/quickstart).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from orchestrator.errors import ConfigError  # noqa: E402
from orchestrator.results import export_trial  # noqa: E402

FORMATS = ("artifact", "onnx", "hf")


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _cell(run_dir: Path, trial: str, fmt: str, tmp: Path) -> str:
    out = tmp / f"{trial}-{fmt}"
    t0 = time.perf_counter()
    try:
        record = export_trial(run_dir, out, trial, fmt)
    except ConfigError as e:
        return "refused: " + "; ".join(p.message.split(": ", 1)[-1] for p in e.problems)
    seconds = time.perf_counter() - t0
    size = f"{_bytes(out) / 1e6:.2f} MB"
    check = record.get(f"{fmt}_check")
    if not check:
        return f"yes, {size}, {seconds:.0f} s"
    return (
        f"yes, {size}, {check['agreement']:.2%} same labels, max logit diff "
        f"{check['max_logit_diff']:.3g}, acc {check[f'accuracy_{fmt}']:.4f} "
        f"(artifact {check['accuracy_artifact']:.4f}), {seconds:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # torchvision ops it skips
    front = pq.read_table(args.run_dir / "pareto.parquet").to_pylist()
    print(f"# export_formats: {args.run_dir}, {len(front)} Pareto trials")
    print(f"# {platform.node()} | {platform.processor() or platform.machine()} | {time.ctime()}")
    print("| trial | recipe | " + " | ".join(FORMATS) + " |")
    print("|---|---|" + "---|" * len(FORMATS))
    with tempfile.TemporaryDirectory() as tmp:
        for row in front:
            cells = [_cell(args.run_dir, row["trial"], f, Path(tmp)) for f in FORMATS]
            print(f"| {row['trial']} | {row['recipe']} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

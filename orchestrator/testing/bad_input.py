"""The table of bad inputs and limits a user can hit when a job meets a cluster (issue #5): each
case runs the real CLI (``orchestrator.cli.main``) and records its exit code and error message:
in a process of its own where the case reaches Ray, else in the caller's process (the check
fails before Ray starts, and a process of its own would spend its seconds importing torch). The
integration test checks every row; ``benchmarks/faults.py`` prints the table for
BENCHMARKS.md. Cases that need a small or read-only file system mount a tmpfs, which needs root;
they are skipped elsewhere."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from orchestrator.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
DDP_JOB = str(ROOT / "jobs" / "debug" / "ddp.yaml")
SEARCH_JOB = str(ROOT / "jobs" / "debug" / "search.yaml")
DECODER_SEARCH_JOB = str(ROOT / "jobs" / "debug" / "decoder_search.yaml")
DECODER_JOB = str(ROOT / "jobs" / "debug" / "decoder.yaml")


@dataclass(frozen=True)
class Case:
    name: str
    # (work dir, cluster address) -> (CLI arguments, extra environment)
    command: Callable[[Path, str], tuple[list[str], dict[str, str]]]
    exit_code: int
    says: tuple[str, ...]  # substrings the error message must contain
    mount: str = ""  # tmpfs options for <work dir>/mnt (root only), e.g. "size=1m"
    run_dir: str = "debug-ddp"  # must not exist after an exit-2 case (nothing half-written)
    # Runs in a process of its own: it reaches Ray (a caller connected to Ray already, as the
    # integration tier is, would lend the case its connection) or trains.
    own_process: bool = False


def _cli(verb: str, job: str, *extra: str, env: dict[str, str] | None = None):
    """``orchestrator VERB JOB`` writing under the case's work folder; in ``extra``, ``{work}``
    is that folder and ``{free_port}`` a port where nothing listens."""

    def command(work: Path, cluster: str) -> tuple[list[str], dict[str, str]]:
        args = [
            verb,
            job,
            f"output.dir={work / 'mnt' / 'runs'}",
            f"data.cache_dir={work / 'cache'}",
        ]
        args += [
            e.replace("{work}", str(work)).replace("{free_port}", str(free_port())) for e in extra
        ]
        return args, {"RAY_ADDRESS": cluster, **(env or {})}

    return command


def _train(*extra: str, env: dict[str, str] | None = None):
    return _cli("train", DDP_JOB, *extra, env=env)


def _search(*extra: str):
    return _cli("search", SEARCH_JOB, *extra)


def _decoder(*extra: str):
    return _cli("train", DECODER_JOB, *extra)


def _unreachable(work: Path, cluster: str) -> tuple[list[str], dict[str, str]]:
    args, _ = _train()(work, cluster)
    return args, {"RAY_ADDRESS": f"127.0.0.1:{free_port()}"}


CASES = [
    Case(
        "RAY_ADDRESS where no Ray runs",
        _unreachable,
        2,
        ("RAY_ADDRESS = '127.0.0.1:", "nothing answers there", "Connection refused"),
        own_process=True,
    ),
    Case(
        "--address that is not an address",
        _train("--address", "head-node"),
        2,
        ("--address = 'head-node'", "is not a Ray address"),
        own_process=True,
    ),
    Case(
        "more workers than the cluster has CPUs",
        _train("train.num_workers=8"),
        2,
        ("train.num_workers = 8", "needs 8 CPUs", "the cluster has at most 2"),
        own_process=True,
    ),
    Case(
        "GPU workers on a cluster without GPUs",
        _train("resources.gpus_per_worker=1"),
        2,
        ("resources.gpus_per_worker = 1", "needs 2 GPUs", "has at most 0"),
        own_process=True,
    ),
    Case(
        "tracking.mlflow.tracking_uri where no MLflow server runs",
        _search("tracking.mlflow.tracking_uri=http://127.0.0.1:{free_port}"),
        2,
        (
            "tracking.mlflow.tracking_uri = 'http://127.0.0.1:",
            "MLflow cannot be reached there",
            "mlflow server --backend-store-uri",
        ),
        run_dir="debug-search",
    ),
    Case(
        "a label column on a language model's job",
        _decoder("data.label_column=sentiment"),
        2,
        ("data.label_column", "is a language model", "reads no labels"),
        run_dir="debug-decoder",
    ),
    Case(
        "a language model's search bounded by accuracy",
        _cli("search", DECODER_SEARCH_JOB, "search.constraints={max_accuracy_drop: 0.01}"),
        2,
        ("search.constraints.max_accuracy_drop", "is a language model", "max_perplexity_increase"),
        run_dir="debug-decoder-search",
    ),
    Case(
        "activation-aware scaling on an encoder",
        _train("compress.quantize={method: dynamic_int8, activation_scaling: true}"),
        2,
        ("compress.quantize.activation_scaling", "no Llama-style decoder blocks"),
    ),
    Case(
        "a mean sparsity no per-layer allocation reaches",
        _train("compress.prune={method: magnitude, sparsity: 0.95, allocate: {}}"),
        2,
        ("compress.prune.sparsity", "no allocation of", "0.875"),
    ),
    Case(
        "an empty set of candidate ranks",
        _train("compress.factorize={allocate: {param_ratio: 0.5, rank_ratios: []}}"),
        2,
        ("compress.factorize.allocate.rank_ratios",),
    ),
    Case(
        "a parameter budget below what the smallest rank keeps",
        _train("compress.factorize={allocate: {param_ratio: 0.05, rank_ratios: [0.5]}}"),
        2,
        ("compress.factorize.allocate.param_ratio", "smallest rank ratio"),
    ),
    Case(
        "blocks longer than the decoder's context",
        _decoder("data.max_length=1024"),
        2,
        ("data.max_length", "longer than", "512 positions"),
        run_dir="debug-decoder",
    ),
    Case(
        "a GGUF file cut short",
        _decoder("model.path={work}/cut.gguf"),
        2,
        ("model.path", "cannot be read as a GGUF model"),
        run_dir="debug-decoder",
    ),
    Case(
        "output.dir is a file",
        _train("output.dir={work}/cache/../job-file.txt"),
        2,
        ("output.dir", "is a file, not a folder"),
    ),
    Case(
        "output.dir on a read-only file system",
        _train(),
        2,
        ("output.dir", "is not writable"),
        mount="ro,size=1m",
    ),
    Case(
        "output.dir on a full disk (too small for one checkpoint)",
        _train(),
        2,
        ("output.dir", "MiB free", "one checkpoint of this model takes about"),
        mount="size=4m",
    ),
    Case(
        "the disk fills up during the run",
        _train(),
        1,
        ("the disk is full", "No space left on device", "run the same command again"),
        # Room for the preflight's estimate (one checkpoint with its optimizer state, 24 MiB)
        # and the step-6 checkpoint, none for the final one and the model copied out of it.
        mount="size=28m",
        own_process=True,
    ),
]


@contextlib.contextmanager
def prepared(case: Case, work: Path) -> Iterator[None]:
    """The work folder a case runs in: ``mnt/`` a tmpfs with the case's options (root only),
    or a plain folder; ``job-file.txt`` a file where a folder is expected; ``cut.gguf`` the
    first bytes of a GGUF file."""
    mnt = work / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    (work / "job-file.txt").write_text("not a folder\n")
    (work / "cut.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(8))
    if case.mount:
        subprocess.run(["mount", "-t", "tmpfs", "-o", case.mount, "tmpfs", str(mnt)], check=True)
    try:
        yield
    finally:
        if case.mount:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def run_case(case: Case, work: Path, cluster: str, timeout_s: float = 600) -> tuple[int, str]:
    """Run one case's CLI command; returns (exit code, the error message on stderr)."""
    args, env = case.command(work, cluster)
    with prepared(case, work):
        if case.own_process:
            proc = subprocess.run(
                [sys.executable, "-m", "orchestrator", *args],
                cwd=work,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            code, stderr = proc.returncode, proc.stderr
        else:
            code, stderr = cli_in_process(args, env, work)
        message = "\n".join(
            line for line in stderr.splitlines() if line.startswith(("error:", "  - "))
        )
        half_written = (work / "mnt" / "runs" / case.run_dir).exists()
    if code == 2 and half_written:
        message += "\n(a run directory was written)"
    return code, message or stderr[-3000:]


def cli_in_process(args: list[str], env: dict[str, str], work: Path) -> tuple[int, str]:
    """``orchestrator.cli.main(args)`` in this process, in ``work`` with ``env`` set (both
    restored after): (exit code, stderr). For commands refused before Ray starts."""
    from orchestrator.cli import main

    cwd = os.getcwd()
    err = io.StringIO()
    with mock.patch.dict(os.environ, env):
        try:
            os.chdir(work)
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(args)
        finally:
            os.chdir(cwd)
    return code, err.getvalue()

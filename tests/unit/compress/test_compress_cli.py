"""`orchestrator compress` end to end on the debug job: the report, the artifact, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[3]
JOB = str(ROOT / "jobs/debug/compress.yaml")


def test_compress_debug_job(tmp_path, capsys) -> None:
    rc = main(["compress", JOB, f"output.dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    run = tmp_path / "debug-compress"
    report = json.loads((run / "compress_report.json").read_text())
    m = report["metrics"]
    for key in (
        "compress/params",
        "compress/nonzero_params",
        "compress/sparsity",
        "compress/bits",
        "compress/size_bytes",
        "compress/dense_size_bytes",
        "perf/latency_ms_b1",
        "perf/latency_ms_b32",
        "perf/speedup",
        "eval/accuracy",
        "test/accuracy",
    ):
        assert key in m, key
    assert m["compress/params"] < m["compress/params_before"]
    assert m["compress/size_bytes"] < m["compress/dense_size_bytes"]
    techniques = {r["technique"] for r in report["modules"]}
    assert techniques == {"prune", "factorize", "quantize"}
    assert report["notes"]
    assert (run / "model" / "manifest.json").is_file() and "note:" in out


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("compress.prune.sparsity=1.0", "compress.prune.sparsity"),
        ("compress.prune.sparsity=-0.1", "compress.prune.sparsity"),
        ("compress.quantize.bits=9", "compress.quantize.bits"),
        ("compress.quantize.bits=1", "compress.quantize.bits"),
        ("compress.factorize.rank=0", "compress.factorize.rank"),
        ("compress.prune.method=lottery", "compress.prune.method"),
        ("compress.quantize.method=int3", "compress.quantize.method"),
        ("compress.factorize.include=['*no_such_layer*']", "compress.factorize.include"),
        ("compress.prune.sparsty=0.5", "compress.prune.sparsty"),
    ],
)
def test_bad_input_exits_2_naming_the_key(tmp_path, capsys, override, key) -> None:
    rc = main(
        ["compress", JOB, override, f"output.dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert key in err
    assert not (tmp_path / "debug-compress").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("command", "overrides", "key", "words"),
    [
        (
            "compress",
            ["compress.depth={method: similarity, blocks: 2}"],
            "compress.depth.blocks",
            "would remove all 2 blocks",
        ),
        (
            "train",
            ["compress.depth={method: named, remove: [0, 1]}"],
            "compress.depth.remove",
            "would remove all 2 blocks",
        ),
        (
            "train",
            ["model.name=mlp", "data.name=mnist", "compress={vocab: {method: trim}}"],
            "compress.vocab.method",
            "no token embedding table",
        ),
        (
            "train",
            ["train.distill={alpha: 0.5}"],
            "train.distill",
            "no fine-tuned model to distil from",
        ),
    ],
)
def test_bad_new_technique_input_exits_2_writing_nothing(
    tmp_path, capsys, command, overrides, key, words
) -> None:
    """Each refused before anything runs or is written: exit 2, the key and why."""
    rc = main(
        [command, JOB, f"output.dir={tmp_path}", f"data.cache_dir={tmp_path / 'c'}", *overrides]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert key in err and words in err
    assert not (tmp_path / "debug-compress").exists()

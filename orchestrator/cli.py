"""``orchestrator`` command line (docs/contracts.md, "Command line"). Exit codes: 0 ok, 2 bad
input, 1 run failure."""

from __future__ import annotations

import argparse
import errno
import shlex
import sys

from orchestrator.errors import ConfigError, OrchestratorError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestrator",
        description="Distributed training and model compression on Ray.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text, description=help_text)
        c.add_argument("job", metavar="JOB.yaml", help="job file")
        c.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides, e.g. train.lr=1e-4 train.num_workers=2",
        )
        return c

    job_command("validate", "print the resolved job, or every problem in it (exit 2)")
    t = job_command("train", "one Ray Train run of the job (DDP or DeepSpeed workers)")
    t.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    job_command(
        "compress",
        "one-shot compression of the job's model, no training; evaluates and measures the artifact",
    )
    s = job_command(
        "search",
        "Ray Tune search over the job's search.space: a Ray Train run per trial, then the "
        "Pareto front, report.html and the best recipe",
    )
    s.add_argument("--resume", action="store_true", help="continue an interrupted search")
    s.add_argument(
        "--verbose",
        action="store_true",
        help="also print Ray Tune's full trial table every 30 s (default: a line per trial)",
    )
    s.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    r = sub.add_parser(
        "report",
        help="(re)build results.parquet, pareto.parquet, pareto.png and report.html of a search",
        description="(re)build the tables, plot and HTML report of a finished or partial search",
    )
    r.add_argument("run_dir", metavar="RUN_DIR", help="the search's run directory")
    c = sub.add_parser(
        "confirm",
        help="train a finished trial of a search again with other seeds and report in how many "
        "its constraint held",
        description="train a finished trial of a search (default: the selected one) again with "
        "each of --seeds (its job.yaml with train.seed changed), write the runs to "
        "RUN_DIR/confirm.json and rebuild the report; seeds already measured are not trained "
        "again",
    )
    c.add_argument("run_dir", metavar="RUN_DIR", help="the search's run directory")
    c.add_argument(
        "--seeds", type=int, nargs="+", required=True, metavar="S", help="train.seed values"
    )
    c.add_argument("--trial", metavar="ID", help="a trial by name (default: the selected one)")
    c.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    e = sub.add_parser(
        "export",
        help="write a trial's compressed model (safetensors + config + manifest) to a folder",
        description="write the best feasible trial's (or a named trial's) compressed model",
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="the search's run directory")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--best", action="store_true", help="the best trial under the constraints")
    which.add_argument("--trial", metavar="ID", help="a trial by name (see report.html)")
    e.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/best)")
    e.add_argument(
        "--format",
        choices=["artifact", "onnx", "hf"],
        default="artifact",
        help="artifact: the compressed model as the search wrote it (load_artifact); onnx: "
        "model.onnx for ONNX Runtime; hf: a folder plain transformers loads (recipes a "
        "transformers config describes, weights as float); onnx and hf are checked against "
        "the artifact on the test split",
    )
    return p


def _summary(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    rows = [
        f"  {k:<{width}}  {v:.4f}" if abs(v) < 1e5 else f"  {k:<{width}}  {v:.4g}"
        for k, v in sorted(metrics.items())
    ]
    return "\n".join(["final metrics:", *rows])


def _modules_table(rows: list[dict]) -> str:
    """One line per module: technique, shapes before -> after (or why skipped), details."""
    lines = ["modules:"]
    for r in rows:
        what = (
            "skipped: " + r["reason"]
            if r["skipped"]
            else (f"{r['shape_before']} -> {r['shape_after']}")
        )
        extra = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["details"].items()
        )
        lines.append(f"  {r['technique']:<9} {r['name']:<50} {what}  {extra}")
    return "\n".join(lines)


def _run_dir_command(args: argparse.Namespace) -> int:
    """``report``, ``export`` and ``confirm``: they read a run directory (a folder or a storage
    URI); only ``confirm`` needs Ray (it trains)."""
    from orchestrator import results
    from orchestrator.storage import RunFolder, StorageError, unreachable

    folder = RunFolder(args.run_dir)
    try:
        folder.pull_records()  # a run in storage: this machine's mirror of its records
    except StorageError as e:
        raise unreachable("RUN_DIR", args.run_dir, e, source="run directory") from None
    failed: list[str] = []
    spec = None  # the report reads and checks the run's job itself
    if args.command == "confirm":
        from orchestrator.search.confirm import confirm_command

        failed, spec = confirm_command(folder, args.trial, args.seeds, args.address)
    if args.command in ("report", "confirm"):
        summary = results.write_run_report(folder, spec=spec)
        import pyarrow.parquet as pq

        table = pq.read_table(folder.local / "results.parquet")
        print(results.format_pareto_table(table, summary.confirmed))
        for note in summary.notes:
            print(f"note: {note}")
        print(f"report: {folder.uri('report.html')}")
        if folder.remote:
            print(f"local copy: {folder.local / 'report.html'}")
        if failed:
            print(
                f"error: the run(s) with seed(s) {', '.join(failed)} failed (their errors are "
                f"in the report and {folder.uri('confirm.json')}); the same command tries them "
                "again",
                file=sys.stderr,
            )
            return 1
        return 0
    out = args.out or folder.uri("best")
    record = results.export_trial(folder, out, None if args.best else args.trial, args.format)
    as_what = {"onnx": " as ONNX", "hf": " as a plain transformers model"}
    print(f"exported trial {record['trial']} to {out}{as_what.get(args.format, '')}")
    check = record.get(f"{args.format}_check")
    if check:
        runtime = {"onnx": "ONNX Runtime", "hf": "transformers"}[args.format]
        int8 = f"{check['int8_matmuls']} int8 MatMuls, " if "int8_matmuls" in check else ""
        print(
            f"{runtime} against the artifact on {check['examples']} test examples: "
            f"{check['agreement']:.2%} same labels, largest logit difference "
            f"{check['max_logit_diff']:.3g}, accuracy {check[f'accuracy_{args.format}']:.4f} "
            f"(artifact {check['accuracy_artifact']:.4f}); {int8}{check['bytes'] / 1e6:.2f} MB"
        )
    return 0


_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    try:
        if args.command in ("report", "export", "confirm"):
            return _run_dir_command(args)
        from orchestrator.config import dump_job, load_job

        spec = load_job(args.job, args.overrides)
        if args.command == "validate":
            sys.stdout.write(dump_job(spec))
            return 0
        if args.command in ("train", "compress") and spec.tracking.mlflow is not None:
            print(
                f"note: tracking.mlflow: only `orchestrator search` logs to MLflow; this "
                f"{args.command} run is not logged there (its run directory holds it all)"
            )
        if args.command == "train":
            from orchestrator import launch

            metrics = launch.train(spec, address=args.address)
            print(_summary(metrics))
            print(f"run directory: {launch.run_dir(launch.resolve_paths(spec))}")
            return 0
        if args.command == "compress":
            from orchestrator import launch, oneshot

            out = oneshot.compress_job(spec)
            print(_modules_table(out["modules"]))
            for note in out["notes"]:
                print(f"note: {note}")
            print(_summary(out["metrics"]))
            print(f"run directory: {launch.run_dir(launch.resolve_paths(spec))}")
            return 0
        if args.command == "search":
            from orchestrator import launch, search

            summary = search.search(
                spec, address=args.address, resume=args.resume, verbose=args.verbose
            )
            folder = launch.run_dir(launch.resolve_paths(spec))
            for note in summary.notes:
                print(f"note: {note}")
            print(f"report: {folder.uri('report.html')}")
            if folder.remote:
                print(f"local copy: {folder.local / 'report.html'}")
            if summary.best:
                print(
                    f"export the best model: orchestrator export {shlex.quote(str(folder))} "
                    f"--best --out {shlex.quote(folder.uri('best'))}"
                )
            return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OrchestratorError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno not in _DISK_ERRORS:
            raise
        # The driver's own files (run directory, report files): name the path and the cause.
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1

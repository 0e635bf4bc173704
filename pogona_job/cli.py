"""`pogona-job` command line: run (default), config, dataset pull|push|validate|demo.

Heavy imports (torch, ultralytics, boto3) happen inside the commands that need them,
so `--help` and `config` answer instantly.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pogona_job.config import Settings, effective_config, load_settings
from pogona_job.errors import ConfigError, Interrupted, JobError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pogona-job",
        description="Pull a YOLO dataset from S3, prove the model learns, train, and publish the results. "
        "Configured by POGONA_* environment variables (see `pogona-job config`).",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser(
        "run",
        help="the whole job (default)",
        description="The whole job: pull, validate, sanity gate, train, evaluate, publish. Configured only by "
        "POGONA_* environment variables (required: POGONA_DATASET_URI, POGONA_OUTPUT_URI); `pogona-job config` "
        "prints every variable with its effective value, and the README's Configuration table documents each.",
    )
    sub.add_parser("config", help="print the effective configuration, secrets masked")
    ds = sub.add_parser("dataset", help="dataset tools").add_subparsers(dest="action", required=True)
    pull = ds.add_parser("pull", help="download POGONA_DATASET_URI into DEST (prunes only files it fetched)")
    pull.add_argument("dest", type=Path)
    pull.add_argument(
        "--force",
        action="store_true",
        help="pull into a non-empty DEST that no earlier pull wrote, and replace files there that the pull did not "
        "write (or that changed since) when the bucket has an object of that name; nothing of yours is ever pruned",
    )
    push = ds.add_parser("push", help="validate SRC, then upload it to POGONA_DATASET_URI (hidden/junk files skipped)")
    push.add_argument("src", type=Path)
    push.add_argument("--delete", action="store_true", help="also delete objects that SRC no longer has (listed)")
    ds.add_parser("validate", help="check a local dataset folder; no bucket needed").add_argument("dir", type=Path)
    demo = ds.add_parser("demo", help="write the synthetic demo dataset into DEST")
    demo.add_argument("dest", type=Path)
    demo.add_argument("--images", type=int, default=120)
    demo.add_argument("--size", type=int, default=160)
    runs = sub.add_parser("runs", help="list the runs under POGONA_OUTPUT_URI (champion marked)")
    runs_sub = runs.add_subparsers(dest="action")
    runs_sub.add_parser("show", help="one run's manifest, readable").add_argument("run_id")
    watch = runs_sub.add_parser("watch", help="follow a live run's progress.json (rich on a TTY, JSON lines otherwise)")
    watch.add_argument("run_id", nargs="?", help="the run to follow")
    watch.add_argument("--latest", action="store_true", help="follow the run that wrote progress most recently")
    watch.add_argument("--once", action="store_true", help="print the current state once and exit")
    compare = runs_sub.add_parser(
        "compare", help="two runs: metrics with intervals, paired difference, differing settings, curves (PNG)"
    )
    compare.add_argument("run_a")
    compare.add_argument("run_b")
    compare.add_argument("--plot", type=Path, help="where to write the curves (default compare-A-B.png here)")
    predict = sub.add_parser(
        "predict",
        help="run a trained model on images: annotated images + predictions.jsonl in DEST",
        description="SRC and DEST: a local folder or an s3:// prefix. Boxes below POGONA_CONF (default 0.25) are "
        "dropped. Exit 2: a model or SRC that does not exist; 3: no readable image; 4: storage refused.",
    )
    predict.add_argument(
        "--model",
        help="champion (default: the champion under POGONA_OUTPUT_URI), a run id, an s3:// URI, or a "
        "local best.pt / best.onnx (onnx runs through onnxruntime, without torch)",
    )
    predict.add_argument("--conf", type=float, help="confidence threshold (default POGONA_CONF)")
    predict.add_argument("--txt", action="store_true", help="also write YOLO label files under DEST/labels/")
    predict.add_argument("src", help="folder, image or s3:// prefix of images")
    predict.add_argument("dest", help="folder or s3:// prefix for the results")
    return parser


def entry(argv: list[str] | None = None) -> NoReturn:
    """The console script (`pogona-job`, `python -m pogona_job`): `main`, then the process ends with its exit
    code once the exit handlers ran and the output is flushed, without the interpreter's own teardown.

    obstore's Rust runtime keeps worker threads that are never told the process is ending; one that is busy
    while Python finalises panics and aborts the process (SIGABRT, exit 134), after the work is done and its
    exit code decided. Seen here: `dataset push` printed its result and exited -6. A scheduler would retry a
    run that had succeeded. Skipping the teardown leaves no window for it."""
    code = main(argv)
    atexit._run_exitfuncs()  # what a normal exit runs (logging's flush, temporary folders, ...)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    settings: Settings | None = None
    try:
        settings = load_settings()
        from pogona_job import logs

        logs.configure(settings.log_format, debug=settings.debug)
        if command == "run":
            from pogona_job.run.job import run

            return run(settings)
        if command == "config":
            print(json.dumps(effective_config(settings), indent=2, default=str))
            return 0
        if command == "runs":
            return _runs(args, settings)
        if command == "predict":
            from pogona_job.tools import predict as predicting

            return predicting.command(args.model, args.src, args.dest, settings, conf=args.conf, txt=args.txt)
        return _dataset(args, settings)
    except JobError as err:
        if settings is not None and settings.debug:  # the traceback, but the documented exit code all the same
            import traceback

            traceback.print_exc()
        print(err.sentence, file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


def _dataset(args: argparse.Namespace, settings: Settings) -> int:
    from pogona_job.logs import get_logger

    log = get_logger()
    if args.action == "demo":
        from pogona_job.tools.demo import write_demo

        write_demo(args.dest, n_images=args.images, size=args.size, seed=settings.seed)
        print(f"Demo dataset written to {args.dest} ({args.images} images).")
        return 0
    if args.action == "validate":
        return _validate(args.dir, settings)
    from pogona_job.s3 import pull, storage

    if settings.dataset_uri is None:
        raise ConfigError("POGONA_DATASET_URI is required: set it to the s3://bucket/prefix of the dataset.")
    client = storage.make_client(threads=settings.s3_threads, max_attempts=settings.s3_max_attempts)
    uri = storage.S3Path.parse(settings.dataset_uri)
    from pogona_job.s3.progress import transfer_progress

    console = settings.log_format != "json"
    if args.action == "pull":
        dest: Path = args.dest
        if dest.is_dir() and any(dest.iterdir()) and not pull.pulled_before(dest) and not args.force:
            print(
                f"{dest} is not empty and no earlier pull wrote it: choose an empty folder, or pass --force "
                "(files the pull did not fetch are never deleted).",
                file=sys.stderr,
            )
            return 2
        with transfer_progress("pull", console=console, check=_stop_on_sigterm()) as progress:
            result = pull.pull_prefix(
                client, uri, args.dest, threads=settings.s3_threads, progress=progress, replace=args.force
            )
        log.info("dataset pulled", files=result.files, fetched=result.fetched, cached=result.skipped)
        for note in result.notes:
            print(f"note: {note}")
        kept = f", {len(result.notes)} of your files kept (noted above)" if result.notes else ""
        print(f"Pulled {uri.uri} into {args.dest}: {result.fetched} fetched, {result.skipped} already cached{kept}.")
        return 0
    if _validate(args.src, settings) != 0:
        return 3
    with transfer_progress("push", console=console) as progress:
        uploaded, skipped = storage.push_tree(
            client,
            args.src,
            uri,
            threads=settings.s3_threads,
            progress=progress,
            delete=args.delete,
            on_delete=lambda key: print(f"deleting s3://{uri.bucket}/{key} (not in {args.src})"),
        )
    print(f"Pushed {args.src} to {uri.uri}: {uploaded} uploaded, {skipped} unchanged.")
    return 0


def _stop_on_sigterm() -> Callable[[], None]:
    """SIGTERM ends a pull at its next progress tick (5 a second): GETs dropped, no partial file left."""
    asked: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: asked.append(signum))

    def check() -> None:
        if asked:
            raise Interrupted(
                "The pull was stopped by a termination signal: run it again to go on (fetched files are kept)."
            )

    return check


def _validate(folder: Path, settings: Settings) -> int:
    from pogona_job.dataset import Options, format_problems, inspect_dataset

    if not folder.is_dir():
        print(f"{folder} is not a folder.", file=sys.stderr)
        return 3
    inventory = inspect_dataset(folder, settings.configured_classes, Options.from_settings(settings))
    n = len(inventory.items)
    unlabelled = sum(1 for it in inventory.items if it.label is None)
    without = f", {unlabelled} of them without a label file" if unlabelled else ""
    summary = (
        f"{folder}: {inventory.layout_label}; {n} images ({inventory.backgrounds} background{without}), "
        f"{inventory.companions} companion files, {inventory.junk_ignored} junk files ignored; "
        f"classes {inventory.class_names} from {inventory.names_source}"
    )
    if inventory.notes:
        print(f"{len(inventory.notes)} notes (not problems):\n{format_problems(inventory.notes)}")
    if not inventory.problems:
        print(f"{summary}: OK.")
        return 0
    # On stdout like the OK case, so `> out.txt` keeps the list; the exit code says it failed.
    count = len(inventory.problems)
    print(f"{summary}: {count} problem{'s' if count != 1 else ''}:\n{format_problems(inventory.problems)}")
    return 3


def _runs(args: argparse.Namespace, settings: Settings) -> int:
    from pogona_job.s3 import storage
    from pogona_job.tools import runs

    if args.action == "watch":
        from pogona_job.run.livestatus import watch_command

        return watch_command(args, settings)
    if settings.output_uri is None:
        raise ConfigError("POGONA_OUTPUT_URI is required: set it to the s3://bucket/prefix of the runs.")
    client = storage.make_client(threads=settings.s3_threads, max_attempts=settings.s3_max_attempts)
    out = storage.S3Path.parse(settings.output_uri)
    if args.action == "compare":
        from pogona_job.tools.compare import compare

        plot = args.plot or Path(f"compare-{args.run_a}-{args.run_b}.png")
        print(compare(client, out, args.run_a, args.run_b, plot))
        return 0
    if args.action != "show":
        print(runs.table(client, out))
        return 0
    text = runs.show(client, out, args.run_id)
    if text is None:
        print(f"No manifest for run {args.run_id!r} under {out.uri}: `pogona-job runs` lists them.", file=sys.stderr)
        return 2
    print(text)
    return 0

"""`pogona-job` command line: run (default), config, dataset pull|push|validate|demo.

Heavy imports (torch, ultralytics, boto3) happen inside the commands that need them,
so `--help` and `config` answer instantly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pogona_job.config import Settings, effective_config, load_settings
from pogona_job.errors import ConfigError, JobError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pogona-job",
        description="Pull a YOLO dataset from S3, prove the model learns, train, and publish the results. "
        "Configured by POGONA_* environment variables (see `pogona-job config`).",
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="the whole job (default)")
    sub.add_parser("config", help="print the effective configuration, secrets masked")
    ds = sub.add_parser("dataset", help="dataset tools").add_subparsers(dest="action", required=True)
    ds.add_parser("pull", help="download POGONA_DATASET_URI into DEST").add_argument("dest", type=Path)
    ds.add_parser("push", help="validate SRC, then upload it to POGONA_DATASET_URI").add_argument("src", type=Path)
    ds.add_parser("validate", help="check a local dataset folder; no bucket needed").add_argument("dir", type=Path)
    demo = ds.add_parser("demo", help="write the synthetic demo dataset into DEST")
    demo.add_argument("dest", type=Path)
    demo.add_argument("--images", type=int, default=120)
    demo.add_argument("--size", type=int, default=160)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    settings: Settings | None = None
    try:
        settings = load_settings()
        from pogona_job import logs

        logs.configure(settings.log_format, debug=settings.debug)
        if command == "run":
            from pogona_job.job import run

            return run(settings)
        if command == "config":
            print(json.dumps(effective_config(settings), indent=2, default=str))
            return 0
        return _dataset(args, settings)
    except JobError as err:
        if settings is not None and settings.debug:
            raise
        print(err.sentence, file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


def _dataset(args: argparse.Namespace, settings: Settings) -> int:
    from pogona_job.logs import get_logger

    log = get_logger()
    if args.action == "demo":
        from pogona_job.demo import write_demo

        write_demo(args.dest, n_images=args.images, size=args.size, seed=settings.seed)
        print(f"Demo dataset written to {args.dest} ({args.images} images).")
        return 0
    if args.action == "validate":
        return _validate(args.dir, settings)
    from pogona_job import storage

    if settings.dataset_uri is None:
        raise ConfigError("POGONA_DATASET_URI is required: set it to the s3://bucket/prefix of the dataset.")
    client = storage.make_client(threads=settings.s3_threads, max_attempts=settings.s3_max_attempts)
    uri = storage.S3Path.parse(settings.dataset_uri)
    from pogona_job.progress import transfer_progress

    console = settings.log_format != "json"
    if args.action == "pull":
        with transfer_progress("pull", console=console) as progress:
            result = storage.pull_prefix(client, uri, args.dest, threads=settings.s3_threads, progress=progress)
        log.info("dataset pulled", files=result.files, fetched=result.fetched, cached=result.skipped)
        print(f"Pulled {uri.uri} into {args.dest}: {result.fetched} fetched, {result.skipped} already cached.")
        return 0
    if _validate(args.src, settings) != 0:
        return 3
    with transfer_progress("push", console=console) as progress:
        uploaded, skipped = storage.push_tree(client, args.src, uri, threads=settings.s3_threads, progress=progress)
    print(f"Pushed {args.src} to {uri.uri}: {uploaded} uploaded, {skipped} unchanged.")
    return 0


def _validate(folder: Path, settings: Settings) -> int:
    from pogona_job.dataset import Options, format_problems, inspect_dataset

    if not folder.is_dir():
        print(f"{folder} is not a folder.", file=sys.stderr)
        return 3
    inventory = inspect_dataset(folder, settings.configured_classes, Options.from_settings(settings))
    n = len(inventory.items)
    summary = (
        f"{folder}: {inventory.layout_label}; {n} images ({inventory.backgrounds} background), "
        f"{inventory.companions} companion files, {inventory.junk_ignored} junk files ignored; "
        f"classes {inventory.class_names} from {inventory.names_source}"
    )
    if inventory.notes:
        print(f"{len(inventory.notes)} notes (not problems):\n{format_problems(inventory.notes)}")
    if not inventory.problems:
        print(f"{summary}: OK.")
        return 0
    print(f"{summary}: {len(inventory.problems)} problems:\n{format_problems(inventory.problems)}", file=sys.stderr)
    return 3

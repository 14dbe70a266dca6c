"""The ``ray-ckpt`` subcommands: each parses nothing, calls one library function, prints.

Each command imports what it needs when it runs: torch and Ray take seconds to import, and
``--help``, ``ls`` and ``inspect`` need neither (benchmarks/cli_latency.py measures it). A
command returns the exit status; errors are raised and :func:`ray_ckpt.cli.main` reports them.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from ..errors import CheckpointError
from . import output
from .output import (
    ProgressBar,
    clean,
    human_bytes,
    listing_doc,
    print_diff,
    print_json,
    print_listing,
    print_problems,
    print_roots,
    print_summary,
    table,
    verify_line,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def progress_bar(args: argparse.Namespace) -> ProgressBar:
    enabled = not args.quiet and sys.stdout.isatty() and sys.stderr.isatty()
    return ProgressBar(sys.stderr, enabled, output.PROGRESS_DELAY_SECS)


def say(args: argparse.Namespace, text: str) -> None:
    """A line that is not the command's result: left out with --quiet."""
    if not args.quiet:
        print(clean(text), file=sys.stderr)


# --- commands --------------------------------------------------------------------------------


def run_inspect(args: argparse.Namespace) -> int:
    from ..tools import inspect_checkpoint

    summary = inspect_checkpoint(args.path, rank=args.rank)
    if args.json:
        print_json(summary.to_dict(), sys.stdout)
        return EXIT_OK
    print_summary(summary, sys.stdout)
    return EXIT_OK


def run_verify(args: argparse.Namespace) -> int:
    from ..tools import verify

    bar = progress_bar(args)
    report = verify(args.path, progress=bar, chunk_bytes=args.chunk_size)
    if args.json:
        print_json(report.to_dict(), sys.stdout)
    elif report.ok:
        if not args.quiet:
            print(clean(verify_line(report)))
    else:
        print_problems(report, sys.stdout)
    return EXIT_OK if report.ok else EXIT_FAILED


def run_ls(args: argparse.Namespace) -> int:
    from ..runs import list_run
    from ..storage.storage import Storage

    connect_for(args.root)
    root = Storage.from_path(args.root)
    if not root.exists():
        raise CheckpointError(f"no such directory: {root.display}")
    listing = list_run(args.root)
    if args.json:  # a list of checkpoints, as before; the roots below go to stderr
        print_json(listing_doc(listing), sys.stdout)
        if listing.roots:
            print_roots(listing, sys.stderr)
    elif listing.checkpoints:
        print_listing(listing, sys.stdout)
    elif listing.roots:
        print_roots(listing, sys.stdout)
    else:
        say(args, f"no checkpoints under {root.display}")
    for c in listing.checkpoints:
        if c.entry.problem is not None:
            say(args, f"{c.entry.name}: bad: {c.entry.problem}")
    return EXIT_OK


def connect_for(root: str) -> None:
    """For a ``mem://`` root: connect to the running Ray cluster (``address="auto"``), which
    holds its checkpoints."""
    from ..storage.classify import MEMORY_SCHEME  # imports pyarrow, which --help does not

    if not root.startswith(MEMORY_SCHEME):
        return
    import ray

    from .._attach import attach

    if not ray.is_initialized():
        attach("auto", "", logging_level=logging.WARNING)


def run_clean(args: argparse.Namespace) -> int:
    from ..runs import clean as clean_run
    from ..storage.storage import Storage

    root = Storage.from_path(args.root)
    if not root.exists():
        raise CheckpointError(f"no such directory: {root.display}")
    decisions = clean_run(args.root, unregistered=args.unregistered, dry_run=not args.yes,
                      min_age_secs=args.min_age)
    if args.json:
        print_json([{"name": d.checkpoint.entry.name, "delete": d.delete, "reason": d.reason}
                     for d in decisions], sys.stdout)
        return EXIT_OK
    verb = "delete" if args.yes else "would delete"
    rows = [["NAME", "STEP", "ACTION", "WHY"]]
    rows += [[d.checkpoint.entry.name, "-" if d.checkpoint.step is None else
              str(d.checkpoint.step), verb if d.delete else "keep", d.reason]
             for d in decisions]
    if decisions:
        table(rows, sys.stdout, right=(1,))
    count = sum(d.delete for d in decisions)
    if not args.yes and count:
        say(args, f"dry run: nothing deleted; `ray-ckpt clean {args.root} "
             f"{'--unregistered ' if args.unregistered else ''}--yes` deletes {count}")
    elif not args.quiet:
        print(f"{'deleted' if args.yes else 'nothing to delete:'} {count} checkpoint(s)"
              if count else f"nothing to delete under {root.display}", file=sys.stderr)
    return EXIT_OK


def run_diff(args: argparse.Namespace) -> int:
    from ..tools import diff_checkpoints

    report = diff_checkpoints(args.a, args.b, rank=args.rank, progress=progress_bar(args))
    if args.json:
        print_json(report.to_dict(), sys.stdout)
    else:
        print_diff(report, sys.stdout)
    return EXIT_FAILED if args.exit_code and not report.same else EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    from ..tools import export_checkpoint
    from ..tools.export import DEFAULT_MAX_SHARD_BYTES

    result = export_checkpoint(
        args.path, args.out, to=args.to, only=args.only, strip_prefix=args.strip_prefix,
        max_shard_bytes=args.max_shard_size or DEFAULT_MAX_SHARD_BYTES,
        allow_pickle=args.allow_pickle, overwrite=args.overwrite, rank=args.rank,
        progress=progress_bar(args),
    )
    if not args.quiet:
        skipped = (
            f"; skipped {len(result.skipped)} non-tensor values "
            f"({', '.join(result.skipped[:5])}{', ...' if len(result.skipped) > 5 else ''})"
            if result.skipped else ""
        )
        print(clean(
            f"exported {result.tensors} tensors ({human_bytes(result.nbytes)}) to "
            f"{result.out} as {result.format}: {len(result.files)} file(s){skipped}"
        ))
        for file in result.files:
            print(f"  {clean(file)}")
    return EXIT_OK


def run_import(args: argparse.Namespace) -> int:
    from ..tools import import_checkpoint

    result = import_checkpoint(
        args.src, args.dest, under=args.under, overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
    )
    if not args.quiet:
        print(clean(
            f"imported {result.tensors} tensors ({human_bytes(result.nbytes)}) from "
            f"{result.source} ({result.format}, {len(result.files)} file(s)) to {result.path}"
        ))
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    from ..demo import run

    return run(args.dir, d_model=args.d_model, layers=args.layers)


def source_checkout() -> Path:
    """The directory above the ``ray_ckpt`` package: a source checkout's root, if it is one."""
    return Path(__file__).resolve().parent.parent.parent


def run_bench(args: argparse.Namespace) -> int:
    checkout = source_checkout()
    if not (checkout / "benchmarks" / "bench.py").is_file():
        print(
            "ray-ckpt bench: the benchmarks ship with the source, not with the package: run it "
            f"from a source checkout of ray_ckpt (no benchmarks/bench.py under {checkout})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    command = [sys.executable, "-m", "benchmarks.bench", *extra]
    say(args, f"running {' '.join(command)} in {checkout}")
    return subprocess.call(command, cwd=checkout)

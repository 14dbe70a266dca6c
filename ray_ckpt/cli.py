"""The ``ray-ckpt`` command line (also ``python -m ray_ckpt``).

Each subcommand is a thin layer over a library function (:mod:`ray_ckpt.tools`,
:func:`ray_ckpt.list_checkpoints`, :mod:`ray_ckpt.demo`): parse, call, print. What a command
finds is printed on stdout (a table, or JSON with ``--json``); progress and errors go to
stderr. A progress bar appears only when stdout and stderr are both terminals, and only once an
operation has run for half a second; ``--quiet`` turns it off along with every line that is not
a result.

Exit status: 0 success; 1 the checkpoint is bad or the operation failed (``verify`` found
problems, a :class:`~ray_ckpt.CheckpointError`, an I/O error), with the message on stderr; 2 a
usage error (bad arguments, an unresolvable path). ``diff --exit-code`` exits 1 when the
checkpoints differ, like ``git diff --exit-code``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .errors import CheckpointError
from .storage.classify import MEMORY_SCHEME
from .storage.credentials import redact

if TYPE_CHECKING:
    from .catalog import CheckpointEntry
    from .runs import RunCheckpoint, RunListing
    from .tiers import MemoryCheckpointInfo
    from .tools import CheckpointSummary, DiffReport, LeafSummary, VerifyReport

# Each command imports what it needs when it runs: torch and Ray take seconds to import, and
# --help, ls and inspect need neither (benchmarks/cli_latency.py measures it).

logger = logging.getLogger("ray_ckpt.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROGRESS_DELAY_SECS = 0.5  # operations shorter than this never draw a bar


# --- output helpers --------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``'5GB'`` -> 5_000_000_000, ``'500MiB'`` -> 524_288_000, ``'123'`` -> 123 (bytes)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes"
        )
    return int(value * units[unit])


def clean(text: Any) -> str:
    """``text`` safe for a terminal: every control or format character (ESC, BEL, newline,
    bidi overrides, lone surrogates, ...) shown as its escape, never raw. Checkpoint keys come
    from whoever wrote the checkpoint."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def _when(unix: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix)) if unix else "-"


def _table(rows: Sequence[Sequence[str]], out: TextIO, right: Sequence[int] = ()) -> None:
    """Print ``rows`` (the first is the header) as aligned columns."""
    rows = [[clean(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)


def _print_json(doc: Any, out: TextIO) -> None:
    json.dump(doc, out, indent=2, default=str)
    out.write("\n")


class ProgressBar:
    """A one-line progress bar on stderr (implements :class:`ray_ckpt.tools.Progress`).

    Drawn only when ``enabled`` (the CLI enables it when stdout and stderr are terminals and
    ``--quiet`` is off), and only once the operation has run for ``delay_secs``, so that short
    operations print nothing. At most ten redraws a second.
    """

    def __init__(
        self, stream: TextIO, enabled: bool, delay_secs: float = PROGRESS_DELAY_SECS
    ) -> None:
        self._stream = stream
        self._enabled = enabled
        self._delay_secs = delay_secs
        self._total = 0
        self._done = 0
        self._what = ""
        self._started = 0.0
        self._drawn_at = 0.0
        self._drawn = False

    def start(self, total_bytes: int, what: str) -> None:
        self._total, self._done, self._what = total_bytes, 0, what
        self._started = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        now = time.monotonic()
        if not self._enabled or now - self._started < self._delay_secs:
            return
        if now - self._drawn_at >= 0.1 or self._done >= self._total:
            self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = min(1.0, self._done / self._total) if self._total else 1.0
        width = 30
        filled = int(fraction * width)
        rate = self._done / max(now - self._started, 1e-9)
        self._stream.write(
            f"\r{self._what:<7} [{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} "
            f"{human_bytes(self._done)} / {human_bytes(self._total)}  "
            f"{human_bytes(int(rate))}/s   "
        )
        self._stream.flush()
        self._drawn_at = now
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._drawn = False


def _progress(args: argparse.Namespace) -> ProgressBar:
    enabled = not args.quiet and sys.stdout.isatty() and sys.stderr.isatty()
    return ProgressBar(sys.stderr, enabled, PROGRESS_DELAY_SECS)


def _say(args: argparse.Namespace, text: str) -> None:
    """A line that is not the command's result: left out with --quiet."""
    if not args.quiet:
        print(clean(text), file=sys.stderr)


# --- commands --------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    from .tools import inspect_checkpoint

    summary = inspect_checkpoint(args.path, rank=args.rank)
    if args.json:
        _print_json(summary.to_dict(), sys.stdout)
        return EXIT_OK
    print_summary(summary, sys.stdout)
    return EXIT_OK


def print_summary(summary: CheckpointSummary, out: TextIO) -> None:
    view = f" (rank {summary.rank}'s view)" if summary.world_size > 1 else ""
    print(
        f"{clean(summary.path)}: checkpoint {summary.checkpoint_id}, committed "
        f"{_when(summary.created_unix)}, world size {summary.world_size}{view}",
        file=out,
    )
    sharded = any(leaf.shards for leaf in summary.leaves)
    rows = [["KEY", "KIND", "DTYPE", "SHAPE / VALUE", "SIZE", *(["SHARDS"] if sharded else [])]]
    rows += [_leaf_row(leaf, sharded) for leaf in summary.leaves]
    _table(rows, out, right=(4, 5))
    values = len(summary.leaves) - len(summary.tensors)
    ranks = (
        f" (all ranks: {human_bytes(summary.total_nbytes)})"
        if summary.tensor_nbytes != summary.total_nbytes else ""
    )
    print(
        f"total: {len(summary.tensors)} tensors, {human_bytes(summary.tensor_nbytes)}{ranks}"
        f"{f', {values} other values' if values else ''}; {len(summary.data_files)} data "
        f"files + manifest on storage: {human_bytes(summary.files_nbytes)}",
        file=out,
    )


def _leaf_row(leaf: LeafSummary, sharded: bool) -> list[str]:
    """A table row; with ``sharded``, a last column with the number of shards of each sharded
    tensor (its SHAPE is the global shape, its SIZE the bytes of all its shards)."""
    shards = [str(len(leaf.shards)) if leaf.shards else ""] if sharded else []
    if leaf.kind == "value":
        return [leaf.key, "value", leaf.dtype or "", leaf.value or "", "", *shards]
    shape = "" if leaf.shape is None else str(list(leaf.shape))
    size = f"= {leaf.tied_to}" if leaf.tied_to else human_bytes(leaf.nbytes)
    return [leaf.key, leaf.kind, leaf.dtype or "", shape, size, *shards]


def _verify(args: argparse.Namespace) -> int:
    from .tools import verify

    bar = _progress(args)
    report = verify(args.path, progress=bar, chunk_bytes=args.chunk_size)
    if args.json:
        _print_json(report.to_dict(), sys.stdout)
    elif report.ok:
        if not args.quiet:
            print(clean(_verify_line(report)))
    else:
        print_problems(report, sys.stdout)
    return EXIT_OK if report.ok else EXIT_FAILED


def _verify_line(report: VerifyReport) -> str:
    unchecked = (
        f"; {report.extents_without_checksum} extents were saved without checksums"
        if report.extents_without_checksum else ""
    )
    return (
        f"OK {report.path}: {report.files_checked} data files, {report.extents_checked} "
        f"extents, {human_bytes(report.bytes_checked)} checked{unchecked}"
    )


def print_problems(report: VerifyReport, out: TextIO) -> None:
    count = len(report.problems)
    print(f"FAILED {clean(report.path)}: {count} problem{'s' if count != 1 else ''}", file=out)
    for problem in report.problems:
        print(f"  [{problem.kind}] {clean(problem.message)}", file=out)


def _ls(args: argparse.Namespace) -> int:
    from .runs import list_run
    from .storage.storage import Storage

    held = _memory_copies(args.root)
    root = Storage.from_path(args.root)
    if not root.exists():
        raise CheckpointError(f"no such directory: {root.display}")
    listing = list_run(args.root)
    if args.json:  # a list of checkpoints, as before; the roots below go to stderr
        _print_json(_listing_doc(listing, held), sys.stdout)
        if listing.roots:
            print_roots(listing, sys.stderr)
    elif listing.checkpoints:
        print_listing(listing, sys.stdout, held)
    elif listing.roots:
        print_roots(listing, sys.stdout)
    else:
        _say(args, f"no checkpoints under {root.display}")
    for c in listing.checkpoints:
        if c.entry.problem is not None:
            _say(args, f"{c.entry.name}: bad: {c.entry.problem}")
    return EXIT_OK


def _state(entry: CheckpointEntry) -> str:
    if entry.problem is not None:
        return "bad"
    return "committed" if entry.committed else "incomplete"


def print_listing(
    listing: RunListing, out: TextIO, held: dict[str, MemoryCheckpointInfo] | None = None
) -> None:
    """The checkpoints of one root, oldest step first; on a Ray Train run, whether Ray Train
    registered each, and a line on what that means; for memory checkpoints (``held``), the tier
    and the nodes holding copies."""
    train = listing.ray_train
    rows = [["NAME", "STEP", "STATE", *(["RAY TRAIN"] if train else []), "SIZE", "COMMITTED AT"]]
    for c in listing.checkpoints:
        e = c.entry
        rows.append([
            e.name, "-" if c.step is None else str(c.step),
            _state(e),
            *([_registration(c, listing)] if train else []),
            human_bytes(e.nbytes), _when(e.created_unix),
        ])
    if held is not None:
        rows[0] += ["TIER", "COPIES ON NODES"]
        for row, c in zip(rows[1:], listing.checkpoints):
            doc = _tier_doc(c.entry, held)
            row += [doc["tier"], ", ".join(n[:12] for n in doc["nodes"]) or "-"]
    _table(rows, out, right=(1, 4 if train else 3))
    if train:
        unregistered = [c for c in listing.checkpoints if c.entry.committed and not c.registered]
        print(f"Ray Train run: {sum(bool(c.registered) for c in listing.checkpoints)} registered "
              f"checkpoint(s), resumes from {listing.ray_train_latest or 'none'}", file=out)
        if unregistered:
            print(f"{len(unregistered)} committed but never registered (a save that finished "
                  "after its run attempt failed; Ray Train will not delete it): "
                  "`ray-ckpt clean --unregistered` removes those it may", file=out)
    elif any(c.entry.name.startswith("checkpoint_") for c in listing.checkpoints):
        print("no Ray Train checkpoint_manager_snapshot.json here: whether Ray Train "
              "registered these checkpoints cannot be known", file=sys.stderr)


def _registration(c: RunCheckpoint, listing: RunListing) -> str:
    if c.entry.name == listing.ray_train_latest:
        return "latest"
    return "registered" if c.registered else "no" if c.entry.committed else "-"


def print_roots(listing: RunListing, out: TextIO) -> None:
    print(f"{listing.root} holds no checkpoints itself; it holds {len(listing.roots)} "
          "root(s) of checkpoints (`ray-ckpt ls` one of them):", file=out)
    _table([["ROOT", "CHECKPOINTS"], *[[n, str(k)] for n, k in listing.roots]], out, right=(1,))


def _listing_doc(
    listing: RunListing, held: dict[str, MemoryCheckpointInfo] | None = None
) -> list[dict[str, Any]]:
    """One object per checkpoint; ``registered`` is null where it cannot be known (not a Ray
    Train run), ``ray_train_latest`` true for the one Ray Train resumes from."""
    return [
        {**_entry_doc(c.entry), "step": c.step, "saved_step": c.saved_step,
         "registered": c.registered, "ray_train_latest": c.entry.name == listing.ray_train_latest,
         **_tier_doc(c.entry, held)}
        for c in listing.checkpoints
    ]


def _memory_copies(root: str) -> dict[str, MemoryCheckpointInfo] | None:
    """For a ``mem://`` root: every memory checkpoint by path (connects to the running Ray
    cluster, ``address="auto"``); None for durable roots."""
    if not root.startswith(MEMORY_SCHEME):
        return None
    import ray

    from .tiers import memory_checkpoints

    if not ray.is_initialized():
        ray.init(address="auto", logging_level=logging.WARNING)
    return {i.path: i for i in memory_checkpoints()}


def _tier_doc(
    entry: CheckpointEntry, held: dict[str, MemoryCheckpointInfo] | None
) -> dict[str, Any]:
    """Tier and copies of a memory checkpoint (nothing is added for durable ones)."""
    if held is None:
        return {}
    info = held.get(entry.path.partition("?")[0])
    return {"tier": "memory", "nodes": info.nodes if info else [],
            "copies": info.copies if info else 0}


def _entry_doc(entry: CheckpointEntry) -> dict[str, Any]:
    return {
        "name": entry.name, "path": entry.path, "step": entry.step,
        "committed": entry.committed, "nbytes": entry.nbytes,
        "created_unix": entry.created_unix, "checkpoint_id": entry.checkpoint_id,
        "problem": entry.problem,
    }


def _clean(args: argparse.Namespace) -> int:
    from .runs import clean
    from .storage.storage import Storage

    root = Storage.from_path(args.root)
    if not root.exists():
        raise CheckpointError(f"no such directory: {root.display}")
    decisions = clean(args.root, unregistered=args.unregistered, dry_run=not args.yes,
                      min_age_secs=args.min_age)
    if args.json:
        _print_json([{"name": d.checkpoint.entry.name, "delete": d.delete, "reason": d.reason}
                     for d in decisions], sys.stdout)
        return EXIT_OK
    verb = "delete" if args.yes else "would delete"
    rows = [["NAME", "STEP", "ACTION", "WHY"]]
    rows += [[d.checkpoint.entry.name, "-" if d.checkpoint.step is None else
              str(d.checkpoint.step), verb if d.delete else "keep", d.reason]
             for d in decisions]
    if decisions:
        _table(rows, sys.stdout, right=(1,))
    count = sum(d.delete for d in decisions)
    if not args.yes and count:
        _say(args, f"dry run: nothing deleted; `ray-ckpt clean {args.root} "
             f"{'--unregistered ' if args.unregistered else ''}--yes` deletes {count}")
    elif not args.quiet:
        print(f"{'deleted' if args.yes else 'nothing to delete:'} {count} checkpoint(s)"
              if count else f"nothing to delete under {root.display}", file=sys.stderr)
    return EXIT_OK


def _diff(args: argparse.Namespace) -> int:
    from .tools import diff_checkpoints

    report = diff_checkpoints(args.a, args.b, rank=args.rank, progress=_progress(args))
    if args.json:
        _print_json(report.to_dict(), sys.stdout)
    else:
        print_diff(report, sys.stdout)
    return EXIT_FAILED if args.exit_code and not report.same else EXIT_OK


def print_diff(report: DiffReport, out: TextIO) -> None:
    print(f"--- {clean(report.a)}\n+++ {clean(report.b)}", file=out)
    for key in report.removed:
        print(f"- {clean(key)}", file=out)
    for key in report.added:
        print(f"+ {clean(key)}", file=out)
    if report.changed:
        rows = [["CHANGED", "WHAT", "ELEMENTS", "MAX |A-B|", "DETAIL"]]
        for c in report.changed:
            rows.append([
                f"~ {c.key}", c.what,
                "" if c.numel_changed is None else str(c.numel_changed),
                "" if c.max_abs_diff is None else f"{c.max_abs_diff:.6g}",
                "" if c.what == "values" else c.detail,
            ])
        _table(rows, out, right=(2, 3))
    print(
        f"{len(report.added)} added, {len(report.removed)} removed, {len(report.changed)} "
        f"changed, {report.unchanged} unchanged",
        file=out,
    )


def _export(args: argparse.Namespace) -> int:
    from .tools import export_checkpoint
    from .tools.export import DEFAULT_MAX_SHARD_BYTES

    result = export_checkpoint(
        args.path, args.out, to=args.to, only=args.only, strip_prefix=args.strip_prefix,
        max_shard_bytes=args.max_shard_size or DEFAULT_MAX_SHARD_BYTES,
        allow_pickle=args.allow_pickle, overwrite=args.overwrite, rank=args.rank,
        progress=_progress(args),
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


def _import(args: argparse.Namespace) -> int:
    from .tools import import_checkpoint

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


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args.dir, d_model=args.d_model, layers=args.layers)


def source_checkout() -> Path:
    """The directory above the ``ray_ckpt`` package: a source checkout's root, if it is one."""
    return Path(__file__).resolve().parent.parent


def _bench(args: argparse.Namespace) -> int:
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
    _say(args, f"running {' '.join(command)} in {checkout}")
    return subprocess.call(command, cwd=checkout)


# --- parser ----------------------------------------------------------------------------------

Handler = Callable[[argparse.Namespace], int]


def _command(
    sub: Any, common: argparse.ArgumentParser, name: str, handler: Handler, summary: str,
    description: str, examples: str,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=textwrap.fill(description, 88), parents=[common],
        epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=handler)
    return parser


def _rank_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, default=0, metavar="R",
                        help="a multi-rank checkpoint as rank R saved it (default 0)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bar, print only results and errors")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what ray_ckpt does (INFO), with tracebacks on errors")
    parser = argparse.ArgumentParser(
        prog="ray-ckpt", parents=[common],
        description="Ray-native checkpointing for PyTorch: inspect, verify, list, compare, "
        "export and import checkpoints. PATH and ROOT may be local paths or URIs (s3://, gs://, "
        "file://). Exit status: 0 success, 1 bad checkpoint or failure, 2 usage error.",
        epilog="Run 'ray-ckpt COMMAND --help' for a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, common, "inspect", _inspect,
                 "keys, dtypes, shapes and sizes of a checkpoint (reads no tensor data)",
                 "Print every key of a committed checkpoint with its kind, dtype, shape (or "
                 "value) and size, and the totals, read from the manifest alone. A sharded "
                 "tensor (DTensor shards saved by several ranks) is one key with its global "
                 "shape and its number of shards; --json lists each shard's box.",
                 "  ray-ckpt inspect /tmp/run/step-100\n"
                 "  ray-ckpt inspect s3://bucket/run/step-100 --json | jq '.leaves[].key'\n")
    p.add_argument("path", metavar="PATH", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _rank_option(p)

    p = _command(sub, common, "verify", _verify,
                 "check every byte of a checkpoint against its CRC32C checksums",
                 "Read every extent of every data file, streaming (memory stays at one "
                 "buffer), and check its CRC32C; also the commit marker, the manifest, data "
                 "file headers and sizes. Every bad file and key is reported; exit status 1 "
                 "if there is any.",
                 "  ray-ckpt verify /tmp/run/step-100\n"
                 "  ray-ckpt verify -q gs://bucket/run/step-100 || echo damaged\n")
    p.add_argument("path", metavar="PATH", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--chunk-size", type=parse_size, default=16 << 20, metavar="SIZE",
                   help="read buffer (default 16MiB)")

    p = _command(sub, common, "ls", _ls,
                 "checkpoints under a root: step, state, size, commit time, Ray Train's view",
                 "List every checkpoint directory directly under ROOT, committed or not "
                 "(an incomplete one is a save that never finished), ordered by the step the "
                 "state saved (its top-level 'step'; else a step-N directory name; else the "
                 "commit time). On a Ray Train run directory, also whether Ray Train "
                 "registered each (from its checkpoint_manager_snapshot.json). On a directory "
                 "of roots, the roots it holds.",
                 "  ray-ckpt ls /tmp/run\n  ray-ckpt ls s3://bucket/run --json\n")
    p.add_argument("root", metavar="ROOT", help="directory holding checkpoint directories")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = _command(sub, common, "clean", _clean,
                 "delete incomplete saves (and unregistered Ray Train checkpoints)",
                 "Delete, under ROOT, the checkpoint directories of saves that never committed "
                 "and, with --unregistered, on a Ray Train run, committed checkpoints Ray Train "
                 "never registered (it would never delete them). A dry run unless --yes. Never "
                 "deleted: the newest committed checkpoint, Ray Train's latest, anything "
                 "touched within --min-age seconds (a save may be in progress), and any "
                 "directory holding files ray_ckpt did not write.",
                 "  ray-ckpt clean /tmp/run\n"
                 "  ray-ckpt clean ~/ray_results/my_run --unregistered --yes\n")
    p.add_argument("root", metavar="ROOT", help="directory holding checkpoint directories")
    p.add_argument("--unregistered", action="store_true",
                   help="also committed checkpoints Ray Train never registered")
    p.add_argument("--yes", action="store_true", help="delete (default: only say what)")
    p.add_argument("--min-age", type=float, default=600.0, metavar="SECS",
                   help="leave alone what changed in the last SECS seconds (default 600)")
    p.add_argument("--json", action="store_true", help="print the decisions as JSON")

    p = _command(sub, common, "diff", _diff,
                 "keys added, removed and changed between two checkpoints",
                 "Compare checkpoint B with checkpoint A key by key: keys only in B (+), only "
                 "in A (-), and changed (~) with the number of elements that differ and the "
                 "largest absolute difference. Sharded tensors compare by their global value "
                 "(a sharded and an unsharded save of one model are equal). Streams one "
                 "window of each tensor per side at a time.",
                 "  ray-ckpt diff /tmp/run/step-100 /tmp/run/step-200\n"
                 "  ray-ckpt diff A B --exit-code >/dev/null && echo identical\n")
    p.add_argument("a", metavar="A", help="the old checkpoint")
    p.add_argument("b", metavar="B", help="the new checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--exit-code", action="store_true",
                   help="exit with status 1 when the checkpoints differ")
    _rank_option(p)

    p = _command(sub, common, "export", _export,
                 "write a checkpoint as a torch.save file or as safetensors",
                 "Export a checkpoint, streaming, so memory stays bounded. --to torch writes "
                 "one file for torch.load (structure and plain values kept). --to safetensors "
                 "writes OUT/model.safetensors, or shards model-0000k-of-0000n.safetensors "
                 "plus model.safetensors.index.json when larger than --max-shard-size (the "
                 "Hugging Face layout); non-tensor values are skipped. Sharded tensors are "
                 "consolidated into one full tensor each.",
                 "  ray-ckpt export /tmp/run/step-100 --to torch model.pt\n"
                 "  ray-ckpt export /tmp/run/step-100 --to safetensors --only model hf-model/\n"
                 "  ray-ckpt export DDP_CKPT --to safetensors --only model --strip-prefix module. "
                 "out/\n")
    p.add_argument("path", metavar="PATH", help="checkpoint directory")
    p.add_argument("--to", required=True, choices=("torch", "safetensors"), help="format")
    p.add_argument("out", metavar="OUT",
                   help="torch: the file to write; safetensors: the directory to write into")
    p.add_argument("--only", metavar="KEY",
                   help="export only the dict under this dotted key, prefix stripped (e.g. model)")
    p.add_argument("--strip-prefix", metavar="PREFIX",
                   help="remove PREFIX from the exported keys that start with it (e.g. module. "
                   "for a DDP model: module.0.weight -> 0.weight)")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="safetensors: largest shard (default 5GB)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="torch: export pickled objects too (unpickles them: trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    _rank_option(p)

    p = _command(sub, common, "import", _import,
                 "save a torch.save file or safetensors model as a checkpoint",
                 "Import SRC, a torch.save file, a .safetensors file, or a Hugging Face model "
                 "directory (model.safetensors, or model.safetensors.index.json and its "
                 "shards), as the checkpoint DEST (a local path or a URI). Tensors are memory-"
                 "mapped, not read into memory, and saved through a checkpointer on a local "
                 "Ray (or the cluster in RAY_ADDRESS). torch files are loaded weights-only: "
                 "one holding arbitrary objects is refused. safetensors names stay flat keys "
                 "(model.layers.0.weight).",
                 "  ray-ckpt import model.pt /tmp/run/step-0\n"
                 "  ray-ckpt import hf-model/ s3://bucket/base --under model\n")
    p.add_argument("src", metavar="SRC", help="torch.save file, .safetensors file or model dir")
    p.add_argument("dest", metavar="DEST", help="checkpoint directory to write")
    p.add_argument("--under", metavar="KEY",
                   help="put the imported state under this key (e.g. model)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="store values ray_ckpt keeps only as pickle (loading needs it too)")
    p.add_argument("--overwrite", action="store_true", help="replace a committed DEST")

    p = _command(sub, common, "demo", _demo,
                 "save, load and verify a model-plus-optimizer state on a local Ray",
                 "Train a small transformer for two steps, save its model and AdamW state "
                 "sync and async, load it back whole and in place, verify every tensor and "
                 "print sizes and throughput.",
                 "  ray-ckpt demo\n  ray-ckpt demo --layers 12 --dir /tmp/demo\n")
    p.add_argument("--dir", help="keep the checkpoints in this directory (default: a temp dir)")
    p.add_argument("--d-model", type=int, default=512, help="model width (default 512)")
    p.add_argument("--layers", type=int, default=6, help="transformer layers (default 6)")

    p = _command(sub, common, "bench", _bench,
                 "run the benchmarks (python -m benchmarks.bench, from a source checkout)",
                 "Run ray_ckpt's benchmarks against its peers and the machine's limits. They "
                 "live in benchmarks/ of a source checkout; arguments after -- go to them.",
                 "  ray-ckpt bench\n  ray-ckpt bench -- --help\n")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for benchmarks.bench")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except BrokenPipeError:  # the reader went away (`ray-ckpt diff A B | head`): not an error
        return _quiet_broken_pipe()
    except CheckpointError as e:
        return _fail(args, e, EXIT_FAILED)
    except ValueError as e:  # invalid arguments the library refused (a URI, a size)
        return _fail(args, e, EXIT_USAGE)
    except OSError as e:  # the output could not be written, the storage refused access
        return _fail(args, e, EXIT_FAILED)
    except KeyboardInterrupt:
        print(f"ray-ckpt {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_broken_pipe() -> int:
    """End like other Unix tools when stdout's reader has gone: quietly, status 0. stdout is
    pointed at /dev/null so that the interpreter's last flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


def _fail(args: argparse.Namespace, error: BaseException, status: int) -> int:
    if args.verbose:
        logger.error("ray-ckpt %s failed", args.command, exc_info=error)
    print(f"ray-ckpt {args.command}: error: {clean(redact(str(error)))}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

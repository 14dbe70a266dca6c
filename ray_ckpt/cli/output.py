"""What the ``ray-ckpt`` commands print: sizes, tables, JSON, the progress bar.

Everything printed passes :func:`clean` first: checkpoint keys and paths come from whoever wrote
the checkpoint, and a terminal must never receive their control characters raw. Nothing here
imports torch or Ray (the types below are for checkers only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ..catalog import CheckpointEntry
    from ..runs import RunCheckpoint, RunListing
    from ..tools import CheckpointSummary, DiffReport, LeafSummary, VerifyReport

PROGRESS_DELAY_SECS = 0.5  # operations shorter than this never draw a bar


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


def when(unix: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix)) if unix else "-"


def table(rows: Sequence[Sequence[str]], out: TextIO, right: Sequence[int] = ()) -> None:
    """Print ``rows`` (the first is the header) as aligned columns."""
    rows = [[clean(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)


def print_json(doc: Any, out: TextIO) -> None:
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


def print_summary(summary: CheckpointSummary, out: TextIO) -> None:
    view = f" (rank {summary.rank}'s view)" if summary.world_size > 1 else ""
    print(
        f"{clean(summary.path)}: checkpoint {summary.checkpoint_id}, committed "
        f"{when(summary.created_unix)}, world size {summary.world_size}{view}",
        file=out,
    )
    sharded = any(leaf.shards for leaf in summary.leaves)
    rows = [["KEY", "KIND", "DTYPE", "SHAPE / VALUE", "SIZE", *(["SHARDS"] if sharded else [])]]
    rows += [leaf_row(leaf, sharded) for leaf in summary.leaves]
    table(rows, out, right=(4, 5))
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


def leaf_row(leaf: LeafSummary, sharded: bool) -> list[str]:
    """A table row; with ``sharded``, a last column with the number of shards of each sharded
    tensor (its SHAPE is the global shape, its SIZE the bytes of all its shards)."""
    shards = [str(len(leaf.shards)) if leaf.shards else ""] if sharded else []
    if leaf.kind == "value":
        return [leaf.key, "value", leaf.dtype or "", leaf.value or "", "", *shards]
    shape = "" if leaf.shape is None else str(list(leaf.shape))
    size = f"= {leaf.tied_to}" if leaf.tied_to else human_bytes(leaf.nbytes)
    return [leaf.key, leaf.kind, leaf.dtype or "", shape, size, *shards]


def verify_line(report: VerifyReport) -> str:
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


def state(entry: CheckpointEntry) -> str:
    if entry.problem is not None:
        return "bad"
    return "committed" if entry.committed else "incomplete"


def print_listing(listing: RunListing, out: TextIO) -> None:
    """The checkpoints of one root, oldest step first; on a Ray Train run, whether Ray Train
    registered each, and a line on what that means; for memory checkpoints, the tier and the
    nodes holding copies."""
    train = listing.ray_train
    rows = [["NAME", "STEP", "STATE", *(["RAY TRAIN"] if train else []), "SIZE", "COMMITTED AT"]]
    for c in listing.checkpoints:
        e = c.entry
        rows.append([
            e.name, "-" if c.step is None else str(c.step),
            state(e),
            *([registration(c, listing)] if train else []),
            human_bytes(e.nbytes), when(e.created_unix),
        ])
    if any(c.entry.tier != "durable" for c in listing.checkpoints):
        rows[0] += ["TIER", "COPIES ON NODES"]
        for row, c in zip(rows[1:], listing.checkpoints):
            row += [c.entry.tier, ", ".join(n[:12] for n in c.entry.nodes) or "-"]
    table(rows, out, right=(1, 4 if train else 3))
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


def registration(c: RunCheckpoint, listing: RunListing) -> str:
    if c.entry.name == listing.ray_train_latest:
        return "latest"
    return "registered" if c.registered else "no" if c.entry.committed else "-"


def print_roots(listing: RunListing, out: TextIO) -> None:
    print(f"{listing.root} holds no checkpoints itself; it holds {len(listing.roots)} "
          "root(s) of checkpoints (`ray-ckpt ls` one of them):", file=out)
    table([["ROOT", "CHECKPOINTS"], *[[n, str(k)] for n, k in listing.roots]], out, right=(1,))


def listing_doc(listing: RunListing) -> list[dict[str, Any]]:
    """One object per checkpoint; ``registered`` is null where it cannot be known (not a Ray
    Train run), ``ray_train_latest`` true for the one Ray Train resumes from."""
    return [
        {**entry_doc(c.entry), "step": c.step, "saved_step": c.saved_step,
         "registered": c.registered, "ray_train_latest": c.entry.name == listing.ray_train_latest,
         **tier_doc(c.entry)}
        for c in listing.checkpoints
    ]


def tier_doc(entry: CheckpointEntry) -> dict[str, Any]:
    """Tier and copies of a memory checkpoint (nothing is added for durable ones)."""
    if entry.tier == "durable":
        return {}
    return {"tier": entry.tier, "nodes": entry.nodes, "copies": entry.copies}


def entry_doc(entry: CheckpointEntry) -> dict[str, Any]:
    return {
        "name": entry.name, "path": entry.path, "step": entry.step,
        "committed": entry.committed, "nbytes": entry.nbytes,
        "created_unix": entry.created_unix, "checkpoint_id": entry.checkpoint_id,
        "problem": entry.problem,
    }


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
        table(rows, out, right=(2, 3))
    print(
        f"{len(report.added)} added, {len(report.removed)} removed, {len(report.changed)} "
        f"changed, {report.unchanged} unchanged",
        file=out,
    )

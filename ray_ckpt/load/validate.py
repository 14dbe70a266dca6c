"""Opening a checkpoint: the one validator, which the load raises from and ``verify`` collects.

Opening goes in two steps. :func:`read_manifest` lists the directory, reads the commit marker
and the manifest (sizes checked before either is read, the manifest against the marker's
CRC32C) and parses the manifest; nothing past a bad marker or manifest can be checked, so it
raises (a directory that is no checkpoint gets a message that says what it is instead).
:func:`checkpoint_problems` then yields every problem of the opened checkpoint, in the order a
load meets them: data files missing or short, items that need more bytes than the files hold,
and for each rank asked for, its tree (decodes, refers to items of its kind, shards that tile).

The checks themselves are :mod:`ray_ckpt.format.checks`; this module only runs them in one
order. :meth:`CheckpointReader.open <ray_ckpt.load.reader.CheckpointReader.open>` raises the
first problem (for its own rank's tree), ``verify`` (:mod:`ray_ckpt.tools.integrity`) collects
them all (every rank's tree). Neither has a check of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from .._checksum import crc32c
from ..catalog import read_marker
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from ..format.checks import (
    Problem,
    allocation_problems,
    file_size_problems,
    manifest_listing_problems,
    raise_first,
    tree_problems,
)
from ..format.manifest import Manifest, manifest_from_bytes, parse_manifest
from ..format.marker import Marker
from ..format.names import MARKER_NAME, is_own_file
from ..format.tree import decode
from ..storage.storage import Storage


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, opened and validated: what :meth:`CheckpointReader.open` returns."""

    storage: Storage
    marker: Marker
    manifest: Manifest
    tree: Any
    file_sizes: dict[str, int]

    @property
    def table(self) -> pa.Table:
        """The manifest as an Arrow table (one row per extent)."""
        return self.manifest.table

    @property
    def nbytes(self) -> int:
        return self.marker.total_nbytes


def read_manifest(storage: Storage) -> tuple[dict[str, int], Marker, Manifest]:
    """The listing of ``storage``, its commit marker and its parsed manifest; raises
    :class:`CorruptCheckpointError` for a bad marker or manifest, and
    :class:`CheckpointNotFoundError` or :class:`IncompleteCheckpointError` for a directory
    that is no committed checkpoint."""
    files = storage.list_files()
    if MARKER_NAME not in files:
        _raise_not_a_checkpoint(storage, files)
    marker = read_marker(storage, files)
    raise_first(manifest_listing_problems(files, marker, storage.display))
    raw = storage.read_file(marker.manifest)
    if len(raw) != marker.manifest_nbytes or crc32c(raw) != marker.manifest_crc32c:
        raise CorruptCheckpointError(
            f"checkpoint {storage.display} is damaged: manifest {marker.manifest} does not "
            f"match the checksum and size in the commit marker ({len(raw)} bytes, expected "
            f"{marker.manifest_nbytes}). Restore the file or use another checkpoint."
        )
    where = f"{storage.display}/{marker.manifest}"
    manifest = parse_manifest(manifest_from_bytes(raw, where=where), where=where, marker=marker)
    return files, marker, manifest


def open_checkpoint(storage: Storage, rank: int, *, check_files: bool = True) -> CheckpointInfo:
    """The committed checkpoint in ``storage``, validated (:func:`read_manifest`, then
    :func:`checkpoint_problems` for rank ``rank``'s tree; ``check_files=False`` skips the data
    files), with that tree; raises the first problem. Needs neither torch nor Ray."""
    files, marker, manifest = read_manifest(storage)
    trees: dict[int, Any] = {}
    raise_first(checkpoint_problems(
        storage.display, marker, manifest, files, [rank], check_files=check_files, trees=trees
    ))
    return CheckpointInfo(storage, marker, manifest, trees[rank], files)


def checkpoint_problems(
    display: str,
    marker: Marker,
    manifest: Manifest,
    sizes: Mapping[str, int],
    ranks: Iterable[int],
    *,
    check_files: bool = True,
    trees: dict[int, Any] | None = None,
) -> Iterator[Problem]:
    """Every problem of a checkpoint opened with :func:`read_manifest` (see the module
    docstring): its data files (unless ``check_files`` is false), then the tree of each rank
    of ``ranks``, the first problem of each. The decoded trees go into ``trees``."""
    if check_files:
        missing = False
        for problem in file_size_problems(manifest, sizes, display):
            missing = True
            yield problem
        if not missing:  # a missing or short file is reported as such, not as forged sizes
            yield from allocation_problems(manifest, sizes, display)
    where = f"{display}/{marker.manifest}"
    n_items = max(manifest.items, default=-1) + 1
    for rank in ranks:
        here = f"{where}, rank {rank}" if manifest.trees else where
        try:
            tree = decode(manifest.tree_for(rank), n_items=n_items, where=here)
        except CorruptCheckpointError as e:
            yield Problem("manifest", str(e), file=marker.manifest)
            continue
        if trees is not None:
            trees[rank] = tree
        for problem in tree_problems(tree, manifest, here):
            yield Problem(problem.kind, problem.message, marker.manifest, problem.key)
            break


def tree_ranks(manifest: Manifest) -> range:
    """The ranks whose trees the manifest holds (one tree, rank 0's, for all when it holds
    no tree per rank)."""
    return range(len(manifest.trees) or 1)


def _raise_not_a_checkpoint(storage: Storage, files: dict[str, int]) -> None:
    holds = checkpoints_below(storage)
    if holds:
        shown = ", ".join(holds[:3]) + (", ..." if len(holds) > 3 else "")
        raise CheckpointNotFoundError(
            f"{storage.display} is not a checkpoint but a directory of checkpoints (a run "
            f"root): it holds {len(holds)}{'+' if len(holds) >= _ROOT_PROBE else ''} committed "
            f"checkpoint(s) ({shown}). Pass one of them; `ray-ckpt ls {storage.display}` lists "
            "them by step."
        )
    if any(is_own_file(name) for name in files):
        raise IncompleteCheckpointError(
            f"{storage.display} is an incomplete checkpoint: it has no commit marker "
            f"({MARKER_NAME}): the save that writes it has not finished (it is still running: "
            "wait for its future; or it failed). Load an earlier checkpoint; if the save failed, "
            "`ray-ckpt clean` on the directory above it (or CheckpointManager.cleanup() for a "
            "manager's root) removes it."
        )
    if files or storage.list_dirs():
        raise IncompleteCheckpointError(
            f"{storage.display} is not a checkpoint: it holds no ray_ckpt files and no commit "
            f"marker ({MARKER_NAME}). `ray-ckpt ls {storage.display}` shows whether any "
            "directory under it is one."
        )
    if storage.is_file():
        raise CheckpointNotFoundError(
            f"{storage.display} is a file, not a checkpoint directory"
        )
    if storage.exists():
        raise IncompleteCheckpointError(
            f"{storage.display} is an empty directory, not a checkpoint (no {MARKER_NAME}): a "
            "save into it has written nothing yet (wait for its future), or it was made by hand"
        )
    where = storage.where_looked()
    raise CheckpointNotFoundError(
        f"no checkpoint at {storage.display}: the path does not exist{where and '; ' + where}"
    )


_ROOT_PROBE = 20  # subdirectories looked at to tell a run root from a broken checkpoint


def checkpoints_below(storage: Storage) -> list[str]:
    """Names of the committed checkpoints directly under ``storage`` (among its first
    ``_ROOT_PROBE`` subdirectories): non-empty when ``storage`` is a root of checkpoints."""
    return [
        name for name in sorted(storage.list_dirs())[:_ROOT_PROBE]
        if storage.child(name).exists(MARKER_NAME)
    ]

"""Reading checkpoints back: whole, or only the keys a target state dict asks for, in place.

Loading needs no Ray: the caller reads the files itself, straight into the destination tensors
(``preadv`` into their memory on local disks), ``io_threads`` extents at a time, verifying the
CRC32C of every extent as it lands. Before a byte of tensor data is read, :meth:`open` checks
the commit marker, the manifest's checksum, every row of the manifest and the size of every data
file, so a damaged or hostile checkpoint is refused before anything is allocated for it.

Reading goes in three passes: *plan* (one walk of the target against the stored tree: which
items, into which tensors; shape and dtype mismatches, missing keys and targets that match
nothing are found here, before anything is read or assigned), *read* (parallel), *assign* (run
the plan's steps: put the values read fresh into the result, hand modules and optimizers their
state through ``load_state_dict``).
"""

from __future__ import annotations

import concurrent.futures
import difflib
import functools
import logging
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import metrics
from ._checksum import crc32c
from ._stateful import is_stateful, load_state_of, state_dict_of
from ._tree import ItemRef, ShardedRef, decode, key_string, leaves, materialize
from .catalog import read_marker
from .config import CheckpointReaderConfig, StorageConfig
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MissingKeysError,
    PickleNotAllowedError,
    StateDictMismatchError,
    UnsupportedValueError,
)
from .format import (
    HEADER_SIZE,
    KIND_PICKLE,
    MARKER_NAME,
    Extent,
    ItemMeta,
    Manifest,
    Marker,
    check_header,
    dtype_from_name,
    is_own_file,
    manifest_from_bytes,
    parse_manifest,
    without_gc,
)
from .sharding import Box, ShardedTensor, is_dtensor, overlap, runs, slices, target_box
from .storage import FileReader, Storage
from .types import RankInfo
from .validate import (
    allocation_problems,
    file_size_problems,
    manifest_listing_problems,
    raise_first,
    tree_problems,
)

logger = logging.getLogger(__name__)

MapLocation = Callable[[torch.Tensor, str | None], torch.Tensor]


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


@dataclass(frozen=True)
class _Copy:
    """Copy the region ``box`` (in the item's own coordinates) of stored item ``item`` into
    ``dest`` (a tensor of the region's shape: a new tensor, a target, or a view of either)."""

    item: int
    box: Box
    dest: torch.Tensor


Step = Callable[[dict[Any, Any]], None]  # runs after the read, with the values read fresh


@dataclass
class _Plan:
    copies: list[_Copy] = field(default_factory=list)
    fresh: dict[Any, Any] = field(default_factory=dict)  # ref key -> value being read
    missing: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)  # run in order once the values are read
    pickled: list[str] = field(default_factory=list)  # keys of pickled items to read

    @property
    def nbytes(self) -> int:
        return sum(c.dest.numel() * c.dest.element_size() for c in self.copies)


@dataclass
class ReadStats:
    """What the last ``read`` did: bytes it read from storage, and of them the bytes it could
    not verify because it read part of an extent (a load into another sharding)."""

    nbytes_read: int = 0
    nbytes_unverified: int = 0


class CheckpointReader:
    """Reads checkpoints written by ray_ckpt; see the module docstring."""

    def __init__(
        self,
        rank_info: RankInfo | None = None,
        config: CheckpointReaderConfig | None = None,
        *,
        storage_config: StorageConfig | None = None,
        filesystem: Any = None,
    ) -> None:
        self._rank_info = rank_info or RankInfo(0, 1)
        self._config = config or CheckpointReaderConfig()
        self._storage_config = storage_config
        self._filesystem = filesystem
        self.last_stats = ReadStats()

    # --- open ---------------------------------------------------------------------------------

    def open(self, path: str, *, check_files: bool = True) -> CheckpointInfo:
        """Validate the checkpoint at ``path`` (marker, manifest, file sizes) without reading
        tensor data. ``check_files=False`` skips the data files (missing or short ones are then
        no error here): ``verify`` uses it to report every such file."""
        storage = Storage.from_path(path, self._filesystem, self._storage_config)
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
        if check_files:
            raise_first(file_size_problems(manifest, files, storage.display))
            raise_first(allocation_problems(manifest, files, storage.display))
        tree_json = manifest.tree_for(self._rank_info.global_rank)
        tree = decode(tree_json, n_items=max(manifest.items, default=-1) + 1, where=where)
        raise_first(tree_problems(tree, manifest, where))
        return CheckpointInfo(storage, marker, manifest, tree, files)

    # --- read ---------------------------------------------------------------------------------

    @without_gc
    def read(
        self,
        path: str,
        state_dict: dict[Any, Any] | None = None,
        *,
        map_location: Any = None,
        allow_pickle: bool = False,
    ) -> tuple[dict[Any, Any], list[str]]:
        """Read the checkpoint at ``path``.

        Without ``state_dict``: the whole state dict, tensors on the CPU (or where
        ``map_location`` says); a sharded tensor comes back whole. With it: only its keys, into
        its own tensors where they match (a DTensor or :class:`~ray_ckpt.ShardedTensor` gets
        its own shard, whatever sharding the checkpoint was saved with); anything else is
        replaced. Returns the result with the keys the checkpoint lacks.
        """
        started = time.perf_counter()
        relocate = resolve_map_location(map_location)
        info = self.open(path)
        plan = _Plan()
        if state_dict is None:
            result = _Walker(info, plan, allow_pickle).fresh_value(info.tree)
        else:
            if not isinstance(state_dict, dict):
                raise UnsupportedValueError(
                    f"state_dict must be a dict to load into, got {type(state_dict).__qualname__}"
                )
            _Walker(info, plan, allow_pickle).walk(state_dict)
        _check_pickles(plan, info, allow_pickle)
        self.last_stats = self._run(info, plan.copies)
        values = {key: _finish(value, info, key, relocate) for key, value in plan.fresh.items()}
        if state_dict is None:
            result = _assign(result, values)
        else:
            for step in plan.steps:
                step(values)
            result = state_dict
        secs = time.perf_counter() - started
        nbytes = plan.nbytes
        logger.info(
            "loaded %s: %d copies, %.1f MiB in %.3fs (%.2f GB/s)",
            info.storage.display, len(plan.copies), nbytes / 2**20, secs,
            nbytes / secs / 1e9 if secs > 0 else 0.0,
        )
        if plan.missing:
            logger.warning(
                "loaded %s without %d key(s) of the state_dict that it does not hold: %s%s "
                "(pass strict=True to make this an error)",
                info.storage.display, len(plan.missing), plan.missing[:10],
                " ..." if len(plan.missing) > 10 else "",
            )
        metrics.record_load(nbytes, secs)
        return result, plan.missing

    def _run(self, info: CheckpointInfo, copies: list[_Copy]) -> ReadStats:
        """Read every copy's byte ranges, verifying whole extents, and finish the copies that
        went through a staging tensor (non-contiguous or off-CPU destinations)."""
        pieces: list[_Piece] = []
        finishers: list[Callable[[], None]] = []
        extents = info.manifest.extents
        for copy in copies:
            meta = info.manifest.items[copy.item]
            dest_tensor = copy.dest
            direct = dest_tensor.is_cpu and dest_tensor.is_contiguous()
            stage = (
                dest_tensor.detach()
                if direct
                else torch.empty(dest_tensor.shape, dtype=dest_tensor.dtype)
            )
            dest = _bytes_of(stage).data
            shape = _item_shape(meta)
            if copy.box[1] == shape:  # the whole item: one run
                _add_pieces(pieces, extents[copy.item], 0, len(dest), dest, meta)
            else:
                itemsize = stage.element_size()
                position = 0
                for start, count in runs(shape, copy.box):
                    length = count * itemsize
                    _add_pieces(pieces, extents[copy.item], start * itemsize, length,
                                dest[position : position + length], meta)
                    position += length
            if not direct:
                finishers.append(functools.partial(_copy_back, dest_tensor, stage))
        stats = ReadStats()
        self._execute(info, _coalesce(pieces), stats)
        for finish in finishers:
            finish()
        return stats

    def _execute(self, info: CheckpointInfo, reads: list[_Read], stats: ReadStats) -> None:
        """Run the reads on ``io_threads`` threads, each with its own share of the bytes."""
        verify = self._config.verify_checksums
        display = info.storage.display
        with info.storage.reader() as files:
            for file in sorted({read.file for read in reads}):
                raw = bytearray(HEADER_SIZE)
                try:
                    files.read_into(file, 0, memoryview(raw))
                except EOFError:
                    pass  # check_header names the truncation
                check_header(bytes(raw), file=f"{display}/{file}")
            shares = _balance(reads, min(self._config.io_threads, max(1, len(reads))))

            def work(share: list[_Read]) -> ReadStats:
                done = ReadStats()
                scratch = memoryview(bytearray(_COALESCE_MAX_BYTES))
                for read in share:
                    _perform(files, read, verify, display, done, scratch)
                return done

            if len(shares) == 1:
                results = [work(shares[0])]
            else:
                with concurrent.futures.ThreadPoolExecutor(len(shares)) as pool:
                    results = list(pool.map(work, shares))
            for result in results:
                stats.nbytes_read += result.nbytes_read
                stats.nbytes_unverified += result.nbytes_unverified


@dataclass
class _Piece:
    """Bytes ``[start, start + length)`` of ``extent``, for ``dest`` (same length)."""

    extent: Extent
    start: int
    length: int
    dest: memoryview
    meta: ItemMeta

    @property
    def file_offset(self) -> int:
        return self.extent.offset + self.start


@dataclass
class _Read:
    """One read of a file range that serves one or more pieces (adjacent in the file)."""

    file: str
    offset: int
    length: int
    pieces: list[_Piece]


_SLICE_BYTES = 1 << 20  # read and checksum granularity: fits in the CPU cache
# Pieces this close in one file are read together (the gap is alignment padding or another
# item's bytes): one system call instead of one per item. Such a read goes through a scratch
# buffer and is then copied out, so it spans one slice at most: larger pieces are read straight
# into their tensors. (Coalescing up to 16 MiB cost a second copy of most of a transformer's
# bytes: 23% of the reader threads' time on 1 GiB.)
_COALESCE_GAP_BYTES = 64 << 10
_COALESCE_MAX_BYTES = _SLICE_BYTES


def _add_pieces(
    pieces: list[_Piece],
    extents: list[Extent],
    start: int,
    length: int,
    dest: memoryview,
    meta: ItemMeta,
) -> None:
    """Split the item byte range [start, start + length) over the extents that hold it."""
    end = start + length
    for extent in extents:
        lo = max(start, extent.chunk_offset)
        hi = min(end, extent.chunk_offset + extent.length)
        if lo < hi:
            pieces.append(
                _Piece(
                    extent, lo - extent.chunk_offset, hi - lo, dest[lo - start : hi - start], meta
                )
            )
        elif length == 0 and extent.length == 0:
            pieces.append(_Piece(extent, 0, 0, dest[0:0], meta))
            return


def _coalesce(pieces: list[_Piece]) -> list[_Read]:
    """Group pieces by file and merge neighbours into single reads."""
    reads: list[_Read] = []
    for piece in sorted(pieces, key=lambda p: (p.extent.file, p.file_offset)):
        last = reads[-1] if reads else None
        if (
            last is not None
            and last.file == piece.extent.file
            and 0 <= piece.file_offset - (last.offset + last.length) <= _COALESCE_GAP_BYTES
            and piece.file_offset + piece.length - last.offset <= _COALESCE_MAX_BYTES
        ):
            last.length = piece.file_offset + piece.length - last.offset
            last.pieces.append(piece)
        else:
            reads.append(_Read(piece.extent.file, piece.file_offset, piece.length, [piece]))
    return reads


def _balance(reads: list[_Read], shares: int) -> list[list[_Read]]:
    """Split the reads over ``shares`` threads, largest first to the least loaded."""
    loads = [0] * shares
    out: list[list[_Read]] = [[] for _ in range(shares)]
    for read in sorted(reads, key=lambda r: -r.length):
        i = loads.index(min(loads))
        out[i].append(read)
        loads[i] += read.length
    return out


def _perform(
    files: FileReader,
    read: _Read,
    verify: bool,
    display: str,
    stats: ReadStats,
    scratch: memoryview,
) -> None:
    """Read one file range (into its only piece's memory, or ``scratch``, whose bytes are then
    scattered) and check the CRC32C of every whole extent while its bytes are hot."""
    single = len(read.pieces) == 1
    buffer = read.pieces[0].dest if single else scratch
    crc = 0

    def checksum(start: int, piece_of: memoryview) -> None:
        nonlocal crc
        crc = crc32c(piece_of, crc if start else 0)  # a retried read starts again at 0

    try:
        # slice by slice, checksumming each slice while it is still in the CPU cache
        files.read_into(
            read.file, read.offset, buffer[: read.length], slice_bytes=_SLICE_BYTES,
            on_slice=checksum if single and verify else None,
        )
    except EOFError as e:
        keys = sorted({p.meta.key for p in read.pieces})
        raise CorruptCheckpointError(
            f"key {keys[0]!r}: data file {display}/{read.file} is truncated ({e}). Restore "
            "the file or use another checkpoint."
        ) from None
    for piece in read.pieces:
        if single:
            data = buffer
        else:
            at = piece.file_offset - read.offset
            data = buffer[at : at + piece.length]
            piece.dest[:] = data
            crc = crc32c(data) if verify else 0
        whole = piece.start == 0 and piece.length == piece.extent.length
        stats.nbytes_read += piece.length
        if not whole:
            stats.nbytes_unverified += piece.length
        elif verify and piece.extent.checksum is not None and crc != piece.extent.checksum:
            extent = piece.extent
            raise CorruptCheckpointError(
                f"key {piece.meta.key!r}: checksum mismatch in {display}/{extent.file} (bytes "
                f"{extent.offset}..{extent.offset + extent.length}): the file is damaged. "
                "Restore it or use another checkpoint."
            )


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
            f"({MARKER_NAME}), so the save that wrote it never finished. Load an earlier "
            "checkpoint; `ray-ckpt clean` on the directory above it (or "
            "CheckpointManager.cleanup() for a manager's root) removes it."
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
            f"{storage.display} is an empty directory, not a checkpoint (no {MARKER_NAME})"
        )
    raise CheckpointNotFoundError(f"no checkpoint at {storage.display}: the path does not exist")


_ROOT_PROBE = 20  # subdirectories looked at to tell a run root from a broken checkpoint


def checkpoints_below(storage: Storage) -> list[str]:
    """Names of the committed checkpoints directly under ``storage`` (among its first
    ``_ROOT_PROBE`` subdirectories): non-empty when ``storage`` is a root of checkpoints."""
    return [
        name for name in sorted(storage.list_dirs())[:_ROOT_PROBE]
        if storage.child(name).exists(MARKER_NAME)
    ]


def _check_pickles(plan: _Plan, info: CheckpointInfo, allow_pickle: bool) -> None:
    if plan.pickled and not allow_pickle:
        raise PickleNotAllowedError(
            f"checkpoint {info.storage.display} stores {len(plan.pickled)} pickled object(s) "
            f"(keys {plan.pickled[:10]}); loading them runs code from the file. Pass "
            "allow_pickle=True only if you trust who wrote it, or load a state_dict without "
            "those keys."
        )


class _Missing:
    """A key of the target that the checkpoint lacks, in the walk's order."""

    def __init__(self, key: str) -> None:
        self.key = key


_WRAPPER_PREFIX = "module."  # what DistributedDataParallel and DataParallel put before names


class _Walker:
    """Matches a target state dict against the stored tree, depth first with an explicit stack
    (a state dict may nest ``MAX_DEPTH`` levels), and plans the load: the copies into the
    target's own tensors, the values to read fresh, the keys the checkpoint lacks, and the
    steps that put the fresh values into the target once they are read (children first, so
    that a module's ``load_state_dict`` or a rebuilt tuple sees its loaded children).

    Keys match by equality; where none of a dict's keys do, its keys are matched with DDP's
    ``module.`` prefix added (or removed) if that is unambiguous, and otherwise the load fails
    (:class:`~ray_ckpt.errors.MissingKeysError`, whatever ``strict`` says): a target that matches
    nothing is a mistake, never a no-op. Modules, optimizers and other objects with
    ``load_state_dict`` are loaded through it."""

    def __init__(self, info: CheckpointInfo, plan: _Plan, allow_pickle: bool) -> None:
        self.info = info
        self.plan = plan
        self.allow_pickle = allow_pickle

    def walk(self, state_dict: dict[Any, Any]) -> None:
        stack: list[Any] = [(state_dict, self.info.tree, (), None)]
        while stack:
            entry = stack.pop()
            if isinstance(entry, _Missing):
                self.plan.missing.append(entry.key)
            elif callable(entry):  # a container's last step, once its children's are planned
                self.plan.steps.append(entry)
            else:
                target, stored, path, put = entry
                self._visit(target, stored, path, put, stack)

    def _visit(
        self,
        target: Any,
        stored: Any,
        path: tuple[Any, ...],
        put: Callable[[Any], None] | None,
        stack: list[Any],
    ) -> None:
        key = key_string(path)
        if _is_tensor_target(target):
            if not isinstance(stored, (ItemRef, ShardedRef)):
                raise StateDictMismatchError(
                    f"key {key!r}: the target is a tensor but the checkpoint holds a "
                    f"{type(stored).__qualname__}"
                )
            if isinstance(stored, ItemRef) and stored.tag == "P":
                raise StateDictMismatchError(
                    f"key {key!r}: the target is a tensor but the checkpoint holds a pickled object"
                )
            self._plan_into(target, stored, key)
        elif isinstance(target, torch.optim.Optimizer):
            # a fresh optimizer has no state tensors to fill: its state is read whole, and
            # load_state_dict moves it to the parameters' devices
            self._expect(dict, stored, target, key)
            self.fresh_value(stored)
            self.plan.steps.append(lambda values: load_state_of(target, _assign(stored, values)))
        elif is_stateful(target):  # a module, a scheduler: in place into its state dict
            state = state_dict_of(target)
            self._expect(dict, stored, target, key)
            stack.append(lambda values: load_state_of(target, state))
            self._children(state, stored, path, stack)
        elif isinstance(target, dict) and not isinstance(stored, (ItemRef, ShardedRef)):
            self._expect(dict, stored, target, key)
            self._children(target, stored, path, stack)
        elif isinstance(target, (list, tuple)) and not isinstance(target, torch.Size):
            self._sequence(target, stored, path, put, stack)
        else:
            self.fresh_value(stored)
            if put is not None:
                self.plan.steps.append(lambda values: put(_assign(stored, values)))

    def _expect(self, kind: type, stored: Any, target: Any, key: str) -> None:
        if not isinstance(stored, kind):
            raise StateDictMismatchError(
                f"key {key!r}: the target is a {type(target).__qualname__} but the checkpoint "
                f"holds a {type(stored).__qualname__}"
            )

    def _children(
        self, target: dict[Any, Any], stored: dict[Any, Any], path: tuple[Any, ...],
        stack: list[Any],
    ) -> None:
        """Push the target's entries, in reverse so that they are walked in order."""
        matches = self._match_keys(target, stored, path)
        for k, found in reversed(matches):
            if found is _NOT_FOUND:
                stack.append(_Missing(key_string((*path, k))))
            else:
                stack.append((target[k], stored[found], (*path, k), _setter(target, k)))

    def _match_keys(
        self, target: dict[Any, Any], stored: dict[Any, Any], path: tuple[Any, ...]
    ) -> list[tuple[Any, Any]]:
        """Each target key with the stored key it loads from (or ``_NOT_FOUND``)."""
        if not target or any(k in stored for k in target):
            return [(k, k if k in stored else _NOT_FOUND) for k in target]
        renamed = _prefix_renaming(target, stored)
        if renamed is not None:
            logger.info(
                "key %r: the target's keys match the checkpoint's with DDP's %r prefix %s",
                key_string(path) or "(root)", _WRAPPER_PREFIX,
                "added" if next(iter(renamed.values())).startswith(_WRAPPER_PREFIX)
                else "removed",
            )
            return [(k, renamed[k] if renamed[k] in stored else _NOT_FOUND) for k in target]
        raise _nothing_matches(self.info, target, stored, path)

    def _sequence(
        self, target: Any, stored: Any, path: tuple[Any, ...],
        put: Callable[[Any], None] | None, stack: list[Any],
    ) -> None:
        if not isinstance(stored, (list, tuple)):
            raise StateDictMismatchError(
                f"key {key_string(path)!r}: the target is a {type(target).__name__} but the "
                f"checkpoint holds a {type(stored).__qualname__}"
            )
        values = list(target) + [None] * (len(stored) - len(target))
        if isinstance(target, list):
            stack.append(lambda _: target.__setitem__(slice(None), values))
        elif put is not None:
            stack.append(lambda _: put(tuple(values)))
        for i in reversed(range(len(values))):
            if i < len(stored):
                stack.append((values[i], stored[i], (*path, i), _setter(values, i)))
            else:
                stack.append(_Missing(key_string((*path, i))))

    def fresh_value(self, stored: Any) -> Any:
        """Allocate what ``stored`` needs and return it with placeholders."""
        for _, leaf in leaves(stored):
            if isinstance(leaf, (ItemRef, ShardedRef)):
                self._allocate(leaf)
        return stored

    def _allocate(self, stored: ItemRef | ShardedRef) -> None:
        if isinstance(stored, ItemRef):
            if stored.index in self.plan.fresh:
                return
            meta = self.info.manifest.items[stored.index]
            if meta.kind == KIND_PICKLE:
                self.plan.pickled.append(meta.key)
                dtype = torch.uint8
            else:
                dtype = dtype_from_name(meta.dtype or "", where=meta.key)
            shape = _item_shape(meta)
            tensor = torch.empty(shape, dtype=dtype)
            self.plan.fresh[stored.index] = tensor
            self.plan.copies.append(_Copy(stored.index, _whole(shape), tensor))
        else:
            if stored.indices in self.plan.fresh:
                return
            first = self.info.manifest.items[stored.indices[0]]
            dtype = dtype_from_name(first.dtype or "", where=first.key)
            tensor = torch.empty(stored.global_shape, dtype=dtype)
            self.plan.fresh[stored.indices] = tensor
            self._plan_region(tensor, _whole(stored.global_shape), stored, first.key)

    def _plan_into(self, target: Any, stored: ItemRef | ShardedRef, key: str) -> None:
        local, box, global_shape = target_box(target)
        if isinstance(stored, ItemRef):
            meta = self.info.manifest.items[stored.index]
            if not _is_sharded_target(target):
                _check_match(local, meta, key)
                self.plan.copies.append(_Copy(stored.index, _whole(meta.shape or ()), local))
                return
            stored = ShardedRef((stored.index,), meta.shape or ())
        first = self.info.manifest.items[stored.indices[0]]
        dtype = dtype_from_name(first.dtype or "", where=key)
        if tuple(global_shape) != stored.global_shape or local.dtype != dtype:
            raise StateDictMismatchError(
                f"key {key!r}: the checkpoint holds {first.dtype} {list(stored.global_shape)} "
                f"(as {len(stored.indices)} shard(s)) but the target is "
                f"{str(local.dtype).removeprefix('torch.')} {list(global_shape)}"
                + (f" (its shard at {list(box[0])})" if _is_sharded_target(target) else "")
                + ". Load into a tensor of the same global shape and dtype."
            )
        self._plan_region(local, box, stored, key)

    def _plan_region(self, dest: torch.Tensor, box: Box, stored: ShardedRef, key: str) -> None:
        """Copies that fill ``dest`` (the region ``box`` of the global tensor) from every stored
        shard that overlaps it; a region no shard covers is an error naming both layouts."""
        covered = 0
        layout = []
        for index in stored.indices:
            meta = self.info.manifest.items[index]
            shard_box = (meta.global_offset or (0,) * len(meta.shape or ()), meta.shape or ())
            layout.append(shard_box)
            common = overlap(box, shard_box)
            if common is None:
                continue
            covered += math.prod(common[1])
            within_shard = (tuple(o - s for o, s in zip(common[0], shard_box[0])), common[1])
            view = dest[slices(common, box[0])] if dest.dim() else dest
            self.plan.copies.append(_Copy(index, within_shard, view))
        if covered != math.prod(box[1]):
            raise CorruptCheckpointError(
                f"key {key!r}: the stored shards {[list(b[0]) for b in layout]} (shapes "
                f"{[list(b[1]) for b in layout]}) cover {covered} of the {math.prod(box[1])} "
                f"elements of the region at {list(box[0])} of shape {list(box[1])}: a shard is "
                "missing"
            )


_NOT_FOUND = object()


def _setter(container: Any, key: Any) -> Callable[[Any], None]:
    def put(value: Any) -> None:
        container[key] = value

    return put


def _prefix_renaming(target: dict[Any, Any], stored: dict[Any, Any]) -> dict[str, str] | None:
    """The target's keys renamed to the stored ones by adding or removing DDP's ``module.``
    prefix, where that is unambiguous: every key on one side has it, none on the other, and
    some renamed key exists. ``None`` otherwise."""
    if not all(isinstance(k, str) for k in (*target, *stored)):
        return None
    prefix = _WRAPPER_PREFIX
    if all(k.startswith(prefix) for k in stored) and not any(k.startswith(prefix) for k in target):
        renamed = {k: prefix + k for k in target}
    elif all(k.startswith(prefix) for k in target) and not any(
        k.startswith(prefix) for k in stored
    ):
        renamed = {k: k[len(prefix) :] for k in target}
    else:
        return None
    return renamed if any(v in stored for v in renamed.values()) else None


def _nothing_matches(
    info: CheckpointInfo, target: dict[Any, Any], stored: dict[Any, Any], path: tuple[Any, ...]
) -> MissingKeysError:
    """The error for a target dict none of whose keys the checkpoint holds (under ``path``)."""
    where = f"under {key_string(path)!r}" if path else "at the root"
    wanted = [str(k) for k in target]
    held = [str(k) for k in stored]
    close = []
    for k in wanted[:3]:
        match = difflib.get_close_matches(k, held, n=1, cutoff=0.5)
        if match:
            close.append(f"{k!r} -> {match[0]!r}")
    hint = (
        f"the closest keys it holds: {', '.join(close)}" if close
        else f"it holds {held[:5]}{' ...' if len(held) > 5 else ''}"
    )
    error = MissingKeysError(
        f"checkpoint {info.storage.display} holds none of the {len(wanted)} key(s) the "
        f"state_dict asks for {where} ({wanted[:5]}{' ...' if len(wanted) > 5 else ''}); "
        f"{hint}. Nothing would be loaded there, so the load fails even with strict=False: "
        "fix the keys (load without a state_dict to see what the checkpoint holds), or leave "
        "that entry out of the state_dict."
    )
    error.missing_keys = [key_string((*path, k)) for k in target]
    return error


def _assign(tree: Any, values: dict[Any, Any]) -> Any:
    def resolve(ref: Any) -> Any:
        if isinstance(ref, ShardedRef):
            return values[ref.indices]
        value = values[ref.index]
        return value.cpu().numpy() if ref.tag == "N" and isinstance(value, torch.Tensor) else value

    return materialize(tree, resolve)


def _finish(value: torch.Tensor, info: CheckpointInfo, key: Any, relocate: MapLocation) -> Any:
    """A value read fresh, made what the caller gets: unpickled, or moved by map_location."""
    index = key[0] if isinstance(key, tuple) else key
    meta = info.manifest.items[index]
    if meta.kind == KIND_PICKLE:
        return pickle.loads(value.numpy().tobytes())  # allow_pickle was checked when planned
    return relocate(value, meta.device)


def _item_shape(meta: ItemMeta) -> tuple[int, ...]:
    """A tensor item's shape; a pickled item is a vector of its bytes."""
    return (meta.nbytes,) if meta.kind == KIND_PICKLE else meta.shape or ()


def _whole(shape: tuple[int, ...]) -> Box:
    return (0,) * len(shape), tuple(shape)


def _is_sharded_target(target: Any) -> bool:
    return isinstance(target, ShardedTensor) or is_dtensor(target)


def _is_tensor_target(target: Any) -> bool:
    return isinstance(target, torch.Tensor) or isinstance(target, ShardedTensor)


def _check_match(target: torch.Tensor, meta: ItemMeta, key: str) -> None:
    dtype = dtype_from_name(meta.dtype or "", where=key)
    if tuple(target.shape) != meta.shape or target.dtype != dtype:
        raise StateDictMismatchError(
            f"key {key!r}: the checkpoint holds {meta.dtype} {list(meta.shape or ())} but the "
            f"target tensor is {str(target.dtype).removeprefix('torch.')} {list(target.shape)}. "
            "Load into a tensor of that shape and dtype, or leave the key out of state_dict."
        )


def _copy_back(dest: torch.Tensor, stage: torch.Tensor) -> None:
    dest.detach().copy_(stage)


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()


def resolve_map_location(map_location: Any) -> MapLocation:
    """Turn ``default_map_location`` into a function ``(cpu_tensor, saved_device) -> tensor``.

    ``None`` keeps tensors on the CPU; a device or device string moves every tensor there; a
    dict maps saved device strings to devices (others stay on the CPU); a callable is called as
    ``fn(tensor, saved_device)``.
    """
    if map_location is None:
        return lambda t, _: t
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        return lambda t, saved: map_location(t, saved)
    if isinstance(map_location, dict):
        mapping = {str(k): _device(v) for k, v in map_location.items()}
        return lambda t, saved: t.to(mapping[saved]) if saved in mapping else t
    device = _device(map_location)
    if device.type == "cpu":
        return lambda t, _: t
    return lambda t, _: t.to(device)


def _device(value: Any) -> torch.device:
    if not isinstance(value, (str, torch.device)):
        raise UnsupportedValueError(
            f"default_map_location must be None, a device, a device string, a dict or a "
            f"callable, got {type(value).__qualname__}"
        )
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as e:
        raise UnsupportedValueError(
            f"default_map_location {value!r} is not a device: {e}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedValueError(
            f"default_map_location {value!r} asks for CUDA, which this process does not have; "
            "use 'cpu' or load on a GPU machine"
        )
    index = device.index
    if device.type == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise UnsupportedValueError(
            f"default_map_location {value!r}: this process sees {torch.cuda.device_count()} GPUs"
        )
    return device

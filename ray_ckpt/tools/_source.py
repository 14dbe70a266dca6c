"""Shared by the tools: progress reporting, and reading the items of an opened checkpoint.

A :class:`Source` is a checkpoint opened with :func:`._open.open_checkpoint` (marker, validated
manifest, decoded tree) plus its open files (:class:`~ray_ckpt.storage.files.FileReader`). It reads
one item, or one extent, at a time, checking each data file's header once and every extent's
CRC32C, so a tool holds at most what it asks for.

Tensors are streamed through :meth:`Source.chunks`: the tensor (a stored item, or a sharded
tensor whose shards are several items) is cut into *windows*, boxes of the global tensor that
are consecutive in C order and hold at most ``window_bytes``; each window is filled from the
shards it overlaps and handed out in turn. A window fixes the indices of the dimensions before
some ``k``, spans a range of ``k`` and all of the dimensions after it, so its overlap with any
shard is one contiguous byte range of that shard, and consecutive windows read each shard
front to back: every extent is read exactly once, in order, and its CRC32C is checked as its
last byte goes by. Memory: one window (plus, for a shard that splits a later dimension, a
buffer for its part of the window), whatever the tensor's size or layout.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .._checksum import crc32c
from ..config import StorageConfig
from ..errors import CheckpointError, CorruptCheckpointError
from ..format.checks import raise_first, shard_problems
from ..format.manifest import Extent, Manifest
from ..format.names import KIND_PICKLE, dtype_from_name
from ..format.refs import ItemRef, ShardedRef, key_string
from ..format.tree import leaves
from ..load.extents import ExtentReader
from ..load.validate import CheckpointInfo
from ..sharding import Box, overlap, runs, slices
from ..storage.files import FileReader, open_files
from ._open import KIND_OF_TAG as KIND_OF_TAG  # for the tools that take it from here
from ._open import open_checkpoint

DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_WINDOW_BYTES = 16 << 20


class Progress(Protocol):
    """Receives progress of a long operation: ``start`` once, ``advance`` as bytes go by."""

    def start(self, total_bytes: int, what: str) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, total_bytes: int, what: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


StoredRef = ItemRef | ShardedRef


@dataclass(frozen=True)
class TensorLeaf:
    """A tensor of a checkpoint as the tools see it: one stored item (``T``/``N``), or a sharded
    tensor stored as several items, each the box ``(offset, shape)`` of the global tensor."""

    ref: StoredRef
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # the global shape
    shards: tuple[tuple[int, Box], ...]  # (item index, its box), by offset

    @property
    def ident(self) -> int | tuple[int, ...]:
        return ref_ident(self.ref)

    @property
    def sharded(self) -> bool:
        return isinstance(self.ref, ShardedRef)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def ref_ident(ref: StoredRef) -> int | tuple[int, ...]:
    """What identifies a stored tensor: its item, or the items of its shards."""
    return ref.indices if isinstance(ref, ShardedRef) else ref.index


def is_tensor_ref(value: Any) -> bool:
    """A stored tensor or array (not a pickled object), sharded or not."""
    return isinstance(value, ShardedRef) or (isinstance(value, ItemRef) and value.tag != "P")


def stored_refs(tree: Any) -> Iterator[StoredRef]:
    """Every stored leaf of a decoded tree (:class:`ItemRef` or :class:`ShardedRef`), once."""
    seen: set[Any] = set()
    for _, leaf in leaves(tree):
        if isinstance(leaf, (ItemRef, ShardedRef)) and ref_ident(leaf) not in seen:
            seen.add(ref_ident(leaf))
            yield leaf


class Source:
    """An opened checkpoint with its files open: reads items, verifying headers and CRC32Cs."""

    def __init__(self, info: CheckpointInfo, files: FileReader) -> None:
        self.info = info
        self.files = files
        self.extents = ExtentReader(files, info.storage.display)
        # Reused by every call of chunks(): freeing and allocating a window per tensor makes
        # glibc keep the freed windows (its mmap threshold rises to their size), and memory
        # would grow with the number of tensors.
        self._scratch: dict[str, torch.Tensor] = {}

    @property
    def manifest(self) -> Manifest:
        return self.info.manifest

    def where(self, file: str) -> str:
        return self.extents.where(file)

    def check_header(self, file: str) -> None:
        self.extents.check_header(file)

    def read_extent(self, extent: Extent, key: str, dest: memoryview) -> None:
        """Read ``extent`` into ``dest`` (exactly its length) and check its CRC32C."""
        self.extents.read_extent(extent, key, dest)

    def read_into(self, index: int, dest: np.ndarray, progress: Progress | None = None) -> None:
        """Fill ``dest`` (a uint8 array of the item's size) with item ``index``."""
        key = self.manifest.items[index].key
        for extent in self.manifest.extents[index]:
            part = dest[extent.chunk_offset : extent.chunk_offset + extent.length]
            self.read_extent(extent, key, memoryview(part))  # type: ignore[arg-type]
            if progress is not None:
                progress.advance(extent.length)

    def read_item(self, index: int, progress: Progress | None = None) -> torch.Tensor | bytes:
        """Item ``index`` as a CPU tensor, or as raw bytes for a pickled item."""
        meta = self.manifest.items[index]
        if meta.kind == KIND_PICKLE:
            raw = np.empty(meta.nbytes, dtype=np.uint8)
            self.read_into(index, raw, progress)
            return raw.tobytes()
        dtype = dtype_from_name(meta.dtype or "", where=meta.key)
        tensor = torch.empty(meta.shape or (), dtype=dtype)
        self.read_into(index, bytes_of(tensor), progress)
        return tensor

    def tensor(self, ref: StoredRef) -> TensorLeaf:
        """The tensor ``ref`` stands for; a sharded one's shards are checked to tile it
        (:func:`ray_ckpt.format.checks.shard_problems`)."""
        if isinstance(ref, ItemRef):
            meta = self.manifest.items[ref.index]
            shape = meta.shape or ()
            dtype = dtype_from_name(meta.dtype or "", where=meta.key)
            return TensorLeaf(ref, meta.key, dtype, shape, ((ref.index, _whole(shape)),))
        raise_first(shard_problems(
            ref.indices, ref.global_shape, self.manifest, self.info.storage.display
        ))
        metas = [self.manifest.items[i] for i in ref.indices]
        key = metas[0].key
        boxes = [(m.global_offset or (0,) * len(m.shape or ()), m.shape or ()) for m in metas]
        dtype = dtype_from_name(metas[0].dtype or "", where=key)
        shards = tuple(sorted(zip(ref.indices, boxes), key=lambda s: s[1][0]))
        return TensorLeaf(ref, key, dtype, tuple(ref.global_shape), shards)

    def chunks(
        self, leaf: TensorLeaf, window_bytes: int = DEFAULT_WINDOW_BYTES
    ) -> Iterator[torch.Tensor]:
        """The elements of ``leaf`` in C order, as consecutive flat tensors of at most
        ``window_bytes`` (see the module docstring). Each is a view of one reused buffer:
        use it before asking for the next."""
        if leaf.numel == 0:
            return
        itemsize = leaf.dtype.itemsize
        streams = {index: _ItemStream(self, index) for index, _ in leaf.shards}
        for window in _windows(leaf.shape, itemsize, window_bytes):
            out = self._buffer("window", leaf.dtype, window[1])
            covered = 0
            for index, box in leaf.shards:
                common = overlap(window, box)
                if common is None or not math.prod(common[1]):
                    continue
                covered += math.prod(common[1])
                within = (tuple(o - b for o, b in zip(common[0], box[0])), common[1])
                ((start, _),) = runs(box[1], within)  # one run: see the module docstring
                dest = out[slices(common, window[0])] if out.dim() else out
                if dest.is_contiguous():
                    streams[index].read_into(start * itemsize, byte_view(dest))
                else:
                    part = self._buffer("part", leaf.dtype, common[1])
                    streams[index].read_into(start * itemsize, byte_view(part))
                    dest.copy_(part)
            if covered != out.numel():
                raise CorruptCheckpointError(
                    f"key {leaf.key!r} in {self.info.storage.display}: the shards cover "
                    f"{covered} of the {out.numel()} elements at {list(window[0])}: a shard is "
                    "missing or the shards overlap. Restore the checkpoint or use another one."
                )
            yield out.reshape(-1)
        for stream in streams.values():
            stream.finish()

    def _buffer(self, slot: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of ``shape`` in the reusable buffer ``slot`` (grown when too small)."""
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._scratch.get(slot)
        if buffer is None or buffer.numel() < nbytes:
            self._scratch.pop(slot, None)
            buffer = self._scratch[slot] = torch.empty(max(nbytes, 64), dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).view(shape)


def bytes_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor, as bytes."""
    return memoryview(bytes_of(tensor))  # type: ignore[arg-type]


@contextlib.contextmanager
def opened(
    path: str, filesystem: Any, storage_config: StorageConfig | None, rank: int = 0
) -> Iterator[Source]:
    info = open_checkpoint(path, filesystem, storage_config, rank)
    with open_files(info.storage) as files:
        yield Source(info, files)


KeyPath = tuple[Any, ...]


def subtree(tree: Any, prefix: str | None, where: str) -> Any:
    """The part of ``tree`` under the dotted key ``prefix`` (the whole tree for ``None``)."""
    if not prefix:
        return tree
    node = tree
    walked: list[Any] = []
    for part in prefix.split("."):
        if isinstance(node, dict):
            match = [k for k in node if str(k) == part]
        elif isinstance(node, (list, tuple)) and not isinstance(node, torch.Size):
            match = [i for i in range(len(node)) if str(i) == part]
        else:
            match = []
        if not match:
            here = key_string(walked) or "the root"
            choices = (
                [str(k) for k in node] if isinstance(node, dict)
                else list(range(len(node))) if isinstance(node, (list, tuple)) else []
            )
            raise CheckpointError(
                f"checkpoint {where} has no key {prefix!r}: {part!r} is not under {here} "
                f"(it holds {choices[:20]})"
            )
        walked.append(match[0])
        node = node[match[0]]
    if not isinstance(node, dict):
        raise CheckpointError(
            f"checkpoint {where}: {prefix!r} is a {type(node).__name__}, not a dict of "
            "tensors; name a dict (a module's state dict, say) to export"
        )
    return node



class _ItemStream:
    """Reads one item front to back, in pieces, checking each extent's CRC32C once its last
    byte has been read."""

    def __init__(self, source: Source, index: int) -> None:
        self._source = source
        self._meta = source.manifest.items[index]
        self._extents = sorted(source.manifest.extents[index], key=lambda e: e.chunk_offset)
        self._next = 0  # the extent being read
        self._position = 0  # bytes of the item read so far
        self._crc = 0  # of the extent being read, so far

    def read_into(self, start: int, dest: memoryview) -> None:
        if start != self._position:
            raise CheckpointError(
                f"internal error: key {self._meta.key!r} read at byte {start}, expected "
                f"{self._position}"
            )
        while len(dest):
            extent = self._extents[self._next]
            within = self._position - extent.chunk_offset
            if within >= extent.length:  # an empty extent
                self._next += 1
                continue
            n = min(len(dest), extent.length - within)
            self._read(extent, within, dest[:n])
            self._crc = crc32c(dest[:n], self._crc)
            self._position += n
            dest = dest[n:]
            if within + n == extent.length:
                self._check(extent)

    def _read(self, extent: Extent, within: int, dest: memoryview) -> None:
        reader = self._source.extents
        reader.check_header(extent.file)
        reader.read(extent.file, extent.offset + within, dest, self._meta.key)

    def _check(self, extent: Extent) -> None:
        self._source.extents.check(self._crc, extent, self._meta.key)
        self._crc = 0
        self._next += 1

    def finish(self) -> None:
        if self._position != self._meta.nbytes:
            raise CheckpointError(
                f"internal error: key {self._meta.key!r}: read {self._position} of "
                f"{self._meta.nbytes} bytes"
            )


def _whole(shape: tuple[int, ...]) -> Box:
    return (0,) * len(shape), tuple(shape)


def _windows(shape: tuple[int, ...], itemsize: int, window_bytes: int) -> Iterator[Box]:
    """Boxes that tile a tensor of ``shape`` in C order, each of at most ``window_bytes`` (at
    least one element): the indices of dimensions ``< k`` fixed, a range of ``k``, every later
    dimension whole, with ``k`` the outermost dimension whose slices fit."""
    n = len(shape)
    if n == 0:
        yield (), ()
        return
    if 0 in shape:
        return
    k = next(d for d in range(n) if math.prod(shape[d + 1 :]) * itemsize <= window_bytes
             or d == n - 1)
    inner = math.prod(shape[k + 1 :]) * itemsize
    step = max(1, min(shape[k], window_bytes // inner))
    for lead in itertools.product(*(range(d) for d in shape[:k])):
        for first in range(0, shape[k], step):
            size = min(step, shape[k] - first)
            yield (*lead, first, *(0,) * (n - k - 1)), (*(1,) * k, size, *shape[k + 1 :])

"""Shared by the tools: progress reporting, and reading the items of an opened checkpoint.

A :class:`Source` is a checkpoint opened with :meth:`CheckpointReader.open` (marker, validated
manifest, decoded tree) plus its open files (:class:`~ray_ckpt.storage.FileReader`). It reads
one item, or one extent, at a time, checking each data file's header once and every extent's
CRC32C, so a tool holds at most what it asks for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from .._checksum import crc32c
from .._tree import key_string
from ..config import StorageConfig
from ..errors import CheckpointError, CorruptCheckpointError
from ..format import HEADER_SIZE, KIND_PICKLE, Extent, Manifest, check_header, dtype_from_name
from ..reader import CheckpointInfo, CheckpointReader
from ..storage import FileReader
from ..types import RankInfo

DEFAULT_CHUNK_BYTES = 16 << 20
KIND_OF_TAG = {"T": "tensor", "N": "ndarray", "P": "pickle"}


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


class Source:
    """An opened checkpoint with its files open: reads items, verifying headers and CRC32Cs."""

    def __init__(self, info: CheckpointInfo, files: FileReader) -> None:
        self.info = info
        self.files = files
        self._headers_checked: set[str] = set()

    @property
    def manifest(self) -> Manifest:
        return self.info.manifest

    def where(self, file: str) -> str:
        return f"{self.info.storage.display}/{file}"

    def check_header(self, file: str) -> None:
        if file in self._headers_checked:
            return
        raw = bytearray(HEADER_SIZE)
        self.files.read_into(file, 0, memoryview(raw))
        check_header(bytes(raw), file=self.where(file))
        self._headers_checked.add(file)

    def read_extent(self, extent: Extent, key: str, dest: memoryview) -> None:
        """Read ``extent`` into ``dest`` (exactly its length) and check its CRC32C."""
        self.check_header(extent.file)
        if extent.length:
            try:
                self.files.read_into(extent.file, extent.offset, dest)
            except EOFError as e:
                raise CorruptCheckpointError(
                    f"key {key!r}: data file {self.where(extent.file)} is truncated ({e}). "
                    "Restore the file or use another checkpoint."
                ) from None
        if extent.checksum is not None and crc32c(dest) != extent.checksum:
            raise CorruptCheckpointError(
                f"key {key!r}: checksum mismatch in {self.where(extent.file)} (bytes "
                f"{extent.offset}..{extent.offset + extent.length}): the file is damaged. "
                "Restore it or use another checkpoint."
            )

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


def bytes_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()


@contextlib.contextmanager
def opened(
    path: str, filesystem: Any, storage_config: StorageConfig | None, rank: int = 0
) -> Iterator[Source]:
    info = open_checkpoint(path, filesystem, storage_config, rank)
    with info.storage.reader() as files:
        yield Source(info, files)


def reader_for(
    filesystem: Any, storage_config: StorageConfig | None, rank: int = 0
) -> CheckpointReader:
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return CheckpointReader(
        RankInfo(rank, rank + 1), storage_config=storage_config, filesystem=filesystem
    )


def open_checkpoint(
    path: str, filesystem: Any, storage_config: StorageConfig | None, rank: int = 0
) -> CheckpointInfo:
    """:meth:`CheckpointReader.open` as rank ``rank`` sees the checkpoint: the tree is the one
    that rank saved (rank-local keys differ between ranks of a multi-rank save)."""
    info = reader_for(filesystem, storage_config, rank).open(path)
    if rank >= info.marker.world_size:
        raise CheckpointError(
            f"checkpoint {info.storage.display} was saved by {info.marker.world_size} rank(s); "
            f"rank {rank} is not one of them (use 0..{info.marker.world_size - 1})"
        )
    return info


KeyPath = tuple[Any, ...]


def leaves(tree: Any, path: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """Every leaf of a decoded tree with its key path: stored items (:class:`ItemRef`) and plain
    values. Empty containers count as values, so that they show up in a diff."""
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaves(value, (*path, key))
    elif isinstance(tree, (list, tuple)) and tree and not isinstance(tree, torch.Size):
        for i, value in enumerate(tree):
            yield from leaves(value, (*path, i))
    else:
        yield path, tree


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


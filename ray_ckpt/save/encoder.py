"""The bucket encoder: one staged bucket becomes one data file (docs/FORMAT.md).

Called by the writer actor's ``write_bucket`` (:mod:`ray_ckpt.save.writer`) for every bucket
the pipeline hands it: header, each array at its aligned offset, CRC32C of every extent computed
while its bytes are in the cache, fsync. Returns the extents the commit puts in the manifest.
:class:`CheckpointWriter` is plain Python, the extension point of ``checkpoint_writer_init_fn``.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from typing import Any

from .._checksum import crc32c
from .._util import PackedRows, without_gc
from ..config import CheckpointWriterConfig
from ..errors import CheckpointWriteError
from ..format.header import HEADER_SIZE, encode_header
from ..format.layout import BucketLayout
from ..format.manifest import Extent
from ..storage.storage import Storage

_ZEROS = bytes(64)


class CheckpointWriter:
    """Writes one staged bucket as one data file: header, aligned extents, checksums, fsync.

    Hosted by the writer actor of a node; plain Python, so it can be subclassed (a custom
    ``checkpoint_writer_init_fn``) or wrapped to inject faults.
    """

    def __init__(self, config: CheckpointWriterConfig | None = None) -> None:
        self.config = config or CheckpointWriterConfig()

    @without_gc
    def write_bucket(
        self,
        storage: Storage,
        layout: BucketLayout,
        arrays: list[list[Any]],
        *,
        rank: int,
        checkpoint_id: str,
        checksum: bool,
        fsync: bool,
    ) -> list[Extent]:
        """Write bucket ``layout`` from ``arrays``: each array of the layout, given as the list
        of its consecutive pieces (as the stager puts them; anything with the buffer
        protocol)."""
        if len(arrays) != len(layout.array_nbytes):
            raise CheckpointWriteError(
                f"bucket {layout.file} arrived with {len(arrays)} arrays, expected "
                f"{len(layout.array_nbytes)}"
            )
        views = [_Pieces(array) for array in arrays]
        for index, (view, nbytes) in enumerate(zip(views, layout.array_nbytes)):
            if view.nbytes != nbytes:
                raise CheckpointWriteError(
                    f"bucket {layout.file}: array {index} arrived with {view.nbytes} bytes, "
                    f"expected {nbytes}"
                )
        crcs: list[int | None] = [None] * len(layout.segments)
        # the segments of each array: a chunk (one segment, the whole array) is checksummed
        # piece by piece as it is written, while the piece is in the CPU cache
        by_array: list[list[int]] = [[] for _ in views]
        for index, seg in enumerate(layout.segments):
            by_array[seg.array].append(index)

        def produce(write: Callable[[memoryview | bytes], None]) -> None:
            write(encode_header(rank, layout.seq, checkpoint_id))
            position = HEADER_SIZE
            for array, (view, offset) in enumerate(zip(views, layout.array_offsets)):
                if offset > position:
                    write(_ZEROS[: offset - position])
                segs = by_array[array]
                whole = len(segs) == 1 and layout.segments[segs[0]].length == view.nbytes
                if whole:
                    crc = 0
                    for piece in view.pieces:
                        if checksum:
                            crc = crc32c(piece, crc)
                        write(piece)
                    crcs[segs[0]] = crc if checksum else None
                else:
                    if checksum:
                        for index in segs:
                            seg = layout.segments[index]
                            crcs[index] = view.crc32c(seg.start, seg.length)
                    for piece in view.pieces:
                        write(piece)
                position = offset + view.nbytes

        storage.write_stream(layout.file, produce, fsync=fsync)
        extents = PackedRows(
            Extent(
                item=seg.item,
                chunk_offset=seg.chunk_offset,
                file=layout.file,
                offset=layout.array_offsets[seg.array] + seg.start,
                length=seg.length,
                checksum=crcs[index],
                rank=rank,
            )
            for index, seg in enumerate(layout.segments)
        )
        return extents


class _Pieces:
    """One staged array, as the consecutive pieces it was put in."""

    def __init__(self, pieces: list[Any]) -> None:
        self.pieces = [memoryview(p).cast("B") for p in pieces]
        self.starts = list(itertools.accumulate((len(p) for p in self.pieces), initial=0))
        self.nbytes = self.starts[-1]

    def crc32c(self, start: int, length: int) -> int:
        """The CRC32C of bytes ``[start, start + length)``, which may span pieces."""
        crc = 0
        index = bisect.bisect_right(self.starts, start) - 1
        end = start + length
        while start < end:
            piece, base = self.pieces[index], self.starts[index]
            stop = min(end, base + len(piece))
            crc = crc32c(piece[start - base : stop - base], crc)
            start = stop
            index += 1
        return crc


def default_writer_init_fn(config: CheckpointWriterConfig) -> CheckpointWriter:
    """The default ``checkpoint_writer_init_fn``: a plain :class:`CheckpointWriter`."""
    return CheckpointWriter(config)

"""extents: moved from ray_ckpt.load.reader (issue 14). TODO: docstring."""

from __future__ import annotations

from dataclasses import dataclass

from .._checksum import crc32c
from ..errors import CorruptCheckpointError
from ..format.manifest import Extent, ItemMeta
from ..storage.files import FileReader


@dataclass
class ReadStats:
    """What the last ``read`` did: bytes it read from storage, and of them the bytes it could
    not verify because it read part of an extent (a load into another sharding)."""

    nbytes_read: int = 0
    nbytes_unverified: int = 0


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

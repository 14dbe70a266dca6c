"""Reading extents from data files: the one extent reader, and the load's read plan.

:class:`ExtentReader` is the only code that turns data-file bytes into checked bytes. The load
(:class:`~ray_ckpt.load.reader.CheckpointReader`), ``verify`` and every tool read through it,
so they check a data file's header the same way (once per file) and report a short file and a
CRC32C mismatch in one text that names the file, the key and the byte range. The texts are
:class:`~ray_ckpt.format.checks.Problem` records (:func:`truncated_problem`,
:func:`checksum_problem`): ``verify`` collects them, everyone else raises them as
:class:`~ray_ckpt.errors.CorruptCheckpointError`.

The rest is the load's plan: the byte ranges a load needs are cut into *pieces* (part of one
extent, for one destination), neighbouring pieces of a file are *coalesced* into one read, the
reads are *balanced* over the I/O threads, and :func:`_perform` runs one read, checking the
CRC32C of every whole extent while its bytes are still in the CPU cache (a piece that is only
part of an extent, in a load into another sharding, cannot be checked and is counted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .._checksum import crc32c
from ..errors import CorruptCheckpointError
from ..format.checks import Problem
from ..format.header import HEADER_SIZE, check_header
from ..format.manifest import Extent, ItemMeta
from ..storage.files import READ_CHUNK_BYTES, FileReader


def truncated_problem(key: str, file: str, where: str, error: EOFError) -> Problem:
    """The data file ``file`` (shown as ``where``) ended inside an extent of ``key``."""
    return Problem(
        "truncated",
        f"key {key!r}: data file {where} is truncated ({error}). Restore the file or use "
        "another checkpoint.",
        file=file, key=key,
    )


def checksum_problem(key: str, extent: Extent, where: str) -> Problem:
    """The bytes of ``extent`` (of ``key``, in the file shown as ``where``) fail its CRC32C."""
    return Problem(
        "checksum",
        f"key {key!r}: checksum mismatch in {where} (bytes {extent.offset}.."
        f"{extent.offset + extent.length}): the file is damaged. Restore it or use another "
        "checkpoint.",
        file=extent.file, key=key,
    )


class ExtentReader:
    """Reads extents of the data files of one checkpoint (open ``files``, shown as
    ``display``): see the module docstring. Raises :class:`CorruptCheckpointError`."""

    def __init__(self, files: FileReader, display: str) -> None:
        self.files = files
        self.display = display
        self._headers_checked: set[str] = set()

    def where(self, file: str) -> str:
        return f"{self.display}/{file}"

    def check_header(self, file: str) -> None:
        """Check the header of data file ``file`` against its name (once per file)."""
        if file in self._headers_checked:
            return
        raw = bytearray(HEADER_SIZE)
        try:
            self.files.read_into(file, 0, memoryview(raw))
        except EOFError as e:
            raise CorruptCheckpointError(
                f"data file {self.where(file)} is truncated: shorter than its {HEADER_SIZE}-byte "
                f"header ({e}). Restore the file or use another checkpoint."
            ) from None
        check_header(bytes(raw), file=self.where(file))
        self._headers_checked.add(file)

    def read(
        self,
        file: str,
        offset: int,
        dest: memoryview,
        key: str,
        *,
        slice_bytes: int = READ_CHUNK_BYTES,
        on_slice: Callable[[int, memoryview], None] | None = None,
    ) -> None:
        """Fill ``dest`` from ``file`` at ``offset`` (bytes of ``key``); a short file is a
        :func:`truncated_problem`. ``on_slice`` as :meth:`FileReader.read_into`."""
        try:
            self.files.read_into(file, offset, dest, slice_bytes=slice_bytes, on_slice=on_slice)
        except EOFError as e:
            raise CorruptCheckpointError(
                truncated_problem(key, file, self.where(file), e).message
            ) from None

    def check(self, crc: int, extent: Extent, key: str) -> None:
        """Raise the :func:`checksum_problem` when ``crc`` is not the extent's CRC32C."""
        problem = self.checksum(crc, extent, key)
        if problem is not None:
            raise CorruptCheckpointError(problem.message)

    def checksum(self, crc: int, extent: Extent, key: str) -> Problem | None:
        """The :func:`checksum_problem` when ``crc`` is not the extent's CRC32C (an extent
        saved without one passes)."""
        if extent.checksum is None or crc == extent.checksum:
            return None
        return checksum_problem(key, extent, self.where(extent.file))

    def read_extent(self, extent: Extent, key: str, dest: memoryview) -> None:
        """Read all of ``extent`` into ``dest`` (exactly its length), header and CRC32C
        checked."""
        self.check_header(extent.file)
        if extent.length:
            self.read(extent.file, extent.offset, dest, key)
        self.check(crc32c(dest), extent, key)


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
    reader: ExtentReader,
    read: _Read,
    verify: bool,
    stats: ReadStats,
    scratch: memoryview,
) -> None:
    """Read one file range (into its only piece's memory, or ``scratch``, whose bytes are then
    scattered) and check the CRC32C of every whole extent while its bytes are hot. The files'
    headers were checked before."""
    single = len(read.pieces) == 1
    buffer = read.pieces[0].dest if single else scratch
    crc = 0

    def checksum(start: int, piece_of: memoryview) -> None:
        nonlocal crc
        crc = crc32c(piece_of, crc if start else 0)  # a retried read starts again at 0

    # slice by slice, checksumming each slice while it is still in the CPU cache
    reader.read(
        read.file, read.offset, buffer[: read.length],
        min(p.meta.key for p in read.pieces),
        slice_bytes=_SLICE_BYTES, on_slice=checksum if single and verify else None,
    )
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
        elif verify:
            reader.check(crc, piece.extent, piece.meta.key)

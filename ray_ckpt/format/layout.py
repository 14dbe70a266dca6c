"""Where the bytes of a bucket go in its data file: the plan the stager makes and the writer
follows.

A bucket is one data file. Its staged arrays are written back to back after the header
(:data:`~ray_ckpt.format.header.HEADER_SIZE`), each at ``array_offsets[i]``; a
:class:`Segment` says which bytes of which item sit where in which array, which is what the
manifest's extents record. Pure data, sent to the writer actor with the bucket's object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .header import HEADER_SIZE


class Segment(NamedTuple):
    """Bytes ``[chunk_offset, chunk_offset + length)`` of item ``item``, found at byte ``start``
    of staged array ``array`` of a bucket."""

    item: int
    chunk_offset: int
    array: int
    start: int
    length: int


@dataclass(frozen=True)
class BucketLayout:
    """What one data file holds and where: sent to the writer with the bucket's object."""

    seq: int
    file: str
    array_nbytes: tuple[int, ...]
    array_offsets: tuple[int, ...]  # offset of each array in the data file
    segments: list[Segment]  # PackedRows: cheap to send

    @property
    def nbytes(self) -> int:
        return sum(self.array_nbytes)

    @property
    def file_nbytes(self) -> int:
        if not self.array_nbytes:
            return HEADER_SIZE
        return self.array_offsets[-1] + self.array_nbytes[-1]

"""layout: moved from ray_ckpt.save.stager (issue 14). TODO: docstring."""

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

"""A file held in memory as a list of buffers, in order (the memory tier keeps a data file as
its writer's parts): ranges of it read as ranges of the joined bytes, without joining them.

Used on both sides of a memory-tier read: by :class:`~.files.FileReader`, copying ranges into
a load's tensors, and by a holder serving a peer's read (:mod:`.memory_stream`), sending them.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator
from typing import Any


class Buffers:
    """The bytes of one file, as ``buffers`` (anything exposing the buffer protocol), in order."""

    def __init__(self, buffers: list[Any]) -> None:
        self._views = [memoryview(b).cast("B") for b in buffers]
        self._starts = list(itertools.accumulate((len(v) for v in self._views), initial=0))

    @property
    def nbytes(self) -> int:
        return self._starts[-1]

    def at(self, offset: int, nbytes: int) -> memoryview:
        """Up to ``nbytes`` of the file from ``offset``, within one buffer (empty at the end)."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if not 0 <= i < len(self._views):
            return memoryview(b"")
        within = offset - self._starts[i]
        return self._views[i][within : within + nbytes]

    def ranges(self, offset: int, nbytes: int) -> Iterator[memoryview]:
        """The views that make up ``nbytes`` from ``offset`` (fewer at the end of the file)."""
        while nbytes > 0:
            chunk = self.at(offset, nbytes)
            if not chunk:
                return
            yield chunk
            offset += len(chunk)
            nbytes -= len(chunk)

    def read_into(self, offset: int, out: memoryview) -> int:
        """Copy up to ``len(out)`` bytes from ``offset`` into ``out``, fewer only at the end of
        the file; returns how many."""
        done = 0
        for chunk in self.ranges(offset, len(out)):
            out[done : done + len(chunk)] = chunk
            done += len(chunk)
        return done

    def read_slices(
        self,
        offset: int,
        out: memoryview,
        slice_bytes: int,
        on_slice: Callable[[int, memoryview], None] | None = None,
    ) -> int:
        """Fill ``out`` from ``offset`` a slice at a time, calling ``on_slice(start, slice)``
        after each (see :mod:`.files`); returns how many bytes, fewer only at the end."""
        for start in range(0, len(out), slice_bytes):
            piece = out[start : start + slice_bytes]
            n = self.read_into(offset + start, piece)
            if n and on_slice is not None:
                on_slice(start, piece[:n])
            if n < len(piece):
                return start + n
        return len(out)

    def close(self) -> None:
        for view in self._views:
            view.release()

"""Reading a checkpoint's files: ``FileReader`` keeps the data files of one :class:`Storage`
open across calls and reads byte ranges straight into caller memory; ``open_files`` scopes
one.

A filesystem that reads ranges straight into caller memory itself (the memory tier: a held
file is a view of shared memory, or a peer's holder streams it) says so by giving its
``pyarrow.fs.PyFileSystem`` handler an ``open_ranges(path, scope)`` method. It returns the
file's reader (for a file in memory: a :class:`~.buffers.Buffers`): ``read_slices(offset, out,
slice_bytes, on_slice)`` fills ``out`` from ``offset`` with no read copy, calls
``on_slice(start, slice)`` with each ``slice_bytes`` of it in order as they land, and returns
the bytes filled (fewer only at the end of the file); ``close()``. A range is one call, so that
a reader across the network asks for it in one request. ``scope`` is a :class:`ReadScope` the
reader keeps while it is open, where the filesystem may keep what serves the other files of
the same load."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .storage import Storage

READ_CHUNK_BYTES = 64 << 20


@contextmanager
def open_files(storage: Storage) -> Iterator[FileReader]:
    """A reader of ``storage``'s files that keeps them open across calls; closed on exit."""
    reader = FileReader(storage)
    try:
        yield reader
    finally:
        reader.close()


class FileReader:
    """Reads byte ranges of the files of one :class:`Storage` straight into caller memory."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._handles: dict[str, object] = {}
        self._opening: dict[str, threading.Lock] = {}  # one per file: files open in parallel
        self._scope = ReadScope()
        self._lock = threading.Lock()

    def read_into(
        self,
        name: str,
        offset: int,
        out: memoryview,
        *,
        slice_bytes: int = READ_CHUNK_BYTES,
        on_slice: Callable[[int, memoryview], None] | None = None,
    ) -> None:
        """Fill ``out`` with the bytes of file ``name`` from ``offset`` and call
        ``on_slice(start, slice)`` with each ``slice_bytes`` of it in order; a short file
        raises ``EOFError``. Local files are read a slice at a time, so that each slice is
        still in the CPU cache when ``on_slice`` sees it; a filesystem's with ``open_ranges`` (the
        memory tier) in one ``read_slices`` call; others in ranged reads of up to
        ``READ_CHUNK_BYTES``. A transient error retries the whole range, starting again
        at ``start`` 0."""
        path = self._storage._join(name)
        view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        self._storage.call(
            "read", path, lambda: self._read_into(name, path, offset, view, slice_bytes, on_slice)
        )

    def _read_into(
        self,
        name: str,
        path: str,
        offset: int,
        view: memoryview,
        slice_bytes: int,
        on_slice: Callable[[int, memoryview], None] | None,
    ) -> None:
        held = getattr(getattr(self._storage.fs, "handler", None), "open_ranges", None)
        if held is not None:
            data = self._handle(name, lambda: held(path, self._scope))
            n = data.read_slices(offset, view, slice_bytes, on_slice)
            if n < len(view):
                raise EOFError(f"{path} ends at byte {offset + n}")
            return
        local = self._storage.is_local
        if local:
            fd = self._handle(name, lambda: os.open(path, os.O_RDONLY))
        else:
            handle = self._handle(name, lambda: self._storage.fs.open_input_file(path))
        step = slice_bytes if local else max(slice_bytes, READ_CHUNK_BYTES)
        for start in range(0, len(view), step):
            piece = view[start : start + step]
            done = 0
            while done < len(piece):
                at = offset + start + done
                if local:
                    n = os.preadv(fd, [piece[done:]], at)  # type: ignore[arg-type]
                else:
                    chunk = handle.read_at(len(piece) - done, at)  # type: ignore[attr-defined]
                    n = len(chunk)
                    piece[done : done + n] = memoryview(chunk).cast("B")
                if n == 0:
                    raise EOFError(f"{path} ends at byte {at}")
                done += n
            if on_slice is not None:
                for within in range(0, len(piece), slice_bytes):
                    on_slice(start + within, piece[within : within + slice_bytes])

    def _handle(self, name: str, open_fn: Callable[[], Any]) -> Any:
        """The open handle of file ``name``, opened by the first thread to ask for it; other
        files open meanwhile (an open on an object store is a round trip)."""
        with self._lock:
            handle = self._handles.get(name)
            if handle is not None:
                return handle
            opening = self._opening.setdefault(name, threading.Lock())
        with opening:
            with self._lock:
                handle = self._handles.get(name)
            if handle is None:
                handle = open_fn()
                with self._lock:
                    self._handles[name] = handle
            return handle

    def close(self) -> None:
        self._opening.clear()
        for handle in self._handles.values():
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle.close()  # type: ignore[attr-defined]
        self._handles.clear()
        self._scope.close()


class ReadScope(dict[str, Any]):
    """What a filesystem keeps for the files of one :class:`FileReader` (see the module
    docstring), and what to do when the reader closes (:meth:`at_close`). Its files may be
    opened by several threads at once: ``lock`` serialises what they share."""

    def __init__(self) -> None:
        super().__init__()
        self._closers: list[Callable[[], None]] = []
        self.lock = threading.Lock()

    def at_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        closers, self._closers = self._closers, []
        self.clear()
        for fn in closers:
            fn()


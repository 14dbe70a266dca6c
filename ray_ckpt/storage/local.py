"""Local-disk writes below :class:`Storage`: buffers written with ``os.write`` while the
kernel is asked to start writeback as they go (``sync_file_range``), so the final fsync has
little left to wait for."""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from typing import Any

Buffer = memoryview | bytes


_KICK_BYTES = 8 << 20


_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function  # type: ignore[no-any-return]


def _write_local(
    path: str, produce: Callable[[Callable[[Buffer], None]], Any], fsync: bool
) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    kick = _sync_file_range() if fsync else None
    position = kicked = 0

    def write(buf: Buffer) -> None:
        nonlocal position, kicked
        view = memoryview(buf).cast("B")
        while view:
            written = os.write(fd, view[:_KICK_BYTES])
            view = view[written:]
            position += written
            if kick is not None and position - kicked >= _KICK_BYTES:
                kick(fd, kicked, position - kicked, _SYNC_FILE_RANGE_WRITE)  # start writeback
                kicked = position

    try:
        produce(write)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)

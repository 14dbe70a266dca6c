"""Prefaulting this process's mapping of the node's object store, so that staging does not pay
page faults inside the stall.

Every Ray process maps the whole object store (one file in ``/dev/shm``), but the kernel fills
the process's page table one page at a time, on first touch: the first ``ray.put`` into each
page of the store costs the putting process a page fault, even when the page is already in
memory because another process (a writer, a holder) wrote it before. Measured with 1 GiB
memory checkpoints on a 4.25 GiB store (2 cores): an async save's stall was 1.3-2.5x a memcpy
while the staging process's puts still landed on pages it had not touched, 0.64-0.74x once its
page table covered the store.

So a checkpointer's process populates its page table for the pages of the store that are
already in memory (``mincore``), with ``madvise(MADV_POPULATE_WRITE)``: no byte is read or
written, and no page that Ray has not used is allocated (the store's memory use does not
change). It runs on a background thread: when a checkpointer is created, and again after every
save (the writers and holders brought more of the store into memory meanwhile), at the lowest
CPU priority (a run may overlap the next save's stall, which comes first), and never while this
process loads a checkpoint (``LOADS``: a restore, often right after a checkpointer is made,
comes first; a run then waits between windows). Measured, 1 GiB restores from a peer's holder
by a process that makes a checkpointer for each, 10 by turns: 0.342 s and 0.462 s (two runs)
with no prefault run against 0.400 s and 0.506 s beside one (its ``mincore`` and page-table
walks take CPU that the load needs, even at the lowest priority); 0.328 s waiting against
0.351 s not. Pages never used yet still cost a fault on their first use, whoever touches them
first. Linux 5.14 or later, a store in ``/dev/shm`` (Ray's default); elsewhere it does nothing,
and says why once in the log.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable

from .._util import LOADS

logger = logging.getLogger(__name__)

_MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14
_STORE_DIRECTORY = "/dev/shm/"
_WINDOW_BYTES = 1 << 30  # mincore's residency vector is built a window at a time


def store_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of each shared, writable mapping of an object store file in this
    process."""
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if (
                len(fields) >= 6
                and fields[5].startswith(_STORE_DIRECTORY)
                and os.path.basename(fields[5]).startswith("plasma")
                and fields[1].startswith("rw") and fields[1].endswith("s")
            ):
                start, end = fields[0].split("-")
                out.append((int(start, 16), int(end, 16)))
    return out


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _windows() -> list[tuple[int, int]]:
    """``(start, length)`` of every window of every mapping of the store in this process."""
    return [(start, min(high, start + _WINDOW_BYTES) - start)
            for low, high in store_mappings() for start in range(low, high, _WINDOW_BYTES)]


def _residency(libc: ctypes.CDLL, start: int, length: int) -> bytes:
    """One byte a page of ``[start, start + length)``: bit 0 set when the page is in memory."""
    vector = ctypes.create_string_buffer(-(-length // os.sysconf("SC_PAGE_SIZE")))
    _check(libc.mincore(start, length, vector), "mincore")
    return vector.raw


def store_in_memory() -> tuple[int, int]:
    """(bytes of the object store in memory, bytes of it in all) as this process maps it."""
    libc = _libc()
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for start, length in _windows():
        resident += (len(pages := _residency(libc, start, length)) - pages.count(0)) * page
        total += length
    return resident, total


def populate_resident(
    seen: dict[int, int] | None = None, before_window: Callable[[], None] | None = None
) -> int:
    """Populate this process's page table for every page of the object store that is in
    memory; returns the bytes covered. ``seen`` (window start -> pages in memory at the last
    call) skips the windows with no new page in memory since (a page of the store, once in
    memory, stays); ``before_window`` is called before each window. Raises ``OSError`` where
    the kernel refuses."""
    libc = _libc()
    page = os.sysconf("SC_PAGE_SIZE")
    seen = {} if seen is None else seen
    covered = 0
    for start, length in _windows():
        if before_window is not None:
            before_window()
        resident = _residency(libc, start, length)
        pages = len(resident)
        count = pages - resident.count(0)
        if seen.get(start) == count:
            continue
        first = resident.find(1)
        while first >= 0:
            end = resident.find(0, first)
            end = pages if end < 0 else end
            nbytes = min((end - first) * page, length - first * page)
            _check(libc.madvise(start + first * page, nbytes, _MADV_POPULATE_WRITE),
                   "madvise(MADV_POPULATE_WRITE)")
            covered += nbytes
            first = resident.find(1, end)
        seen[start] = count
    return covered


def _check(result: int, call: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{call}: {os.strerror(errno)}")


class _Prefaulter:
    """One background run at a time per process; a request during a run runs it again after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = False
        self._again = False
        self._disabled = not sys.platform.startswith("linux")
        self._seen: dict[int, int] = {}  # see populate_resident

    def request(self) -> None:
        with self._lock:
            if self._disabled:
                return
            if self._running:
                self._again = True
                return
            self._running = True
        threading.Thread(target=self._run, daemon=True, name="ray_ckpt-prefault").start()

    def _run(self) -> None:
        # the lowest priority: a run may overlap the next save's stall, whose copies come first
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            try:
                covered = populate_resident(self._seen, LOADS.wait_idle)
                logger.debug("ray_ckpt: prefaulted %.1f MiB of the object store", covered / 2**20)
            except OSError as e:  # an old kernel, say: staging then pays its page faults
                logger.info("ray_ckpt: not prefaulting the object store (%s): a save's first "
                            "puts into each page of it pay a page fault in the stall", e)
                with self._lock:
                    self._disabled = True
                    self._running = False
                return
            with self._lock:
                if not self._again:
                    self._running = False
                    return
                self._again = False


_PREFAULTER = _Prefaulter()


def request() -> None:
    """Populate this process's mapping of the object store soon, on a background thread."""
    _PREFAULTER.request()

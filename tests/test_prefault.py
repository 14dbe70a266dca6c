"""Prefaulting the object store (ray_ckpt.save.prefault): this process's page table comes to
cover the store's pages that another process brought into memory, and no page is allocated."""

from __future__ import annotations

import ctypes
import os
import sys
import time

import numpy as np
import pytest
import ray

from ray_ckpt._util import LOADS
from ray_ckpt.save import prefault

from .conftest import MiB

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _store_pages() -> tuple[int, int]:
    """(pages of the store in memory, pages of it in this process's page table)."""
    page = os.sysconf("SC_PAGE_SIZE")
    mapped = 0
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
                inside = len(fields) >= 6 and os.path.basename(fields[5]).startswith("plasma")
            elif inside and fields[0] == "Rss:":
                mapped += int(fields[1]) * 1024 // page
    return prefault.store_in_memory()[0] // page, mapped


@ray.remote(num_cpus=0)
def _put_elsewhere(nbytes: int) -> list[ray.ObjectRef]:
    return [ray.put(np.ones(nbytes, np.uint8))]


def test_prefault_maps_the_pages_other_processes_wrote_and_allocates_none(cluster):
    assert prefault.store_mappings(), "this process maps no object store"
    [ref] = ray.get(_put_elsewhere.remote(48 * MiB))  # pages only the task's process mapped
    resident_before, mapped_before = _store_pages()
    seen: dict[int, int] = {}
    covered = prefault.populate_resident(seen)
    resident_after, mapped_after = _store_pages()
    page = os.sysconf("SC_PAGE_SIZE")
    assert resident_after == resident_before  # no page of the store allocated
    assert covered >= 48 * MiB and covered == resident_before * page
    assert mapped_before < resident_before  # the task's pages were not in our page table
    assert mapped_after >= resident_after - 16  # now every page of the store in memory is
    assert prefault.populate_resident(seen) == 0  # nothing new in memory: nothing done again
    del ref


def _forget_store_pages() -> None:
    """Empty this process's page table for the store (``MADV_DONTNEED`` on a shared mapping
    drops only the mapping: the pages and their bytes stay in the store)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start, end in prefault.store_mappings():
        assert libc.madvise(start, end - start, 4) == 0, os.strerror(ctypes.get_errno())


def test_a_prefault_run_waits_while_this_process_loads(cluster):
    """A run requested during a load (a checkpointer made to restore) populates nothing until
    the load ends, then everything."""
    [ref] = ray.get(_put_elsewhere.remote(48 * MiB))  # some of the store in memory, at least
    prefaulter = prefault._Prefaulter()  # not the process's: no run of it is under way
    with LOADS.running():  # (nor will the process's one populate now)
        _forget_store_pages()
        resident, mapped = _store_pages()
        assert mapped < resident - 48 * MiB // os.sysconf("SC_PAGE_SIZE")
        prefaulter.request()
        time.sleep(1.0)
        assert _store_pages()[1] == mapped  # nothing populated meanwhile
    deadline = time.monotonic() + 30
    while _store_pages()[1] < resident - 16:
        assert time.monotonic() < deadline, "the run did not resume after the load"
        time.sleep(0.05)
    del ref

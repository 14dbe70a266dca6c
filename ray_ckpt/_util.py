"""Small helpers that are not part of the format: pausing the garbage collector around bulk
work (``without_gc``, ``gc_paused``), ``PackedRows``, the rows of many small items packed
into one buffer, which Ray ray_ckpt started for this process (``local_ray_started``), and the
loads running in this process (``LOADS``)."""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building tens of thousands of small objects
    (one per tensor): otherwise each burst of allocations triggers a collection that walks the
    whole heap, which measured 3 to 4 times the cost of the work itself for 50,000 items. What
    is built here holds no reference cycles; the collector resumes afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


F = TypeVar("F", bound=Callable[..., Any])

_local_ray: list[str] = []  # the GCS address of the local Ray ray_ckpt started, if it did


def note_local_ray(gcs_address: str) -> None:
    """``builder.ensure_ray`` started a local Ray for this process, at ``gcs_address``."""
    _local_ray[:] = [gcs_address]


def local_ray_started(gcs_address: str) -> bool:
    """Whether the Ray at ``gcs_address`` is one ray_ckpt started for this process (no cluster
    address was given): it ends with the process, and no other process can reach it."""
    return _local_ray == [gcs_address]


def without_gc(fn: F) -> F:
    """Run ``fn`` with the collector paused (see :func:`gc_paused`)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with gc_paused():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


class PackedRows(list):  # type: ignore[type-arg]
    """A list of named-tuple rows (items, extents, segments) that pickles column by column.

    A save of 50,000 tiny tensors ships 50,000 of each between the caller, the writer and the
    commit; pickled as objects they cost about a second (measured), as columns a few
    hundredths. It is a plain list to everything that reads it."""

    def __reduce__(self) -> tuple[Any, ...]:
        if not self:
            return (PackedRows, ())
        return (_unpack_rows, (type(self[0]), tuple(map(list, zip(*self)))))


def _unpack_rows(cls: Any, columns: tuple[list[Any], ...]) -> PackedRows:
    with gc_paused():
        return PackedRows(map(cls._make, zip(*columns)))


class _Loads:
    """The checkpoint loads running in this process, for the background work that would take
    the cores a load needs (prefaulting the object store, starting this node's writer): a
    restore, often made by a process restarted after a failure right after it makes its
    checkpointer, comes first."""

    def __init__(self) -> None:
        self._running = 0
        self._ended = 0.0  # monotonic: when the last load ended
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Within it, this process loads a checkpoint."""
        with self._changed:
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                self._ended = time.monotonic()
                self._changed.notify_all()

    def wait_for_none(self, quiet_secs: float = 0.0) -> None:
        """Return once no load runs and none has run for ``quiet_secs``, counted from this call
        at the earliest (a load that begins within them, as a restore right after a
        checkpointer is made does, is waited for too)."""
        since = time.monotonic()
        with self._changed:
            while True:
                self._changed.wait_for(lambda: self._running == 0)
                left = max(since, self._ended) + quiet_secs - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)


LOADS = _Loads()

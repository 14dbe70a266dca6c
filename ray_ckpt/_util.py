"""Small helpers that are not part of the format: pausing the garbage collector around bulk
work (``without_gc``, ``gc_paused``), ``PackedRows``, the rows of many small items packed
into one buffer, which Ray ray_ckpt started for this process (``local_ray_started``), and
``InFlight``, a count of calls or loads in flight (``LOADS``: this process's loads)."""

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


class InFlight:
    """A count of things in flight and when the last one ended: the calls on a writer actor
    (it retires once idle long enough), the loads of this process (:data:`LOADS`)."""

    def __init__(self) -> None:
        self._count = 0
        self._ended = time.monotonic()  # when the last one ended (or this was made)
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Within it, one more thing is in flight."""
        with self._changed:
            self._count += 1
        try:
            yield
        finally:
            with self._changed:
                self._count -= 1
                self._ended = time.monotonic()
                self._changed.notify_all()

    def idle_secs(self) -> float:
        """Seconds since the last one ended; 0 while one is in flight."""
        with self._changed:
            return 0.0 if self._count else time.monotonic() - self._ended

    def wait_idle(self, quiet_secs: float = 0.0) -> None:
        """Return once nothing is in flight and nothing has been for ``quiet_secs``, counted
        from this call at the earliest (what begins within them is waited for too)."""
        since = time.monotonic()
        with self._changed:
            while True:
                self._changed.wait_for(lambda: self._count == 0)
                left = max(since, self._ended) + quiet_secs - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)


# The checkpoint loads running in this process, for the background work that would take the
# cores a load needs (prefaulting the object store, starting this node's writer): a restore,
# often made by a process restarted after a failure right after it makes its checkpointer,
# comes first.
LOADS = InFlight()

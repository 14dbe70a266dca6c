"""Small helpers that are not part of the format: pausing the garbage collector around bulk
work (``without_gc``, ``gc_paused``), ``PackedRows``, the rows of many small items packed
into one buffer, and which Ray ray_ckpt started for this process (``local_ray_started``)."""

from __future__ import annotations

import contextlib
import functools
import gc
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

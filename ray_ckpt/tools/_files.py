"""Files the export tools write: a temporary name beside the destination, published by an
atomic rename once complete, discarded on failure."""

from __future__ import annotations

import os


def temp_name(directory: str, name: str) -> str:
    """Where ``name`` is written before it is complete."""
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def publish(directory: str, temps: list[str], names: list[str], stale: list[str]) -> None:
    """Rename the finished ``temps`` to ``names``, then delete ``stale`` files of an export
    they replace; make the directory durable."""
    for temp, name in zip(temps, names, strict=True):
        os.replace(temp, os.path.join(directory, name))
    for name in stale:
        if name not in names:
            os.unlink(os.path.join(directory, name))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(temps: list[str]) -> None:
    for temp in temps:
        if os.path.exists(temp):
            os.unlink(temp)

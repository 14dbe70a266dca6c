"""Errors raised by ray_ckpt.

Every error ray_ckpt raises on purpose derives from :class:`CheckpointError`. Where an error
refines a built-in (a missing checkpoint is a ``FileNotFoundError``, missing keys under
``strict=True`` are a ``RuntimeError`` as in PyTorch), it inherits that built-in as well, so
callers can catch either.

Errors cross actor boundaries: a writer actor raises, the caller's future re-raises. They keep
their message and their attributes through pickling because ``__reduce__`` rebuilds them from
the message and restores ``__dict__``.
"""

from __future__ import annotations

from typing import Any


class CheckpointError(Exception):
    """Root of every error ray_ckpt raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self.args[0]) if self.args else "",), self.__dict__)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint (and no directory) exists at the path."""


class IncompleteCheckpointError(CheckpointError):
    """The directory exists but holds no commit marker: a save that never finished."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A save would replace a committed checkpoint (or foreign files) without ``overwrite=True``."""


class CorruptCheckpointError(CheckpointError):
    """Bytes on storage do not match what the manifest promises (checksum, length, structure)."""


class FormatVersionError(CorruptCheckpointError):
    """The checkpoint was written in a format version this reader does not understand."""


class MissingKeysError(CheckpointError, RuntimeError):
    """``strict=True`` and the checkpoint lacks keys that the target state dict asks for."""

    missing_keys: list[str]


class StateDictMismatchError(CheckpointError, ValueError):
    """A target tensor's shape, dtype or type does not match the stored item."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A state dict holds something ray_ckpt cannot save (a sparse tensor, a lambda, ...)."""


class PickleNotAllowedError(CheckpointError):
    """Saving or loading an arbitrary Python object requires ``allow_pickle=True``."""


class CheckpointWriteError(CheckpointError):
    """A save failed; nothing was committed. The message names every failed writer and cause."""


class StorageError(CheckpointError, OSError):
    """Storage refused an operation permanently (permission, missing bucket, disk full)."""


class CheckpointerClosedError(CheckpointError, RuntimeError):
    """The checkpointer was closed; create a new one to save again."""


class BarrierTimeoutError(CheckpointError, TimeoutError):
    """Not every rank reached the commit barrier in time; nothing was committed."""


class MemoryTierFullError(CheckpointError, MemoryError):
    """A memory checkpoint does not fit in the object store of a node, even after evicting
    what the eviction rule allows."""


class MemoryCopiesLostError(CheckpointError, FileNotFoundError):
    """Every held copy of a file of a memory checkpoint is gone (its nodes were lost)."""


class RayUnreachableError(CheckpointError, ConnectionError):
    """No Ray cluster answers at the address given (``RAY_ADDRESS``, ``ray_address``)."""

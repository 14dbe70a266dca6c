"""Checkpointers: the API a training loop calls (``save``, ``load``, ``close``).

``SyncCheckpointer.save`` returns once the checkpoint is committed. ``AsyncCheckpointer.save``
returns ``(stage_future, write_future)`` as soon as staging has started (or ended, without
``use_async_staging``). Both run the same protocol (:mod:`ray_ckpt.save.pipeline`); the
synchronous one simply waits for both futures before returning.
"""

from __future__ import annotations

import abc
import logging
import threading
from typing import Any

from .errors import CheckpointerClosedError, MissingKeysError
from .futures import CheckpointFuture
from .load.reader import CheckpointReader
from .save.pipeline import Coordinator
from .save.pool import WriterPool
from .save.protocol import SaveResult, StageStats
from .types import STATE_DICT

logger = logging.getLogger(__name__)


def missing_keys_error(path: str, missing: list[str]) -> MissingKeysError:
    """The error for a strict load of ``path`` that lacks the keys ``missing``."""
    error = MissingKeysError(
        f"checkpoint {path} is missing {len(missing)} key(s) that the state_dict asks "
        f"for: {missing}. Pass strict=False to load the others."
    )
    error.missing_keys = missing
    return error


class Checkpointer(abc.ABC):
    """Saves and loads state dicts. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self, coordinator: Coordinator, reader: CheckpointReader, pool: WriterPool
    ) -> None:
        self._coordinator = coordinator
        self._reader = reader
        self._pool = pool
        self._closed = False
        self._lock = threading.Lock()
        # held by a save from its check that the checkpointer is open until it has started
        # (async) or committed (sync), and by close() around its drain: close waits for every
        # save it let in, and a save that comes after close is refused
        self._save_lock = threading.RLock()

    @abc.abstractmethod
    def save(
        self,
        path: str,
        state_dict: STATE_DICT,
        *,
        allow_pickle: bool = False,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[CheckpointFuture[StageStats], CheckpointFuture[SaveResult]] | None:
        """Save ``state_dict`` as the checkpoint at ``path``.

        Keyword arguments: ``allow_pickle=False`` (store objects that have no safe encoding as
        pickle), ``overwrite=False`` (replace a committed checkpoint at ``path``),
        ``metadata=None`` (a small JSON dict, e.g. metrics, kept in the commit marker and shown
        by :func:`ray_ckpt.list_checkpoints`).
        """

    def load(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        strict: bool = False,
        allow_pickle: bool = False,
    ) -> STATE_DICT:
        """Load the checkpoint at ``path``.

        Without ``state_dict``, the whole checkpoint, tensors on the CPU (or where
        ``default_map_location`` says). With ``state_dict``, only its keys, into its own
        tensors in place; modules, optimizers and other objects with ``load_state_dict`` get
        their state through it. ``strict=True`` raises
        :class:`~ray_ckpt.errors.MissingKeysError` (a ``RuntimeError``) naming every key the
        checkpoint lacks; a dict of the target none of whose keys the checkpoint holds raises
        it whatever ``strict`` says.
        """
        loaded, missing = self._load_and_missing(
            path, state_dict, default_map_location=default_map_location,
            allow_pickle=allow_pickle,
        )
        if strict and missing:
            raise missing_keys_error(path, missing)
        return loaded

    def _load_and_missing(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        default_map_location: Any = None,
        allow_pickle: bool = False,
    ) -> tuple[STATE_DICT, list[str]]:
        """:meth:`load` without ``strict``: the loaded state dict and the keys of
        ``state_dict`` that the checkpoint lacks (for a caller with its own rule about them)."""
        self._check_open()
        return self._reader.read(
            path, state_dict, map_location=default_map_location, allow_pickle=allow_pickle
        )

    def close(self) -> None:
        """Release staging threads, buffers and (custom) writer actors. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with self._save_lock:
            try:
                self._drain()  # raises the last save's error if nobody has seen it yet
            finally:
                self._coordinator.close()
                self._pool.close()
        logger.debug("%s closed", type(self).__name__)

    def _drain(self) -> None:  # noqa: B027 - a no-op unless a subclass has saves in flight
        """Wait for saves in flight (async only)."""

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointerClosedError(
                f"this {type(self).__name__} is closed; create a new one with "
                "ray_ckpt.make_sync_checkpointer() or make_async_checkpointer()"
            )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncCheckpointer(Checkpointer):
    """Saves synchronously: ``save`` returns ``None`` once the checkpoint is committed."""

    def save(
        self,
        path: str,
        state_dict: STATE_DICT,
        *,
        allow_pickle: bool = False,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        with self._save_lock:
            self._check_open()
            stage, write = self._coordinator.save(
                path,
                state_dict,
                allow_pickle=allow_pickle,
                overwrite=overwrite,
                background=False,
                metadata=metadata,
            )
            stage.result()
            write.result()
        return None

    def __enter__(self) -> SyncCheckpointer:
        return self


class AsyncCheckpointer(Checkpointer):
    """Saves in the background: ``save`` returns ``(stage_future, write_future)``.

    ``stage_future`` resolves once every tensor is in the object store: from then on the caller
    may change or free its tensors. ``write_future`` resolves once the checkpoint is committed
    and raises the save's error otherwise. A new ``save`` first waits for the previous one and
    raises its error, so no failure goes unseen. ``close`` waits for the save in flight.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        reader: CheckpointReader,
        pool: WriterPool,
        *,
        use_async_staging: bool = True,
        write_during_staging: bool = False,
    ) -> None:
        super().__init__(coordinator, reader, pool)
        self._use_async_staging = use_async_staging
        self._overlap_writes = write_during_staging
        self._previous: (
            tuple[CheckpointFuture[StageStats], CheckpointFuture[SaveResult]] | None
        ) = None

    def save(
        self,
        path: str,
        state_dict: STATE_DICT,
        *,
        allow_pickle: bool = False,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[CheckpointFuture[StageStats], CheckpointFuture[SaveResult]]:
        with self._save_lock:
            self._check_open()
            self._wait_previous()
            futures = self._coordinator.save(
                path,
                state_dict,
                allow_pickle=allow_pickle,
                overwrite=overwrite,
                background=self._use_async_staging,
                overlap_writes=self._overlap_writes,
                metadata=metadata,
            )
            self._previous = futures
        return futures

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight; return its result, or raise its error if the caller
        has not seen it yet (None when there is nothing to wait for)."""
        previous = self._previous
        self._wait_previous()
        return previous[1].stats if previous is not None else None

    def _wait_previous(self) -> None:
        """Wait for the previous save; raise its error unless the caller has already seen it."""
        previous, self._previous = self._previous, None
        if previous is not None:
            write = previous[1]
            seen = write.error_seen
            error = write.exception()
            if error is not None and not seen:
                raise error

    def _drain(self) -> None:
        self._wait_previous()

    def __enter__(self) -> AsyncCheckpointer:
        return self

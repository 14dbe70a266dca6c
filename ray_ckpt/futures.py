"""``CheckpointFuture``: a future backed by a Ray ``ObjectRef``.

``AsyncCheckpointer.save`` returns two of them. Each wraps the ``ray.ObjectRef`` of the
writer-side call that resolves when its stage is over, so a caller can ``ray.wait`` on
``future.object_ref``, hand it to another Ray task, ``await future`` in asyncio code, or use the
``concurrent.futures`` style methods below. Errors raised by a writer actor re-raise here as the
original :class:`~ray_ckpt.errors.CheckpointError`, not wrapped in ``RayTaskError``.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from .errors import CheckpointWriteError

T = TypeVar("T")


def unwrap_ray_error(error: BaseException) -> BaseException:
    """The error a caller should see for an error that crossed an actor boundary."""
    if isinstance(error, RayTaskError):
        cause = error.cause
        if isinstance(cause, BaseException) and not isinstance(cause, RayTaskError):
            return cause
        return CheckpointWriteError(str(error))
    if isinstance(error, RayActorError):
        return CheckpointWriteError(
            f"a ray_ckpt writer actor died during the save, so nothing was committed: {error}"
        )
    return error


class CheckpointFuture(Generic[T]):
    """A future for one stage of a save (staging, or the commit).

    Args:
        object_ref: the Ray object that holds the result (or the error).
        local: an optional ``concurrent.futures.Future`` set by this process when it learns
            the outcome first (staging ends in this process); ``result()`` then returns
            without a round trip to the actor.
        on_cancel: called by :meth:`cancel`; returns whether the save was stopped in time.
        on_failure: called with the Ray error (before it is unwrapped) when the future fails.
    """

    def __init__(
        self,
        object_ref: ray.ObjectRef,
        *,
        local: concurrent.futures.Future[T] | None = None,
        on_cancel: Callable[[], bool] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._ref = object_ref
        self._local = local
        self._on_cancel = on_cancel
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._outcome: tuple[bool, Any] | None = None  # (ok, value or error)
        self._cancelled = False
        self._error_seen = False

    @property
    def object_ref(self) -> ray.ObjectRef:
        """The ``ray.ObjectRef`` behind this future (``ray.get``/``ray.wait`` work on it)."""
        return self._ref

    def result(self, timeout: float | None = None) -> T:
        """The result; raises the save's error, or ``TimeoutError`` after ``timeout`` seconds."""
        ok, value = self._resolve(timeout)
        if not ok:
            self._error_seen = True
            raise value
        return value  # type: ignore[no-any-return]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        ok, value = self._resolve(timeout)
        if not ok:
            self._error_seen = True
        return None if ok else value  # type: ignore[no-any-return]

    @property
    def stats(self) -> T | None:
        """The result once the future succeeded, else None: :class:`~ray_ckpt.StageStats`
        (bytes, items, stall) for a stage future, :class:`~ray_ckpt.SaveResult` (bytes, files,
        stall, total time, writers) for a write future. Never raises, never blocks."""
        if not self.done():
            return None
        ok, value = self._resolve(None)
        return value if ok else None

    @property
    def error_seen(self) -> bool:
        """Whether the caller has already been handed this future's error."""
        return self._error_seen

    def done(self) -> bool:
        if self._outcome is not None:
            return True
        if self._local is not None and self._local.done():
            return True
        ready, _ = ray.wait([self._ref], timeout=0, fetch_local=False)
        return bool(ready)

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> bool:
        """Stop the save before it commits. True when it was stopped: nothing is committed,
        and ``result()`` raises ``concurrent.futures.CancelledError`` once the writer has
        deleted the save's files. False when it had already committed or failed."""
        if self._on_cancel is None or self._outcome is not None:
            return False
        stopped = self._on_cancel()
        if stopped:
            self._cancelled = True
            self._error_seen = True
        return stopped

    def add_done_callback(self, fn: Callable[[CheckpointFuture[T]], Any]) -> None:
        """Call ``fn(self)`` once the future is done (from a Ray or staging thread)."""
        source: concurrent.futures.Future[Any] = (
            self._local if self._local is not None else self._ref.future()
        )
        source.add_done_callback(lambda _: fn(self))

    def __await__(self) -> Generator[Any, None, T]:
        return self._await().__await__()

    async def _await(self) -> T:
        if self._outcome is None:
            try:
                value = await self._ref
                self._store(True, value)
            except Exception as e:  # noqa: BLE001 - stored and re-raised below
                self._failed(e)
        return self.result()

    def _resolve(self, timeout: float | None) -> tuple[bool, Any]:
        if self._outcome is not None:
            return self._outcome
        if self._cancelled:
            # wait for the writer to finish with the save (and delete its files), so that
            # once result() raises, nothing of the cancelled save is left behind
            ready, _ = ray.wait([self._ref], timeout=timeout, fetch_local=False)
            if not ready:
                raise TimeoutError(f"the cancelled save did not wind up within {timeout} seconds")
            return self._store(False, concurrent.futures.CancelledError())
        try:
            if self._local is not None:
                value = self._local.result(timeout)
            else:
                value = ray.get(self._ref, timeout=timeout)
        except GetTimeoutError:
            raise TimeoutError(f"the save did not finish within {timeout} seconds") from None
        except concurrent.futures.CancelledError:
            return self._store(False, concurrent.futures.CancelledError())
        except Exception as e:  # noqa: BLE001 - stored, then raised by result()
            # the save's own error may be a TimeoutError too (BarrierTimeoutError): only a
            # local future that is still pending means that *this wait* timed out
            if isinstance(e, TimeoutError) and self._local is not None and not self._local.done():
                raise TimeoutError(f"the save did not finish within {timeout} seconds") from None
            return self._failed(e)
        return self._store(True, value)

    def _failed(self, error: BaseException) -> tuple[bool, Any]:
        if self._on_failure is not None and self._outcome is None:
            self._on_failure(error)
        return self._store(False, unwrap_ray_error(error))

    def _store(self, ok: bool, value: Any) -> tuple[bool, Any]:
        with self._lock:
            if self._outcome is None:
                self._outcome = (ok, value)
            return self._outcome

    def __repr__(self) -> str:
        state = "done" if self._outcome is not None else "pending"
        return f"<CheckpointFuture {state} {self._ref}>"



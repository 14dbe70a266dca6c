"""Storage: every byte ray_ckpt reads or writes goes through this module, on ``pyarrow.fs``.

A :class:`Storage` is one directory on one filesystem, resolved once from a local path, a URI
(``file://``, ``s3://``, ``gs://``, ``hdfs://``) or an explicit ``pyarrow.fs.FileSystem``. It
pickles, so the same object travels to the writer actors. On a ``LocalFileSystem`` it talks to
the OS directly (``pwritev``/``preadv`` straight from and into tensor memory, ``fsync`` of files
and of the directory); on any other filesystem it streams through pyarrow.

Every call is retried on transient errors (timeouts, 5xx, throttling) with exponential backoff
up to :class:`~ray_ckpt.config.StorageConfig` ``max_attempts``, logging each attempt; permanent
errors (permission, missing bucket, disk full) fail at once as
:class:`~ray_ckpt.errors.StorageError` naming the path and the fix.

Commit strategies (how the marker makes a checkpoint exist):

* :class:`RenameCommit` for filesystems with atomic rename (local and network disks, HDFS):
  every data file and the manifest were fsynced; the marker is written to a temporary name,
  fsynced, renamed over ``ray_ckpt.commit``, and the directory is fsynced.
* :class:`PutCommit` for object stores (S3, GCS), which cannot rename: data objects and the
  manifest are uploaded first, the marker is uploaded last. A PUT is atomic: readers see the
  old marker or the new one, never half of one.
"""

from __future__ import annotations

import abc
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import pyarrow.fs as pafs

from .config import StorageConfig
from .errors import CheckpointExistsError, CheckpointNotFoundError, StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

Buffer = memoryview | bytes

_IOV_MAX = 512
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.EBUSY}
_TRANSIENT_WORDS = (
    "timeout",
    "timed out",
    "throttl",
    "slowdown",
    "slow down",
    "service unavailable",
    "internal error",
    "internalerror",
    "connection reset",
    "connection was closed",
    "broken pipe",
    "try again",
    "http status 500",
    "http status 502",
    "http status 503",
    "http status 504",
    "error 500",
    "error 503",
    "transient",
)


def resolve(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """Resolve ``path`` once into an ``(fs, fs_path)`` pair.

    With ``filesystem``, ``path`` is a path on that filesystem (a ``file://`` prefix is
    dropped). Without it, a URI is resolved with ``pyarrow.fs.FileSystem.from_uri`` and
    anything else is a local path, made absolute.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not path:
        raise ValueError("a checkpoint path must not be empty")
    if filesystem is not None:
        return filesystem, path.removeprefix("file://").rstrip("/") or "/"
    if "://" in path:
        try:
            fs, fs_path = pafs.FileSystem.from_uri(path)
        except (pafs.ArrowInvalid, OSError, ValueError) as e:  # type: ignore[attr-defined]
            raise ValueError(f"cannot resolve storage URI {path!r}: {e}") from e
        return fs, fs_path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def is_transient(error: BaseException) -> bool:
    """Whether retrying ``error`` may succeed (timeouts, 5xx, throttling, resets)."""
    if isinstance(error, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in _TRANSIENT_ERRNOS:
            return True
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    text = str(error).lower()
    return any(word in text for word in _TRANSIENT_WORDS)


def _permanent_error(error: BaseException, what: str, where: str) -> StorageError:
    text = str(error)
    lower = text.lower()
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or (
        "no space left" in lower
    ):
        hint = "free space on that device or choose another storage path"
    elif isinstance(error, PermissionError) or "access denied" in lower or "forbidden" in lower:
        hint = (
            "check that every node of the cluster has read/write access to the storage path "
            "(credentials, bucket policy, file permissions)"
        )
    elif "nosuchbucket" in lower or "bucket does not exist" in lower or "no such bucket" in lower:
        hint = "the bucket does not exist: create it or fix the bucket name in the path"
    elif isinstance(error, OSError) and error.errno == errno.EROFS:
        hint = "the filesystem is read-only: choose a writable storage path"
    else:
        hint = "check the storage path and that the storage is reachable from every node"
    return StorageError(f"{what} {where} failed: {type(error).__name__}: {text}. Fix: {hint}.")


class Storage:
    """One directory on one filesystem. Picklable; shared by the caller and the writer actors."""

    def __init__(
        self, fs: pafs.FileSystem, path: str, config: StorageConfig | None = None
    ) -> None:
        self.fs = fs
        self.path = path.rstrip("/") or "/"
        self.config = config or StorageConfig()
        self.is_local = isinstance(fs, pafs.LocalFileSystem)

    @classmethod
    def from_path(
        cls,
        path: str,
        filesystem: pafs.FileSystem | None = None,
        config: StorageConfig | None = None,
    ) -> Storage:
        fs, fs_path = resolve(path, filesystem)
        return cls(fs, fs_path, config)

    def __repr__(self) -> str:
        return f"Storage({self.display})"

    @property
    def display(self) -> str:
        """The directory as a user would write it: a local path or ``scheme://path``."""
        if self.is_local:
            return self.path
        return f"{self.fs.type_name}://{self.path}"

    def child(self, name: str) -> Storage:
        return Storage(self.fs, self._join(name), self.config)

    def _join(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        return f"{self.path}/{name}" if self.path != "/" else f"/{name}"

    @property
    def commit_strategy(self) -> CommitStrategy:
        if self.fs.type_name in ("s3", "gcs"):
            return PutCommit()
        return RenameCommit()

    # --- retries ------------------------------------------------------------------------------

    def call(self, what: str, where: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries on transient errors; translate permanent ones."""
        backoff = self.config.retry_initial_backoff_secs
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                return fn()
            except (
                StorageError,
                CheckpointNotFoundError,
                FileNotFoundError,
                FileExistsError,
                NotADirectoryError,
            ):
                raise
            except Exception as e:
                if not is_transient(e) or attempt == self.config.max_attempts:
                    if is_transient(e):
                        raise StorageError(
                            f"{what} {where} failed after {attempt} attempts, the last with "
                            f"{type(e).__name__}: {e}. Fix: check that the storage is reachable "
                            "and not overloaded, or raise StorageConfig.max_attempts."
                        ) from e
                    raise _permanent_error(e, what, where) from e
                logger.warning(
                    "%s %s failed (attempt %d of %d, retrying in %.2fs): %s",
                    what, where, attempt, self.config.max_attempts, backoff, e,
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, self.config.retry_max_backoff_secs)
        raise AssertionError("unreachable")

    # --- directory ----------------------------------------------------------------------------

    def exists(self, name: str | None = None) -> bool:
        path = self.path if name is None else self._join(name)
        info = self.call("stat", path, lambda: self.fs.get_file_info(path))
        return info.type != pafs.FileType.NotFound

    def is_file(self, name: str | None = None) -> bool:
        path = self.path if name is None else self._join(name)
        info = self.call("stat", path, lambda: self.fs.get_file_info(path))
        return info.type == pafs.FileType.File

    def size(self, name: str) -> int:
        path = self._join(name)
        info = self.call("stat", path, lambda: self.fs.get_file_info(path))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(path)
        return int(info.size)

    def _list(self) -> list[pafs.FileInfo]:
        def ls() -> list[pafs.FileInfo]:
            try:
                return self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
            except NotADirectoryError:
                return []

        return self.call("list", self.path, ls)

    def list_files(self) -> dict[str, int]:
        """Names and sizes of the files directly in this directory ({} when it is absent)."""
        return {
            info.base_name: int(info.size)
            for info in self._list()
            if info.type == pafs.FileType.File
        }

    def list_dirs(self) -> list[str]:
        """Names of the subdirectories directly in this directory."""
        return sorted(
            info.base_name for info in self._list() if info.type == pafs.FileType.Directory
        )

    def make_dir(self) -> None:
        self.call("create directory", self.path, lambda: self.fs.create_dir(self.path, recursive=True))

    def delete_files(self, names: Sequence[str]) -> None:
        for name in names:
            path = self._join(name)
            self.call("delete", path, lambda p=path: self._delete_file(p))

    def _delete_file(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def delete_dir(self) -> None:
        def rm() -> None:
            try:
                self.fs.delete_dir(self.path)
            except FileNotFoundError:
                pass

        self.call("delete directory", self.path, rm)

    def sync_dir(self) -> None:
        """Make the directory's entries durable (local filesystems; a no-op elsewhere)."""
        if not self.is_local:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- whole files --------------------------------------------------------------------------

    def write_file(self, name: str, buffers: Sequence[Buffer], *, fsync: bool) -> None:
        """Write ``buffers`` one after another as file ``name``; durable on return."""
        path = self._join(name)
        if self.is_local:
            self.call("write", path, lambda: _write_local(path, buffers, fsync))
        else:
            self.call("write", path, lambda: self._write_stream(path, buffers))

    def _write_stream(self, path: str, buffers: Sequence[Buffer]) -> None:
        part = self.config.part_size_bytes
        with self.fs.open_output_stream(path, metadata={}) as out:
            for buf in buffers:
                view = memoryview(buf).cast("B")
                for start in range(0, len(view), part):
                    out.write(view[start : start + part])

    def read_file(self, name: str) -> bytes:
        path = self._join(name)

        def read() -> bytes:
            if self.is_local:
                with open(path, "rb") as f:
                    return f.read()
            with self.fs.open_input_stream(path) as f:
                return bytes(f.read())

        return self.call("read", path, read)

    @contextmanager
    def reader(self) -> Iterator[FileReader]:
        """A reader that keeps files open across calls; close it to release them."""
        reader = FileReader(self)
        try:
            yield reader
        finally:
            reader.close()


class FileReader:
    """Reads byte ranges of the files of one :class:`Storage` straight into caller memory."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes of file ``name`` from ``offset``; a short file raises
        ``EOFError``."""
        path = self._storage._join(name)
        self._storage.call("read", path, lambda: self._read_into(name, path, offset, out))

    def _read_into(self, name: str, path: str, offset: int, out: memoryview) -> None:
        view = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        if self._storage.is_local:
            fd = self._handle(name, lambda: os.open(path, os.O_RDONLY))
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)  # type: ignore[arg-type]
                if n == 0:
                    raise EOFError(f"{path} ends at byte {offset + done}")
                done += n
            return
        handle = self._handle(name, lambda: self._storage.fs.open_input_file(path))
        done = 0
        while done < len(view):
            chunk = handle.read_at(min(len(view) - done, 64 << 20), offset + done)  # type: ignore[attr-defined]
            if len(chunk) == 0:
                raise EOFError(f"{path} ends at byte {offset + done}")
            view[done : done + len(chunk)] = memoryview(chunk).cast("B")
            done += len(chunk)

    def _handle(self, name: str, open_fn: Callable[[], Any]) -> Any:
        with self._lock:
            handle = self._handles.get(name)
            if handle is None:
                handle = self._handles[name] = open_fn()
            return handle

    def close(self) -> None:
        for handle in self._handles.values():
            if isinstance(handle, int):
                os.close(handle)
            else:
                handle.close()  # type: ignore[attr-defined]
        self._handles.clear()


def _write_local(path: str, buffers: Sequence[Buffer], fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        while pending:
            batch = pending[:_IOV_MAX]
            written = os.writev(fd, batch)
            # drop what was written; a short write leaves the rest of a buffer pending
            consumed = 0
            while consumed < len(batch) and written >= len(batch[consumed]):
                written -= len(batch[consumed])
                consumed += 1
            pending = pending[consumed:]
            if written:
                pending[0] = pending[0][written:]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


class CommitStrategy(abc.ABC):
    """How the commit marker makes a checkpoint exist. Called once, after every data file and
    the manifest are durable. With ``exclusive``, an existing marker is never replaced: the
    commit fails with :class:`~ray_ckpt.errors.CheckpointExistsError` instead, so of two saves
    racing to one path exactly one wins."""

    @abc.abstractmethod
    def commit(
        self, storage: Storage, marker_name: str, marker: bytes, temp_name: str, *, exclusive: bool
    ) -> None:
        ...


def _exists_error(storage: Storage) -> CheckpointExistsError:
    return CheckpointExistsError(
        f"another save committed a checkpoint at {storage.display} first; nothing of this save "
        "was committed. Pass overwrite=True to replace it, or save to a new path."
    )


class RenameCommit(CommitStrategy):
    """Filesystems with atomic rename: write the marker to ``temp_name`` and fsync it, then
    rename it over ``marker_name`` (an atomic replace) or, when ``exclusive``, hard-link it there
    (an atomic create that fails if the marker exists); then fsync the directory."""

    def commit(
        self, storage: Storage, marker_name: str, marker: bytes, temp_name: str, *, exclusive: bool
    ) -> None:
        storage.sync_dir()
        storage.write_file(temp_name, [marker], fsync=True)
        src, dst = storage._join(temp_name), storage._join(marker_name)
        try:
            if storage.is_local and exclusive:
                try:
                    storage.call("link", src, lambda: os.link(src, dst))
                except FileExistsError:
                    raise _exists_error(storage) from None
                storage.delete_files([temp_name])
            elif storage.is_local:
                storage.call("rename", src, lambda: os.replace(src, dst))
            else:
                if exclusive and storage.exists(marker_name):
                    raise _exists_error(storage)
                storage.call("rename", src, lambda: storage.fs.move(src, dst))
        except BaseException:
            storage.delete_files([temp_name])
            raise
        storage.sync_dir()


class PutCommit(CommitStrategy):
    """Object stores: the marker is uploaded last, in one PUT, which is atomic. (``exclusive``
    checks for an existing marker first; object stores offer no atomic create through
    ``pyarrow.fs``, so two saves racing within that window both succeed and the last wins.)"""

    def commit(
        self, storage: Storage, marker_name: str, marker: bytes, temp_name: str, *, exclusive: bool
    ) -> None:
        if exclusive and storage.exists(marker_name):
            raise _exists_error(storage)
        storage.write_file(marker_name, [marker], fsync=False)

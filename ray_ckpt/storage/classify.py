"""Where a path lives and what an error means: ``resolve`` turns a path or URI into a
``(pyarrow filesystem, path)`` pair once (``mem://`` paths go to the memory tier), and the
classifiers tell a transient storage error (retry) from a permanent one (missing bucket,
access denied), and an object store from a filesystem."""

from __future__ import annotations

import errno
import os
import re
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from ..errors import StorageError
from . import credentials

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.EBUSY}


# Lower-case fragments of transient errors: plain words, HTTP statuses, and the AWS SDK error
# names pyarrow puts in its messages ("AWS Error SLOW_DOWN during PutObject operation: ...").
_TRANSIENT_WORDS = (
    "timeout",
    "timed out",
    "throttl",
    "slowdown",
    "slow down",
    "slow_down",
    "service unavailable",
    "service_unavailable",
    "serviceunavailable",
    "internal error",
    "internalerror",
    "internal_failure",
    "network_connection",
    "could not connect",
    "couldn't connect",
    "connection refused",
    "connection reset",
    "connection was closed",
    "broken pipe",
    "try again",
    "requestlimitexceeded",
    "http status 429",
    "http status 500",
    "http status 502",
    "http status 503",
    "http status 504",
    "error 500",
    "error 503",
    "transient",
)


# Errors that no retry can fix; checked before the transient words.
_NO_BUCKET_WORDS = ("no_such_bucket", "nosuchbucket", "no such bucket", "bucket does not exist")


_NO_BUCKET_RE = re.compile(r"bucket '[^']*' not found")


_DENIED_WORDS = (
    "access_denied",
    "accessdenied",
    "access denied",
    "forbidden",
    "http status 403",
    "invalid_access_key_id",
    "invalidaccesskeyid",
    "signature_does_not_match",
    "signaturedoesnotmatch",
    "expired_token",
    "expiredtoken",
    "invalid_token",
    "permission denied",
)


_BUCKET_IN_MESSAGE_RE = re.compile(r"bucket '([^']+)'")


# Names (pyarrow type names, fsspec protocols) of object stores: no rename, atomic uploads.
OBJECT_STORES = frozenset(
    {"s3", "s3a", "gcs", "gs", "abfs", "abfss", "az", "adl", "wasb", "wasbs", "oss", "r2"}
)


MEMORY_SCHEME = "mem://"  # the memory tier (ray_ckpt.memory)


_MEMORY_TYPE_NAME = "py::mem"  # its filesystem's type_name


def resolve(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """Resolve ``path`` once into an ``(fs, fs_path)`` pair.

    With ``filesystem``, ``path`` is a path on that filesystem (a ``file://`` prefix is
    dropped). Without it, a URI is resolved with ``pyarrow.fs.FileSystem.from_uri`` and
    anything else is a local path, made absolute.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__}"
        )
    path = os.fspath(path)
    if not path:
        raise ValueError("a checkpoint path must not be empty")
    if path.startswith(MEMORY_SCHEME):  # the memory tier, whatever the other filesystem is
        from . import memory

        fs, fs_path = memory.from_uri(path, filesystem)
    elif filesystem is not None:
        fs, fs_path = filesystem, path.removeprefix("file://").rstrip("/") or "/"
    elif "://" in path:
        try:
            fs, fs_path = pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError, ValueError) as e:
            shown = credentials.redact(path)
            raise ValueError(
                f"cannot resolve storage URI {shown!r}: {credentials.redact(str(e))}"
            ) from None
        fs_path = fs_path.rstrip("/")
    else:
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if isinstance(fs, pafs.LocalFileSystem):
        return fs, os.path.normpath(fs_path) if fs_path else fs_path
    _check_keys(path, fs_path)
    return fs, fs_path


def _check_keys(path: str, fs_path: str) -> None:
    """Off local disk a path is a key prefix, not a path the OS resolves: a ``.``, ``..`` or
    empty component would be saved as a name of its own, one that no listing of the directory
    can show and that names another checkpoint than the path seems to."""
    bad = [part for part in fs_path.strip("/").split("/") if part in ("", ".", "..")]
    if fs_path.strip("/") and bad:
        raise ValueError(
            f"checkpoint path {credentials.redact(path)!r} has "
            f"{f'a {bad[0]!r}' if bad[0] else 'an empty'} component: off local disk paths are "
            "not resolved, so write it without '.', '..' or '//'"
        )


def is_transient(error: BaseException) -> bool:
    """Whether retrying ``error`` may succeed (timeouts, 5xx, throttling, refused or reset
    connections). Access denied, missing buckets and missing files are never transient."""
    if isinstance(
        error, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)
    ):
        return False
    text = str(error).lower()
    if _no_bucket(text) or any(word in text for word in _DENIED_WORDS):
        return False
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in _TRANSIENT_ERRNOS:
            return True
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    return any(word in text for word in _TRANSIENT_WORDS)


def _no_bucket(text: str) -> bool:
    return any(word in text for word in _NO_BUCKET_WORDS) or bool(_NO_BUCKET_RE.search(text))


def _permanent_error(
    error: BaseException, what: str, where: str, bucket: str | None
) -> StorageError:
    text = str(error)
    lower = text.lower()
    found = _BUCKET_IN_MESSAGE_RE.search(text)
    bucket = found.group(1) if found else bucket
    if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        "no space left" in lower
    ):
        hint = "free space on that device or choose another storage path"
    elif _no_bucket(lower):
        hint = (
            f"bucket {bucket!r} does not exist: create it, or fix the bucket name in the path "
            "(and check the endpoint and region the filesystem points at)"
        )
    elif isinstance(error, PermissionError) or any(word in lower for word in _DENIED_WORDS):
        if bucket is not None:
            hint = (
                f"access to bucket {bucket!r} was denied: give every node of the cluster "
                "credentials that may list, read, write and delete under this path "
                "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, an instance profile or role, or "
                "access_key=/secret_key= on the filesystem) and check the bucket policy"
            )
        else:
            hint = (
                "check that every node of the cluster has read/write access to the storage "
                "path (file permissions, mount options)"
            )
    elif isinstance(error, OSError) and error.errno == errno.EROFS:
        hint = "the filesystem is read-only: choose a writable storage path"
    else:
        hint = "check the storage path and that the storage is reachable from every node"
    return StorageError(f"{what} {where} failed: {type(error).__name__}: {text}. Fix: {hint}.")


def _fs_names(fs: Any) -> set[str]:
    """Lower-case names of ``fs`` and of whatever it wraps: pyarrow type names split into words
    (``py::fsspec+s3`` -> py, fsspec, s3) and fsspec protocols, looking through
    ``SubTreeFileSystem``, ``PyFileSystem`` handlers and fsspec wrappers (``DirFileSystem``)."""
    names: set[str] = set()
    stack, seen = [fs], 0
    while stack and seen < 16:
        obj = stack.pop()
        seen += 1
        if isinstance(obj, pafs.FileSystem):
            names.update(re.split(r"[^a-z0-9]+", obj.type_name.lower()))
            if isinstance(obj, pafs.SubTreeFileSystem):
                stack.append(obj.base_fs)
            elif isinstance(obj, pafs.PyFileSystem):
                stack.append(obj.handler)
            continue
        protocol = getattr(obj, "protocol", None)
        if isinstance(protocol, str):
            names.add(protocol.lower())
        elif isinstance(protocol, (list, tuple)):
            names.update(str(p).lower() for p in protocol)
        inner = getattr(obj, "fs", None)  # FSSpecHandler.fs, DirFileSystem.fs, wrappers
        if inner is not None and inner is not obj:
            stack.append(inner)
    names.discard("")
    return names


def is_object_store(fs: Any) -> bool:
    """Whether ``fs`` is (or wraps) an object store, which cannot rename."""
    return bool(_fs_names(fs) & OBJECT_STORES)

"""A fault-injecting pyarrow filesystem: wraps a real one and fails or delays chosen calls.

    plan = FaultPlan(tmp_path / "faults", [
        Fault("write", "r*.data", nth=2, error=PermissionError("denied")),  # the 2nd data file
        Fault("write", "ray_ckpt.commit*", error=OSError("AWS Error SLOW_DOWN ...")),
    ])
    fs = faulty(real_fs, plan)        # a pyarrow.fs.PyFileSystem; paths are real_fs's paths

:class:`FaultyHandler` is a ``pyarrow.fs.FileSystemHandler`` around any ``pyarrow.fs``
filesystem (local, S3, another ``PyFileSystem``). It pickles, and so does the ``PyFileSystem``
around it, so the same plan applies inside the writer actors, which run in other processes.
That is why its state lives in files: matching calls are counted in ``plan.state_dir`` under an
exclusive ``flock``, so "the 2nd data-file write" means the 2nd across every process of the
(single-machine) cluster. Every call is appended to a journal there as well, which the tests
read to assert what was attempted, how often and in which order.

A fault fires on the ``nth`` matching call and the ``times - 1`` matching calls after it
(``times=None``: every one from the ``nth`` on). It sleeps ``delay_secs`` (then lets the call
through when it has no ``error``), raises ``error`` instead of doing the call, or, for writes
with ``after_bytes``, lets that many bytes through to the real file and then raises (a torn
write that leaves a partial file behind; a file shorter than that lands whole and its close
raises, as when the answer to a finished upload is lost).

Operations: ``write`` (open_output_stream, open_append_stream), ``read`` (open_input_file,
open_input_stream), ``stat`` (get_file_info of paths), ``list`` (get_file_info of a selector),
``mkdir``, ``delete`` (delete_file), ``delete_dir``, ``move`` (matched on the destination),
``copy``.
"""

from __future__ import annotations

import fcntl
import fnmatch
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

OPS = ("write", "read", "stat", "list", "mkdir", "delete", "delete_dir", "move", "copy")


@dataclass(frozen=True)
class Fault:
    """Fail or delay calls of ``op`` on files whose base name matches ``pattern``."""

    op: str
    pattern: str = "*"
    nth: int = 1
    times: int | None = 1
    error: BaseException | None = None
    delay_secs: float = 0.0
    after_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.nth < 1 or (self.times is not None and self.times < 1):
            raise ValueError("nth and times must be >= 1 (times=None: every call from nth on)")
        if self.after_bytes is not None and self.op != "write":
            raise ValueError("after_bytes applies to writes only")
        if self.error is None and (self.delay_secs <= 0 or self.after_bytes is not None):
            raise ValueError("a fault needs an error, or a delay_secs > 0 alone")

    def matches(self, op: str, path: str) -> bool:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return op == self.op and fnmatch.fnmatchcase(name, self.pattern)

    def fires(self, count: int) -> bool:
        """Whether the ``count``-th matching call (1-based) is hit."""
        return count >= self.nth and (self.times is None or count < self.nth + self.times)


@dataclass(frozen=True)
class Call:
    """One journal line: a call the wrapper saw, and the fault that hit it (or None)."""

    pid: int
    op: str
    path: str
    fault: int | None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]


class FaultPlan:
    """The faults, and the shared state (counters, journal) that makes them cross processes."""

    def __init__(self, state_dir: str | os.PathLike[str], faults: Sequence[Fault] = ()) -> None:
        self.state_dir = str(state_dir)
        self.faults = tuple(faults)
        os.makedirs(self.state_dir, exist_ok=True)

    def __reduce__(self) -> tuple[Any, ...]:
        return (FaultPlan, (self.state_dir, self.faults))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.state_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _bump(self, index: int) -> int:
        path = os.path.join(self.state_dir, f"fault-{index}.count")
        try:
            with open(path) as f:
                count = int(f.read() or 0) + 1
        except FileNotFoundError:
            count = 1
        with open(path, "w") as f:
            f.write(str(count))
        return count

    def check(self, op: str, path: str) -> Fault | None:
        """Count this call against every matching fault; journal it; return the fault that
        fires (the first one, in plan order), if any."""
        hit: tuple[int, Fault] | None = None
        with self._locked():
            for index, fault in enumerate(self.faults):
                if fault.matches(op, path) and fault.fires(self._bump(index)) and hit is None:
                    hit = (index, fault)
            with open(os.path.join(self.state_dir, "journal"), "a") as journal:
                mark = "-" if hit is None else str(hit[0])
                journal.write(f"{os.getpid()}\t{op}\t{path}\t{mark}\n")
        if hit is None:
            return None
        fault = hit[1]
        if fault.delay_secs:
            time.sleep(fault.delay_secs)
        return fault

    def journal(self, op: str | None = None) -> list[Call]:
        """Every call seen so far, in order (optionally only those of ``op``)."""
        try:
            lines = Path(self.state_dir, "journal").read_text().splitlines()
        except FileNotFoundError:
            return []
        calls = []
        for line in lines:
            pid, call_op, path, mark = line.split("\t")
            if op is None or call_op == op:
                calls.append(Call(int(pid), call_op, path, None if mark == "-" else int(mark)))
        return calls

    def hits(self, index: int) -> int:
        """How many calls fault ``index`` has hit."""
        return sum(1 for call in self.journal() if call.fault == index)


class _TornWriter:
    """A file object that passes ``limit`` bytes to ``stream``, then closes it and raises (at
    the latest on close)."""

    def __init__(self, stream: pa.NativeFile, limit: int, error: BaseException) -> None:
        self._stream = stream
        self._left = limit
        self._error = error
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) <= self._left:
            self._left -= len(view)
            self._stream.write(view)
            return len(view)
        self._stream.write(view[: self._left])
        self._left = 0
        self._stream.close()  # the partial file lands, as after a crash mid-write
        self.closed = True
        raise self._error

    def flush(self) -> None:
        if not self.closed:
            self._stream.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stream.close()
            raise self._error


class FaultyHandler(pafs.FileSystemHandler):
    """Delegates every call to ``fs`` after asking ``plan`` whether to fail or delay it."""

    def __init__(self, fs: pafs.FileSystem, plan: FaultPlan) -> None:
        self.fs = fs
        self.plan = plan

    def __reduce__(self) -> tuple[Any, ...]:
        return (FaultyHandler, (self.fs, self.plan))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FaultyHandler)
            and self.fs.equals(other.fs)
            and self.plan.state_dir == other.plan.state_dir
        )

    def __hash__(self) -> int:
        return hash((type(self), self.plan.state_dir))

    def _gate(self, op: str, path: str) -> Fault | None:
        fault = self.plan.check(op, path)
        if fault is not None and fault.error is not None and fault.after_bytes is None:
            raise fault.error
        return fault

    def get_type_name(self) -> str:
        return f"faulty+{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        for path in paths:
            self._gate("stat", path)
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        self._gate("list", selector.base_dir)
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._gate("mkdir", path)
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._gate("delete_dir", path)
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._gate("delete_dir", path)
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self._gate("delete_dir", "/")
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def delete_file(self, path: str) -> None:
        self._gate("delete", path)
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._gate("move", dest)
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._gate("copy", dest)
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        self._gate("read", path)
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        self._gate("read", path)
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self._open_writer(path, self.fs.open_output_stream, metadata)

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self._open_writer(path, self.fs.open_append_stream, metadata)

    def _open_writer(self, path: str, open_fn: Any, metadata: Any) -> pa.NativeFile:
        fault = self._gate("write", path)
        stream = open_fn(path, metadata=metadata)
        if fault is not None and fault.after_bytes is not None:
            assert fault.error is not None
            return pa.PythonFile(_TornWriter(stream, fault.after_bytes, fault.error), mode="w")
        return stream


def faulty(fs: pafs.FileSystem, plan: FaultPlan) -> pafs.PyFileSystem:
    """``fs`` behind ``plan``'s faults; the same paths, the same files."""
    return pafs.PyFileSystem(FaultyHandler(fs, plan))

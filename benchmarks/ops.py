"""What the benchmark times: the machine's limits, the peers, and ray_ckpt.

Each :class:`Op` times one thing per call of :meth:`Op.run` and returns ``{row: seconds}`` (an
async save returns two rows from one run: its stall and its total). Saves write into a fresh
directory and delete it afterwards, untimed. Loads read an *artifact* written once, untimed,
before their first run (several loads share one: every ray_ckpt load reads the same checkpoint).

Rows carry a *phase*, which picks the limit a row is compared with:

=========  ==========================================  =============================
phase      rows                                        limit
=========  ==========================================  =============================
``save``   every save, and every async save's total    raw write+fsync, 64 MiB files
``stall``  how long an async save blocks the caller    memcpy
``load``   every load                                  raw read
=========  ==========================================  =============================
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .state_dicts import copy_into, flat_tensors, tensors

MiB = 1 << 20
RAW_FILE_BYTES = 64 * MiB  # ray_ckpt's default bucket_size_bytes: one data file per bucket
_IOV_MAX = 1024

MEMCPY = "memcpy: copy_ into preallocated"
RAW_WRITE = "raw write+fsync, 64 MiB files"
RAW_WRITE_ONE = "raw write+fsync, one file"
RAW_WRITE_THREADS = "raw write+fsync, 64 MiB files, 4 at a time"
RAW_READ = "raw read into preallocated"
# bounds of particular phases, shown to say what bounds a target that is not met
OBJECT_STORE_PUT = "ray.put of the bytes, 256 MiB objects"
RAW_READ_CRC = "raw read + crc32c, 2 threads"

LIMIT_OF_PHASE = {"save": RAW_WRITE, "stall": MEMCPY, "load": RAW_READ}


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    name: str
    group: str  # limit | peer | ray_ckpt
    phase: str  # copy | write | read (limits); save | stall | load
    partial: bool = False  # part of a peer's path, not a whole save: not a "best peer"

    @property
    def limit(self) -> str | None:
        return LIMIT_OF_PHASE.get(self.phase)


@dataclass
class Context:
    """What every op of one state dict shares."""

    state: Any  # the state dict being saved
    target: Any  # preallocated tensors of the same structure, for in-place loads
    scratch: str  # a directory of its own for this state dict, deleted afterwards
    nbytes: int
    checkpointers: dict[str, Any]  # ray_ckpt checkpointers by name (see bench.py)
    artifacts: dict[str, str] = field(default_factory=dict)  # what loads read, by name
    _counter: int = 0

    def fresh_path(self, stem: str) -> str:
        self._counter += 1
        return os.path.join(self.scratch, f"{stem}-{self._counter}")


class Op:
    """Times one way of doing something; see the module docstring."""

    rows: tuple[Row, ...] = ()
    artifact: str | None = None  # loads: the name of what they read

    def run(self, ctx: Context) -> dict[str, float]:
        raise NotImplementedError


# --- helpers ----------------------------------------------------------------------------------


def byte_view(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file under ``root`` and every directory, deepest first."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def drop_from_page_cache(root: str) -> None:
    """Ask the kernel to drop the (clean, fsynced) pages of every file under ``root``."""
    paths = [root] if os.path.isfile(root) else [
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files
    ]
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _chunks(views: list[np.ndarray], limit: int) -> list[list[np.ndarray]]:
    """Group byte views into files of at most ``limit`` bytes, splitting large ones."""
    files: list[list[np.ndarray]] = []
    current: list[np.ndarray] = []
    used = 0
    for view in views:
        start = 0
        while start < len(view):
            take = min(len(view) - start, limit - used)
            current.append(view[start : start + take])
            used += take
            start += take
            if used == limit:
                files.append(current)
                current, used = [], 0
    if current:
        files.append(current)
    return files


def _write_all(fd: int, views: list[np.ndarray]) -> None:
    pending = [v.data for v in views if len(v)]
    while pending:
        batch = pending[:_IOV_MAX]
        written = os.writev(fd, batch)
        consumed = 0
        while consumed < len(batch) and written >= len(batch[consumed]):
            written -= len(batch[consumed])
            consumed += 1
        pending = pending[consumed:]
        if written:
            pending[0] = pending[0][written:]


def _read_all(fd: int, views: list[np.ndarray], offset: int = 0) -> None:
    for view in views:
        done = 0
        mv = view.data
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n == 0:
                raise EOFError("raw file is short")
            done += n
        offset += len(mv)


# --- limits -----------------------------------------------------------------------------------


class Memcpy(Op):
    rows = (Row(MEMCPY, "limit", "copy"),)

    def run(self, ctx: Context) -> dict[str, float]:
        pairs = [
            (d, s) for (_, d), (_, s) in zip(tensors(ctx.target), tensors(ctx.state), strict=True)
        ]

        def copy() -> None:
            for dst, src in pairs:
                dst.copy_(src)

        return {MEMCPY: timed(copy)}


class RawWrite(Op):
    """The bytes of every tensor, written with ``writev`` straight from the tensors' own memory
    and fsynced: one file per 64 MiB (as ray_ckpt lays them out) or one big file; one file at
    a time (the limit), or 4 files at a time (what the disk gives to concurrent writers, as
    ray_ckpt's writer has ``io_threads=4``)."""

    def __init__(self, one_file: bool = False, threads: int = 1) -> None:
        self.one_file = one_file
        self.threads = threads
        name = RAW_WRITE_ONE if one_file else RAW_WRITE if threads == 1 else RAW_WRITE_THREADS
        self.rows = (Row(name, "limit", "write"),)

    def run(self, ctx: Context) -> dict[str, float]:
        views = [byte_view(t) for _, t in tensors(ctx.state)]
        limit = ctx.nbytes + 1 if self.one_file else RAW_FILE_BYTES
        files = _chunks(views, limit)
        root = ctx.fresh_path("raw-write")
        os.makedirs(root)

        def write_one(i: int) -> None:
            fd = os.open(os.path.join(root, f"{i:05d}.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                _write_all(fd, files[i])
                os.fsync(fd)
            finally:
                os.close(fd)

        def write() -> None:
            if self.threads == 1:
                for i in range(len(files)):
                    write_one(i)
            else:
                with concurrent.futures.ThreadPoolExecutor(self.threads) as pool:
                    list(pool.map(write_one, range(len(files))))
            fsync_path(root)

        secs = timed(write)
        remove(root)
        return {self.rows[0].name: secs}


class RawRead(Op):
    """``preadv`` of the 64 MiB raw files straight into the preallocated tensors: the same
    files, the same page-cache state and the same destination memory as the loads."""

    rows = (Row(RAW_READ, "limit", "read"),)
    artifact = "raw"

    def run(self, ctx: Context) -> dict[str, float]:
        root = ctx.artifacts["raw"]
        files = _chunks([byte_view(t) for _, t in tensors(ctx.target)], RAW_FILE_BYTES)

        def read() -> None:
            for i, chunk in enumerate(files):
                fd = os.open(os.path.join(root, f"{i:05d}.bin"), os.O_RDONLY)
                try:
                    _read_all(fd, chunk)
                finally:
                    os.close(fd)

        return {RAW_READ: timed(read)}


class ObjectStorePut(Op):
    """``ray.put`` of the state's bytes as numpy byte views, one object per 256 MiB made of
    64 MiB buckets of pieces under 1 MiB, ``put_threads`` objects at once (what an async
    save's stager puts, without planning or packing): the floor of an async save's stall,
    which must copy every byte into Ray's object store before the caller may go on."""

    rows = (Row(OBJECT_STORE_PUT, "limit", "copy"),)

    def run(self, ctx: Context) -> dict[str, float]:
        import ray
        from ray_ckpt.config import CheckpointStagerConfig
        from ray_ckpt.save.pieces import pieces
        from ray_ckpt.save.pipeline import ASYNC_PUT_BYTES

        files = _chunks([byte_view(t) for _, t in tensors(ctx.state)], RAW_FILE_BYTES)
        files = [[pieces(view) for view in file] for file in files]
        per_put = ASYNC_PUT_BYTES // RAW_FILE_BYTES
        groups = [files[i : i + per_put] for i in range(0, len(files), per_put)]
        threads = CheckpointStagerConfig().put_threads
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            refs = list(pool.map(ray.put, groups))
            secs = time.perf_counter() - start
        refs.clear()  # frees the objects
        return {OBJECT_STORE_PUT: secs}


class RawReadVerified(Op):
    """The raw read, with a CRC32C of every 1 MiB slice as it lands (as ray_ckpt's reader
    checks), on two threads: the bound of any load that verifies every byte on this machine,
    one copy out of the page cache plus one checksum pass over the same bytes."""

    rows = (Row(RAW_READ_CRC, "limit", "read"),)
    artifact = "raw"

    def run(self, ctx: Context) -> dict[str, float]:
        from ray_ckpt._checksum import crc32c

        root = ctx.artifacts["raw"]
        files = _chunks([byte_view(t) for _, t in tensors(ctx.target)], RAW_FILE_BYTES)

        def read_one(i: int) -> None:
            fd = os.open(os.path.join(root, f"{i:05d}.bin"), os.O_RDONLY)
            try:
                offset = 0
                for view in files[i]:
                    for at in range(0, len(view), MiB):
                        piece = view[at : at + MiB]
                        _read_all(fd, [piece], offset + at)
                        crc32c(piece)
                    offset += len(view)
            finally:
                os.close(fd)

        def read() -> None:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                list(pool.map(read_one, range(len(files))))

        return {RAW_READ_CRC: timed(read)}


def make_raw_artifact(ctx: Context) -> str:
    root = ctx.fresh_path("raw")
    os.makedirs(root)
    views = [byte_view(t) for _, t in tensors(ctx.state)]
    for i, chunk in enumerate(_chunks(views, RAW_FILE_BYTES)):
        fd = os.open(os.path.join(root, f"{i:05d}.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    return root


# --- peers: torch.save / torch.load -----------------------------------------------------------

TORCH_SAVE = "torch.save +fsync"
TORCH_LOAD = "torch.load(mmap) + copy_ in place"


class TorchSave(Op):
    rows = (Row(TORCH_SAVE, "peer", "save"),)

    def run(self, ctx: Context) -> dict[str, float]:
        path = ctx.fresh_path("torch") + ".pt"

        def save() -> None:
            torch.save(ctx.state, path)
            fsync_path(path)

        secs = timed(save)
        remove(path)
        return {TORCH_SAVE: secs}


class TorchLoad(Op):
    rows = (Row(TORCH_LOAD, "peer", "load"),)
    artifact = "torch"

    def run(self, ctx: Context) -> dict[str, float]:
        path = ctx.artifacts["torch"]

        def load() -> None:
            loaded = torch.load(path, mmap=True, weights_only=True)
            copy_into(ctx.target, loaded)

        return {TORCH_LOAD: timed(load)}


def make_torch_artifact(ctx: Context) -> str:
    path = ctx.fresh_path("torch") + ".pt"
    torch.save(ctx.state, path)
    fsync_path(path)
    return path


# --- peers: safetensors -----------------------------------------------------------------------

ST_SAVE = "safetensors save +fsync"
ST_LOAD = "safetensors load + copy_ in place"


class SafetensorsSave(Op):
    rows = (Row(ST_SAVE, "peer", "save"),)

    def run(self, ctx: Context) -> dict[str, float]:
        from safetensors.torch import save_file

        path = ctx.fresh_path("st") + ".safetensors"
        flat = flat_tensors(ctx.state)  # tensors only: safetensors stores no other values

        def save() -> None:
            save_file(flat, path)
            fsync_path(path)

        secs = timed(save)
        remove(path)
        return {ST_SAVE: secs}


class SafetensorsLoad(Op):
    """``safe_open`` + ``get_tensor`` per key, copied into the preallocated tensors (what
    ``safetensors.torch.load_model`` does, one tensor at a time instead of all at once)."""

    rows = (Row(ST_LOAD, "peer", "load"),)
    artifact = "safetensors"

    def run(self, ctx: Context) -> dict[str, float]:
        from safetensors import safe_open

        path = ctx.artifacts["safetensors"]
        targets = list(tensors(ctx.target))

        def load() -> None:
            with safe_open(path, framework="pt") as f:
                for key, tensor in targets:
                    tensor.copy_(f.get_tensor(key))

        return {ST_LOAD: timed(load)}


def make_safetensors_artifact(ctx: Context) -> str:
    from safetensors.torch import save_file

    path = ctx.fresh_path("st") + ".safetensors"
    save_file(flat_tensors(ctx.state), path)
    fsync_path(path)
    return path


# --- peers: PyTorch DCP -----------------------------------------------------------------------

DCP_SAVE = "DCP save (sync_files)"
DCP_LOAD = "DCP load in place"
DCP_ASYNC_STALL = "DCP async_save stall"
DCP_ASYNC_TOTAL = "DCP async_save total"


class DcpSave(Op):
    """``torch.distributed.checkpoint.save`` with ``FileSystemWriter(sync_files=True)``, one
    process and no process group (DCP then runs as ``no_dist``, with a warning)."""

    rows = (Row(DCP_SAVE, "peer", "save"),)

    def run(self, ctx: Context) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp

        path = ctx.fresh_path("dcp")

        def save() -> None:
            with quiet():
                dcp.save(ctx.state, storage_writer=dcp.FileSystemWriter(path, sync_files=True))

        secs = timed(save)
        remove(path)
        return {DCP_SAVE: secs}


class DcpAsyncSave(Op):
    """``async_save(..., no_dist=True)`` (without a process group it must be told): the stall
    is its return, which includes DCP's staging copy; the total is its future's result."""

    rows = (Row(DCP_ASYNC_STALL, "peer", "stall"), Row(DCP_ASYNC_TOTAL, "peer", "save"))

    def run(self, ctx: Context) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp

        path = ctx.fresh_path("dcp-async")
        with quiet():
            start = time.perf_counter()
            response = dcp.async_save(
                ctx.state,
                storage_writer=dcp.FileSystemWriter(path, sync_files=True),
                no_dist=True,
            )
            # a Future; an AsyncSaveResponse only with a stager that stages asynchronously
            future: Any = getattr(response, "upload_completion", response)
            stall = time.perf_counter() - start
            future.result()
            total = time.perf_counter() - start
        remove(path)
        return {DCP_ASYNC_STALL: stall, DCP_ASYNC_TOTAL: total}


class DcpLoad(Op):
    rows = (Row(DCP_LOAD, "peer", "load"),)
    artifact = "dcp"

    def run(self, ctx: Context) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp

        path = ctx.artifacts["dcp"]

        def load() -> None:
            with quiet():
                dcp.load(ctx.target, storage_reader=dcp.FileSystemReader(path))

        return {DCP_LOAD: timed(load)}


def make_dcp_artifact(ctx: Context) -> str:
    import torch.distributed.checkpoint as dcp

    path = ctx.fresh_path("dcp")
    with quiet():
        dcp.save(ctx.state, storage_writer=dcp.FileSystemWriter(path, sync_files=True))
    return path


# --- peers: Ray Train -------------------------------------------------------------------------

RT_SAVE = "Ray Train: torch.save dir + persist +fsync"
RT_PERSIST = "Ray Train: persist copy only +fsync"
RT_LOAD = "Ray Train: to_directory + torch.load in place"


def _ray_train_copy(source: str, destination: str) -> None:
    """Copy a local checkpoint directory into the storage path as Ray Train persists one
    (``StorageContext.persist_current_checkpoint``: ``create_dir``, then
    ``pyarrow.fs.copy_files`` with 64 MiB chunks)."""
    import pyarrow.fs as pafs

    copy_files: Callable[..., Any]
    try:
        from ray.train.v2._internal.execution.storage import _pyarrow_fs_copy_files

        copy_files = _pyarrow_fs_copy_files
    except ImportError:  # older Ray: the same call, written out

        def copy_files(src: str, dst: str, **kwargs: Any) -> None:
            kwargs.setdefault("chunk_size", 64 * MiB)
            pafs.copy_files(src, dst, **kwargs)

    fs = pafs.LocalFileSystem()
    fs.create_dir(destination)
    copy_files(source, destination, source_filesystem=fs, destination_filesystem=fs)


class RayTrainSave(Op):
    """A Ray Train worker's checkpoint: ``torch.save`` into a local temp directory,
    ``ray.train.Checkpoint.from_directory`` on it, then the persist copy into the run's
    storage path. Ray Train does not fsync; we add an fsync of the persisted files so that the
    row compares with the durable saves. Two rows: the whole path, and the persist copy alone."""

    rows = (
        Row(RT_SAVE, "peer", "save"),
        Row(RT_PERSIST, "peer", "save", partial=True),
    )

    def run(self, ctx: Context) -> dict[str, float]:
        from ray.train import Checkpoint

        local = ctx.fresh_path("raytrain-local")
        storage = ctx.fresh_path("raytrain-storage")
        start = time.perf_counter()
        os.makedirs(local)
        torch.save(ctx.state, os.path.join(local, "model.pt"))
        checkpoint = Checkpoint.from_directory(local)
        copy_start = time.perf_counter()
        _ray_train_copy(checkpoint.path, storage)
        fsync_tree(storage)
        end = time.perf_counter()
        remove(local)
        remove(storage)
        return {RT_SAVE: end - start, RT_PERSIST: end - copy_start}


class RayTrainLoad(Op):
    """``Checkpoint(storage path).to_directory()`` (a copy into a local temp dir, as on a node
    that reads from shared storage), then ``torch.load(mmap)`` and ``copy_`` in place."""

    rows = (Row(RT_LOAD, "peer", "load"),)
    artifact = "raytrain"

    def run(self, ctx: Context) -> dict[str, float]:
        import pyarrow.fs as pafs
        from ray.train import Checkpoint

        storage = ctx.artifacts["raytrain"]
        local = ctx.fresh_path("raytrain-download")

        def load() -> None:
            checkpoint = Checkpoint(path=storage, filesystem=pafs.LocalFileSystem())
            directory = checkpoint.to_directory(local)
            loaded = torch.load(os.path.join(directory, "model.pt"), mmap=True, weights_only=True)
            copy_into(ctx.target, loaded)

        secs = timed(load)
        remove(local)
        return {RT_LOAD: secs}


def make_raytrain_artifact(ctx: Context) -> str:
    local = ctx.fresh_path("raytrain-local")
    os.makedirs(local)
    torch.save(ctx.state, os.path.join(local, "model.pt"))
    storage = ctx.fresh_path("raytrain-storage")
    _ray_train_copy(local, storage)
    fsync_tree(storage)
    remove(local)
    return storage


# --- ray_ckpt ---------------------------------------------------------------------------------


def _crc(on: bool) -> str:
    return "crc on" if on else "crc off"


def rc_save(on: bool) -> str:
    return f"ray_ckpt sync save ({_crc(on)})"


def rc_stall(on: bool) -> str:
    return f"ray_ckpt async stall ({_crc(on)})"


def rc_total(on: bool) -> str:
    return f"ray_ckpt async total ({_crc(on)})"


def rc_load(on: bool) -> str:
    return f"ray_ckpt load full ({_crc(on)})"


def rc_load_into(on: bool) -> str:
    return f"ray_ckpt load in place ({_crc(on)})"


class RayCkptSave(Op):
    def __init__(self, checksum: bool) -> None:
        self.checksum = checksum
        self.rows = (Row(rc_save(checksum), "ray_ckpt", "save"),)

    def run(self, ctx: Context) -> dict[str, float]:
        ckptr = ctx.checkpointers[f"sync-{_crc(self.checksum)}"]
        path = ctx.fresh_path("rc-sync")
        secs = timed(lambda: ckptr.save(path, ctx.state))
        remove(path)
        return {self.rows[0].name: secs}


class RayCkptAsyncSave(Op):
    """``save()`` then ``stage_future.result()`` (the stall), then ``write_future.result()``
    (the total, committed)."""

    def __init__(self, checksum: bool) -> None:
        self.checksum = checksum
        self.rows = (
            Row(rc_stall(checksum), "ray_ckpt", "stall"),
            Row(rc_total(checksum), "ray_ckpt", "save"),
        )

    def run(self, ctx: Context) -> dict[str, float]:
        ckptr = ctx.checkpointers[f"async-{_crc(self.checksum)}"]
        path = ctx.fresh_path("rc-async")
        start = time.perf_counter()
        stage, write = ckptr.save(path, ctx.state)
        stage.result()
        stall = time.perf_counter() - start
        write.result()
        total = time.perf_counter() - start
        remove(path)
        return {rc_stall(self.checksum): stall, rc_total(self.checksum): total}


class RayCkptLoad(Op):
    artifact = "ray_ckpt"

    def __init__(self, checksum: bool, in_place: bool) -> None:
        self.checksum = checksum
        self.in_place = in_place
        name = rc_load_into(checksum) if in_place else rc_load(checksum)
        self.rows = (Row(name, "ray_ckpt", "load"),)

    def run(self, ctx: Context) -> dict[str, float]:
        ckptr = ctx.checkpointers[f"sync-{_crc(self.checksum)}"]
        path = ctx.artifacts["ray_ckpt"]
        if self.in_place:
            secs = timed(lambda: ckptr.load(path, ctx.target))
        else:
            holder: list[Any] = []
            secs = timed(lambda: holder.append(ckptr.load(path)))
            holder.clear()  # freed outside the timed region
        return {self.rows[0].name: secs}


def make_ray_ckpt_artifact(ctx: Context) -> str:
    path = ctx.fresh_path("rc")
    ctx.checkpointers["sync-crc on"].save(path, ctx.state)
    return path


ARTIFACT_MAKERS: dict[str, Callable[[Context], str]] = {
    "raw": make_raw_artifact,
    "torch": make_torch_artifact,
    "safetensors": make_safetensors_artifact,
    "dcp": make_dcp_artifact,
    "raytrain": make_raytrain_artifact,
    "ray_ckpt": make_ray_ckpt_artifact,
}


def all_ops() -> list[Op]:
    """Every op, in the order of the table."""
    return [
        Memcpy(),
        RawWrite(),
        RawWrite(one_file=True),
        RawWrite(threads=4),
        RawRead(),
        ObjectStorePut(),
        RawReadVerified(),
        TorchSave(),
        TorchLoad(),
        SafetensorsSave(),
        SafetensorsLoad(),
        DcpSave(),
        DcpLoad(),
        DcpAsyncSave(),
        RayTrainSave(),
        RayTrainLoad(),
        RayCkptSave(True),
        RayCkptSave(False),
        RayCkptAsyncSave(True),
        RayCkptAsyncSave(False),
        RayCkptLoad(True, in_place=False),
        RayCkptLoad(False, in_place=False),
        RayCkptLoad(True, in_place=True),
        RayCkptLoad(False, in_place=True),
    ]


def all_rows() -> list[Row]:
    return [row for op in all_ops() for row in op.rows]


def scratch_dir(parent: str | None) -> str:
    return tempfile.mkdtemp(prefix="ray_ckpt_bench_", dir=parent)

"""Prototypes of the changes proposed in PROFILE.md, measured against the current code.

    python -m benchmarks.experiments writer  [--size 1g --rounds 5]   # E1
    python -m benchmarks.experiments cold    [--size 1g]              # E2
    python -m benchmarks.experiments reader  [--size 1g --tiny 50000 --rounds 5]  # E3

Nothing in ray_ckpt/ is changed: each prototype plugs in where ray_ckpt allows it (a custom
``checkpoint_writer_init_fn``; a ``CheckpointReader`` subclass) or measures a setting. They
lean on internals of the commit they were written against (``CheckpointReader._run``, the
``BucketLayout`` fields), so they are evidence for a proposal, not code to keep running.

* **E1 writer**: write each bucket in 8 MiB slices; checksum each slice right after writing
  it (it is still in the CPU cache); with ``kick``, also ``sync_file_range(WRITE)`` after each
  slice so the disk starts writing while the rest of the bucket is copied, and ``fsync`` finds
  less to do. Compared with the current writer, both in writer actors of their own (custom
  pools), A/B alternated, async save → total time.
* **E2 cold**: the stall of the first three async saves on a fresh object store: as is; with
  ``RAY_preallocate_plasma_memory=1`` (Ray allocates the store's pages at start); and after
  the driver has put and freed as many bytes as the state once (it faults the pages into its
  own mapping, which a checkpointer could do in the background when it is created).
* **E3 reader**: read in 1 MiB slices and checksum each slice as it lands (cache-hot); read runs
  of small adjacent extents with one ``preadv`` (their alignment gaps into a scratch buffer);
  hand each of the ``io_threads`` threads one list of work instead of one task per extent.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import ray

from .state_dicts import (
    empty_like_tree,
    nbytes_of,
    parse_size,
    same_tensors,
    tiny_state,
    transformer_state,
)

MiB = 1 << 20
SLICE = 8 * MiB
_SYNC_FILE_RANGE_WRITE = 2


# --- E1: the writer ---------------------------------------------------------------------------


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return libc


def make_sliced_writer(config: Any, kick: bool = False) -> Any:
    """A CheckpointWriter that writes in slices, checksums each slice after writing it and
    (``kick``) starts writeback of each slice at once."""
    from ray_ckpt._checksum import crc32c
    from ray_ckpt.format import HEADER_SIZE, Extent, encode_header
    from ray_ckpt.writer import CheckpointWriter

    libc = _libc() if kick else None

    class SlicedWriter(CheckpointWriter):
        def write_bucket(self, storage: Any, layout: Any, arrays: list[np.ndarray], *, rank: int,
                         checkpoint_id: str, checksum: bool, fsync: bool) -> tuple[Any, ...]:
            if not storage.is_local:
                return super().write_bucket(storage, layout, arrays, rank=rank,
                                            checkpoint_id=checkpoint_id, checksum=checksum,
                                            fsync=fsync)
            views = [a.data.cast("B") for a in arrays]
            offsets = layout.array_offsets
            by_array: dict[int, list[Any]] = {}
            for seg in layout.segments:
                by_array.setdefault(seg.array, []).append(seg)
            crcs: dict[int, int] = {}
            path = storage._join(layout.file)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.pwrite(fd, encode_header(rank, layout.seq, checkpoint_id), 0)
                end = HEADER_SIZE
                for index, (view, offset) in enumerate(zip(views, offsets, strict=True)):
                    segs = sorted(by_array.get(index, []), key=lambda s: s.start)
                    first = 0  # segments before this one ended before the current slice
                    for a in range(0, len(view), SLICE):
                        b = min(a + SLICE, len(view))
                        done = 0
                        while done < b - a:
                            done += os.pwrite(fd, view[a + done : b], offset + a + done)
                        if libc is not None:
                            libc.sync_file_range(fd, offset + a, b - a, _SYNC_FILE_RANGE_WRITE)
                        if not checksum:
                            continue
                        i = first
                        while i < len(segs) and segs[i].start < b:
                            seg = segs[i]
                            lo, hi = max(a, seg.start), min(b, seg.start + seg.length)
                            if lo < hi or seg.length == 0:
                                crcs[id(seg)] = crc32c(view[lo:hi], crcs.get(id(seg), 0))
                            if seg.start + seg.length <= b:
                                first = i + 1 if i == first else first
                            i += 1
                    end = offset + len(view)
                if end < layout.file_nbytes:
                    os.ftruncate(fd, layout.file_nbytes)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            return tuple(
                Extent(item=seg.item, chunk_offset=seg.chunk_offset, file=layout.file,
                       offset=layout.array_offsets[seg.array] + seg.start, length=seg.length,
                       checksum=(crcs.get(id(seg), 0) if checksum else None), rank=rank)
                for seg in layout.segments
            )

    return SlicedWriter(config)


def make_plain_writer(config: Any) -> Any:
    from ray_ckpt.writer import CheckpointWriter

    return CheckpointWriter(config)


def make_kicked_writer(config: Any) -> Any:
    return make_sliced_writer(config, kick=True)


def experiment_writer(args: argparse.Namespace) -> None:
    import ray_ckpt

    state = transformer_state(parse_size(args.size))
    nbytes = nbytes_of(state)
    scratch = tempfile.mkdtemp(prefix="ray_ckpt_exp_")
    variants = {
        "current writer": make_plain_writer,
        "sliced crc": make_sliced_writer,
        "sliced crc + sync_file_range": make_kicked_writer,
    }
    ckptrs = {name: ray_ckpt.make_async_checkpointer(checkpoint_writer_init_fn=fn)
              for name, fn in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for r in range(args.rounds + 1):
            for name, ckptr in ckptrs.items():
                path = os.path.join(scratch, f"{r}-{len(times[name])}-{name[:5]}")
                start = time.perf_counter()
                _, write = ckptr.save(path, state)
                write.result()
                secs = time.perf_counter() - start
                if r == 0:  # warm-up; and the prototype must write a loadable checkpoint
                    assert same_tensors(ray_ckpt.CheckpointReader().read(path)[0], state)
                else:
                    times[name].append(secs)
                shutil.rmtree(path)
    finally:
        for ckptr in ckptrs.values():
            ckptr.close()
        shutil.rmtree(scratch, ignore_errors=True)
    base = statistics.median(times["current writer"])
    print(f"E1 writer: async save total of {nbytes / 2**30:.2f} GiB, median of {args.rounds}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:<32} {med:.3f}s  {nbytes / med / 1e9:.2f} GB/s  "
              f"{base / med:.2f}× current  (runs: {', '.join(f'{v:.2f}' for v in values)})")


# --- E2: the first stall ----------------------------------------------------------------------


def prefault_object_store(nbytes: int, piece: int = 64 * MiB) -> float:
    """Touch ``nbytes`` of this node's object store from this process, then free it: the
    pages stay mapped, so the next puts run at warm speed. Returns the seconds it took."""
    start = time.perf_counter()
    zeros = np.zeros(piece, dtype=np.uint8)
    refs = [ray.put([zeros]) for _ in range(max(1, nbytes // piece))]
    del refs
    return time.perf_counter() - start


def _cold_child(size: str, prefault: bool) -> None:
    import ray_ckpt

    ray.init(address="local", num_cpus=2, object_store_memory=parse_size("3g"),
             include_dashboard=False, log_to_driver=False)
    try:
        state = transformer_state(parse_size(size))
        if prefault:
            print(f"PREFAULT {prefault_object_store(nbytes_of(state)):.3f}")
        scratch = tempfile.mkdtemp(prefix="ray_ckpt_exp_")
        with ray_ckpt.make_async_checkpointer() as ckptr:
            stalls = []
            for i in range(3):
                path = os.path.join(scratch, str(i))
                start = time.perf_counter()
                stage, write = ckptr.save(path, state)
                stage.result()
                stalls.append(time.perf_counter() - start)
                write.result()
                shutil.rmtree(path)
        shutil.rmtree(scratch, ignore_errors=True)
        print("STALLS", " ".join(f"{s:.3f}" for s in stalls))
    finally:
        ray.shutdown()


def experiment_cold(args: argparse.Namespace) -> None:
    print(f"E2 cold store: async stall of saves 1, 2, 3 of a {args.size} state on a fresh Ray")
    for env_value, prefault in (("0", False), ("1", False), ("0", True)):
        env = dict(os.environ, RAY_preallocate_plasma_memory=env_value)
        command = [sys.executable, "-m", "benchmarks.experiments", "_cold_child", "--size",
                   args.size] + (["--prefault"] if prefault else [])
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        line = next((x for x in out.splitlines() if x.startswith("STALLS")), "STALLS ?")
        touched = next((x[9:] for x in out.splitlines() if x.startswith("PREFAULT")), None)
        how = (f"prefault from the driver first ({touched}s, off the critical path)" if prefault
               else f"RAY_preallocate_plasma_memory={env_value}")
        print(f"  {how}: stalls {line[7:]} s")


# --- E3: the reader ---------------------------------------------------------------------------

READ_SLICE = 1 * MiB
COALESCE_GAP = 4096


def make_fast_reader(config: Any) -> Any:
    """A CheckpointReader whose ``_execute`` (the step that reads the planned byte ranges)
    reads big ranges in slices checksummed as they land, small adjacent ones with one
    ``preadv``, and gives each thread one list of work."""
    from ray_ckpt._checksum import crc32c
    from ray_ckpt.errors import CorruptCheckpointError
    from ray_ckpt.format import HEADER_SIZE, check_header
    from ray_ckpt.reader import CheckpointReader

    class FastReader(CheckpointReader):
        def _execute(self, info: Any, jobs: list[Any], stats: Any) -> None:
            verify = self._config.verify_checksums
            tasks = _plan_reads(jobs)
            threads = min(self._config.io_threads, max(1, len(tasks)))
            shares: list[list[Any]] = [[] for _ in range(threads)]
            loads = [0] * threads
            for task in sorted(tasks, key=lambda t: -t[0]):
                i = loads.index(min(loads))
                shares[i].append(task)
                loads[i] += task[0]
            files = sorted({job[0].file for job in jobs})
            fds = {f: os.open(info.storage._join(f), os.O_RDONLY) for f in files}
            try:
                for file, fd in fds.items():
                    raw = bytearray(HEADER_SIZE)
                    os.preadv(fd, [raw], 0)
                    check_header(bytes(raw), file=f"{info.storage.display}/{file}")

                def fill(fd: int, iov: list[memoryview], offset: int) -> None:
                    want = sum(len(b) for b in iov)
                    got = 0
                    while got < want:  # a short read is finished buffer by buffer
                        n = os.preadv(fd, _skip(iov, got), offset + got)
                        if n == 0:
                            raise CorruptCheckpointError("data file truncated")
                        got += n

                def check(extent: Any, value: int, meta: Any) -> None:
                    if value != extent.checksum:
                        raise CorruptCheckpointError(f"checksum mismatch: {meta.key}")

                def run_share(share: list[Any]) -> None:
                    for _, kind, payload in share:
                        if kind == "big":
                            extent, start, length, dest, meta = payload
                            whole = verify and start == 0 and length == extent.length
                            whole = whole and extent.checksum is not None
                            value = 0
                            for a in range(0, length, READ_SLICE):
                                piece = dest[a : a + READ_SLICE]
                                fill(fds[extent.file], [piece], extent.offset + start + a)
                                if whole:
                                    value = crc32c(piece, value)
                            if whole:
                                check(extent, value, meta)
                        else:
                            file, offset, iov, members = payload
                            fill(fds[file], iov, offset)
                            for extent, start, length, dest, meta in members:
                                if (verify and start == 0 and length == extent.length
                                        and extent.checksum is not None):
                                    check(extent, crc32c(dest), meta)

                if threads == 1:
                    run_share(shares[0])
                else:
                    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                        for future in [pool.submit(run_share, s) for s in shares]:
                            future.result()
                stats.nbytes_read += sum(job[2] for job in jobs)
            finally:
                for fd in fds.values():
                    os.close(fd)

    return FastReader(config=config)


def _skip(iov: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for b in iov:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


def _plan_reads(jobs: list[Any]) -> list[tuple[int, str, Any]]:
    """(bytes, kind, payload): big ranges alone; runs of small adjacent ones in one preadv.
    A job is ``(extent, start, length, dest, meta)``: ``length`` bytes from ``extent.offset +
    start`` of ``extent.file`` into ``dest``."""
    tasks: list[tuple[int, str, Any]] = []
    by_file: dict[str, list[Any]] = {}
    for job in jobs:
        if job[2] >= READ_SLICE:
            tasks.append((job[2], "big", job))
        elif job[2]:
            by_file.setdefault(job[0].file, []).append(job)
    for file, small in by_file.items():
        small.sort(key=lambda j: j[0].offset + j[1])
        run: list[Any] = []
        iov: list[memoryview] = []
        start = end = 0
        for job in small:
            offset = job[0].offset + job[1]
            gap = offset - end
            full = len(iov) >= 1000 or end - start > 16 * MiB
            if run and (gap < 0 or gap > COALESCE_GAP or full):
                tasks.append((end - start, "run", (file, start, iov, run)))
                run, iov = [], []
            if not run:
                start = end = offset
            elif gap:
                iov.append(memoryview(bytearray(gap)))
            iov.append(job[3])
            run.append(job)
            end = offset + job[2]
        if run:
            tasks.append((end - start, "run", (file, start, iov, run)))
    return tasks


def experiment_reader(args: argparse.Namespace) -> None:
    import ray_ckpt

    cases = [("transformer " + args.size, transformer_state(parse_size(args.size)))]
    if args.tiny:
        cases.append((f"{args.tiny} tiny tensors", tiny_state(args.tiny)))
    scratch = tempfile.mkdtemp(prefix="ray_ckpt_exp_")
    try:
        with ray_ckpt.make_sync_checkpointer() as ckptr:
            for name, state in cases:
                path = os.path.join(scratch, name.replace(" ", "-"))
                ckptr.save(path, state)
                target = empty_like_tree(state)
                fast = make_fast_reader(ray_ckpt.CheckpointReaderConfig())
                readers = {
                    "current reader": ray_ckpt.CheckpointReader(),
                    "fused crc + coalesced reads": fast,
                }
                for reader in readers.values():  # warm-up, and check every byte
                    for _, t in _tensors(target):
                        t.zero_()
                    reader.read(path, target)
                    assert same_tensors(target, state)
                times: dict[str, list[float]] = {k: [] for k in readers}
                for _ in range(args.rounds):
                    for key, reader in readers.items():
                        start = time.perf_counter()
                        reader.read(path, target)
                        times[key].append(time.perf_counter() - start)
                base = statistics.median(times["current reader"])
                nbytes = nbytes_of(state)
                print(f"E3 reader: in-place load of {name}, checksums verified, median of "
                      f"{args.rounds} (page cache)")
                for key, values in times.items():
                    med = statistics.median(values)
                    print(f"  {key:<32} {med:.3f}s  {nbytes / med / 1e9:.2f} GB/s  "
                          f"{base / med:.2f}× current")
                shutil.rmtree(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _tensors(tree: Any) -> Any:
    from .state_dicts import tensors

    return tensors(tree)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments")
    p.add_argument("experiment", choices=["writer", "cold", "reader", "_cold_child"])
    p.add_argument("--size", default="1g")
    p.add_argument("--tiny", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefault", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.experiment == "_cold_child":
        _cold_child(args.size, args.prefault)
        return 0
    if args.experiment == "cold":
        experiment_cold(args)
        return 0
    path = os.environ.get("PYTHONPATH", "")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (root, path) if x)
    ray.init(address="local", num_cpus=2, object_store_memory=parse_size("3g"),
             include_dashboard=False, log_to_driver=False)
    try:
        {"writer": experiment_writer, "reader": experiment_reader}[args.experiment](args)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

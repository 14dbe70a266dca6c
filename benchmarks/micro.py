"""Micro-benchmarks of the steps of ray_ckpt's data path, one at a time, on 1 GiB by default.

    python -m benchmarks.micro [--gib 1] [--bucket-mib 64]

Each line is a median of ``--runs`` (after one warm-up, except the lines that say "cold"):

* ``copy_``: torch copy of every bucket-sized tensor into preallocated tensors (the memcpy
  limit of the stall);
* ``ray.put``: of one list per bucket, holding a numpy byte view (what the stager puts) or a
  torch tensor; cold (the store's first use of those pages) and warm; sequential and from two
  threads; and ``ray.get`` of the result (zero-copy or not);
* ``crc32c``: of every bucket, whole, and in 4 MiB slices while the slice is in cache;
* ``write+fsync`` / ``pread``: one 64 MiB file per bucket.

It starts a local Ray of its own (``address="local"``); run it in the benchmark's network
namespace (see README.md). ``RAY_preallocate_plasma_memory=1`` in the environment makes Ray
touch its whole store at start, which removes the cold case.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import functools
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

MiB = 1 << 20
WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def median_gbps(nbytes: int, fn: Callable[[], Any], runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def _fused(read_one: Callable[..., None], slice_bytes: int, i: int) -> None:
    read_one(i, True, slice_bytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.micro",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--bucket-mib", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--object-store", type=float, default=3.0, help="GiB")
    args = p.parse_args(argv)

    bucket = args.bucket_mib * MiB
    n = max(1, int(args.gib * 1024 * MiB) // bucket)
    nbytes = n * bucket
    src = [torch.empty(bucket // 4).uniform_() for _ in range(n)]
    dst = [torch.zeros_like(t) for t in src]
    views = [t.view(torch.uint8).numpy() for t in src]
    out: list[tuple[str, float]] = []

    def line(name: str, gbps: float) -> None:
        out.append((name, gbps))
        print(f"{name:<58} {gbps:6.2f} GB/s", flush=True)

    print(f"{n} buckets of {args.bucket_mib} MiB = {nbytes / 2**30:.2f} GiB; "
          f"torch threads {torch.get_num_threads()}; "
          f"RAY_preallocate_plasma_memory={os.environ.get('RAY_preallocate_plasma_memory', '0')}")

    def copy() -> None:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    line("copy_ into preallocated tensors", median_gbps(nbytes, copy, args.runs))

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=int(args.object_store * 1024 * MiB))
    try:
        def put(items: list[Any]) -> Callable[[], None]:
            def fn() -> None:
                refs = [ray.put([x]) for x in items]
                del refs

            return fn

        start = time.perf_counter()
        put(views)()
        line("ray.put numpy byte views, cold (first use of the store)",
             nbytes / (time.perf_counter() - start) / 1e9)
        line("ray.put numpy byte views, warm", median_gbps(nbytes, put(views), args.runs))
        line("ray.put torch tensors, warm", median_gbps(nbytes, put(src), args.runs))

        def put_threads(workers: int) -> Callable[[], None]:
            def fn() -> None:
                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    refs = list(pool.map(lambda x: ray.put([x]), views))
                del refs

            return fn

        line("ray.put numpy byte views, warm, 2 threads",
             median_gbps(nbytes, put_threads(2), args.runs))

        refs = [ray.put([v]) for v in views]
        tensor_refs = [ray.put([t]) for t in src]

        def get(rs: list[Any]) -> Callable[[], None]:
            def fn() -> None:
                got = [ray.get(r) for r in rs]
                del got

            return fn

        line("ray.get of numpy puts (zero-copy)", median_gbps(nbytes, get(refs), args.runs))
        line("ray.get of torch puts", median_gbps(nbytes, get(tensor_refs), args.runs))
        del refs, tensor_refs
        gc.collect()
    finally:
        ray.shutdown()

    from crc32c import crc32c

    def crc_whole() -> None:
        for v in views:
            crc32c(v.data)

    def crc_sliced() -> None:
        step = 4 * MiB
        for v in views:
            value = 0
            for i in range(0, len(v), step):
                value = crc32c(v[i : i + step].data, value)

    line("crc32c, whole buckets", median_gbps(nbytes, crc_whole, args.runs))
    line("crc32c, 4 MiB slices", median_gbps(nbytes, crc_sliced, args.runs))

    def crc_two_threads() -> None:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(crc32c, views))

    line("crc32c, whole buckets, 2 threads", median_gbps(nbytes, crc_two_threads, args.runs))

    scratch = tempfile.mkdtemp(prefix="ray_ckpt_micro_")
    try:
        def write() -> None:
            for i, v in enumerate(views):
                fd = os.open(os.path.join(scratch, f"{i}.bin"), WRITE_FLAGS)
                os.write(fd, v.data)
                os.fsync(fd)
                os.close(fd)

        def write_threads(workers: int) -> Callable[[], None]:
            def one(i: int) -> None:
                fd = os.open(os.path.join(scratch, f"{i}.bin"), WRITE_FLAGS)
                os.write(fd, views[i].data)
                os.fsync(fd)
                os.close(fd)

            def fn() -> None:
                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    list(pool.map(one, range(n)))

            return fn

        libc = ctypes.CDLL(None, use_errno=True)
        libc.sync_file_range.argtypes = [
            ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint,
        ]
        kick = 8 * MiB

        def write_kicked_threads(workers: int) -> Callable[[], None]:
            """writev in 8 MiB pieces, each followed by sync_file_range(WRITE): the disk starts
            writing while the rest is copied; fsync at the end waits for less."""

            def one(i: int) -> None:
                fd = os.open(os.path.join(scratch, f"{i}.bin"), WRITE_FLAGS)
                view = views[i].data
                for off in range(0, len(view), kick):
                    os.pwrite(fd, view[off : off + kick], off)
                    libc.sync_file_range(fd, off, kick, 2)  # SYNC_FILE_RANGE_WRITE
                os.fsync(fd)
                os.close(fd)

            def fn() -> None:
                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    list(pool.map(one, range(n)))

            return fn

        line("write+fsync, one file per bucket", median_gbps(nbytes, write, args.runs))
        line("write+fsync, one file per bucket, 4 threads",
             median_gbps(nbytes, write_threads(4), args.runs))
        line("write+fsync, 4 threads, sync_file_range every 8 MiB",
             median_gbps(nbytes, write_kicked_threads(4), args.runs))
        line("write+fsync, 1 thread, sync_file_range every 8 MiB",
             median_gbps(nbytes, write_kicked_threads(1), args.runs))

        def read() -> None:
            for i, d in enumerate(dst):
                fd = os.open(os.path.join(scratch, f"{i}.bin"), os.O_RDONLY)
                os.preadv(fd, [d.view(torch.uint8).numpy().data], 0)
                os.close(fd)

        def read_crc_fused() -> None:
            step = 4 * MiB
            for i, d in enumerate(dst):
                fd = os.open(os.path.join(scratch, f"{i}.bin"), os.O_RDONLY)
                view = d.view(torch.uint8).numpy().data
                value = 0
                for off in range(0, len(view), step):
                    os.preadv(fd, [view[off : off + step]], off)
                    value = crc32c(view[off : off + step], value)
                os.close(fd)

        def read_then_crc() -> None:
            read()
            for d in dst:
                crc32c(d.view(torch.uint8).numpy().data)

        def threaded(fn_one: Callable[[int], None], workers: int) -> Callable[[], None]:
            def fn() -> None:
                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    list(pool.map(fn_one, range(n)))

            return fn

        def read_one(i: int, crc: bool = False, slice_bytes: int = 0) -> None:
            fd = os.open(os.path.join(scratch, f"{i}.bin"), os.O_RDONLY)
            view = dst[i].view(torch.uint8).numpy().data
            step = slice_bytes or len(view)
            value = 0
            for off in range(0, len(view), step):
                os.preadv(fd, [view[off : off + step]], off)
                if crc and slice_bytes:
                    value = crc32c(view[off : off + step], value)
            if crc and not slice_bytes:
                crc32c(view)
            os.close(fd)

        line("pread into preallocated (page cache)", median_gbps(nbytes, read, args.runs))
        line("pread whole file, then crc32c", median_gbps(nbytes, read_then_crc, args.runs))
        line("pread + crc32c fused in 4 MiB slices", median_gbps(nbytes, read_crc_fused, args.runs))
        line("pread, 2 threads", median_gbps(nbytes, threaded(read_one, 2), args.runs))
        line("pread whole file then crc32c, 2 threads",
             median_gbps(nbytes, threaded(lambda i: read_one(i, crc=True), 2), args.runs))
        for kib in (256, 1024, 4096):
            fused = functools.partial(_fused, read_one, kib * 1024)
            line(f"pread + crc32c fused in {kib} KiB slices, 2 threads",
                 median_gbps(nbytes, threaded(fused, 2), args.runs))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _ = np  # numpy views are built through torch
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

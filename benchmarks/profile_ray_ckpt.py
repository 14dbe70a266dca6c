"""Where ray_ckpt's time goes, for a sync save, an async save (stall and total) and an in-place
load: timers around the steps, py-spy on the driver and the writer actor, pyinstrument on the
driver.

    python -m benchmarks.profile_ray_ckpt --size 1g --iterations 5 --out /tmp/ray_ckpt_profile

Run it in the benchmark's network namespace (see README.md). It changes no file of ray_ckpt:
the timers are wrappers installed at run time, in this process and (through the actor's
``__ray_call__``) in the writer actor of this node. For each of ``sync``, ``async``, ``load``:

1. **timers**: ``--iterations`` runs with wrappers counting calls and seconds of each step
   (``ray.put``, ``crc32c``, ``writev``, ``fsync``, ``preadv``, plan, open, commit, waits);
   seconds are summed over threads ("thread-seconds"), so concurrent steps can add up to more
   than the wall time;
2. **py-spy**: ``--iterations`` runs under ``py-spy record --native --idle --threads`` on this
   process and on the writer actor; the samples of the work (the driver's main and staging
   threads; in the writer, samples inside ``write_bucket`` or ``run_save``) are put into
   categories (:data:`CATEGORIES`);
3. **pyinstrument**: ``--iterations`` runs on the driver, its text report kept.

The first save of the run is an async one on a fresh object store: its stall shows the cost of
touching the store's pages for the first time. Everything lands in ``--out``: ``summary.md``,
the raw py-spy stacks (``*-driver.txt``, ``*-writer.txt``: one line per distinct stack, for
flamegraph.pl or speedscope) and the pyinstrument reports.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from .state_dicts import Spec, count_tensors, empty_like_tree, nbytes_of, parse_size

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- timers -----------------------------------------------------------------------------------


class Timers:
    """Calls and seconds per step, summed over threads; installed by wrapping functions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        self.restore: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return
        timers = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                with timers.lock:
                    entry = timers.data[name]
                    entry[0] += 1
                    entry[1] += elapsed

        setattr(owner, attr, timed)
        self.restore.append((owner, attr, original))

    def take(self) -> dict[str, tuple[int, float]]:
        with self.lock:
            out = {k: (int(v[0]), v[1]) for k, v in self.data.items()}
            self.data.clear()
        return out

    def uninstall(self) -> None:
        for owner, attr, original in reversed(self.restore):
            setattr(owner, attr, original)
        self.restore.clear()


DRIVER_TIMERS = Timers()
WRITER_TIMERS: Timers | None = None  # in the writer actor, once installed


def install_driver_timers() -> None:
    import ray_ckpt.checkpointer as checkpointer
    import ray_ckpt.coordinator as coordinator
    import ray_ckpt.reader as reader
    import ray_ckpt.stager as stager

    t = DRIVER_TIMERS
    t.wrap(ray, "put", "ray.put (copy into the object store)")
    t.wrap(ray, "wait", "ray.wait (memory budget)")
    t.wrap(stager.DefaultStager, "plan", "plan (flatten, lay out)")
    t.wrap(stager.DefaultStager, "stage", "stage a bucket (build arrays + ray.put)")
    t.wrap(coordinator, "check_destination", "check destination (list, mkdir)")
    t.wrap(coordinator.CheckpointFuture, "result", "wait on a future")
    t.wrap(checkpointer.CheckpointReader, "open", "open (marker, manifest, sizes)")
    t.wrap(reader, "crc32c", "crc32c (verify)")
    t.wrap(os, "preadv", "preadv")
    t.wrap(reader.CheckpointReader, "_read_items", "read items (preadv + crc32c, threads)")


def install_writer_timers(actor: Any) -> bool:
    """Runs inside the writer actor (``__ray_call__``)."""
    import ray_ckpt.coordinator as coordinator
    import ray_ckpt.writer as writer

    global WRITER_TIMERS
    if WRITER_TIMERS is not None:
        return False
    t = WRITER_TIMERS = Timers()
    t.wrap(actor._writer, "write_bucket", "write a bucket (crc32c + writev + fsync)")
    t.wrap(writer, "crc32c", "crc32c")
    t.wrap(os, "writev", "writev")
    t.wrap(os, "pwritev", "pwritev")
    t.wrap(os, "fsync", "fsync (data files, manifest, marker, dir)")
    t.wrap(ray, "get", "ray.get (bucket zero-copy / gather results)")
    t.wrap(coordinator, "commit_save", "commit_save (gather + manifest + marker)")
    t.wrap(coordinator, "gather_shards", "gather (wait for every write)")
    t.wrap(coordinator, "write_manifest", "write manifest")
    return True


def take_writer_timers(_actor: Any) -> dict[str, tuple[int, float]]:
    return WRITER_TIMERS.take() if WRITER_TIMERS is not None else {}


def actor_pid(_actor: Any) -> int:
    return os.getpid()


# --- py-spy -----------------------------------------------------------------------------------

# (category, substrings of a frame, lower case); per sample, frames are tried leaf first and
# the first category with a matching frame wins, so a memcpy under ray.put counts as a put.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("crc32c", ("crc32c",)),
    ("fsync", ("fsync",)),
    ("write syscalls", ("writev", "__libc_write", "_write_local", "pwrite")),
    ("read syscalls", ("preadv", "__libc_pread", "_read_into")),
    ("memcpy into the object store (ray.put)", ("parallel_memcopy", "memcpy", "memmove")),
    ("ray.put: serialize, create, seal", ("put_object", "put (ray/_private/worker", "serializ",
                                          "pickle", "seal", "create")),
    ("waiting (locks, futures, ray.get, sleep)", (
        "wait", "futex", "epoll", "poll", "select", "acquire", "sem_", "sleep", "recv",
        "pthread_cond", "syscall (libc", "result (concurrent", "_worker (concurrent",
        "get_objects", "getimpl",
    )),
    ("ray: task submission and execution", ("_raylet", "ray/", "ray::", "grpc", "boost")),
    ("python: ray_ckpt", ("ray_ckpt/",)),
    ("python / other", ("",)),
]


def categorize(frames: list[str]) -> str:
    for frame in reversed(frames):
        low = frame.lower()
        for name, needles in CATEGORIES[:-1]:
            if any(n in low for n in needles):
                return name
    return CATEGORIES[-1][0]


def parse_raw(path: str) -> dict[str, list[tuple[list[str], int]]]:
    """py-spy raw output → stacks per thread."""
    threads: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    if not os.path.exists(path):
        return threads
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            frames = stack.split(";")
            threads[frames[0]].append((frames[1:], int(count)))
    return threads


def is_work(thread: str, frames: list[str], who: str) -> bool:
    """Samples of the work: in the driver, the main thread and every thread running ray_ckpt
    code (staging, the reader's pool); in the writer, samples inside ``write_bucket`` or
    ``run_save`` (its 128 pool threads are idle otherwise)."""
    if who == "driver":
        return "MainThread" in thread or any("ray_ckpt/" in f for f in frames)
    return any("write_bucket" in f or "run_save" in f for f in frames)


def categories_of(path: str, who: str) -> tuple[collections.Counter[str], int]:
    threads = parse_raw(path)
    counts: collections.Counter[str] = collections.Counter()
    working = set()
    for thread, stacks in threads.items():
        for frames, n in stacks:
            if is_work(thread, frames, who):
                counts[categorize(frames)] += n
                working.add(thread)
    return counts, len(working)


def start_pyspy(
    pids: dict[str, int], out: str, label: str, rate: int
) -> list[tuple[str, Any, str]]:
    procs = []
    for who, pid in pids.items():
        path = os.path.join(out, f"{label}-{who}.txt")
        proc = subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--native", "--idle", "--threads",
             "--format", "raw", "--rate", str(rate), "--output", path],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        procs.append((who, proc, path))
    time.sleep(1.0)  # let py-spy attach
    return procs


def stop_pyspy(procs: list[tuple[str, Any, str]]) -> None:
    for _, proc, _ in procs:
        proc.send_signal(signal.SIGINT)
    for who, proc, _ in procs:
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode not in (0, -signal.SIGINT, 130) and err:
            print(f"py-spy on {who}: {err.decode(errors='replace')[-500:]}", file=sys.stderr)


# --- the operations ---------------------------------------------------------------------------


class Harness:
    def __init__(self, spec: Spec, scratch: str) -> None:
        import ray_ckpt

        self.state = spec.build()
        self.target = empty_like_tree(self.state)
        self.nbytes = nbytes_of(self.state)
        self.scratch = scratch
        self.sync = ray_ckpt.make_sync_checkpointer()
        self.async_ = ray_ckpt.make_async_checkpointer()
        self.count = 0
        self.first = self.async_save()  # the first save on a fresh object store
        self.loaded_path = self.fresh()
        self.sync.save(self.loaded_path, self.state)

    def fresh(self) -> str:
        self.count += 1
        return os.path.join(self.scratch, f"ckpt-{self.count}")

    def sync_save(self) -> dict[str, float]:
        path = self.fresh()
        start = time.perf_counter()
        self.sync.save(path, self.state)
        secs = time.perf_counter() - start
        shutil.rmtree(path)
        return {"save": secs}

    def async_save(self) -> dict[str, float]:
        path = self.fresh()
        start = time.perf_counter()
        stage, write = self.async_.save(path, self.state)
        stage.result()
        stall = time.perf_counter() - start
        write.result()
        total = time.perf_counter() - start
        shutil.rmtree(path)
        return {"stall": stall, "total": total}

    def load_in_place(self) -> dict[str, float]:
        start = time.perf_counter()
        self.sync.load(self.loaded_path, self.target)
        return {"load": time.perf_counter() - start}

    def writer(self) -> Any:
        return self.sync._pool.local()  # the writer actor of this node (shared by both)

    def close(self) -> None:
        self.sync.close()
        self.async_.close()


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def timer_table(
    title: str, data: dict[str, tuple[int, float]], iterations: int, wall: float
) -> str:
    lines = [f"**{title}** (per iteration; % of the median wall time {wall:.3f}s)", "",
             "| step | calls | thread-seconds | % of wall |", "|---|---:|---:|---:|"]
    for name, (calls, secs) in sorted(data.items(), key=lambda kv: -kv[1][1]):
        per = secs / iterations
        lines.append(f"| {name} | {calls / iterations:.0f} | {per:.3f} | {per / wall * 100:.0f}% |")
    return "\n".join(lines)


def category_table(title: str, counts: collections.Counter[str], threads: int) -> str:
    total = sum(counts.values()) or 1
    lines = [f"**{title}** ({threads} working threads, {total} samples)", "",
             "| category | share of samples |", "|---|---:|"]
    for name, _ in CATEGORIES:
        if counts.get(name):
            lines.append(f"| {name} | {counts[name] / total * 100:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_ray_ckpt")
    p.add_argument("--size", default="1g",
                   help="bytes of the state dict (--kind tiny: the count of tensors)")
    p.add_argument("--kind", default="transformer", choices=["transformer", "tiny", "optimizer"])
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--object-store", default="3g")
    p.add_argument("--what", default="sync,async,load")
    p.add_argument("--no-pyspy", action="store_true")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "ray_ckpt_profile"))
    args = p.parse_args(argv)
    # the functions run in the writer actor must be importable by name, not pickled by value
    # from __main__ (they keep state in their module between calls)
    from benchmarks import profile_ray_ckpt as this

    os.makedirs(args.out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="ray_ckpt_profile_")
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (REPO_ROOT, path) if x)
    ray.init(address="local", num_cpus=2, object_store_memory=parse_size(args.object_store),
             include_dashboard=False, log_to_driver=False)
    report: list[str] = []
    try:
        amount = int(args.size) if args.kind == "tiny" else parse_size(args.size)
        h = Harness(Spec(args.kind, args.kind, amount), scratch)
        writer = h.writer()
        writer_pid = ray.get(writer.__ray_call__.remote(this.actor_pid))
        pids = {"driver": os.getpid(), "writer": writer_pid}
        report.append(
            f"state: {args.kind}, {h.nbytes / 2**20:.0f} MiB in {count_tensors(h.state)} tensors, "
            f"{args.iterations} iterations; "
            f"first async save on a fresh object store: stall {h.first['stall']:.3f}s, "
            f"total {h.first['total']:.3f}s"
        )
        ops: dict[str, Callable[[], dict[str, float]]] = {
            "sync": h.sync_save, "async": h.async_save, "load": h.load_in_place,
        }
        for what in args.what.split(","):
            op = ops[what]
            op()  # warm-up
            # 1. timers
            install_driver_timers()
            ray.get(writer.__ray_call__.remote(this.install_writer_timers))
            ray.get(writer.__ray_call__.remote(this.take_writer_timers))
            DRIVER_TIMERS.take()
            timings = [op() for _ in range(args.iterations)]
            driver_data = DRIVER_TIMERS.take()
            writer_data = ray.get(writer.__ray_call__.remote(this.take_writer_timers))
            DRIVER_TIMERS.uninstall()
            medians = {k: _median([t[k] for t in timings]) for k in timings[0]}
            wall = max(medians.values())
            report.append(f"\n## {what}\n\nmedian wall: " + ", ".join(
                f"{k} {v:.3f}s ({h.nbytes / v / 1e9:.2f} GB/s)" for k, v in medians.items()))
            report.append("\n" + timer_table(f"{what}: driver steps", driver_data,
                                             args.iterations, wall))
            if what != "load":
                report.append("\n" + timer_table(f"{what}: writer actor steps", writer_data,
                                                 args.iterations, wall))
            # 2. py-spy
            if not args.no_pyspy:
                procs = start_pyspy(pids, args.out, what, args.rate)
                for _ in range(args.iterations):
                    op()
                stop_pyspy(procs)
                for who, _, raw in procs:
                    if who == "writer" and what == "load":
                        continue
                    counts, threads = categories_of(raw, who)
                    report.append("\n" + category_table(f"{what}: {who} (py-spy)", counts, threads))
            # 3. pyinstrument
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.001)
            profiler.start()
            for _ in range(args.iterations):
                op()
            profiler.stop()
            with open(os.path.join(args.out, f"{what}-pyinstrument.txt"), "w") as f:
                f.write(profiler.output_text(unicode=True, color=False))
        h.close()
    finally:
        DRIVER_TIMERS.uninstall()
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    text = "\n".join(report) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

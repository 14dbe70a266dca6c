"""The memory tier: save stall, time until replicated, and restores from each place.

    python -m benchmarks.memory_tier --size 256m --runs 3 --saves 8

On a simulated cluster (``ray.cluster_utils.Cluster``: a head and two worker nodes), a trainer
actor on worker node A holds a transformer + Adam state (``benchmarks.state_dicts``):

* memcpy: copying the state into preallocated tensors (the machine's limit);
* memory save: the stall of an async save to ``mem://`` (until the caller may change its
  tensors) and the time until the checkpoint is committed, i.e. held on A and replicated to one
  peer; ``--saves`` saves in a row, each with the bytes of A's object store that came into
  memory during its stall. A fresh store is not in memory: the first saves write into pages
  never touched, and pay a page fault for each (once per page and node, whoever touches it
  first). The table shows the median stall of the saves after the first that found their pages
  in memory (under 5% of the state first touched: the steady state of a training run), of
  those that did not, and every save's;
* restores, in place into preallocated tensors, each checked byte for byte once, the median of
  ``--runs`` loads each (but the first after the loss of A: one load): from A's own holder;
  from cold local disk (the same state saved to a directory, its pages dropped with
  ``posix_fadvise(DONTNEED)`` before every read); from a peer's holder after node A is removed
  (on a node that holds no copy, so every byte crosses between nodes: over a direct connection
  to the peer's holder), then the time until re-replication restores two copies; then, on
  another new node, by a process that has loaded before, with no node loss in progress, from
  the loopback S3 server (moto, the state saved there by A) and from a peer's holder, by turns,
  so that the machine's drifting speed (it is shared) moves both alike;
* the transport alone, by turns with those: the same bytes from a process on the peer's node
  over plain TCP, on as many connections as a load has threads, each MiB checksummed (CRC32C)
  as it lands, as a load does; no request protocol, no manifest, no actor call: what the
  transport alone takes on this machine (a reference, as noisy as the rest: in one of its
  first two runs a warm peer restore's median came in below it);
* Ray Train node loss (``benchmarks.train_recovery``, unless ``--no-train-recovery``): a
  ``TorchTrainer`` of 2 DDP workers on 2 simulated nodes, whose model + AdamW state is the size
  of the state above, loses a node after step 13, once with memory checkpoints every step
  and durable ones every 5 steps, once with durable ones only: the steps lost and the seconds
  until training runs again.

The cluster runs Ray's defaults (no ``_system_config``: ``free_objects_period_milliseconds``
is 1000, as on a cluster started with ``ray start``), not the 10 ms of the local Ray that
ray_ckpt starts itself.

Results: markdown tables on stdout and ``--out``/memory_tier.json (the Ray Train runs under
``train_recovery``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import torch
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray_ckpt.save import prefault

from benchmarks import train_recovery
from benchmarks.state_dicts import optimizer_state, parse_size, tensors

MiB = 1 << 20
_RANGE = "<QQ"  # a transport-floor request: offset, length (a str: the classes pickle by value)
FIRST_TOUCHED_AT_MOST = 0.05  # a save found its pages in memory: it touched this share first


def _on(node: str) -> dict[str, Any]:
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


@ray.remote(num_cpus=0)
class Trainer:
    def __init__(self, nbytes: int) -> None:
        import ray_ckpt

        torch.manual_seed(0)  # the same state on every node, to check a load on another one
        self.state = optimizer_state(nbytes)
        self.target = _zeros_like(self.state)
        self.ckptr = ray_ckpt.make_async_checkpointer()
        self.sync = ray_ckpt.make_sync_checkpointer()

    def nbytes(self) -> int:
        return sum(t.nbytes for _, t in tensors(self.state))

    def memcpy(self) -> float:
        started = time.perf_counter()
        for (_, src), (_, dst) in zip(tensors(self.state), tensors(self.target)):
            dst.copy_(src)
        return time.perf_counter() - started

    def save_memory(self, path: str) -> tuple[float, float, int]:
        """(stall, until committed, bytes of the object store first touched in the stall)"""
        before, _ = prefault.store_in_memory()
        started = time.perf_counter()
        stage, write = self.ckptr.save(path, self.state)
        stage.result()
        stall = time.perf_counter() - started
        after, _ = prefault.store_in_memory()
        write.result()
        return stall, time.perf_counter() - started, after - before

    def save(self, path: str, filesystem: Any = None) -> None:
        import ray_ckpt

        with ray_ckpt.make_sync_checkpointer(filesystem=filesystem) as ckptr:
            ckptr.save(path, self.state)

    def load(self, path: str, filesystem: Any = None, check: bool = False,
             profile: str | None = None) -> float:
        import cProfile
        import pstats

        import ray_ckpt

        for _, t in tensors(self.target):
            t.zero_()
        with ray_ckpt.make_sync_checkpointer(filesystem=filesystem) as ckptr:
            profiler = cProfile.Profile() if profile else None
            started = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            ckptr.load(path, self.target, strict=True)
            took = time.perf_counter() - started
            if profiler is not None and profile is not None:
                profiler.disable()
                with open(profile, "w") as f:
                    pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(40)
        if check:
            for (key, a), (_, b) in zip(tensors(self.state), tensors(self.target)):
                assert torch.equal(a, b), f"{key} differs after loading {path}"
        return took

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def floor(self, address: tuple[str, int], nbytes: int) -> float:
        """Seconds to receive ``nbytes`` from the :class:`FloorSender` at ``address`` over
        plain TCP, one connection per thread of a load, each MiB checksummed as it lands."""
        from ray_ckpt._checksum import crc32c
        from ray_ckpt.config import CheckpointReaderConfig
        from ray_ckpt.storage.memory_stream import _receive_into  # a peer read's receive loop

        if len(getattr(self, "landing", ())) != nbytes:
            self.landing = np.ones(nbytes, dtype=np.uint8)  # in memory, as a load's tensors
        view = memoryview(self.landing)
        streams = CheckpointReaderConfig().io_threads
        part = -(-nbytes // streams)

        def receive(start: int) -> None:
            end = min(nbytes, start + part)
            with socket.create_connection(address) as conn:
                conn.sendall(struct.pack(_RANGE, start, end - start))
                crc = 0
                while start < end:
                    piece = view[start : min(end, start + MiB)]
                    if not _receive_into(conn, piece):
                        raise ConnectionError(f"{address} closed the floor's stream")
                    crc = crc32c(piece, crc)
                    start += len(piece)

        started = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(receive, range(0, nbytes, part)))
        return time.perf_counter() - started


@ray.remote(num_cpus=0)
class FloorSender:
    """The far end of the transport floor: ``nbytes`` in memory (as a holder's are), sent
    over plain TCP to each connection that asks for a range (offset and length, u64 each)."""

    def __init__(self, nbytes: int) -> None:
        self.data = np.ones(nbytes, dtype=np.uint8)
        self.server = socket.create_server((ray.util.get_node_ip_address(), 0))
        threading.Thread(target=self._accept, daemon=True).start()

    def address(self) -> tuple[str, int]:
        host, port = self.server.getsockname()[:2]
        return host, port

    def _accept(self) -> None:
        while True:
            conn, _ = self.server.accept()
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        with conn:
            request = conn.recv(struct.calcsize(_RANGE), socket.MSG_WAITALL)
            offset, length = struct.unpack(_RANGE, request)
            conn.sendall(memoryview(self.data)[offset : offset + length])


def _zeros_like(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, dict):
        return {k: _zeros_like(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_zeros_like(v) for v in tree]
    return tree


def drop_from_page_cache(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@ray.remote(num_cpus=0)
def _drop(root: str) -> None:
    drop_from_page_cache(root)


def _start_s3(log: Path) -> tuple[subprocess.Popen[bytes], pafs.S3FileSystem]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = Path(sys.executable).with_name("moto_server")
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.1)
    fs = pafs.S3FileSystem(access_key="k", secret_key="s", endpoint_override=f"127.0.0.1:{port}",
                           scheme="http", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("bench")
    return proc, fs


def _copies(path: str) -> list[list[str]]:
    from ray_ckpt.storage import memory
    from ray_ckpt.storage.storage import Storage

    storage = Storage.from_path(path)
    cat = memory.catalog()
    names = [n for n in storage.list_files() if n.endswith(".data")]
    return [ray.get(cat.copies.remote(f"{storage.path}/{n}")) for n in names]


def _join(cluster: Cluster, store_bytes: int) -> str:
    """A worker node that joins the cluster now (it holds no memory checkpoint)."""
    node = cluster.add_node(num_cpus=1, object_store_memory=store_bytes)
    cluster.wait_for_nodes()
    return str(node.node_id)


def run(size: int, runs: int, saves: int, work: str) -> dict[str, Any]:
    head_store, worker_store = 4 * size + 512 * MiB, 4 * size + 256 * MiB
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": head_store})
    a = cluster.add_node(num_cpus=1, object_store_memory=worker_store)
    cluster.add_node(num_cpus=1, object_store_memory=worker_store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="bench", log_to_driver=False)
    s3_proc, s3 = _start_s3(Path(work) / "moto.log")
    out: dict[str, Any] = {"size_bytes": size, "runs": runs}
    try:
        trainer = Trainer.options(**_on(a.node_id)).remote(size)
        out["state_bytes"] = ray.get(trainer.nbytes.remote())
        out["memcpy_s"] = statistics.median(ray.get(trainer.memcpy.remote()) for _ in range(runs))
        done = [ray.get(trainer.save_memory.remote(f"mem://bench/step-{i}"))
                for i in range(saves)]
        out["first_save_stall_s"], out["first_save_replicated_s"], _ = done[0]
        out["save_stalls_s"] = [s for s, _, _ in done]  # every save, the first included
        out["first_touched_bytes"] = [n for _, _, n in done]
        touched_at_most = int(out["state_bytes"] * FIRST_TOUCHED_AT_MOST)
        steady = [s for s, _, n in done[1:] if n <= touched_at_most]
        filling = [s for s, _, n in done[1:] if n > touched_at_most]
        out["save_stall_s"] = statistics.median(steady) if steady else None
        out["save_stall_filling_s"] = statistics.median(filling) if filling else None
        out["save_replicated_s"] = statistics.median(t for _, t, _ in done[1:])
        last = f"mem://bench/step-{saves - 1}"
        ray.get(trainer.load.remote(last, None, True))
        out["load_local_holder_s"] = statistics.median(
            ray.get(trainer.load.remote(last)) for _ in range(runs))
        disk = os.path.join(work, "disk", "step")
        ray.get(trainer.save.remote(disk))
        cold = []
        for i in range(runs):
            ray.get(_drop.options(**_on(a.node_id)).remote(disk))
            cold.append(ray.get(trainer.load.remote(disk, None, i == 0)))
        out["load_cold_disk_s"] = statistics.median(cold)
        ray.get(trainer.save.remote("bench/step", s3))  # loaded below, beside the peer reads
        # node A is lost: load on a node that joins now (it holds no copy: every byte crosses
        # from a peer's holder), while re-replication runs
        ray.kill(trainer)
        cluster.remove_node(a)
        while a.node_id in [n["NodeID"] for n in ray.nodes() if n["Alive"]]:
            time.sleep(0.1)
        lost_at = time.perf_counter()
        profile = os.environ.get("BENCH_PROFILE_DIR")
        loader = Trainer.options(**_on(_join(cluster, worker_store))).remote(size)
        out["load_peer_holder_s"] = ray.get(loader.load.remote(
            last, None, True, profile and os.path.join(profile, "peer_first.txt")))
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        while not all(len([n for n in c if n in alive]) >= 2 for c in _copies(last)):
            time.sleep(0.1)
        out["re_replicated_after_s"] = time.perf_counter() - lost_at
        # peer reads with no node loss in progress, on another node that joins now, by a
        # process warmed by one load of each kind, by turns with loads from S3: the machine's
        # speed drifts (other tenants), and the ratio of the two is the target
        again = Trainer.options(**_on(_join(cluster, worker_store))).remote(size)
        ray.get(again.load.remote(f"mem://bench/step-{saves - 2}"))
        ray.get(again.load.remote("bench/step", s3, True))  # warms its S3 client alike
        holder_node = next(n for n in _copies(last)[0] if n in alive)
        sender = FloorSender.options(**_on(holder_node)).remote(out["state_bytes"])
        floor_at = ray.get(sender.address.remote())
        ray.get(again.floor.remote(floor_at, out["state_bytes"]))  # its buffer touched once
        s3_loads, peer_loads, floors = [], [], []
        for i in range(runs):
            s3_loads.append(ray.get(again.load.remote("bench/step", s3)))
            peer_loads.append(ray.get(again.load.remote(
                last, None, i == 0, profile and i == 0 and os.path.join(profile, "peer.txt"))))
            floors.append(ray.get(again.floor.remote(floor_at, out["state_bytes"])))
        ray.kill(sender)
        out["load_s3_s"] = statistics.median(s3_loads)
        out["load_peer_holder_steady_s"] = statistics.median(peer_loads)
        out["transport_floor_s"] = statistics.median(floors)
    except BaseException:
        sys.stderr.write(f"partial results: {json.dumps(out)}\n")
        raise
    finally:
        s3_proc.kill()
        s3_proc.wait()
        ray.shutdown()
        cluster.shutdown()
    return out


def _ratio(secs: float | None, memcpy: float) -> str:
    return "no such save" if secs is None else f"{secs / memcpy:.2f}x memcpy"


def table(r: dict[str, Any]) -> str:
    m = r["memcpy_s"]
    rows = [
        ("memcpy (limit)", r["memcpy_s"], "1.00x memcpy"),
        ("memory save: stall, object store in memory", r["save_stall_s"],
         _ratio(r["save_stall_s"], m) + " (each save after the first, with the MiB of the "
         "store it touched first: " + ", ".join(
             f"{s / m:.2f}x {n / MiB:.0f}"
             for s, n in zip(r["save_stalls_s"][1:], r["first_touched_bytes"][1:])) + ")"),
        ("memory save: stall, object store still filling", r["save_stall_filling_s"],
         _ratio(r["save_stall_filling_s"], m) + " (first touch of its pages)"),
        ("memory save: until held on 2 nodes", r["save_replicated_s"], ""),
        ("first memory save: stall / replicated", r["first_save_stall_s"],
         f"replicated {r['first_save_replicated_s']:.2f} s"),
        ("restore: local holder", r["load_local_holder_s"], ""),
        ("restore: peer holder, fresh process, local node just removed (one load: the first "
         "after the loss, during re-replication)", r["load_peer_holder_s"],
         f"{r['load_s3_s'] / r['load_peer_holder_s']:.1f}x faster than S3, "
         f"{r['load_cold_disk_s'] / r['load_peer_holder_s']:.1f}x than cold disk"),
        ("restore: peer holder, warm process, no loss in progress",
         r["load_peer_holder_steady_s"],
         f"{r['load_s3_s'] / r['load_peer_holder_steady_s']:.1f}x faster than S3, "
         f"{r['load_cold_disk_s'] / r['load_peer_holder_steady_s']:.1f}x than cold disk"),
        ("transport alone: the same bytes from a process on a holder's node, plain TCP, "
         "CRC32C as they land, no protocol (by turns with the two rows above)",
         r["transport_floor_s"],
         f"{r['load_s3_s'] / r['transport_floor_s']:.1f}x faster than S3; a warm peer restore "
         f"takes {r['load_peer_holder_steady_s'] / r['transport_floor_s']:.2f}x it"),
        ("restore: cold local disk", r["load_cold_disk_s"], ""),
        ("restore: loopback S3 (moto)", r["load_s3_s"], ""),
        ("re-replication after node loss", r["re_replicated_after_s"], "background"),
    ]
    lines = [f"state {r['state_bytes'] / MiB:.0f} MiB (transformer + Adam), median of "
             f"{r['runs']} runs of each restore, {len(r['save_stalls_s'])} memory saves", "",
             "| what | seconds | vs |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {'-' if secs is None else f'{secs:.3f}'} | {note} |"
              for name, secs, note in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256m", help="state size (transformer + Adam)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each restore")
    parser.add_argument("--saves", type=int, default=8, help="memory saves in a row (>= 3)")
    parser.add_argument("--train-recovery", action=argparse.BooleanOptionalAction,
                        default=True, help="also the Ray Train node-loss runs (minutes)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="ray_ckpt_memtier_")
    try:
        result = run(size, args.runs, max(3, args.saves), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.train_recovery:  # the same state size; a small batch keeps a step short
        d_model, layers, vocab = train_recovery.model_for(size)
        result["train_recovery"] = train_recovery.run(train_recovery.parser().parse_args([
            "--d-model", str(d_model), "--layers", str(layers), "--vocab", str(vocab),
            "--batch", "2", "--seq", "32", "--store-mib", str(max(768, 3 * size // MiB)),
        ]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory_tier.json"), "w") as f:
        json.dump(result, f, indent=1)
    sys.stdout.write(table(result) + "\n")
    if args.train_recovery:
        sys.stdout.write("\n" + train_recovery.table(result["train_recovery"]["runs"]) + "\n")


if __name__ == "__main__":
    main()

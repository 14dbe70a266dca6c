"""The memory tier: checkpoints held in the Ray object store, replicated across nodes.

A memory checkpoint is a checkpoint directory like any other (the same data files, manifest
and commit marker, byte for byte), on a filesystem whose files live in Ray instead of on a
disk: ``mem://run/step-5``, or any path on :func:`memory_filesystem`. Every part of a save and
a load (stager, writers, commit, multi-rank barrier, reader, DTensor resharding) runs
unchanged; only where the bytes go differs:

* a **data file** is *held*: when a writer closes it, the holder actor of the writer's node
  puts its bytes into the object store itself (bytes must be put by a process that outlives
  the training process: an object lives as long as the process that put it), then pushes them
  to ``replicas`` peer holders, each of which puts its own copy. The writer returns only once
  every copy is held, so the commit (manifest, then marker, last) comes after replication,
  and all of it after the stall;
* the **manifest and marker** (small) live with the catalog actor, one per cluster, on the head
  node; a checkpoint exists once the catalog has its marker;
* a **read** of a data file asks the holder of the reader's node first (zero-copy out of shared
  memory), then the peers' (Ray transfers the object); a file with no live copy fails the load
  as incomplete, never half from one checkpoint and half from another.

Holders are detached actors pinned to their node (``ray_ckpt_holder_<node id>``, namespace
``ray_ckpt``), so a memory checkpoint outlives the process that saved it and a worker restart.
When a node is lost, the catalog's repair thread drops the copies it held and has a surviving
holder push a new copy to another node, until each file has ``1 + replicas`` copies again (or
one on every node there is).

Accounting (the documented rule): before a save, :func:`make_room` asks the catalog whether the
saving node can take the new checkpoint (what its holder holds, plus twice the checkpoint: the
staged bytes and the held copy, within ``capacity_fraction`` of the node's object store). If
not, it evicts whole committed memory checkpoints, oldest first, never the newest committed
checkpoint of a directory and never one being written; if that is still not enough it refuses
the save with :class:`MemoryTierFullError`. After a commit the catalog keeps the newest
``keep_last`` committed checkpoints of that directory and frees the rest, so a node holds at
most ``keep_last x (1 + replicas)`` checkpoints' worth of copies. Nothing is left for Ray to
spill silently.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import CheckpointError
from ..format.names import MARKER_NAME
from .classify import MEMORY_SCHEME

logger = logging.getLogger(__name__)

SCHEME = MEMORY_SCHEME
NAMESPACE = "ray_ckpt"
CATALOG_NAME = "ray_ckpt_memory_catalog"
_REPAIR_PERIOD_SECS = 0.5
_DATA_SUFFIX = ".data"


class MemoryTierFullError(CheckpointError, MemoryError):
    """A memory checkpoint does not fit in the object store of a node, even after evicting
    what the eviction rule allows."""


class MemoryCopiesLostError(CheckpointError, FileNotFoundError):
    """Every held copy of a file of a memory checkpoint is gone (its nodes were lost)."""


@dataclass(frozen=True)
class MemoryTierConfig:
    """Settings of the memory tier, carried by the filesystem to every writer.

    Args:
        replicas: copies on other nodes besides the saving node's (0 keeps one copy).
        keep_last: committed memory checkpoints kept per directory; older ones are freed.
        capacity_fraction: share of each node's object store the tier may fill.
    """

    replicas: int = 1
    keep_last: int = 2
    capacity_fraction: float = 0.8

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 0:
            raise ValueError(f"replicas must be an integer >= 0, got {self.replicas!r}")
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {self.keep_last!r}")
        if not 0 < self.capacity_fraction <= 1:
            raise ValueError(
                f"capacity_fraction must be in (0, 1], got {self.capacity_fraction!r}"
            )


# --- actors -----------------------------------------------------------------------------------


def holder_name(node_id: str) -> str:
    return f"ray_ckpt_holder_{node_id}"


# (Ray's typing overloads of ``ray.remote`` omit ``max_concurrency``, a documented option.)
@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=16)  # type: ignore[call-overload]
class _Holder:
    """Owns the held copies of one node: every object here was put by this actor."""

    def __init__(self, node_id: str) -> None:
        self._node_id = node_id
        self._objects: dict[str, ray.ObjectRef] = {}
        self._nbytes: dict[str, int] = {}

    def node_id(self) -> str:
        return self._node_id

    def adopt(self, key: str, data: np.ndarray) -> int:
        """Put ``data`` (an argument, owned by the caller) as this holder's own copy."""
        self._objects[key] = ray.put(np.ascontiguousarray(data))
        self._nbytes[key] = int(data.nbytes)
        return int(data.nbytes)

    def copy_from(self, key: str, refs: list[ray.ObjectRef]) -> int:
        """Fetch another holder's copy (Ray transfers it) and put one of our own."""
        data = ray.get(refs[0])
        return self.adopt(key, data)

    def push(self, key: str, peer: Any) -> int:
        """Have ``peer`` take a copy of ``key``."""
        return int(ray.get(peer.copy_from.remote(key, [self._objects[key]])))

    def ref(self, key: str) -> list[ray.ObjectRef]:
        """``[ref]`` of our copy of ``key`` (a list, so Ray does not resolve it), or ``[]``."""
        ref = self._objects.get(key)
        return [] if ref is None else [ref]

    def drop(self, keys: list[str]) -> None:
        for key in keys:
            self._objects.pop(key, None)
            self._nbytes.pop(key, None)

    def held_bytes(self) -> int:
        return sum(self._nbytes.values())

    def write_to(self, key: str, storage: Any, name: str, fsync: bool) -> int:
        """Write our copy of ``key`` as file ``name`` of ``storage`` (persisting)."""
        data = ray.get(self._objects[key])
        storage.write_file(name, [memoryview(data)], fsync=fsync)
        return int(data.nbytes)


def holder_for(node_id: str) -> Any:
    """The holder of ``node_id``, created there (detached) on first use."""
    return _Holder.options(  # type: ignore[attr-defined]
        name=holder_name(node_id),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(node_id)


def alive_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def store_capacity(node_id: str) -> int:
    for n in ray.nodes():
        if n["NodeID"] == node_id:
            return int(n["Resources"].get("object_store_memory", 0))
    return 0


@dataclass
class _File:
    nbytes: int
    target: int  # copies wanted
    nodes: list[str] = field(default_factory=list)


@dataclass
class _Dir:
    created: float
    files: dict[str, bytes] = field(default_factory=dict)  # small files: manifest, marker
    data: dict[str, _File] = field(default_factory=dict)
    mtimes: dict[str, float] = field(default_factory=dict)
    keep_last: int = 2
    committed_unix: float | None = None


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=32)  # type: ignore[call-overload]
class _Catalog:
    """Where each memory checkpoint's files are: small files kept here, data files by node."""

    def __init__(self) -> None:
        self._dirs: dict[str, _Dir] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._repairs = 0
        self._pinned: dict[str, int] = {}  # path -> pins: being persisted, never freed
        threading.Thread(target=self._repair_loop, daemon=True, name="repair").start()

    # --- the filesystem view ------------------------------------------------------------------

    def make_dir(self, path: str) -> None:
        with self._lock:
            self._dirs.setdefault(path, _Dir(created=time.time()))

    def stat(self, path: str) -> tuple[str, int, float]:
        """("file" | "dir" | "none", size, mtime)."""
        with self._lock:
            if path in self._dirs or any(d.startswith(path + "/") for d in self._dirs):
                return ("dir", 0, self._dirs[path].created if path in self._dirs else 0.0)
            parent, _, name = path.rpartition("/")
            d = self._dirs.get(parent)
            if d is not None and name in d.files:
                return ("file", len(d.files[name]), d.mtimes[name])
            if d is not None and name in d.data:
                return ("file", d.data[name].nbytes, d.mtimes[name])
            return ("none", 0, 0.0)

    def listing(self, path: str) -> list[tuple[str, str, int, float]] | None:
        """(kind, name, size, mtime) of every entry directly under ``path`` (None: no dir)."""
        with self._lock:
            prefix = path + "/" if path else ""
            out: list[tuple[str, str, int, float]] = []
            subdirs = {p[len(prefix):].split("/", 1)[0] for p in self._dirs if p.startswith(prefix)}
            for name in sorted(s for s in subdirs if s):
                out.append(("dir", name, 0, 0.0))
            d = self._dirs.get(path)
            if d is None and not out:
                return None
            if d is not None:
                out += [("file", n, len(b), d.mtimes[n]) for n, b in d.files.items()]
                out += [("file", n, f.nbytes, d.mtimes[n]) for n, f in d.data.items()]
            return out

    def write_small(self, path: str, data: bytes) -> None:
        parent, _, name = path.rpartition("/")
        with self._lock:
            d = self._dirs.setdefault(parent, _Dir(created=time.time()))
            d.files[name] = data
            d.mtimes[name] = time.time()

    def read_small(self, path: str) -> bytes | None:
        parent, _, name = path.rpartition("/")
        with self._lock:
            d = self._dirs.get(parent)
            return None if d is None else d.files.get(name)

    def add_data(self, path: str, node: str, nbytes: int, target: int) -> None:
        parent, _, name = path.rpartition("/")
        with self._lock:
            d = self._dirs.setdefault(parent, _Dir(created=time.time()))
            f = d.data.setdefault(name, _File(nbytes=nbytes, target=target))
            if node not in f.nodes:
                f.nodes.append(node)
            d.mtimes[name] = time.time()

    def copies(self, path: str) -> list[str] | None:
        parent, _, name = path.rpartition("/")
        with self._lock:
            d = self._dirs.get(parent)
            f = None if d is None else d.data.get(name)
            return None if f is None else list(f.nodes)

    def lost(self, path: str, node: str) -> None:
        """A reader found no copy of ``path`` on ``node``: forget it."""
        parent, _, name = path.rpartition("/")
        with self._lock:
            d = self._dirs.get(parent)
            f = None if d is None else d.data.get(name)
            if f is not None and node in f.nodes:
                f.nodes.remove(node)

    def move(self, src: str, dst: str, keep_last: int) -> None:
        """Rename a small file (the marker's commit); a marker arriving commits its directory
        and applies ``keep_last`` to the directory's siblings."""
        parent, _, name = src.rpartition("/")
        dparent, _, dname = dst.rpartition("/")
        if parent != dparent:
            raise OSError(f"move across directories is not supported: {src} -> {dst}")
        with self._lock:
            d = self._dirs[parent]
            d.files[dname] = d.files.pop(name)
            d.mtimes[dname] = time.time()
            d.mtimes.pop(name, None)
            if dname == MARKER_NAME:
                d.committed_unix = time.time()
                d.keep_last = keep_last
                self._retain(parent.rpartition("/")[0], keep_last)

    def delete_file(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        with self._lock:
            d = self._dirs.get(parent)
            if d is None:
                raise FileNotFoundError(path)
            if name in d.files:
                del d.files[name]
            elif name in d.data:
                self._free({path: d.data.pop(name)})
            else:
                raise FileNotFoundError(path)
            d.mtimes.pop(name, None)
            if name == MARKER_NAME:
                d.committed_unix = None

    def delete_dir(self, path: str) -> None:
        with self._lock:
            for p in [p for p in self._dirs if p == path or p.startswith(path + "/")]:
                self._drop_dir(p)

    def pin(self, path: str) -> bool:
        """Keep committed checkpoint ``path`` from retention and eviction (while it is
        persisted); False when it is not a committed memory checkpoint."""
        with self._lock:
            d = self._dirs.get(path)
            if d is None or d.committed_unix is None:
                return False
            self._pinned[path] = self._pinned.get(path, 0) + 1
            return True

    def unpin(self, path: str) -> None:
        with self._lock:
            left = self._pinned.get(path, 0) - 1
            if left > 0:
                self._pinned[path] = left
                return
            self._pinned.pop(path, None)
            d = self._dirs.get(path)
            if d is not None:
                self._retain(path.rpartition("/")[0], d.keep_last)

    # --- accounting ---------------------------------------------------------------------------

    def held_on(self, node: str) -> int:
        with self._lock:
            return sum(
                f.nbytes for d in self._dirs.values() for f in d.data.values() if node in f.nodes
            )

    def make_room(self, node: str, needed: int, capacity: int, saving: str) -> list[str]:
        """Evict committed checkpoints holding bytes on ``node``, oldest first, never the newest
        committed one of a directory, one being persisted, nor ``saving``, until ``needed``
        more bytes fit within ``capacity``. Returns the evicted paths. When even every allowed
        eviction would not make room, evicts nothing and raises MemoryTierFullError."""
        with self._lock:
            held = self.held_on(node)
            victims: list[str] = []
            for victim in self._evictable(node, saving):
                if held + needed <= capacity:
                    break
                victims.append(victim)
                held -= sum(f.nbytes for f in self._dirs[victim].data.values() if node in f.nodes)
            if held + needed > capacity:
                raise MemoryTierFullError(
                    f"memory checkpoint {SCHEME}{saving} needs {needed / 2**20:.1f} MiB on node "
                    f"{node}, which holds {self.held_on(node) / 2**20:.1f} MiB of memory "
                    f"checkpoints out of {capacity / 2**20:.1f} MiB allowed (capacity_fraction "
                    "of its object store), and evicting what may be evicted (all but the newest "
                    "checkpoint of each directory) would not make room. Persist and delete older "
                    "memory checkpoints, lower keep_last, or give the nodes a larger object store."
                )
            for victim in victims:
                self._drop_dir(victim)
            return victims

    def _evictable(self, node: str, saving: str) -> list[str]:
        """Committed checkpoints with bytes on ``node`` that may be evicted, oldest first."""
        out: list[str] = []
        while True:
            victim = self._oldest_evictable(node, saving, skip=set(out))
            if victim is None:
                return out
            out.append(victim)

    def _oldest_evictable(self, node: str, saving: str, skip: set[str]) -> str | None:
        newest: dict[str, tuple[float, str]] = {}
        for p, d in self._dirs.items():
            if d.committed_unix is not None:
                parent = p.rpartition("/")[0]
                if parent not in newest or newest[parent][0] < d.committed_unix:
                    newest[parent] = (d.committed_unix, p)
        keep = {p for _, p in newest.values()} | {saving} | set(self._pinned)
        candidates = [
            (d.committed_unix, p)
            for p, d in self._dirs.items()
            if d.committed_unix is not None and p not in keep and p not in skip
            and any(node in f.nodes for f in d.data.values())
        ]
        return min(candidates)[1] if candidates else None

    def _retain(self, parent: str, keep_last: int) -> None:
        committed = sorted(
            (d.committed_unix, p)
            for p, d in self._dirs.items()
            if d.committed_unix is not None and p.rpartition("/")[0] == parent
        )
        for _, p in committed[:-keep_last]:
            if p in self._pinned:
                continue
            logger.info("memory tier: freeing %s%s (keep_last=%d)", SCHEME, p, keep_last)
            self._drop_dir(p)

    def _drop_dir(self, path: str) -> None:
        d = self._dirs.pop(path, None)
        if d is not None:
            self._free({f"{path}/{n}": f for n, f in d.data.items()})

    def _free(self, files: dict[str, _File]) -> None:
        by_node: dict[str, list[str]] = {}
        for path, f in files.items():
            for node in f.nodes:
                by_node.setdefault(node, []).append(path)
        for node, keys in by_node.items():
            try:
                ray.get_actor(holder_name(node), namespace=NAMESPACE).drop.remote(keys)
            except ValueError:  # the holder is gone, and its objects with it
                pass

    # --- what is held -------------------------------------------------------------------------

    def checkpoints(self) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for p, d in sorted(self._dirs.items()):
                if not d.data and not d.files:
                    continue
                nodes = sorted({n for f in d.data.values() for n in f.nodes})
                complete = all(f.nodes for f in d.data.values())
                out.append({
                    "path": p,
                    "committed": d.committed_unix is not None,
                    "complete": complete,
                    "nodes": nodes,
                    "copies": min((len(f.nodes) for f in d.data.values()), default=0),
                    "nbytes": sum(f.nbytes for f in d.data.values()),
                })
            return out

    def repairs(self) -> int:
        return self._repairs

    # --- repair -------------------------------------------------------------------------------

    def _repair_loop(self) -> None:
        while not self._stop.wait(_REPAIR_PERIOD_SECS):
            try:
                self.repair()
            except Exception:
                logger.exception("memory tier: repair round failed")

    def repair(self) -> int:
        """Forget copies on dead nodes; re-replicate files below their copy target. Returns the
        number of copies made."""
        alive = set(alive_nodes())
        work: list[tuple[str, str, str]] = []
        with self._lock:
            for p, d in self._dirs.items():
                for name, f in d.data.items():
                    f.nodes = [n for n in f.nodes if n in alive]
                    if d.committed_unix is None:  # its writer is still replicating it
                        continue
                    want = min(f.target, len(alive))
                    spare = sorted(alive - set(f.nodes), key=self.held_on)
                    if f.nodes and len(f.nodes) < want and spare:
                        work.append((f"{p}/{name}", f.nodes[0], spare[0]))
        made = 0
        for path, src, dst in work:
            try:
                src_holder = ray.get_actor(holder_name(src), namespace=NAMESPACE)
                ray.get(src_holder.push.remote(path, holder_for(dst)))
            except Exception as e:  # noqa: BLE001 - this copy failed; the next round retries
                logger.warning("memory tier: re-replicating %s to %s failed: %s", path, dst, e)
                continue
            with self._lock:
                parent, _, name = path.rpartition("/")
                held_dir = self._dirs.get(parent)
                held = None if held_dir is None else held_dir.data.get(name)
                if held is None:  # freed meanwhile
                    holder_for(dst).drop.remote([path])
                    continue
                if dst not in held.nodes:
                    held.nodes.append(dst)
            made += 1
            self._repairs += 1
            logger.info("memory tier: re-replicated %s%s from %s to %s", SCHEME, path, src, dst)
        return made


def in_use() -> bool:
    """Whether this cluster has a memory tier yet (its catalog actor exists)."""
    try:
        ray.get_actor(CATALOG_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def catalog() -> Any:
    """The cluster's catalog actor, created (detached, on the head node) on first use."""
    try:
        return ray.get_actor(CATALOG_NAME, namespace=NAMESPACE)
    except ValueError:
        pass
    head = next(
        (n["NodeID"] for n in ray.nodes()
         if n["Alive"] and "node:__internal_head__" in n["Resources"]),
        ray.get_runtime_context().get_node_id(),
    )
    return _Catalog.options(  # type: ignore[attr-defined]
        name=CATALOG_NAME,
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False),
    ).remote()


# --- the filesystem ---------------------------------------------------------------------------


class _HeldOutput:
    """A file being written: kept in the writer's memory until closed, then held."""

    def __init__(self, handler: MemoryFileSystemHandler, path: str) -> None:
        self._handler = handler
        self._path = path
        self._chunks: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> int:
        self._chunks.append(bytes(data))
        return len(self._chunks[-1])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        chunks, self._chunks = self._chunks, []
        if self._path.endswith(_DATA_SUFFIX):
            data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
            self._handler.hold(self._path, data)
        else:
            ray.get(catalog().write_small.remote(self._path, b"".join(chunks)))


class MemoryFileSystemHandler(pafs.FileSystemHandler):
    """``pyarrow.fs`` over the memory tier (see the module docstring)."""

    protocol = "mem"

    def __init__(self, config: MemoryTierConfig | None = None) -> None:
        self.config = config or MemoryTierConfig()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryFileSystemHandler) and other.config == self.config

    def __hash__(self) -> int:
        return hash(self.config)

    def get_type_name(self) -> str:
        return "mem"

    def equals(self, other: Any) -> bool:
        return self == other

    def normalize_path(self, path: str) -> str:
        return _strip(path)

    # --- holding ------------------------------------------------------------------------------

    def hold(self, path: str, data: np.ndarray) -> None:
        """Hold ``data`` as file ``path``: on this node's holder, then ``replicas`` peers."""
        node = ray.get_runtime_context().get_node_id()
        holder = holder_for(node)
        nbytes = int(ray.get(holder.adopt.remote(path, data)))
        target = 1 + self.config.replicas
        cat = catalog()
        ray.get(cat.add_data.remote(path, node, nbytes, target))
        peers = [n for n in alive_nodes() if n != node]
        loads = ray.get([cat.held_on.remote(n) for n in peers])
        peers = [n for _, n in sorted(zip(loads, peers))][: self.config.replicas]  # least held
        pushes = [holder.push.remote(path, holder_for(peer)) for peer in peers]
        for peer, push in zip(peers, pushes):
            ray.get(push)
            ray.get(cat.add_data.remote(path, peer, nbytes, target))
        if len(peers) < self.config.replicas:
            logger.warning(
                "memory checkpoint file %s%s is held on %d node(s), not 1 + replicas = %d: the "
                "cluster has only %d node(s)", SCHEME, path, 1 + len(peers), target,
                1 + len(peers),
            )

    def open_held(self, path: str) -> tuple[np.ndarray, str]:
        """The bytes of held file ``path`` and the node they came from: this node's holder
        first (zero-copy), then the peers' (a transfer)."""
        cat = catalog()
        nodes = ray.get(cat.copies.remote(path))
        if nodes is None:
            raise FileNotFoundError(f"{SCHEME}{path}")
        local = ray.get_runtime_context().get_node_id()
        for node in sorted(nodes, key=lambda n: n != local):
            try:
                holder = ray.get_actor(holder_name(node), namespace=NAMESPACE)
                refs = ray.get(holder.ref.remote(path))
                if refs:
                    return ray.get(refs[0]), node
            except (ValueError, ray.exceptions.RayError) as e:
                logger.info("memory tier: no copy of %s%s on node %s (%s)", SCHEME, path, node, e)
            ray.get(cat.lost.remote(path, node))
        raise MemoryCopiesLostError(
            f"every copy of {SCHEME}{path} is lost (it was held on node(s) {', '.join(nodes)}): "
            "load the newest durable checkpoint instead"
        )

    # --- pyarrow.fs ---------------------------------------------------------------------------

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        cat = catalog()
        stats = ray.get([cat.stat.remote(_strip(p)) for p in paths])
        return [_info(_strip(p), *s) for p, s in zip(paths, stats)]

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        base = _strip(selector.base_dir)
        entries = ray.get(catalog().listing.remote(base))
        if entries is None:
            if selector.allow_not_found:
                return []
            raise FileNotFoundError(f"{SCHEME}{base}")
        out = []
        for kind, name, size, mtime in entries:
            path = f"{base}/{name}" if base else name
            out.append(_info(path, kind, size, mtime))
            if selector.recursive and kind == "dir":
                out += self.get_file_info_selector(pafs.FileSelector(path, recursive=True))
        return out

    def create_dir(self, path: str, recursive: bool) -> None:
        ray.get(catalog().make_dir.remote(_strip(path)))

    def delete_dir(self, path: str) -> None:
        ray.get(catalog().delete_dir.remote(_strip(path)))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        raise NotImplementedError("delete the checkpoint directories one by one")

    def delete_root_dir_contents(self) -> None:
        raise NotImplementedError("delete the checkpoint directories one by one")

    def delete_file(self, path: str) -> None:
        ray.get(catalog().delete_file.remote(_strip(path)))

    def move(self, src: str, dest: str) -> None:
        ray.get(catalog().move.remote(_strip(src), _strip(dest), self.config.keep_last))

    def copy_file(self, src: str, dest: str) -> None:
        raise NotImplementedError("files of a memory checkpoint are not copied")

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.open_input_file(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        path = _strip(path)
        if path.endswith(_DATA_SUFFIX):
            data, _ = self.open_held(path)
            return pa.BufferReader(pa.py_buffer(data))
        raw = ray.get(catalog().read_small.remote(path))
        if raw is None:
            raise FileNotFoundError(f"{SCHEME}{path}")
        return pa.BufferReader(raw)

    def open_output_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return pa.PythonFile(_HeldOutput(self, _strip(path)), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        raise NotImplementedError("files of a memory checkpoint are written once")


def normalize(path: str) -> str:
    """A path on the memory filesystem: ``mem://run/step-5?replicas=2`` -> ``run/step-5``."""
    return path.removeprefix(SCHEME).partition("?")[0].strip("/")


def from_uri(uri: str, filesystem: Any = None) -> tuple[pafs.FileSystem, str]:
    """``(fs, path)`` of a ``mem://dir[?replicas=R&keep_last=N&capacity_fraction=F]`` URI;
    ``filesystem`` is kept when it is a memory filesystem (its settings then apply)."""
    if handler_of(filesystem) is not None:
        return filesystem, normalize(uri)
    query = urllib.parse.parse_qs(uri.partition("?")[2], strict_parsing=False)
    options: dict[str, Any] = {}
    for key, values in query.items():
        if key not in ("replicas", "keep_last", "capacity_fraction"):
            raise ValueError(
                f"unknown option {key!r} in {uri!r}: a mem:// URI takes replicas, keep_last "
                "and capacity_fraction"
            )
        try:
            options[key] = float(values[-1]) if key == "capacity_fraction" else int(values[-1])
        except ValueError:
            raise ValueError(f"option {key}={values[-1]!r} in {uri!r} is not a number") from None
    return memory_filesystem(**options), normalize(uri)


_strip = normalize


def _info(path: str, kind: str, size: int, mtime: float) -> pafs.FileInfo:
    if kind == "file":
        return pafs.FileInfo(path, pafs.FileType.File, size=size, mtime=mtime)
    if kind == "dir":
        return pafs.FileInfo(path, pafs.FileType.Directory)
    return pafs.FileInfo(path, pafs.FileType.NotFound)


def memory_filesystem(config: MemoryTierConfig | None = None, **options: Any) -> pafs.FileSystem:
    """A ``pyarrow.fs.FileSystem`` over the memory tier, for ``make_*_checkpointer(filesystem=)``
    or a ``CheckpointManager``: ``memory_filesystem(replicas=1, keep_last=2)``. Plain
    ``mem://`` paths use the defaults."""
    return pafs.PyFileSystem(MemoryFileSystemHandler(config or MemoryTierConfig(**options)))


def handler_of(fs: Any) -> MemoryFileSystemHandler | None:
    """The memory tier behind ``fs``, or None when ``fs`` is another filesystem."""
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, MemoryFileSystemHandler):
        return fs.handler
    return None


def make_room(fs: Any, path: str, nbytes: int) -> None:
    """Before a save of ``nbytes`` to memory checkpoint ``path``: check that the saving node
    can hold it, evicting by the rule in the module docstring, else refuse."""
    handler = handler_of(fs)
    if handler is None:
        return
    node = ray.get_runtime_context().get_node_id()
    capacity = int(store_capacity(node) * handler.config.capacity_fraction)
    try:
        evicted = ray.get(catalog().make_room.remote(node, 2 * nbytes, capacity, _strip(path)))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, MemoryTierFullError):
            raise e.cause from None
        raise
    for victim in evicted:
        logger.warning(
            "memory tier: evicted %s%s to make room for %s%s on node %s (oldest first)",
            SCHEME, victim, SCHEME, _strip(path), node,
        )

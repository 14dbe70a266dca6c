"""The memory tier: checkpoints held in the Ray object store, replicated across nodes.

A memory checkpoint is a checkpoint directory like any other (the same data files, manifest
and commit marker, byte for byte), on a filesystem whose files live in Ray instead of on a
disk: ``mem://run/step-5``, or any path on :func:`memory_filesystem`. Every part of a save and
a load (stager, writers, commit, multi-rank barrier, reader, DTensor resharding) runs
unchanged; only where the bytes go differs:

* a **data file** is *held*: when a writer closes it, the holder actor of the writer's node
  puts its bytes into the object store itself (bytes must be put by a process that outlives
  the training process: an object lives as long as the process that put it), then offers them
  to ``replicas`` peer holders, each of which reads them over a direct connection (or Ray's
  transfer, where it cannot connect) and puts its own copy. The writer returns only once
  every copy is held, so the commit (manifest, then marker, last) comes after replication,
  and all of it after the stall;
* the **manifest and marker** (small) live with the catalog actor, one per cluster, on the head
  node; a checkpoint exists once the catalog has its marker;
* a **read** of a data file asks the holder of the reader's node first (zero-copy out of shared
  memory), then the peers': a peer's holder streams the ranges straight into the load's tensors
  over a direct connection (:mod:`.memory_stream`), or Ray transfers the object where the
  reader cannot connect; a file with no live copy fails the load as incomplete, never half from
  one checkpoint and half from another.

The actors live in their own modules: the per-node holders in :mod:`.memory_holder`, the catalog
(with the accounting and the repair) in :mod:`.memory_catalog`; this module is the filesystem.
Holders are detached actors pinned to their node (``ray_ckpt_holder_<node id>``, namespace
``ray_ckpt``), so a memory checkpoint outlives the process that saved it and a worker restart.
When a node is lost, the catalog's repair thread drops the copies it held and has a surviving
holder push a new copy to another node, until each file has ``1 + replicas`` copies again (or
one on every node there is).

Accounting (the documented rule): before a save, :func:`make_room` asks the catalog whether the
saving node can take the new checkpoint (what its holder holds, plus twice the bytes the saving
process writes: the staged bytes and the held copy, within ``capacity_fraction`` of the node's
object store; a rank of a multi-rank save writes its share of the replicated state). If
not, it evicts whole committed memory checkpoints, oldest first, never the newest committed
checkpoint of a directory and never one being written; if that is still not enough it refuses
the save with :class:`MemoryTierFullError`. After a commit the catalog keeps the newest
``keep_last`` committed checkpoints of that directory and frees the rest, so a node holds at
most ``keep_last x (1 + replicas)`` checkpoints' worth of copies. Nothing is left for Ray to
spill silently: on a Ray started with its defaults, evicted objects fill the store for up to a
second after their release (the raylet frees them periodically), so a save whose room depends on
them waits: in the stall only when the staged bytes themselves need that room, otherwise the
writer waits, after the stall, before holding the files.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from .._util import local_ray_started
from ..errors import MemoryCopiesLostError, MemoryTierFullError
from .buffers import Buffers
from .classify import MEMORY_SCHEME
from .files import ReadScope
from .memory_catalog import CATALOG_NAME, catalog, in_use, tier_full
from .memory_holder import (
    NAMESPACE,
    alive_nodes,
    forget_actor,
    holder_for,
    holder_name,
    named_actor,
    store_capacity,
)
from .memory_stream import PeerStream

logger = logging.getLogger(__name__)

SCHEME = MEMORY_SCHEME
_DATA_SUFFIX = ".data"


@dataclass(frozen=True)
class MemoryTierConfig:
    """Settings of the memory tier, carried by the filesystem to every writer.

    Args:
        replicas: copies on other nodes besides the saving node's (0 keeps one copy).
        keep_last: committed memory checkpoints kept per directory; older ones are freed.
        capacity_fraction: share of each node's object store the tier may fill.
        direct_peer_reads: a load on a node that holds no copy reads a peer's copy over a
            direct TCP connection to the peer's holder, straight into its tensors (one copy),
            and a holder taking a replica (of a save, or after a node loss) reads it so from
            the holder that has it; False, or a connection that fails, goes over Ray's object
            transfer (the whole file into the node's object store first).
    """

    replicas: int = 1
    keep_last: int = 2
    capacity_fraction: float = 0.8
    direct_peer_reads: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 0:
            raise ValueError(f"replicas must be an integer >= 0, got {self.replicas!r}")
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {self.keep_last!r}")
        if not isinstance(self.direct_peer_reads, bool):
            raise ValueError(
                f"direct_peer_reads must be True or False, got {self.direct_peer_reads!r}"
            )
        if not 0 < self.capacity_fraction <= 1:
            raise ValueError(
                f"capacity_fraction must be in (0, 1], got {self.capacity_fraction!r}"
            )


# --- the filesystem ---------------------------------------------------------------------------


class _HeldOutput:
    """A file being written: its parts kept (by reference) until closed, then held.

    A part arrives as ``bytes`` or as a ``pyarrow.Buffer`` (``OutputStream::Write(Buffer)``,
    whose contract lets a stream keep the buffer rather than copy it): the writer's staged,
    read-only buffers are kept as they are, and on close a data file's parts are put into the
    object store once, from where this node's holder copies them into an object of its own,
    then has the peers' holders copy that (:meth:`MemoryFileSystemHandler.hold`)."""

    def __init__(self, handler: MemoryFileSystemHandler, path: str) -> None:
        self._handler = handler
        self._path = path
        self._parts: list[Any] = []
        self.closed = False

    def write(self, data: Any) -> int:
        self._parts.append(data if isinstance(data, (bytes, pa.Buffer)) else bytes(data))
        return memoryview(self._parts[-1]).nbytes

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        parts, self._parts = self._parts, []
        if self._path.endswith(_DATA_SUFFIX):
            self._handler.hold(self._path, [np.frombuffer(p, dtype=np.uint8) for p in parts])
        else:
            ray.get(_catalog().write_small.remote(self._path, b"".join(map(bytes, parts))))


def _warn_few_nodes(nodes: int, target: int, path: str) -> None:
    """In the saving process, once for each cluster size (not for every save)."""
    with _LOCK:
        if (nodes, target) in _WARNED_FEW_NODES:
            return
        _WARNED_FEW_NODES.add((nodes, target))
    logger.warning(
        "memory tier: the cluster has only %d node(s), so memory checkpoints are held on %d, "
        "not 1 + replicas = %d (%s%s, and those after it while the cluster is this small): "
        "losing a node loses them", nodes, nodes, target, SCHEME, path,
    )


_LOCK = threading.Lock()
_WARNED_FEW_NODES: set[tuple[int, int]] = set()


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

    def looked_in(self, path: str) -> str:
        """For a message that found nothing at ``path``: which Ray's memory was looked in."""
        address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
        if address is not None and local_ray_started(address):
            return (f"this process looked in a local Ray that ray_ckpt started for it, which "
                    f"holds only what this process saved: {_CONNECT}")
        parent = _strip(path).rpartition("/")[0]
        return (f"memory checkpoints are held by the Ray cluster this process is connected to "
                f"({address}) while it runs; `ray-ckpt ls {SCHEME}{parent}` lists them")

    def copies_under(self, path: str) -> dict[str, tuple[int, list[str]]]:
        """For each memory checkpoint directly under directory ``path``, by name: the fewest
        live copies any of its data files has and the live nodes holding copies (for
        ``list_checkpoints``)."""
        return ray.get(_catalog().copies_under.remote(_strip(path))) if in_use() else {}

    # --- holding ------------------------------------------------------------------------------

    def hold(self, path: str, buffers: list[np.ndarray]) -> None:
        """Hold ``buffers`` (the bytes, in order) as file ``path``: on this node's holder,
        then, from it, on ``replicas`` peers (first waiting, if the room check said so, for Ray
        to free what was evicted for it)."""
        node = ray.get_runtime_context().get_node_id()
        holder = holder_for(node)
        cat = _catalog()
        target = 1 + self.config.replicas
        peers = [n for n in alive_nodes() if n != node]
        loads = ray.get([cat.held_on.remote(n) for n in peers])
        peers = [n for _, n in sorted(zip(loads, peers))][: self.config.replicas]  # least held
        pushed_to = [holder_for(peer) for peer in peers]  # a first save starts them all now
        wait_secs = ray.get(cat.hold_wait.remote(path.rpartition("/")[0]))
        if wait_secs > 0:
            logger.info("memory tier: waiting %.2f s for Ray to free evicted memory checkpoints "
                        "on node %s before holding %s%s", wait_secs, node, SCHEME, path)
            time.sleep(wait_secs)
        # one copy into the store, for this node's holder to take its own; it then pushes that
        # to the peers (straight to each peer's holder, see _Holder.push), at the same time
        shared = ray.put(buffers)
        nbytes = int(ray.get(holder.adopt.remote(path, shared)))
        del shared
        direct = self.config.direct_peer_reads
        ray.get(cat.add_data.remote(path, node, nbytes, target, direct))
        copies = {peer: holder.push.remote(path, to, direct) for peer, to in zip(peers, pushed_to)}
        for where, call in copies.items():
            ray.get(cat.add_data.remote(path, where, int(ray.get(call)), target, direct))

    def open_ranges(self, path: str, scope: ReadScope) -> Buffers | _PeerFile:
        """The reader of data file ``path`` for :class:`~.files.FileReader`, which reads its
        ranges straight into a load's tensors; ``scope`` serves the load's other files: the
        first open of a checkpoint's file finds where all of them are (:func:`_locate`)."""
        path = _strip(path)
        directory, _, name = path.rpartition("/")
        with scope.lock:  # one _locate for the checkpoint's files, whichever opens first
            if directory not in scope:
                scope[directory] = _locate(directory, scope, self.config.direct_peer_reads)
        copy = scope[directory].get(name)
        if copy is not None and copy.stream is not None:
            return _PeerFile(self, path, copy.node, copy.stream, copy.index)
        if copy is not None:
            try:
                return Buffers(ray.get(copy.ref))
            except ray.exceptions.RayError as e:  # its node was lost: ask again below
                logger.info("memory tier: no copy of %s%s on node %s (%s)", SCHEME, path,
                            copy.node, e)
        return Buffers(self.open_held(path))

    def open_held(self, path: str) -> list[np.ndarray]:
        """The bytes of held file ``path`` (buffers, in order): this node's holder's copy first
        (a zero-copy view of its object), then the peers' (Ray transfers it)."""
        cat = _catalog()
        nodes = ray.get(cat.copies.remote(path))
        if nodes is None:
            raise FileNotFoundError(f"{SCHEME}{path}")
        local = ray.get_runtime_context().get_node_id()
        for node in sorted(nodes, key=lambda n: n != local):
            try:
                holder = named_actor(holder_name(node))
                refs = ray.get(holder.ref.remote(path))
                if refs:
                    return ray.get(refs[0])
            except (ValueError, ray.exceptions.RayError) as e:
                forget_actor(holder_name(node))
                logger.info("memory tier: no copy of %s%s on node %s (%s)", SCHEME, path, node, e)
            ray.get(cat.lost.remote(path, node))
        raise MemoryCopiesLostError(
            f"every copy of {SCHEME}{path} is lost (it was held on node(s) {', '.join(nodes)}): "
            "load the newest durable checkpoint instead"
        )

    # --- pyarrow.fs ---------------------------------------------------------------------------

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        # the tier's root always is (a directory); all else is the catalog's, none before it
        # starts (a first save does not wait for it)
        asked = [_strip(p) for p in paths]
        named = [p for p in asked if p]
        stats = {}
        if named and in_use():
            cat = _catalog()
            stats = dict(zip(named, ray.get([cat.stat.remote(p) for p in named])))
        return [_info(p, *stats.get(p, ("none", 0, 0.0))) if p else _info(p, "dir", 0, 0.0)
                for p in asked]

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        base = _strip(selector.base_dir)
        entries = ray.get(_catalog().listing.remote(base)) if in_use() else None
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
        if in_use():
            ray.get(_catalog().make_dir.remote(_strip(path)))
        else:  # the first save: the catalog starts now; its start is not waited for here
            _start_catalog(_strip(path))

    def delete_dir(self, path: str) -> None:
        ray.get(_catalog().delete_dir.remote(_strip(path)))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        raise NotImplementedError("delete the checkpoint directories one by one")

    def delete_root_dir_contents(self) -> None:
        raise NotImplementedError("delete the checkpoint directories one by one")

    def delete_file(self, path: str) -> None:
        ray.get(_catalog().delete_file.remote(_strip(path)))

    def move(self, src: str, dest: str) -> None:
        ray.get(_catalog().move.remote(_strip(src), _strip(dest), self.config.keep_last))

    def copy_file(self, src: str, dest: str) -> None:
        raise NotImplementedError("files of a memory checkpoint are not copied")

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.open_input_file(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        path = _strip(path)
        if path.endswith(_DATA_SUFFIX):
            return pa.BufferReader(pa.py_buffer(join_parts(self.open_held(path))))
        raw = ray.get(_catalog().read_small.remote(path))
        if raw is None:
            raise FileNotFoundError(f"{SCHEME}{path}")
        return pa.BufferReader(raw)

    def open_output_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return pa.PythonFile(_HeldOutput(self, _strip(path)), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        raise NotImplementedError("files of a memory checkpoint are written once")


# (Ray session, future of a make_dir call) sent while the catalog was starting, not yet waited for
_UNSETTLED: list[tuple[str, concurrent.futures.Future[Any]]] = []


def _start_catalog(path: str) -> None:
    """A first save's ``make_dir``: the catalog actor is created and sent the call by a thread,
    so the stall waits neither for the actor's class to be exported nor for it to start."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def start() -> None:
        try:
            future.set_result(catalog().make_dir.remote(path))
        except BaseException as e:  # noqa: BLE001 - raised by the next _catalog() call
            future.set_exception(e)

    _UNSETTLED.append((ray.get_runtime_context().get_session_name(), future))
    threading.Thread(target=start, daemon=True, name="ray_ckpt-catalog-start").start()


def warm_up() -> None:
    """Where this cluster has a memory tier, look up its catalog and this node's holder now,
    from a thread: a first load in a new process (a restore, often right after its
    checkpointer is made) otherwise waits for those GCS lookups, the protocol checks and the
    holder's class to load (40 ms of a first 64 MiB load, 80 without). Nothing starts where
    nothing runs."""

    def run() -> None:
        try:
            if in_use():
                named_actor(holder_name(ray.get_runtime_context().get_node_id()))
        except ValueError:  # no holder on this node: nothing to look up
            pass
        except Exception as e:  # noqa: BLE001 - the first use looks them up again, and reports
            logger.info("memory tier: looking up its actors ahead of use failed: %s", e)

    threading.Thread(target=run, daemon=True, name="ray_ckpt-memory-warm-up").start()


def _catalog() -> Any:
    """:func:`catalog`, once the calls this process sent while it was starting are done (a
    later call must see the directory: the calls of a threaded actor may run out of order)."""
    if _UNSETTLED:
        session = ray.get_runtime_context().get_session_name()
        calls = _UNSETTLED[:]
        del _UNSETTLED[: len(calls)]
        ray.get([f.result() for in_session, f in calls if in_session == session])
    return catalog()


@dataclass(frozen=True)
class _Copy:
    """The copy of a data file a load reads: on ``node``; when ``stream`` is set, over a direct
    connection to that node's holder (file ``index`` of its offer), else by ``ref``."""

    node: str
    ref: ray.ObjectRef
    stream: PeerStream | None = None
    index: int = 0


def _locate(directory: str, scope: ReadScope, direct: bool) -> dict[str, _Copy]:
    """For each data file of checkpoint ``directory``: the copy to read (this node's when it
    holds one), in one catalog call and one call per holder. A file held only on other nodes
    is read over a direct connection to one's holder (``direct``; the connections close with
    ``scope``), else pulled over Ray's transfer: those transfers all start now (a load opens its
    files one after another; without this each open would wait for its own transfer); the
    pulled objects are secondary copies, evicted by Ray under pressure. A node that fails to
    answer is skipped: the open of its files asks again
    (:meth:`MemoryFileSystemHandler.open_held`)."""
    copies = ray.get(_catalog().data_copies.remote(directory))
    local = ray.get_runtime_context().get_node_id()
    by_node: dict[str, list[str]] = {}
    for name, nodes in copies.items():
        if nodes:
            by_node.setdefault(local if local in nodes else nodes[0], []).append(name)
    calls = {}
    streamed: dict[str, bool] = {}
    for node, names in by_node.items():
        try:
            holder = named_actor(holder_name(node))
        except ValueError:  # no holder there any more
            forget_actor(holder_name(node))
            continue
        keys = [f"{directory}/{n}" for n in names]
        streamed[node] = direct and node != local
        calls[node] = holder.serve.remote(keys) if streamed[node] else holder.refs.remote(keys)
    located: dict[str, _Copy] = {}
    pulls: list[ray.ObjectRef] = []
    for node, call in calls.items():
        try:
            answer = ray.get(call)
        except ray.exceptions.RayError:
            forget_actor(holder_name(node))
            continue
        stream = None
        if node == local:
            how, held = "this node's holder", answer
        elif streamed[node]:
            address, token, held = answer
            stream = PeerStream(tuple(address), token)
            scope.at_close(functools.partial(_end_stream, stream, holder_name(node), token))
            how = f"node {node}'s holder over a direct connection ({address[0]}:{address[1]})"
        else:
            how, held = f"node {node}'s holder over Ray's transfer", answer
        for index, (name, refs) in enumerate(zip(by_node[node], held)):
            if refs:
                located[name] = _Copy(node, refs[0], stream, index)
                if node != local and stream is None:
                    pulls.append(refs[0])
        logger.info("memory tier: reading %d file(s) of %s%s from %s", len(by_node[node]),
                    SCHEME, directory, how)
    if pulls:  # start every transfer now; the opens wait for their own
        ray.wait(pulls, num_returns=len(pulls), timeout=0, fetch_local=True)
    return located


def _end_stream(stream: PeerStream, holder: str, token: bytes) -> None:
    """The load is over: close its connections and withdraw the holder's offer (the holder
    no longer keeps views of those files)."""
    stream.close()
    try:
        named_actor(holder).withdraw.remote(token)
    except ValueError:  # the holder is gone, and its offers with it
        forget_actor(holder)


class _PeerFile:
    """A data file read from a peer holder's stream; over Ray's transfer once that fails."""

    def __init__(
        self, handler: MemoryFileSystemHandler, path: str, node: str, stream: PeerStream,
        index: int,
    ) -> None:
        self._handler = handler
        self._path = path
        self._node = node
        self._stream = stream
        self._index = index
        self._fallback: Buffers | None = None

    def read_slices(
        self,
        offset: int,
        out: memoryview,
        slice_bytes: int,
        on_slice: Callable[[int, memoryview], None] | None,
    ) -> int:
        """Fill ``out`` from ``offset``, calling ``on_slice`` with each ``slice_bytes`` as it
        lands (see :mod:`.files`); returns the bytes filled, fewer only at the end of the file.
        A stream that fails within the range goes on over Ray's transfer from its last whole
        slice."""
        landed = 0

        def on_landed(start: int, piece: memoryview) -> None:
            nonlocal landed
            if on_slice is not None:
                on_slice(start, piece)
            landed = start + len(piece)

        if self._fallback is None:
            try:
                return self._stream.read_into(self._index, offset, out, on_landed, slice_bytes)
            except OSError as e:
                logger.warning(
                    "memory tier: reading %s%s from node %s's holder at %s failed (%s): reading "
                    "it over Ray's transfer instead", SCHEME, self._path, self._node,
                    self._stream.address, e,
                )
                self._fallback = Buffers(self._handler.open_held(self._path))
        base = landed
        shifted = None if on_slice is None else (lambda at, piece: on_slice(base + at, piece))
        return base + self._fallback.read_slices(offset + base, out[base:], slice_bytes, shifted)

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()


def join_parts(parts: list[Any]) -> np.ndarray:
    """One contiguous byte array of ``parts`` (buffers): the parts themselves when one."""
    if len(parts) == 1:
        return np.frombuffer(parts[0], dtype=np.uint8)
    out = np.empty(sum(memoryview(p).nbytes for p in parts), dtype=np.uint8)
    position = 0
    for part in parts:
        view = np.frombuffer(part, dtype=np.uint8)
        out[position : position + view.nbytes] = view
        position += view.nbytes
    return out


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


def end_memory_tier(timeout_secs: float = 30.0) -> list[str]:
    """End the memory tier on the connected cluster: its catalog and every live node's holder,
    whichever ray_ckpt started them, dropping the memory checkpoints they hold (persist those
    you need first). For a tier started by another ray_ckpt version, which this one cannot use;
    the next memory save starts a new tier. Returns the names of the actors ended, once they
    are gone (``TimeoutError`` after ``timeout_secs``)."""
    ended = []
    for name in [CATALOG_NAME] + [holder_name(node) for node in alive_nodes()]:
        try:
            actor = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            continue
        ray.kill(actor, no_restart=True)
        forget_actor(name)
        ended.append(name)
    deadline = time.monotonic() + timeout_secs
    for name in ended:  # a name is free for a new actor once its actor is dead
        while True:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the memory tier's actor {name!r} (namespace {NAMESPACE!r}) "
                                   f"was killed but is still there after {timeout_secs} s")
            time.sleep(0.05)
    logger.warning("memory tier: ended %s; the memory checkpoints they held are gone",
                   ", ".join(ended) or "nothing (no memory tier on this cluster)")
    return ended


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


# how to reach the cluster's memory tier from a process that started a Ray of its own
_CONNECT = ("to use the cluster's memory tier, connect to the cluster before making the "
            "checkpointer: ray.init(address='auto') on one of its nodes, RAY_ADDRESS, or "
            "CheckpointerConfig(ray_address=...)")


@functools.cache
def _warn_local_ray(address: str) -> None:
    logger.warning(
        "memory tier: this process saves memory checkpoints into the local Ray that ray_ckpt "
        "started for it at %s (no ray.init() before the checkpointer, no RAY_ADDRESS): they "
        "end with this process and no other process can load them; %s", address, _CONNECT,
    )


def make_room(fs: Any, path: str, nbytes: int) -> None:
    """Before a save that writes ``nbytes`` (this process's share) to memory checkpoint
    ``path``: check that the saving node can hold them, evicting by the rule in the module
    docstring, else refuse."""
    handler = handler_of(fs)
    if handler is None:
        return
    address = ray.get_runtime_context().gcs_address
    if local_ray_started(address):
        _warn_local_ray(address)
    node = ray.get_runtime_context().get_node_id()
    stores = {n["NodeID"]: n["Resources"].get("object_store_memory", 0)
              for n in ray.nodes() if n["Alive"]}
    if len(stores) < 1 + handler.config.replicas:
        _warn_few_nodes(len(stores), 1 + handler.config.replicas, _strip(path))
    capacity = int(stores.get(node, 0) * handler.config.capacity_fraction)
    if not in_use() or _UNSETTLED:  # the first memory save: nothing is held, nothing to evict
        if not _UNSETTLED:
            _start_catalog(_strip(path))  # not awaited: the stall does not wait for the actor
        if 2 * nbytes > capacity:
            raise tier_full(_strip(path), nbytes, node, capacity, held=0)
        return
    try:
        evicted, wait_secs, _ = ray.get(
            catalog().make_room.remote(node, nbytes, capacity, _strip(path))
        )
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, MemoryTierFullError):
            raise e.cause from None
        raise
    for victim in evicted:
        logger.warning(
            "memory tier: evicted %s%s to make room for %s%s on node %s (oldest first)",
            SCHEME, victim, SCHEME, _strip(path), node,
        )
    if wait_secs > 0:  # the staged bytes need this room now: a wait in the stall
        logger.info("memory tier: waiting %.2f s for Ray to free dropped memory checkpoints on "
                    "node %s before staging %s%s", wait_secs, node, SCHEME, _strip(path))
        time.sleep(wait_secs)


__all__ = [
    "CATALOG_NAME",
    "NAMESPACE",
    "SCHEME",
    "MemoryCopiesLostError",
    "MemoryFileSystemHandler",
    "MemoryTierConfig",
    "MemoryTierFullError",
    "alive_nodes",
    "catalog",
    "from_uri",
    "handler_of",
    "holder_for",
    "holder_name",
    "in_use",
    "make_room",
    "memory_filesystem",
    "normalize",
    "store_capacity",
]

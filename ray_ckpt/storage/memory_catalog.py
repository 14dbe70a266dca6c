"""The memory tier's catalog: one detached actor per cluster, on the head node, that knows
where every memory checkpoint's files are, and its accounting and repair.

* **Files**: the small files of a checkpoint (manifest, marker) are kept here; a data file is
  known by the nodes whose holders (:mod:`.memory_holder`) hold a copy. A checkpoint exists once
  the catalog has its marker.
* **Accounting** (the documented rule): :meth:`_Catalog.make_room` evicts whole committed memory
  checkpoints with bytes on the saving node, oldest first, never the newest committed one of a
  directory, one being persisted (pinned) nor the one being saved, until the save fits; when
  even that is not enough it evicts nothing and refuses with :class:`MemoryTierFullError`.
  After a commit the catalog keeps the newest ``keep_last`` committed checkpoints of that
  directory and frees the rest.
* **Repair**: a thread forgets copies on dead nodes, and those of a holder that died on a live
  node (Ray's OOM killer, a crash, ``ray.kill``: Ray frees its objects with it), and has a
  surviving holder push a new copy to another node, until each file has its target of copies
  again (or one on every node). Every ``_SWEEP_PERIOD_SECS`` it has the holders drop the
  copies it does not list (:meth:`_Holder.drop_unlisted`).
* **Restart**: when the catalog's process dies, Ray restarts it (the handles that processes
  keep stay valid), empty: the memory checkpoints it knew are lost with it (their manifests
  were here), it says so, and its first sweep frees their copies. Loads fall back to durable
  storage; the calls in flight when it died fail.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import MemoryTierFullError
from ..format.names import MARKER_NAME
from .classify import MEMORY_SCHEME as SCHEME
from .memory_holder import (
    NAMESPACE,
    PROTOCOL,
    alive_nodes,
    holder_for,
    holder_name,
    lookup,
    named_actor,
)

logger = logging.getLogger(__name__)

CATALOG_NAME = "ray_ckpt_memory_catalog"
_REPAIR_PERIOD_SECS = 0.5
_WATCH_SECS = 30.0  # how long a holder's pending ``watch`` call lasts before it is renewed
_SWEEP_PERIOD_SECS = 30.0
_UNLISTED_GRACE_SECS = 30.0  # a copy taken this long ago and still not listed is garbage
# How long a dropped object may still fill its node's store: the raylet frees released objects
# every ``free_objects_period_milliseconds``, 1000 on a Ray started with its defaults.
RAY_FREE_PERIOD_SECS = 1.0


def pending_frees(
    freeing: list[tuple[float, str, int]], node: str, now: float
) -> tuple[int, float]:
    """Of ``freeing`` ((dropped at, node, bytes), ``time.monotonic()`` times): the bytes dropped
    on ``node`` that Ray may not have freed yet (the raylet frees released objects at its next
    periodic free), and when the last of them is surely freed. A save that needs their room
    waits until then, rather than filling the store and making Ray spill held checkpoints to
    disk."""
    mine = [(at, n) for at, where, n in freeing
            if where == node and at + RAY_FREE_PERIOD_SECS > now]
    if not mine:
        return 0, now
    return sum(n for _, n in mine), max(at for at, _ in mine) + RAY_FREE_PERIOD_SECS


def tier_full(path: str, nbytes: int, node: str, capacity: int, held: int) -> MemoryTierFullError:
    """The refusal of memory checkpoint ``path``, of which the saving process writes ``nbytes``,
    on ``node``, which may hold ``capacity`` bytes of memory checkpoints and holds ``held``."""
    mib = 2**20
    needs = (
        f"memory checkpoint {SCHEME}{path} needs {2 * nbytes / mib:.1f} MiB on node {node} (twice "
        f"the {nbytes / mib:.1f} MiB this process saves: its staged bytes and its held copy), "
    )
    if not held:
        return MemoryTierFullError(
            f"{needs}more than the {capacity / mib:.1f} MiB allowed (capacity_fraction of its "
            "object store): give the nodes a larger object store or raise capacity_fraction"
        )
    return MemoryTierFullError(
        f"{needs}but it holds {held / mib:.1f} MiB of memory checkpoints out of "
        f"{capacity / mib:.1f} MiB allowed (capacity_fraction of its object store), and evicting "
        "what may be evicted (all but the newest checkpoint of each directory) would not make "
        "room. Persist and delete older memory checkpoints, lower keep_last, or give the nodes a "
        "larger object store."
    )


@dataclass
class _File:
    nbytes: int
    target: int  # copies wanted
    nodes: list[str] = field(default_factory=list)
    direct: bool = True  # new copies go straight from holder to holder (direct_peer_reads)


@dataclass
class _Dir:
    created: float
    files: dict[str, bytes] = field(default_factory=dict)  # small files: manifest, marker
    data: dict[str, _File] = field(default_factory=dict)
    mtimes: dict[str, float] = field(default_factory=dict)
    keep_last: int = 2
    committed_unix: float | None = None


def _copies_of(d: _Dir) -> tuple[int, list[str]]:
    """The fewest copies any data file of checkpoint ``d`` has, and the nodes holding copies."""
    return (min((len(f.nodes) for f in d.data.values()), default=0),
            sorted({n for f in d.data.values() for n in f.nodes}))


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=32)  # type: ignore[call-overload]
class _Catalog:
    """Where each memory checkpoint's files are: small files kept here, data files by node."""

    def __init__(self) -> None:
        self._dirs: dict[str, _Dir] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._repairs = 0
        self._pinned: dict[str, int] = {}  # path -> pins: being persisted, never freed
        self._freeing: list[tuple[float, str, int]] = []  # (dropped at, node, bytes)
        self._hold_after: dict[str, float] = {}  # directory -> when its held copies fit
        self._watches: dict[str, ray.ObjectRef] = {}  # node -> its holder's pending watch call
        with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:
            logger.warning(
                "memory tier: the catalog's process died and Ray restarted it: the memory "
                "checkpoints it knew are lost (their manifests were in it), and their copies "
                "are freed; loads fall back to durable storage")
        threading.Thread(target=self._repair_loop, daemon=True, name="repair").start()

    # --- the filesystem view ------------------------------------------------------------------

    def protocol(self) -> int:
        return PROTOCOL

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

    def add_data(
        self, path: str, node: str, nbytes: int, target: int, direct: bool = True
    ) -> None:
        parent, _, name = path.rpartition("/")
        with self._lock:
            d = self._dirs.setdefault(parent, _Dir(created=time.time()))
            f = d.data.setdefault(name, _File(nbytes=nbytes, target=target, direct=direct))
            if node not in f.nodes:
                f.nodes.append(node)
            d.mtimes[name] = time.time()

    def copies(self, path: str) -> list[str] | None:
        parent, _, name = path.rpartition("/")
        with self._lock:
            d = self._dirs.get(parent)
            f = None if d is None else d.data.get(name)
            return None if f is None else list(f.nodes)

    def data_copies(self, path: str) -> dict[str, list[str]]:
        """The nodes holding each data file of directory ``path`` (empty: no such dir)."""
        with self._lock:
            d = self._dirs.get(path)
            return {} if d is None else {n: list(f.nodes) for n, f in d.data.items()}

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

    def make_room(
        self, node: str, nbytes: int, capacity: int, saving: str
    ) -> tuple[list[str], float, float]:
        """Evict committed checkpoints holding bytes on ``node``, oldest first, never the newest
        committed one of a directory, one being persisted, nor ``saving``, until a checkpoint of
        ``nbytes`` fits within ``capacity`` twice (its staged bytes and its held copy). Returns
        the evicted paths, how long the save must wait, before staging, for dropped objects
        that still fill the store (see :meth:`freeing_on`) to leave room for the staged bytes,
        and how long until its held copies fit: the writer waits for that (:meth:`hold_wait`),
        after the stall. When even every allowed eviction would not make room, evicts nothing and
        raises MemoryTierFullError."""
        needed = 2 * nbytes
        with self._lock:
            held = self.held_on(node)
            victims: list[str] = []
            for victim in self._evictable(node, saving):
                if held + needed <= capacity:
                    break
                victims.append(victim)
                held -= sum(f.nbytes for f in self._dirs[victim].data.values() if node in f.nodes)
            if held + needed > capacity:
                raise tier_full(saving, nbytes, node, capacity, self.held_on(node))
            for victim in victims:
                self._drop_dir(victim)
            freeing, until = self.freeing_on(node)
            now = time.monotonic()
            self._hold_after = {d: t for d, t in self._hold_after.items() if t > now}
            hold_wait = until - now if held + needed + freeing > capacity else 0.0
            if hold_wait > 0:
                self._hold_after[saving] = until
            return victims, (until - now if held + nbytes + freeing > capacity else 0.0), hold_wait

    def hold_wait(self, directory: str) -> float:
        """Seconds the writer of memory checkpoint ``directory`` must wait before holding its
        files: until Ray has freed the objects dropped to make room for them (0 when none)."""
        with self._lock:
            until = self._hold_after.get(directory)
            now = time.monotonic()
            if until is None or until <= now:
                self._hold_after.pop(directory, None)
                return 0.0
            return until - now

    def freeing_on(self, node: str) -> tuple[int, float]:
        """:func:`pending_frees` on ``node`` now."""
        with self._lock:
            now = time.monotonic()
            self._freeing = [e for e in self._freeing if e[0] + RAY_FREE_PERIOD_SECS > now]
            return pending_frees(self._freeing, node, now)

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
        now = time.monotonic()
        for path, f in files.items():
            for node in f.nodes:
                by_node.setdefault(node, []).append(path)
                self._freeing.append((now, node, f.nbytes))
        for node, keys in by_node.items():
            try:
                lookup(holder_name(node)).drop.remote(keys)
            except ValueError:  # the holder is gone, and its objects with it
                pass

    # --- what is held -------------------------------------------------------------------------

    def checkpoints(self) -> list[dict[str, Any]]:
        """Every memory checkpoint, with its live copies (:meth:`forget_lost` first)."""
        self.forget_lost()
        with self._lock:
            out = []
            for p, d in sorted(self._dirs.items()):
                if not d.data and not d.files:
                    continue
                copies, nodes = _copies_of(d)
                out.append({
                    "path": p,
                    "committed": d.committed_unix is not None,
                    "complete": all(f.nodes for f in d.data.values()),
                    "nodes": nodes,
                    "copies": copies,
                    "nbytes": sum(f.nbytes for f in d.data.values()),
                })
            return out

    def repairs(self) -> int:
        return self._repairs

    # --- repair -------------------------------------------------------------------------------

    def _repair_loop(self) -> None:
        swept = 0.0
        while not self._stop.wait(_REPAIR_PERIOD_SECS):
            try:
                self.repair()
                if time.monotonic() - swept > _SWEEP_PERIOD_SECS:
                    swept = time.monotonic()
                    self.sweep()
            except Exception:
                logger.exception("memory tier: repair round failed")

    def forget_lost(self) -> set[str]:
        """Forget the copies on dead nodes (what a listing or a load's choice of copy needs
        first: quick, where :meth:`repair` also makes the copies again); returns the live
        nodes."""
        alive = set(alive_nodes())
        with self._lock:
            for d in self._dirs.values():
                for f in d.data.values():
                    f.nodes = [n for n in f.nodes if n in alive]
        return alive

    def copies_under(self, directory: str) -> dict[str, tuple[int, list[str]]]:
        """For each checkpoint directly under ``directory``: the fewest live copies any of its
        data files has, and the live nodes holding copies."""
        self.forget_lost()
        prefix = f"{directory}/" if directory else ""
        with self._lock:
            return {p[len(prefix):]: _copies_of(d) for p, d in self._dirs.items()
                    if p.startswith(prefix) and "/" not in p[len(prefix):] and d.data}

    def repair(self) -> int:
        """Forget copies on dead nodes; re-replicate files below their copy target (the repair
        loop's work: it waits for the copies). Returns the number of copies made."""
        alive = self.forget_lost()
        self._check_holders(alive)
        work: list[tuple[str, str, str, bool]] = []
        with self._lock:
            for p, d in self._dirs.items():
                for name, f in d.data.items():
                    if d.committed_unix is None:  # its writer is still replicating it
                        continue
                    want = min(f.target, len(alive))
                    spare = sorted(alive - set(f.nodes), key=self.held_on)
                    if f.nodes and len(f.nodes) < want and spare:
                        work.append((f"{p}/{name}", f.nodes[0], spare[0], f.direct))
        made = 0
        for path, src, dst, direct in work:
            try:
                src_holder = lookup(holder_name(src))
                ray.get(src_holder.push.remote(path, holder_for(dst), direct, background=True))
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

    def sweep(self, grace_secs: float = _UNLISTED_GRACE_SECS) -> int:
        """Have each live node's holder drop the copies this catalog does not list there, taken
        more than ``grace_secs`` ago (:meth:`_Holder.drop_unlisted`). Returns how many."""
        by_node = self._files_by_node()
        calls = {}
        for node in alive_nodes():
            try:
                holder = lookup(holder_name(node))
            except ValueError:  # no holder there
                continue
            calls[node] = holder.drop_unlisted.remote(list(by_node.get(node, {})), grace_secs)
        dropped = 0
        for node, call in calls.items():
            try:
                unlisted = ray.get(call)
            except ray.exceptions.RayActorError:  # it died meanwhile, and its copies with it
                continue
            if unlisted:
                logger.warning(
                    "memory tier: node %s's holder held %d file(s) that no memory checkpoint "
                    "lists (%s%s%s): from a save that died before listing them, or a catalog "
                    "that died; freed", node, len(unlisted), SCHEME, unlisted[0],
                    ", ..." if len(unlisted) > 1 else "")
            dropped += len(unlisted)
        return dropped

    def _check_holders(self, alive: set[str]) -> None:
        """Forget the copies of a holder that died on a live node (a dead node's are forgotten
        by :meth:`forget_lost`). Each holder with copies has a ``watch`` call pending, which fails
        when its process dies; one that returned is renewed."""
        in_use = set(self._files_by_node()) & alive
        for node in set(self._watches) - in_use:
            del self._watches[node]
        for node in in_use - set(self._watches):
            try:
                self._watches[node] = lookup(holder_name(node)).watch.remote(_WATCH_SECS)
            except ValueError:  # no holder there (it died before a watch began)
                self._holder_died(node)
        if not self._watches:
            return
        ready, _ = ray.wait(list(self._watches.values()), num_returns=len(self._watches),
                            timeout=0)
        for node, call in list(self._watches.items()):
            if call not in ready:
                continue
            del self._watches[node]
            try:
                ray.get(call)
            except ray.exceptions.RayActorError:
                self._holder_died(node)

    def _files_by_node(self) -> dict[str, dict[str, _File]]:
        """node -> {path: file} of the data files listed there."""
        by_node: dict[str, dict[str, _File]] = {}
        with self._lock:
            for p, d in self._dirs.items():
                for name, f in d.data.items():
                    for node in f.nodes:
                        by_node.setdefault(node, {})[f"{p}/{name}"] = f
        return by_node

    def _holder_died(self, node: str) -> None:
        """The holder of live ``node`` died, and its copies with it: forget those that the
        node's holder now (a new one, started since) does not hold."""
        files = self._files_by_node().get(node, {})
        try:
            held = ray.get(lookup(holder_name(node)).refs.remote(list(files)))
        except (ValueError, ray.exceptions.RayActorError):
            held = [[] for _ in files]
        lost = [path for path, refs in zip(files, held) if not refs]
        with self._lock:
            for path in lost:
                if node in files[path].nodes:
                    files[path].nodes.remove(node)
        if lost:
            logger.warning(
                "memory tier: the holder on node %s died, and with it its copies of %d file(s) "
                "(%s%s%s): re-replicating them from their other copies", node, len(lost), SCHEME,
                lost[0], ", ..." if len(lost) > 1 else "")


def in_use() -> bool:
    """Whether this cluster has a memory tier yet (its catalog actor exists)."""
    try:
        named_actor(CATALOG_NAME)
    except ValueError:
        return False
    return True


def catalog() -> Any:
    """The cluster's catalog actor, created (detached, on the head node) on first use."""
    try:
        return named_actor(CATALOG_NAME)
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


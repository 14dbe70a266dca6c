"""Checkpoints across tiers: persist memory checkpoints, and restore from the best place.

* :func:`persist` writes a committed memory checkpoint to durable storage straight from the
  held objects: each data file is written by the holder actor of a node that holds it (zero-copy
  out of its own object, no second staging), then the manifest, then the marker, last, through
  the destination's commit strategy. The files are the memory checkpoint's own bytes, so the
  result is exactly today's on-disk format.
* :func:`load_newest` loads the newest committed checkpoint among several roots (a memory root
  and a durable one): ``(step, commit time)`` decides, a memory checkpoint wins a tie. It logs
  where it loaded from (this node's holder, a peer's holder, durable storage) and why; when
  every copy of a newer memory checkpoint is lost, it warns, naming the steps lost, and loads the
  next one whole: nothing is ever loaded half from one checkpoint and half from another.
* :class:`TieredCheckpointManager` is the policy "in memory every step, keep the last 2; to
  durable storage every 500 steps, keep the last 3 and the best 2".
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import Any

import ray

from .catalog import CheckpointEntry, join_path, list_checkpoints
from .checkpointer import AsyncCheckpointer, Checkpointer
from .errors import CheckpointError, CheckpointNotFoundError, IncompleteCheckpointError
from .format.marker import Marker
from .format.names import MARKER_NAME, marker_temp_name
from .manager import CheckpointManager
from .save.commit import discard_files
from .save.pipeline import check_destination
from .storage import memory
from .storage.atomic import commit_strategy_for
from .storage.storage import Storage

logger = logging.getLogger(__name__)

MEMORY = "memory"
DURABLE = "durable"


@dataclass(frozen=True)
class MemoryCheckpointInfo:
    """Where a memory checkpoint's copies are (see :func:`memory_checkpoints`)."""

    path: str  # mem://...
    committed: bool
    complete: bool  # every data file has a copy on an alive node
    copies: int  # the fewest copies any of its data files has
    nodes: list[str] = field(default_factory=list)
    nbytes: int = 0
    tier: str = MEMORY


def memory_checkpoints() -> list[MemoryCheckpointInfo]:
    """Every memory checkpoint of the cluster, with the nodes that hold copies."""
    return [
        MemoryCheckpointInfo(
            path=f"{memory.SCHEME}{c['path']}", committed=c["committed"], complete=c["complete"],
            copies=c["copies"], nodes=c["nodes"], nbytes=c["nbytes"],
        )
        for c in ray.get(memory.catalog().checkpoints.remote())
    ]


# --- persist ----------------------------------------------------------------------------------


def persist(
    memory_path: str,
    durable_path: str,
    *,
    filesystem: Any = None,
    fsync: bool = True,
) -> str:
    """Write committed memory checkpoint ``memory_path`` to ``durable_path`` (a path on
    ``filesystem``, or a local path or URI) in the on-disk format; returns ``durable_path``."""
    src = Storage.from_path(memory_path)
    if memory.handler_of(src.fs) is None:
        raise ValueError(f"persist copies a memory checkpoint (mem://...), not {src.display}")
    _check_durable(durable_path, filesystem)
    cat = memory.catalog()
    if not ray.get(cat.pin.remote(src.path)):
        raise CheckpointNotFoundError(
            f"{src.display} is not a committed memory checkpoint: nothing to persist"
        )
    try:
        return _persist_pinned(src, durable_path, filesystem, fsync)
    finally:
        cat.unpin.remote(src.path)


def _check_durable(path: str, filesystem: Any) -> None:
    dest = Storage.from_path(path, filesystem)
    if memory.handler_of(dest.fs) is not None:
        raise ValueError(
            f"{dest.display} is in the memory tier: memory checkpoints persist to durable "
            "storage (a local path or an object-store URI such as s3://bucket/run)"
        )


def _persist_pinned(src: Storage, durable_path: str, filesystem: Any, fsync: bool) -> str:
    files = src.list_files()
    raw_marker = src.read_file(MARKER_NAME)
    marker = Marker.from_bytes(raw_marker, where=src.display)
    dest = Storage.from_path(durable_path, filesystem)
    check_destination(dest, overwrite=False)
    try:
        _persist_data(src, dest, [n for n in files if n.endswith(".data")], fsync)
        dest.write_file(marker.manifest, [src.read_file(marker.manifest)], fsync=fsync)
        commit_strategy_for(dest.fs).commit(
            dest, MARKER_NAME, raw_marker, marker_temp_name(marker.checkpoint_id), exclusive=True
        )
    except BaseException:
        discard_files(dest, marker.checkpoint_id)
        raise
    logger.info("persisted %s to %s (%.1f MiB)", src.display, dest.display,
                marker.total_nbytes / 2**20)
    return durable_path


def _persist_data(src: Storage, dest: Storage, names: list[str], fsync: bool) -> None:
    """Each data file written by a holder of it, all at once; another holder on failure."""
    cat = memory.catalog()
    pending = {}
    for name in names:
        key = f"{src.path}/{name}"
        nodes = ray.get(cat.copies.remote(key)) or []
        pending[name] = (key, list(nodes))
    errors: dict[str, str] = {}
    while pending:
        calls = {}
        for name, (key, nodes) in list(pending.items()):
            if not nodes:
                del pending[name]
                continue
            holder = ray.get_actor(memory.holder_name(nodes[0]), namespace=memory.NAMESPACE)
            calls[name] = holder.write_to.remote(key, dest, name, fsync)
        for name, ref in calls.items():
            key, nodes = pending[name]
            try:
                ray.get(ref)
                del pending[name]
            except (ray.exceptions.RayError, ValueError) as e:
                errors[name] = f"node {nodes[0]}: {e}"
                nodes.pop(0)
    lost = [n for n in names if n in errors and not _written(dest, n)]
    if lost:
        raise IncompleteCheckpointError(
            f"cannot persist {src.display}: no holder could write {', '.join(lost)} "
            f"({'; '.join(errors[n] for n in lost)}); nothing was committed to {dest.display}"
        )


def _written(dest: Storage, name: str) -> bool:
    return dest.exists(name)


# --- restore ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A committed checkpoint a load may start from."""

    path: str
    tier: str
    step: int | None
    created_unix: float


def candidates(roots: list[str], *, filesystem: Any = None) -> list[Source]:
    """Committed checkpoints under ``roots``, newest first (a memory one first on a tie)."""
    found = []
    for root in roots:
        tier = MEMORY if root.startswith(memory.SCHEME) else DURABLE
        if tier == MEMORY and not memory.in_use():
            continue  # no memory checkpoint anywhere (and none is created by looking)
        fs = None if tier == MEMORY else filesystem
        for e in list_checkpoints(root, filesystem=fs):
            if e.committed:
                found.append(Source(e.path, tier, e.step, e.created_unix or 0.0))
    return sorted(
        found, key=lambda s: (s.step if s.step is not None else -1, s.created_unix,
                              s.tier == MEMORY), reverse=True,
    )


def where_held(path: str) -> str | None:
    """For a memory checkpoint: "this node's holder" when this node holds every data file,
    "a peer's holder" when another node holds some, None when some file has no copy left."""
    storage = Storage.from_path(path)
    cat = memory.catalog()
    ray.get(cat.forget_lost.remote())  # not repair(): it would wait for the re-replication
    local = ray.get_runtime_context().get_node_id()
    names = [n for n in storage.list_files() if n.endswith(".data")]
    copies = ray.get([cat.copies.remote(f"{storage.path}/{n}") for n in names])
    if any(not c for c in copies):
        return None
    return "this node's holder" if all(local in c for c in copies) else "a peer's holder"


def choose(sources: list[Source]) -> tuple[Source, str, list[Source]]:
    """The newest source that can be read whole, where it is read from, and the newer memory
    checkpoints skipped because every copy of some file of theirs is lost."""
    lost: list[Source] = []
    for source in sources:
        if source.tier == DURABLE:
            return source, "durable storage", lost
        where = where_held(source.path)
        if where is not None:
            return source, where, lost
        lost.append(source)
    raise CheckpointNotFoundError(
        "no committed checkpoint can be loaded"
        + (f": every copy of {', '.join(s.path for s in lost)} is lost" if lost else "")
    )


def load_newest(
    ckptr: Checkpointer, roots: list[str], state_dict: Any = None, *, filesystem: Any = None,
    **load_kwargs: Any,
) -> tuple[Any, Source]:
    """Load the newest committed checkpoint under ``roots`` (see the module docstring)."""
    sources = candidates(roots, filesystem=filesystem)
    if not sources:
        raise CheckpointNotFoundError(f"no committed checkpoint under {', '.join(roots)}")
    while True:
        source, where, lost = choose(sources)
        _log_choice(source, where, lost, sources)
        try:
            return ckptr.load(source.path, state_dict, **load_kwargs), source
        except CheckpointError as e:  # MemoryCopiesLostError, or a read that lost its copy
            if source.tier == DURABLE or not _is_loss(e):
                raise
            # a copy vanished during the load: the next source is loaded whole, over it
            logger.warning("memory checkpoint %s was lost while loading: %s", source.path, e)
            sources = [s for s in sources if s != source and s not in lost]


def _is_loss(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, memory.MemoryCopiesLostError) or "copy of" in text or "lost" in text


def _log_choice(source: Source, where: str, lost: list[Source], sources: list[Source]) -> None:
    lost = [s for s in lost if s.step is None or source.step is None or s.step > source.step]
    if lost:
        steps = ", ".join(str(s.step) for s in lost)
        logger.warning(
            "every copy of memory checkpoint(s) %s is lost (their nodes are gone); falling back "
            "to %s, step %s: the progress of step(s) %s is lost",
            ", ".join(s.path for s in lost), source.path, source.step, steps,
        )
    newest_durable = next((s for s in sources if s.tier == DURABLE), None)
    logger.info(
        "loading %s (step %s) from %s: the newest committed checkpoint that can be read whole "
        "(newest durable: %s)", source.path, source.step, where,
        newest_durable.path if newest_durable else "none",
    )


# --- the policy -------------------------------------------------------------------------------


class TieredCheckpointManager:
    """A checkpoint in memory every step, a durable one every ``persist_every`` steps.

    Example ("in memory every step, keep the last 2; to S3 every 500 steps, keep the last 3
    and the best 2")::

        ckptr = ray_ckpt.make_async_checkpointer()
        durable = ray_ckpt.CheckpointManager("s3://bucket/run", ckptr, keep_last=3,
                                             keep_best=2, metric="loss")
        manager = ray_ckpt.tiers.TieredCheckpointManager(durable, "mem://run?keep_last=2",
                                                   persist_every=500)
        manager.save(step, state, metrics={"loss": loss})
        manager.load(state_dict=state)      # the newest of both tiers

    Durable checkpoints are persisted from the memory checkpoint of their step (no second
    staging), on a background thread once the memory save has committed.
    """

    def __init__(
        self, durable: CheckpointManager, memory_root: str, *, persist_every: int,
    ) -> None:
        if not memory_root.startswith(memory.SCHEME):
            raise ValueError(f"memory_root must be a mem:// URI, got {memory_root!r}")
        if not isinstance(persist_every, int) or persist_every < 1:
            raise ValueError(f"persist_every must be a positive integer, got {persist_every!r}")
        _check_durable(durable.root, durable._filesystem)
        self.durable = durable
        self.memory_root = memory_root
        self.persist_every = persist_every
        self._ckptr = durable._ckptr
        self._pending: tuple[int, Any] | None = None  # step, write future (async)
        self._persisting: concurrent.futures.Future[Any] | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ray_ckpt-persist"
        )

    def path(self, step: int) -> str:
        return join_path(self.memory_root, CheckpointManager.dir_name(step))

    def save(self, step: int, state_dict: Any, metrics: dict[str, Any] | None = None,
             **save_kwargs: Any) -> Any:
        """Save ``step`` to memory; persist it to durable storage when ``step`` is a multiple of
        ``persist_every``. Returns what the checkpointer's save returns."""
        self._settle()
        metadata = {"metrics": dict(metrics or {}), "step": step}
        result = self._ckptr.save(self.path(step), state_dict, metadata=metadata, **save_kwargs)
        if step % self.persist_every == 0:
            if result is not None:  # an async save: persist once it has committed
                self._pending = (step, result[1])
            else:
                self._start_persist(step)
        return result

    def persist(self, step: int) -> str:
        """Persist memory checkpoint ``step`` now (on request); returns the durable path."""
        self._settle()
        dest = persist(self.path(step), self.durable.path(step),
                       filesystem=self.durable._filesystem)
        self.durable.apply_retention()
        return dest

    def _start_persist(self, step: int, write: Any = None) -> None:
        if write is not None:
            write.result()  # committed (raises the save's error)
        cat = memory.catalog()
        path = Storage.from_path(self.path(step)).path
        ray.get(cat.pin.remote(path))  # no later save's retention frees it meanwhile

        def run() -> str:
            try:
                dest = persist(self.path(step), self.durable.path(step),
                               filesystem=self.durable._filesystem)
            finally:
                cat.unpin.remote(path)
            self.durable.apply_retention()
            return dest

        self._persisting = self._thread.submit(run)

    def _settle(self) -> None:
        """Start a due persist; wait for the previous one (raising its error)."""
        if self._pending is not None:
            step, write = self._pending
            self._pending = None
            self.wait()
            self._start_persist(step, write)

    def wait(self) -> None:
        """Wait for the memory save and the persist in flight (raises their error)."""
        if self._pending is not None:
            step, write = self._pending
            self._pending = None
            self._start_persist(step, write)
        if isinstance(self._ckptr, AsyncCheckpointer):
            self._ckptr.wait()
        if self._persisting is not None:
            persisting, self._persisting = self._persisting, None
            persisting.result()

    def entries(self) -> list[CheckpointEntry]:
        """Committed checkpoints of both tiers, memory first."""
        return list_checkpoints(self.memory_root) + self.durable.entries()

    def load(self, state_dict: Any = None, **load_kwargs: Any) -> tuple[Any, Source]:
        """Load the newest committed checkpoint of both tiers; returns it and its source."""
        self.wait()
        return load_newest(
            self._ckptr, [self.memory_root, self.durable.root], state_dict,
            filesystem=self.durable._filesystem, **load_kwargs,
        )

    def close(self) -> None:
        self.wait()
        self._thread.shutdown(wait=True)


__all__ = [
    "MemoryCheckpointInfo",
    "Source",
    "TieredCheckpointManager",
    "load_newest",
    "memory_checkpoints",
    "persist",
]

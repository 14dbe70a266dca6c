"""Writers: one Ray actor per node writes the staged buckets of that node to storage.

Who calls what::

    caller (stager + coordinator)           writer actor on the caller's node
    ────────────────────────────            ──────────────────────────────────────────
    run_save(token, request)  ───────────►  waits for staging to end, then gathers,
    wait_staged(token, [ref]) ───────────►  (resolves when staging has ended; fails the save
                                            at once if the caller's process dies first)
    write_bucket(layout, [ref]) ─────────►  any node's writer: ray.get the bucket (zero-copy
                                            from shared memory), checksum, write, fsync
    end_staging(token, outcome) ─────────►  wakes run_save and wait_staged
                                            run_save: manifest, hooks, marker (coordinator)

The refs of ``run_save`` and ``wait_staged`` exist as soon as ``save`` is called: they are the
``ObjectRef`` behind the write and the stage futures.

The actor is named ``ray_ckpt.writer.<pool>.<node id>`` in the configured namespace, found
again with ``get_if_exists``, pinned to its node with ``NodeAffinitySchedulingStrategy(soft=
False)``, detached (it outlives the process that happened to create it) and restarted on
failure.

Lifetime: a writer exits once nothing has been in flight on it (no save, no write, no call at
all) for ``CheckpointWriterConfig.idle_timeout_secs`` (10 minutes by default), so that the
writers of finished jobs do not hold their processes and memory on the cluster; ``None`` keeps
them. The next save starts it again. A caller that has not used its cached handle for half the
timeout pings it first (a ping counts as use), and finds or creates the writer anew if it has
exited. It needs no CPU slot (``num_cpus=0``), so it never competes with training for them.
Writing itself lives in :class:`CheckpointWriter`, a plain class the actor hosts, so that a
custom writer (``checkpoint_writer_init_fn``) or a test that injects faults can subclass it.
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ._checksum import crc32c
from .config import CheckpointWriterConfig
from .credentials import Handoff, accept
from .errors import CheckpointWriteError
from .format import HEADER_SIZE, Extent, PackedRows, encode_header, without_gc
from .stager import BucketLayout
from .storage import Storage

logger = logging.getLogger(__name__)

_ZEROS = bytes(64)
_CALLER_POLL_SECS = 0.5


class WriterHook(abc.ABC):
    """Actions around the commit of a checkpoint.

    Both run once per checkpoint, in the writer actor that commits it (the one on the node of
    the saving process, or of rank 0's coordinator for multi-rank saves), so a hook must pickle.
    ``pre_commit`` runs after every data file and the manifest are durable and before the
    marker is written; an exception there fails the save with nothing committed.
    ``post_commit`` runs after the marker is durable.
    """

    @abc.abstractmethod
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Called before the commit marker is written."""

    @abc.abstractmethod
    def post_commit(self, path: str, **kwargs: Any) -> None:
        """Called after the commit marker is written."""


@dataclass(frozen=True)
class ShardResult:
    """What one writer wrote for one bucket: its data file and the extents in it."""

    file: str
    file_nbytes: int
    extents: list[Extent]  # PackedRows: cheap to send
    node_id: str
    write_secs: float


class CheckpointWriter:
    """Writes one staged bucket as one data file: header, aligned extents, checksums, fsync.

    Hosted by the writer actor of a node; plain Python, so it can be subclassed (a custom
    ``checkpoint_writer_init_fn``) or wrapped to inject faults.
    """

    def __init__(self, config: CheckpointWriterConfig | None = None) -> None:
        self.config = config or CheckpointWriterConfig()

    @without_gc
    def write_bucket(
        self,
        storage: Storage,
        layout: BucketLayout,
        arrays: list[list[Any]],
        *,
        rank: int,
        checkpoint_id: str,
        checksum: bool,
        fsync: bool,
    ) -> list[Extent]:
        """Write bucket ``layout`` from ``arrays``: each array of the layout, given as the list
        of its consecutive pieces (as the stager puts them; anything with the buffer
        protocol)."""
        if len(arrays) != len(layout.array_nbytes):
            raise CheckpointWriteError(
                f"bucket {layout.file} arrived with {len(arrays)} arrays, expected "
                f"{len(layout.array_nbytes)}"
            )
        views = [_Pieces(array) for array in arrays]
        for index, (view, nbytes) in enumerate(zip(views, layout.array_nbytes)):
            if view.nbytes != nbytes:
                raise CheckpointWriteError(
                    f"bucket {layout.file}: array {index} arrived with {view.nbytes} bytes, "
                    f"expected {nbytes}"
                )
        crcs: list[int | None] = [None] * len(layout.segments)
        # the segments of each array: a chunk (one segment, the whole array) is checksummed
        # piece by piece as it is written, while the piece is in the CPU cache
        by_array: list[list[int]] = [[] for _ in views]
        for index, seg in enumerate(layout.segments):
            by_array[seg.array].append(index)

        def produce(write: Callable[[memoryview | bytes], None]) -> None:
            write(encode_header(rank, layout.seq, checkpoint_id))
            position = HEADER_SIZE
            for array, (view, offset) in enumerate(zip(views, layout.array_offsets)):
                if offset > position:
                    write(_ZEROS[: offset - position])
                segs = by_array[array]
                whole = len(segs) == 1 and layout.segments[segs[0]].length == view.nbytes
                if whole:
                    crc = 0
                    for piece in view.pieces:
                        if checksum:
                            crc = crc32c(piece, crc)
                        write(piece)
                    crcs[segs[0]] = crc if checksum else None
                else:
                    if checksum:
                        for index in segs:
                            seg = layout.segments[index]
                            crcs[index] = view.crc32c(seg.start, seg.length)
                    for piece in view.pieces:
                        write(piece)
                position = offset + view.nbytes

        storage.write_stream(layout.file, produce, fsync=fsync)
        extents = PackedRows(
            Extent(
                item=seg.item,
                chunk_offset=seg.chunk_offset,
                file=layout.file,
                offset=layout.array_offsets[seg.array] + seg.start,
                length=seg.length,
                checksum=crcs[index],
                rank=rank,
            )
            for index, seg in enumerate(layout.segments)
        )
        return extents


class _Pieces:
    """One staged array, as the consecutive pieces it was put in."""

    def __init__(self, pieces: list[Any]) -> None:
        self.pieces = [memoryview(p).cast("B") for p in pieces]
        self.starts = list(itertools.accumulate((len(p) for p in self.pieces), initial=0))
        self.nbytes = self.starts[-1]

    def crc32c(self, start: int, length: int) -> int:
        """The CRC32C of bytes ``[start, start + length)``, which may span pieces."""
        crc = 0
        index = bisect.bisect_right(self.starts, start) - 1
        end = start + length
        while start < end:
            piece, base = self.pieces[index], self.starts[index]
            stop = min(end, base + len(piece))
            crc = crc32c(piece[start - base : stop - base], crc)
            start = stop
            index += 1
        return crc


def default_writer_init_fn(config: CheckpointWriterConfig) -> CheckpointWriter:
    """The default ``checkpoint_writer_init_fn``: a plain :class:`CheckpointWriter`."""
    return CheckpointWriter(config)


def default_subprocess_init_fn(*_: Any) -> None:
    """The default ``subprocess_init_fn`` run once in every writer actor: nothing."""


# --- the actor --------------------------------------------------------------------------------


class _Abandoned:
    """Checkpoint ids whose save failed in this process after its files were discarded (or
    while they were): a write of one that ends later deletes its own file, so that a save cut
    short leaves no data behind once its writer knows. Remembers the last ``limit`` ids."""

    def __init__(self, limit: int = 4096) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, None] = {}
        self._limit = limit

    def add(self, checkpoint_id: str) -> None:
        with self._lock:
            self._ids[checkpoint_id] = None
            while len(self._ids) > self._limit:
                del self._ids[next(iter(self._ids))]

    def __contains__(self, checkpoint_id: str) -> bool:
        with self._lock:
            return checkpoint_id in self._ids


ABANDONED = _Abandoned()  # per writer process; commit.discard_files adds to it


@dataclass
class _Slot:
    event: threading.Event = field(default_factory=threading.Event)
    outcome: Any = None
    consumers: int = 2
    cancelled: bool = False
    committing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin_commit(self) -> bool:
        """Claim the right to commit; False when the save was cancelled first."""
        with self.lock:
            if self.cancelled:
                return False
            self.committing = True
            return True


class _Mailbox:
    """Per-save meeting point of ``run_save``, ``wait_staged`` and ``end_staging``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def slot(self, token: str) -> _Slot:
        with self._lock:
            return self._slots.setdefault(token, _Slot())

    def deliver(self, token: str, outcome: Any) -> None:
        slot = self.slot(token)
        slot.outcome = outcome
        slot.event.set()

    def take(self, token: str, timeout_secs: float) -> _Slot:
        """Wait for ``token``'s outcome; the slot is dropped once both consumers took it."""
        slot = self.slot(token)
        arrived = slot.event.wait(timeout_secs)
        with self._lock:
            slot.consumers -= 1
            if slot.consumers <= 0:
                self._slots.pop(token, None)
        if not arrived:
            raise CheckpointWriteError(
                f"staging of save {token} did not finish within {timeout_secs:.0f}s "
                "(barrier_timeout_secs); the saving process may have died. Nothing was committed."
            )
        return slot


class _Activity:
    """What is in flight on a writer actor, and since when it has been idle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self._since = time.monotonic()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._since = time.monotonic()

    def idle_secs(self) -> float:
        """Seconds since the last call ended; 0 while one is in flight."""
        with self._lock:
            return 0.0 if self._in_flight else time.monotonic() - self._since


class _WriterActor:
    """The Ray actor of one node. See the module docstring for the protocol."""

    def __init__(
        self,
        node_id: str,
        config: CheckpointWriterConfig,
        writer_init_fn: Callable[..., CheckpointWriter],
        writer_init_args: dict[str, Any],
        subprocess_init_fn: Callable[..., None],
        subprocess_init_args: tuple[Any, ...],
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        subprocess_init_fn(*subprocess_init_args)
        self._node_id = node_id
        self._writer = writer_init_fn(config, **writer_init_args)
        self._mailbox = _Mailbox()
        self._running: dict[str, _Slot] = {}
        self._io_slots = threading.BoundedSemaphore(config.io_threads)
        self._activity = _Activity()
        self._idle_timeout_secs = config.idle_timeout_secs
        if self._idle_timeout_secs is not None:
            threading.Thread(target=self._retire_when_idle, name="ray_ckpt-idle",
                             daemon=True).start()

    def node_id(self) -> str:
        with self._activity.busy():  # a ping: the caller is about to use this writer
            return self._node_id

    def _retire_when_idle(self) -> None:
        """Ask this actor to exit once it has been idle for ``idle_timeout_secs``."""
        timeout = float(self._idle_timeout_secs or 0)
        while True:
            time.sleep(max(0.5, min(timeout - self._activity.idle_secs(), 5.0)))
            if self._activity.idle_secs() >= timeout:
                ray.get_runtime_context().current_actor.retire.remote()

    @ray.method(concurrency_group="control")
    def retire(self) -> bool:
        """Exit (for good: no restart) if idle for ``idle_timeout_secs``; else False."""
        idle = self._activity.idle_secs()
        if self._idle_timeout_secs is None or idle < self._idle_timeout_secs:
            return False
        logger.info("writer %s idle for %.0f s: exiting", self._node_id, idle)
        # exit_actor() would wait for this threaded actor's other threads; nothing is in
        # flight, so end the process at once, for good (no restart), which frees the name
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        return True

    @ray.method(concurrency_group="io")
    def write_bucket(
        self,
        handoff: Handoff | None,
        storage: Storage,
        layout: BucketLayout,
        payload: list[list[list[Any]]],
        part: int,
        rank: int,
        checkpoint_id: str,
        checksum: bool,
        fsync: bool,
    ) -> ShardResult:
        # ``payload`` (a group of buckets, each a list of arrays, each a list of pieces; this
        # call writes bucket ``part`` of it) was passed as a top-level ObjectRef: Ray resolved
        # it zero-copy from this node's shared memory, and releases it once every call given
        # it has returned.
        accept(handoff)  # before ``storage`` is used: its filesystem's secrets
        arrays = payload[part]
        del payload
        with self._activity.busy(), self._io_slots:
            start = time.perf_counter()
            abandoned = checkpoint_id in ABANDONED
            extents = [] if abandoned else self._writer.write_bucket(
                storage, layout, arrays, rank=rank, checkpoint_id=checkpoint_id,
                checksum=checksum, fsync=fsync,
            )
            del arrays
            if abandoned or checkpoint_id in ABANDONED:  # its save failed: leave no data behind
                storage.delete_files([layout.file])
                raise CheckpointWriteError(
                    f"save {checkpoint_id} to {storage.display} was abandoned; its data file "
                    f"{layout.file} was deleted"
                )
        return ShardResult(
            file=layout.file,
            file_nbytes=layout.file_nbytes,
            extents=extents,
            node_id=self._node_id,
            write_secs=time.perf_counter() - start,
        )

    @ray.method(concurrency_group="control")
    def run_save(self, handoff: Handoff | None, token: str, request: Any) -> Any:
        from .commit import commit_save

        accept(handoff)  # before ``request.storage`` is used: its filesystem's secrets
        slot = self._mailbox.slot(token)
        self._running[token] = slot
        try:
            with self._activity.busy():
                self._mailbox.take(token, request.barrier_timeout_secs)
                return commit_save(request, slot)
        finally:
            self._running.pop(token, None)

    @ray.method(concurrency_group="control")
    def wait_staged(
        self, token: str, timeout_secs: float, caller: list[ray.ObjectRef] | None = None
    ) -> Any:
        with self._activity.busy():
            if caller:
                self._watch_caller(token, caller[0], timeout_secs)
            outcome = self._mailbox.take(token, timeout_secs).outcome
        if outcome.error is not None:
            raise outcome.error
        return outcome.stats

    def _watch_caller(self, token: str, alive: ray.ObjectRef, timeout_secs: float) -> None:
        """Until staging ends, check that the saving process lives: ``alive`` (the save's write
        ref, owned by that process) becomes ready only if it dies. Then fail the save, which
        deletes its files, instead of holding it for ``timeout_secs``."""
        from .coordinator import StagingOutcome

        slot = self._mailbox.slot(token)
        deadline = time.monotonic() + timeout_secs
        while not slot.event.wait(_CALLER_POLL_SECS) and time.monotonic() < deadline:
            ready, _ = ray.wait([alive], timeout=0, fetch_local=False)
            if ready:
                error = CheckpointWriteError(
                    f"the process that started save {token} died before it finished staging; "
                    "nothing was committed"
                )
                self._mailbox.deliver(token, StagingOutcome(error=error))
                return

    @ray.method(concurrency_group="control")
    def end_staging(self, token: str, outcome: Any) -> None:
        with self._activity.busy():
            self._mailbox.deliver(token, outcome)

    @ray.method(concurrency_group="control")
    def cancel(self, token: str) -> bool:
        """Stop save ``token`` before its commit; False once the commit has begun."""
        slot = self._running.get(token) or self._mailbox.slot(token)
        with slot.lock:
            if slot.committing:
                return False
            slot.cancelled = True
            return True


# Ray fixes concurrency groups per class; the writer's own semaphore applies io_threads.
# (Ray's typing overloads of ``ray.remote`` omit ``concurrency_groups``, a documented option.)
WriterActor = ray.remote(  # type: ignore[call-overload]
    concurrency_groups={"io": 16, "control": 32}
)(_WriterActor)

# The writer is long-lived, so its heap must not creep. Measured over 70 saves of a 16 MB state
# dict with 2,000 tensors: Arrow's default jemalloc pool kept what each manifest build used
# (+210 MiB before it levelled off), and glibc's per-thread malloc arenas fragmented across the
# actor's threads (+6 MiB a save). Arrow's system pool and two arenas keep it within 15 MiB.
_WRITER_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system"}}


class WriterPool:
    """Finds (or creates) the writer actor of a node. One per checkpointer; cheap to keep."""

    def __init__(
        self,
        config: CheckpointWriterConfig,
        namespace: str,
        *,
        writer_init_fn: Callable[..., CheckpointWriter] = default_writer_init_fn,
        writer_init_args: dict[str, Any] | None = None,
        subprocess_init_fn: Callable[..., None] = default_subprocess_init_fn,
        subprocess_init_args: tuple[Any, ...] = (),
    ) -> None:
        self._config = config
        self._namespace = namespace
        writer_args = writer_init_args or {}
        self._init = (writer_init_fn, writer_args, subprocess_init_fn, subprocess_init_args)
        self._custom = not (
            writer_init_fn is default_writer_init_fn
            and subprocess_init_fn is default_subprocess_init_fn
            and not writer_init_args
        )
        self._pool = _pool_name(self._custom, config)
        self._handles: dict[str, Any] = {}
        self._used: dict[str, float] = {}  # when each cached handle was last used (monotonic)
        self._died: set[str] = set()  # nodes whose writer died: wait for its successor
        self._lock = threading.Lock()

    def local_node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def actor_name(self, node_id: str) -> str:
        return f"ray_ckpt.writer.{self._pool}.{node_id}"

    def for_node(self, node_id: str) -> Any:
        with self._lock:
            handle = self._handles.get(node_id)
            if handle is not None and not self._still_there(node_id, handle):
                handle = None
            self._used[node_id] = time.monotonic()
            if handle is None:
                handle = self._create(node_id)
                if node_id in self._died:
                    _wait_until_alive(handle, self.actor_name(node_id))
                    self._died.discard(node_id)
                self._handles[node_id] = handle
            return handle

    def local(self) -> Any:
        return self.for_node(self.local_node_id())

    def _still_there(self, node_id: str, handle: Any) -> bool:
        """Whether a cached writer may be used: certainly when this pool used it within half
        its idle timeout (it cannot have retired since); else ask it (the ping counts as use,
        so it will not retire before the save's calls reach it)."""
        timeout = self._config.idle_timeout_secs
        if timeout is None or time.monotonic() - self._used.get(node_id, 0.0) < timeout / 2:
            return True
        try:
            ray.get(handle.node_id.remote(), timeout=_RESTART_TIMEOUT_SECS)
            return True
        except RayActorError:
            logger.info("writer on node %s has exited (idle); starting it again", node_id)
            del self._handles[node_id]
            return False

    def forget(self, node_id: str) -> None:
        """Drop a cached handle (its actor died for good); the next call finds or creates anew."""
        with self._lock:
            self._handles.pop(node_id, None)

    def forget_dead(self, error: BaseException) -> None:
        """Drop the cached handle of the writer that ``error`` (a ``RayActorError``) reports
        dead, so that the next save finds it restarted, or creates it anew, instead of calling
        a handle whose actor is gone for good."""
        actor_id = getattr(error, "actor_id", None)
        if not isinstance(error, RayActorError) or not actor_id:
            return
        with self._lock:
            for node_id, handle in list(self._handles.items()):
                if handle._actor_id.hex() == actor_id:
                    del self._handles[node_id]
                    self._died.add(node_id)

    def close(self) -> None:
        """Kill the writers of a custom pool (shared default writers stay for other users)."""
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        if self._custom:
            for handle in handles:
                ray.kill(handle, no_restart=True)

    def _create(self, node_id: str) -> Any:
        writer_init_fn, writer_init_args, subprocess_init_fn, subprocess_init_args = self._init
        return WriterActor.options(  # type: ignore[attr-defined]
            name=self.actor_name(node_id),
            namespace=self._namespace,
            get_if_exists=True,
            lifetime=None if self._custom else "detached",
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            runtime_env=_WRITER_ENV,
        ).remote(
            node_id,
            self._config,
            writer_init_fn,
            writer_init_args,
            subprocess_init_fn,
            subprocess_init_args,
        )


_RESTART_TIMEOUT_SECS = 300.0


def _wait_until_alive(handle: Any, name: str) -> None:
    """Wait until the writer behind ``handle`` answers: one that is restarting after its
    process died (a call to it would fail at once with ActorUnavailableError), or one just
    created in place of a writer killed for good. The ping is retried across restarts."""
    try:
        ray.get(
            handle.node_id.options(max_task_retries=-1).remote(), timeout=_RESTART_TIMEOUT_SECS
        )
    except (RayActorError, ray.exceptions.GetTimeoutError) as e:
        raise CheckpointWriteError(
            f"the writer actor {name} died and did not come back within "
            f"{_RESTART_TIMEOUT_SECS:.0f}s ({type(e).__name__}: {e}); check that its node is alive"
        ) from None


def _pool_name(custom: bool, config: CheckpointWriterConfig) -> str:
    """The default writers are shared by every process of the cluster; writers built by custom
    init functions belong to one checkpointer and get a name of their own."""
    if custom:
        return f"custom-{uuid.uuid4().hex[:12]}"
    idle = config.idle_timeout_secs
    default_idle = CheckpointWriterConfig.idle_timeout_secs
    return f"default-io{config.io_threads}" + ("" if idle == default_idle else f"-idle{idle}")

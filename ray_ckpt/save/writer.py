"""Writers: one Ray actor per node writes the staged buckets of that node to storage.

Who calls what::

    caller (stager + pipeline)              writer actor on the caller's node
    ────────────────────────────            ──────────────────────────────────────────
    run_save(token, request)  ───────────►  waits for staging to end, then gathers,
    wait_staged(token, [ref]) ───────────►  (resolves when staging has ended; fails the save
                                            at once if the caller's process dies first)
    write_bucket(layout, [ref]) ─────────►  any node's writer: ray.get the bucket (zero-copy
                                            from shared memory), checksum, write, fsync
    end_staging(token, outcome) ─────────►  wakes run_save and wait_staged
                                            run_save: manifest, hooks, marker (commit; or the
                                            barrier, for a multi-rank save)

The refs of ``run_save`` and ``wait_staged`` exist as soon as ``save`` is called: they are the
``ObjectRef`` behind the write and the stage futures.

The actor is named ``ray_ckpt.writer.<pool>.<node id>`` in the configured namespace, found
again with ``get_if_exists``, pinned to its node with ``NodeAffinitySchedulingStrategy(soft=
False)``, detached (it outlives the process that happened to create it) and restarted on
failure.

Start: a checkpointer starts its node's writer ahead of its first save, once its process has
not loaded a checkpoint for a moment (:meth:`~ray_ckpt.save.pool.WriterPool.prestart`). A writer
handles bytes and never imports torch: its modules import in 0.2 s, against 1.8 s with torch,
of a core that a restore or a training step beside it needs
(``tests/test_writer_lifetime.py`` checks it).

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

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from .._util import InFlight
from ..config import CheckpointWriterConfig
from ..errors import CheckpointWriteError
from ..format.layout import BucketLayout
from ..storage.credentials import Handoff, accept
from ..storage.storage import Storage
from .commit import commit_save, discard_files
from .encoder import CheckpointWriter
from .protocol import (
    ABANDONED,
    SaveRequest,
    SaveResult,
    ShardResult,
    StageStats,
    StagingOutcome,
)

logger = logging.getLogger(__name__)

_CALLER_POLL_SECS = 0.5
_ABANDON_TIMEOUT_SECS = 30.0  # for the writers on other nodes to hear that a save failed


def default_subprocess_init_fn(*_: Any) -> None:
    """The default ``subprocess_init_fn`` run once in every writer actor: nothing."""


# --- the actor --------------------------------------------------------------------------------


@dataclass
class _Slot:
    event: threading.Event = field(default_factory=threading.Event)
    outcome: StagingOutcome = field(default_factory=StagingOutcome)
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

    def deliver(self, token: str, outcome: StagingOutcome) -> None:
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
        self._activity = InFlight()
        self._idle_timeout_secs = config.idle_timeout_secs
        if self._idle_timeout_secs is not None:
            threading.Thread(target=self._retire_when_idle, name="ray_ckpt-idle",
                             daemon=True).start()

    def node_id(self) -> str:
        with self._activity.running():  # a ping: the caller is about to use this writer
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
        with self._activity.running(), self._io_slots:
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
    def run_save(self, handoff: Handoff | None, token: str, request: SaveRequest) -> SaveResult:
        accept(handoff)  # before ``request.storage`` is used: its filesystem's secrets
        slot = self._mailbox.slot(token)
        self._running[token] = slot
        try:
            with self._activity.running():
                self._mailbox.take(token, request.barrier_timeout_secs)
                return commit_save(request, slot.outcome, slot.begin_commit)
        except BaseException:
            if request.barrier is None:  # failed, so nothing of it was committed
                self._abandon_on_other_nodes(request)
            raise
        finally:
            self._running.pop(token, None)

    def _abandon_on_other_nodes(self, request: SaveRequest) -> None:
        """Tell the writers of this pool on the other nodes (a save with
        ``spread_across_nodes`` hands them buckets) that save ``request`` failed: a write of it
        still running there deletes its file when it ends. Then delete what they wrote
        meanwhile (:func:`commit_save` deleted what was there when it failed)."""
        prefix = str(ray.get_runtime_context().get_actor_name()).rpartition(".")[0] + "."
        own = prefix + self._node_id
        calls = []
        for actor in ray.util.list_named_actors(all_namespaces=True):
            name = actor["name"]
            if name.startswith(prefix) and name != own:
                try:
                    writer = ray.get_actor(name, namespace=actor["namespace"])
                except ValueError:  # it exited meanwhile: nothing of the save is running there
                    continue
                calls.append(writer.abandon.remote(request.checkpoint_id))
        if calls:
            ray.wait(calls, num_returns=len(calls), timeout=_ABANDON_TIMEOUT_SECS)
            discard_files(request.storage, request.checkpoint_id)

    @ray.method(concurrency_group="control")
    def abandon(self, checkpoint_id: str) -> None:
        """Save ``checkpoint_id`` failed on another node: a write of it still running here
        deletes its file when it ends."""
        ABANDONED.add(checkpoint_id)

    @ray.method(concurrency_group="control")
    def wait_staged(
        self, token: str, timeout_secs: float, caller: list[ray.ObjectRef] | None = None
    ) -> StageStats | None:
        with self._activity.running():
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
    def end_staging(self, token: str, outcome: StagingOutcome) -> None:
        with self._activity.running():
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



"""The pipeline: the caller's half of a save (:class:`Coordinator`), ``save`` to hand-off.

The protocol, in the order it runs::

    (caller)  check the destination      refuse a committed checkpoint or foreign files
    (caller)  plan                       flatten, validate, lay out buckets (stager)
    (caller)  open the session           run_save / wait_staged on this node's writer (their
                                         refs back the write and stage futures)
    (caller)  stage + dispatch           each group of buckets (one, or ASYNC_PUT_BYTES for
                                         an async save), within the memory budget: ray.put
                                         (stager), then write_bucket of each on one writer
    (caller)  end staging                hand every write's ref to the session
    (writer)  gather, commit, clean up   :mod:`ray_ckpt.save.commit` (multi-rank: through
                                         the checkpoint's barrier, :mod:`ray_ckpt.save.barrier`)

Runs on the caller's thread (``SyncCheckpointer``) or a staging thread (``AsyncCheckpointer``);
the commit runs in the writer actor of the caller's node, so it goes on while the caller trains.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
import ray

from .. import metrics
from ..config import CheckpointerConfig
from ..errors import CheckpointExistsError, CheckpointWriteError, UnsupportedValueError
from ..format.layout import BucketLayout
from ..format.names import MARKER_NAME, is_own_file, new_checkpoint_id
from ..futures import CheckpointFuture, unwrap_ray_error
from ..storage import memory
from ..storage.storage import Storage
from ..types import RankInfo
from . import prefault
from .barrier import barrier_for
from .pool import WriterPool
from .protocol import (
    BarrierHandle,
    SaveRequest,
    SaveResult,
    StageStats,
    StagingOutcome,
    WriterHandle,
    WriterHook,
    portable_error,
)
from .stager import CheckpointStager, StagingPlan, record_staged

logger = logging.getLogger(__name__)

# An async save puts its buckets in groups of up to this many bytes: every ray.put has a fixed
# cost (an object created and sealed in the store), so fewer, larger puts shorten the stall;
# ``put_threads`` groups are put at once. Measured, 1 GiB in pieces under 1 MiB (see
# stager.PUT_PIECE_BYTES), one thread: 128 MiB a put 1.17x a memcpy, 256 MiB 1.11x.
ASYNC_PUT_BYTES = 256 << 20


class Coordinator:
    """The caller's half of a save (see the module docstring)."""

    def __init__(
        self,
        *,
        config: CheckpointerConfig,
        rank_info: RankInfo,
        stager: CheckpointStager,
        pool: WriterPool,
        filesystem: pafs.FileSystem | None = None,
        commit_hook: WriterHook | None = None,
    ) -> None:
        self._config = config
        self._rank_info = rank_info
        self._stager = stager
        self._pool = pool
        self._filesystem = filesystem
        self._hook = commit_hook
        self._staging_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._put_threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._budget_bytes: int | None = config.staging_config.memory_budget_bytes
        self._prefault = config.staging_config.prefault_object_store
        if self._prefault:
            prefault.request()

    def save(
        self,
        path: str,
        state_dict: dict[Any, Any],
        *,
        allow_pickle: bool = False,
        overwrite: bool = False,
        background: bool = False,
        overlap_writes: bool = True,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[CheckpointFuture[StageStats], CheckpointFuture[SaveResult]]:
        """Start a save. ``background`` stages on the staging thread; ``overlap_writes`` (see
        :meth:`_stage_buckets`) trades a longer stall for a shorter total."""
        started = time.perf_counter()
        metadata = json_metadata(metadata)
        storage = Storage.from_path(path, self._filesystem, self._config.storage_config)
        created = check_destination(storage, overwrite=overwrite)
        checkpoint_id = new_checkpoint_id()
        barrier = self._barrier(storage, overwrite)
        try:
            plan = self._stager.plan(
                state_dict,
                checkpoint_id=checkpoint_id,
                rank=self._rank_info.global_rank,
                world_size=self._rank_info.global_world_size,
                allow_pickle=allow_pickle,
                assign_replicas=None if barrier is None else self._assigner(barrier),
            )
            memory.make_room(storage.fs, storage.path, plan.written_bytes)  # its room, this node
        except BaseException as e:
            if barrier is not None:  # fail the save on every rank now, not at the timeout
                barrier.fail(self._rank_info.global_rank, portable_error(e))
            if created:  # refused before anything was written: leave no directory behind
                storage.remove_empty_dir()
            raise
        writer_config = self._config.writer_config
        request = SaveRequest(
            storage=storage,
            checkpoint_id=checkpoint_id,
            rank_info=self._rank_info,
            items=plan.items,
            tree_json=plan.tree_json,
            overwrite=overwrite,
            hook=self._hook,
            fsync=writer_config.fsync,
            barrier_timeout_secs=writer_config.barrier_timeout_secs,
            started_unix=time.time(),
            barrier=barrier,
            metadata=metadata,
        )
        session = self._pool.local()
        # the filesystem's secrets go only as the first argument of a call, which Ray inlines
        # in the call's RPC; the request, which may go to the object store, holds none
        handoff = storage.handoff()
        write_ref = session.run_save.remote(handoff, checkpoint_id, request)
        if request.barrier is not None:
            # the pending write ref is this process's: the barrier learns of its death
            request.barrier.join(self._rank_info.global_rank, [write_ref])
        # the pending write ref is this process's: the writer learns of its death while staging
        stage_ref = session.wait_staged.remote(
            checkpoint_id, writer_config.barrier_timeout_secs, [write_ref]
        )
        staged: concurrent.futures.Future[StageStats] = concurrent.futures.Future()

        def cancel() -> bool:
            return bool(ray.get(session.cancel.remote(checkpoint_id)))

        stage_future = CheckpointFuture(stage_ref, local=staged, on_cancel=cancel)
        write_future: CheckpointFuture[SaveResult] = CheckpointFuture(
            write_ref, on_cancel=cancel, on_failure=self._pool.forget_dead
        )
        write_future.add_done_callback(_log_summary)
        if self._prefault:  # the writers have brought more of the store into memory
            write_future.add_done_callback(lambda _: prefault.request())
        if background:
            executor = self._staging_executor()
            executor.submit(
                self._stage_all, plan, storage, session, staged, started, overlap_writes
            )
        else:
            self._stage_all(plan, storage, session, staged, started, overlap_writes)
        return stage_future, write_future

    def _barrier(self, storage: Storage, overwrite: bool) -> BarrierHandle | None:
        """The barrier actor of this checkpoint, for a multi-rank save (else None)."""
        if self._rank_info.global_world_size == 1:
            return None

        return barrier_for(
            storage,
            rank=self._rank_info.global_rank,
            namespace=self._config.namespace,
            world_size=self._rank_info.global_world_size,
            overwrite=overwrite,
            hook=self._hook,
            fsync=self._config.writer_config.fsync,
            barrier_timeout_secs=self._config.writer_config.barrier_timeout_secs,
        )

    def _assigner(self, barrier: BarrierHandle) -> Callable[[list[tuple[str, int]]], list[int]]:
        """Asks the checkpoint's barrier which rank writes each replicated key; it answers
        once every rank has asked (the union of the ranks' keys), or raises the save's error."""
        rank = self._rank_info.global_rank
        timeout = self._config.writer_config.barrier_timeout_secs + 60

        def assign(keys: list[tuple[str, int]]) -> list[int]:
            try:
                return list(ray.get(barrier.assign(rank, keys), timeout=timeout))
            except Exception as e:  # noqa: BLE001 - the barrier's own error, unwrapped
                raise unwrap_ray_error(e) from None

        return assign

    def _stage_all(
        self,
        plan: StagingPlan,
        storage: Storage,
        session: WriterHandle,
        staged: concurrent.futures.Future[StageStats],
        started: float,
        overlap_writes: bool,
    ) -> None:
        outcome = StagingOutcome()

        def all_staged() -> None:
            """Every byte is in the object store: the caller may change its tensors now,
            before the (remote) hand-off of the last buckets to the writers."""
            stats = record_staged(
                plan, outcome, self._config.staging_config.verify_replicas,
                time.perf_counter() - started,
            )
            plan.host_bytes.clear()  # drop references to the caller's tensors
            staged.set_result(stats)

        try:
            self._stage_buckets(plan, storage, outcome, overlap_writes, all_staged)
        except BaseException as e:  # noqa: BLE001 - delivered to both futures below
            outcome.error = portable_error(e)
            if not staged.done():  # else staging succeeded and the hand-off failed
                staged.set_exception(e)
        finally:
            plan.host_bytes.clear()
            session.end_staging.remote(plan.checkpoint_id, outcome)
        if outcome.stats is not None:
            metrics.record_stall(outcome.stats.stage_secs)

    def _stage_buckets(
        self,
        plan: StagingPlan,
        storage: Storage,
        outcome: StagingOutcome,
        overlap_writes: bool,
        all_staged: Callable[[], None],
    ) -> None:
        """Put the buckets, a group at a time, and hand each to a writer, keeping staged but
        unwritten bytes within the budget; call ``all_staged`` once the last group is put.
        With ``overlap_writes`` each bucket is written while the next is staged (shortest
        total: a sync save); without, writing starts once staging is done or the budget is
        full, so that the writers do not compete with the copy for the two cores and the
        memory bus (shortest stall: measured 1.4x instead of 1.9x a memcpy), and buckets are
        put in groups of up to ``ASYNC_PUT_BYTES``, ``put_threads`` groups at a time. A
        group's buckets go to one writer."""
        budget = self._memory_budget()
        targets = self._placement()
        checksum = self._config.writer_config.checksum
        fsync = self._config.writer_config.fsync
        # (every writer gets a share: with spread_across_nodes, no fewer groups than writers)
        share = -(-plan.written_bytes // len(targets))
        put_limit = 0 if overlap_writes else min(ASYNC_PUT_BYTES, budget // 4, share)
        # put, not yet handed to a writer: (group, its buckets, its put)
        staged: list[tuple[int, list[int], concurrent.futures.Future[ray.ObjectRef]]] = []
        held: dict[int, int] = {}  # group -> bytes in the object store (staged or in flight)
        in_flight: dict[ray.ObjectRef, int] = {}  # write -> its group
        # an async save copies several groups at once, each ray.put on its own thread (CUDA:
        # one at a time, through the stager's one pinned buffer)
        puts = None if overlap_writes or plan.on_cuda else self._put_executor()

        handoff = storage.handoff()  # first argument: inlined in the RPC (see credentials)

        def dispatch() -> None:
            for group, buckets, put in staged:
                payload = put.result()
                node_id, writer = targets[group % len(targets)]
                for part, index in enumerate(buckets):
                    layout = plan.buckets[index]
                    result = writer.write_bucket.remote(
                        handoff, storage, layout, payload, part, plan.rank, plan.checkpoint_id,
                        checksum, fsync,
                    )
                    outcome.shards.append((node_id, layout.file, result))
                    in_flight[result] = group
            staged.clear()

        def wait_for_a_write() -> None:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                group = in_flight.pop(ref)
                if group not in in_flight.values():  # its object is freed once all are written
                    del held[group]
                _raise_if_failed(ref, storage, self._pool.forget_dead)

        try:
            for group, buckets in enumerate(_groups(plan.buckets, put_limit)):
                nbytes = sum(plan.buckets[b].nbytes for b in buckets)
                if staged and sum(held.values()) + nbytes > budget:
                    dispatch()
                pressed = False
                while in_flight and sum(held.values()) + nbytes > budget:
                    wait_for_a_write()
                    pressed = True
                if puts is None:
                    put: concurrent.futures.Future[ray.ObjectRef] = concurrent.futures.Future()
                    put.set_result(self._stager.stage(plan, buckets))
                else:
                    put = puts.submit(self._stager.stage, plan, buckets)
                    if pressed:
                        # a written group's bytes leave the store only when Ray frees them,
                        # some milliseconds later: at the budget, put one group at a time
                        put.result()
                staged.append((group, buckets, put))
                held[group] = nbytes
                if overlap_writes:
                    dispatch()
            for _, _, put in staged:
                put.result()
        finally:
            # no copy of the caller's tensors may still run once staging has ended
            concurrent.futures.wait([put for _, _, put in staged])
        all_staged()
        dispatch()

    def _placement(self) -> list[tuple[str, WriterHandle]]:
        """The writers that write this save's buckets, in turn: this node's own, or (with
        ``spread_across_nodes``) every alive node's, this node's first."""
        local = self._pool.local_node_id()
        nodes = [local]
        if self._config.writer_config.spread_across_nodes:
            nodes += sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != local)
        return [(node, self._pool.for_node(node)) for node in nodes]

    def _memory_budget(self) -> int:
        if self._budget_bytes is None:
            node_id = self._pool.local_node_id()
            store = next(
                (
                    n["Resources"].get("object_store_memory", 0)
                    for n in ray.nodes()
                    if n["NodeID"] == node_id
                ),
                0,
            )
            self._budget_bytes = max(
                int(store) // 2, self._config.staging_config.bucket_size_bytes
            )
        return self._budget_bytes

    def _staging_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._staging_thread is None:
            self._staging_thread = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="ray_ckpt-staging"
            )
        return self._staging_thread

    def _put_executor(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """The threads that put an async save's groups (None with ``put_threads=1``)."""
        threads = self._config.staging_config.put_threads
        if self._put_threads is None and threads > 1:
            self._put_threads = concurrent.futures.ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="ray_ckpt-put"
            )
        return self._put_threads

    def close(self) -> None:
        for executor in (self._staging_thread, self._put_threads):
            if executor is not None:
                executor.shutdown(wait=True)
        self._staging_thread = self._put_threads = None
        self._stager.close()


def _groups(buckets: list[BucketLayout], limit: int) -> list[list[int]]:
    """Consecutive bucket indices, each run of at most ``limit`` bytes (one bucket at least)."""
    groups: list[list[int]] = []
    nbytes = 0
    for index, layout in enumerate(buckets):
        if not groups or nbytes + layout.nbytes > limit:
            groups.append([])
            nbytes = 0
        groups[-1].append(index)
        nbytes += layout.nbytes
    return groups


def json_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """``metadata`` checked to be a JSON object (it is stored in the commit marker)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise UnsupportedValueError(f"metadata must be a dict, got {type(metadata).__qualname__}")
    try:
        return dict(json.loads(json.dumps(metadata, allow_nan=False)))
    except (TypeError, ValueError) as e:
        raise UnsupportedValueError(
            f"metadata must hold only JSON values (str, finite numbers, bool, None, lists, dicts "
            f"with str keys): {e}"
        ) from None


def _log_summary(future: CheckpointFuture[SaveResult]) -> None:
    """One INFO line per save, in the saving process, once it committed."""
    r = future.stats
    if r is not None:
        logger.info(
            "saved %s: %d items, %.1f MiB in %d files, %.3fs (%.2f GB/s), stall %.3fs",
            r.path, r.items, r.nbytes / 2**20, r.files, r.total_secs,
            r.throughput_bytes_per_sec / 1e9, r.stage_secs,
        )


def _raise_if_failed(
    ref: ray.ObjectRef, storage: Storage, on_failure: Callable[[BaseException], None]
) -> None:
    try:
        ray.get(ref)
    except Exception as e:  # noqa: BLE001 - re-raised below as the save's error
        on_failure(e)
        cause = unwrap_ray_error(e)
        raise CheckpointWriteError(
            f"save to {storage.display} failed while staging; nothing was committed: "
            f"{type(cause).__name__}: {cause}"
        ) from None


def check_destination(storage: Storage, *, overwrite: bool) -> bool:
    """Refuse to save over a committed checkpoint (without ``overwrite``), onto a file, or into
    a directory holding files ray_ckpt did not write; create the directory. True when this
    call created it."""
    if storage.is_file():
        raise CheckpointExistsError(
            f"{storage.display} is a file, not a checkpoint directory: choose another path"
        )
    files = storage.list_files()
    if MARKER_NAME in files and not overwrite:
        raise CheckpointExistsError(
            f"{storage.display} already holds a committed checkpoint; pass overwrite=True to "
            "replace it, or save to a new path"
        )
    foreign = sorted(n for n in files if not is_own_file(n)) + sorted(storage.list_dirs())
    if foreign:
        raise CheckpointExistsError(
            f"{storage.display} is not empty: it holds what is not a checkpoint's file "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}), which a save "
            f"there would mix with. Save into a new or empty directory, one per checkpoint: "
            f"{storage.child('step-N').display}, say"
        )
    existed = bool(files) or storage.exists()
    storage.make_dir()
    return not existed

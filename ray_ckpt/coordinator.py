"""The coordinator: turns one ``save`` call into a committed checkpoint.

The protocol, in the order it runs::

    (caller)  check the destination      refuse a committed checkpoint (unless overwrite) or
                                         a directory that holds files ray_ckpt did not write
    (caller)  plan                       flatten, validate, lay out buckets (stager)
    (caller)  open the session           run_save / wait_staged on this node's writer: their
                                         refs back the write and stage futures from now on
    (caller)  stage + dispatch           for each bucket, within the memory budget:
                                           ray.put it (stager), write_bucket on the writer
                                           of the node it was staged on
    (caller)  end staging                hand every write's ref to the session
    (writer)  gather                     wait for every write; one error names every failed
                                         writer, node and cause; nothing is committed
    (writer)  commit                     manifest (fsynced), pre_commit hook, marker last
                                         (storage.CommitStrategy), post_commit hook
    (writer)  clean up                   on failure: every file of this save; after an
                                         overwrite: the files of the checkpoint it replaced

The caller's half runs on the caller's thread (``SyncCheckpointer``) or on a staging thread
(``AsyncCheckpointer`` with ``use_async_staging``); the writer's half runs in the writer actor
of the caller's node, so a save commits even while the caller trains on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from . import metrics
from ._checksum import crc32c
from ._tree import remap
from .config import CheckpointerConfig
from .errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsupportedValueError,
)
from .format import (
    MARKER_NAME,
    Extent,
    PackedRows,
    ItemMeta,
    Marker,
    build_manifest,
    is_own_file,
    manifest_file_name,
    manifest_from_bytes,
    manifest_to_bytes,
    marker_temp_name,
    new_checkpoint_id,
    without_gc,
)
from .futures import CheckpointFuture, unwrap_ray_error
from .sharding import overlap
from .stager import CheckpointStager, StagingPlan, byte_view
from .storage import Storage
from .types import RankInfo
from .writer import ShardResult, WriterHook, WriterPool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageStats:
    """What staging did: the result of a stage future."""

    nbytes: int
    items: int
    buckets: int
    stage_secs: float


@dataclass(frozen=True)
class SaveResult:
    """What a committed save did: the result of a write future."""

    path: str
    checkpoint_id: str
    nbytes: int
    items: int
    files: int
    stage_secs: float
    total_secs: float
    writers: dict[str, int] = field(default_factory=dict)  # node id -> data files written

    @property
    def throughput_bytes_per_sec(self) -> float:
        return self.nbytes / self.total_secs if self.total_secs > 0 else float("inf")


@dataclass(frozen=True)
class SaveRequest:
    """Everything the session needs to commit, sent when the save starts."""

    storage: Storage
    checkpoint_id: str
    rank_info: RankInfo
    items: list[ItemMeta]
    tree_json: str
    overwrite: bool
    hook: WriterHook | None
    fsync: bool
    barrier_timeout_secs: float
    started_unix: float
    barrier: Any = None  # the checkpoint's coordinator actor, for multi-rank saves
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON, kept in the commit marker


@dataclass
class StagingOutcome:
    """Delivered by the caller when staging ends: the write of every bucket, or the error."""

    shards: list[tuple[str, str, ray.ObjectRef]] = field(default_factory=list)  # node, file, ref
    error: BaseException | None = None
    stats: StageStats | None = None
    replicas: dict[int, tuple[str, int, int | None]] = field(default_factory=dict)
    shard_items: dict[int, tuple[str, int]] = field(default_factory=dict)  # item -> path, owner


class Coordinator:
    """The caller's half of a save (see the module docstring)."""

    def __init__(
        self,
        *,
        config: CheckpointerConfig,
        rank_info: RankInfo,
        stager: CheckpointStager,
        pool: WriterPool,
        filesystem: Any = None,
        commit_hook: WriterHook | None = None,
    ) -> None:
        self._config = config
        self._rank_info = rank_info
        self._stager = stager
        self._pool = pool
        self._filesystem = filesystem
        self._hook = commit_hook
        self._staging_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._budget_bytes: int | None = config.staging_config.memory_budget_bytes

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
        metadata = _json_metadata(metadata)
        storage = Storage.from_path(path, self._filesystem, self._config.storage_config)
        check_destination(storage, overwrite=overwrite)
        checkpoint_id = new_checkpoint_id()
        barrier = self._barrier(storage, overwrite)
        try:
            plan = self._stager.plan(
                state_dict,
                checkpoint_id=checkpoint_id,
                rank=self._rank_info.global_rank,
                world_size=self._rank_info.global_world_size,
                allow_pickle=allow_pickle,
            )
        except BaseException as e:
            if barrier is not None:  # fail the save on every rank now, not at the timeout
                barrier.fail.remote(self._rank_info.global_rank, _portable(e))
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
        write_ref = session.run_save.remote(checkpoint_id, request)
        if request.barrier is not None:
            # the pending write ref is this process's: the coordinator learns of its death
            request.barrier.join.remote(self._rank_info.global_rank, [write_ref])
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
        if background:
            executor = self._staging_executor()
            executor.submit(
                self._stage_all, plan, storage, session, staged, started, overlap_writes
            )
        else:
            self._stage_all(plan, storage, session, staged, started, overlap_writes)
        return stage_future, write_future

    def _barrier(self, storage: Storage, overwrite: bool) -> Any:
        """The coordinator actor of this checkpoint, for a multi-rank save (else None)."""
        if self._rank_info.global_world_size == 1:
            return None
        from .barrier import coordinator_for

        return coordinator_for(
            storage,
            namespace=self._config.namespace,
            world_size=self._rank_info.global_world_size,
            overwrite=overwrite,
            hook=self._hook,
            fsync=self._config.writer_config.fsync,
            barrier_timeout_secs=self._config.writer_config.barrier_timeout_secs,
        )

    def _stage_all(
        self,
        plan: StagingPlan,
        storage: Storage,
        session: Any,
        staged: concurrent.futures.Future[StageStats],
        started: float,
        overlap_writes: bool,
    ) -> None:
        outcome = StagingOutcome()
        try:
            self._stage_buckets(plan, storage, outcome, overlap_writes)
            outcome.replicas = self._replica_checksums(plan)
            outcome.shard_items = {
                item: (plan.leaves[item].path_id, owner)
                for item, owner in plan.shard_owners.items()
            }
            outcome.stats = StageStats(
                nbytes=plan.nbytes,
                items=len(plan.items),
                buckets=len(plan.buckets),
                stage_secs=time.perf_counter() - started,
            )
        except BaseException as e:  # noqa: BLE001 - delivered to both futures below
            outcome.error = _portable(e)
            staged.set_exception(e)
        finally:
            plan.host_bytes.clear()  # drop references to the caller's tensors
            session.end_staging.remote(plan.checkpoint_id, outcome)
        if outcome.error is None:
            assert outcome.stats is not None
            metrics.record_stall(outcome.stats.stage_secs)
            staged.set_result(outcome.stats)

    def _stage_buckets(
        self, plan: StagingPlan, storage: Storage, outcome: StagingOutcome, overlap_writes: bool
    ) -> None:
        """Put each bucket and hand it to a writer, keeping staged-but-unwritten bytes within
        the budget. With ``overlap_writes`` each bucket is written while the next is staged
        (shortest total: a sync save); without, writing starts once staging is done or the
        budget is full, so that the writers do not compete with the copy for the two cores
        and the memory bus (shortest stall: measured 1.4x instead of 1.9x a memcpy)."""
        budget = self._memory_budget()
        in_flight: dict[ray.ObjectRef, int] = {}
        targets = self._placement()
        checksum = self._config.writer_config.checksum
        fsync = self._config.writer_config.fsync
        staged: list[tuple[int, Any]] = []  # put, not yet handed to a writer
        staged_bytes = 0

        def dispatch() -> None:
            nonlocal staged_bytes
            for index, payload in staged:
                layout = plan.buckets[index]
                node_id, writer = targets[index % len(targets)]
                result = writer.write_bucket.remote(
                    storage, layout, payload, plan.rank, plan.checkpoint_id, checksum, fsync
                )
                outcome.shards.append((node_id, layout.file, result))
                in_flight[result] = layout.nbytes
            staged.clear()
            staged_bytes = 0

        for index, layout in enumerate(plan.buckets):
            if staged and staged_bytes + sum(in_flight.values()) + layout.nbytes > budget:
                dispatch()
            while in_flight and sum(in_flight.values()) + layout.nbytes > budget:
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    del in_flight[ref]
                    _raise_if_failed(ref, storage, self._pool.forget_dead)
            staged.append((index, self._stager.stage(plan, index)))
            staged_bytes += layout.nbytes
            if overlap_writes:
                dispatch()
        dispatch()

    def _replica_checksums(self, plan: StagingPlan) -> dict[int, tuple[str, int, int | None]]:
        """Path, owner and (with ``verify_replicas``, on CPU) CRC32C of each replicated item."""
        verify = self._config.staging_config.verify_replicas
        out: dict[int, tuple[str, int, int | None]] = {}
        for item, replica in plan.replicas.items():
            raw = byte_view(plan.host_bytes[item])
            crc = crc32c(memoryview(raw)) if verify and isinstance(raw, np.ndarray) else None
            out[item] = (replica.path_id, replica.owner, crc)
        return out

    def _placement(self) -> list[tuple[str, Any]]:
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

    def close(self) -> None:
        if self._staging_thread is not None:
            self._staging_thread.shutdown(wait=True)
            self._staging_thread = None
        self._stager.close()


def _json_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
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


def _portable(error: BaseException) -> BaseException:
    """``error`` as it can travel to the writer actor: ray_ckpt's errors pickle; others are
    described in a :class:`CheckpointWriteError`."""
    if isinstance(error, CheckpointError):
        return error
    return CheckpointWriteError(
        f"staging failed, so nothing was committed: {type(error).__name__}: {error}"
    )


def _raise_if_failed(
    ref: ray.ObjectRef, storage: Storage, on_failure: Callable[[BaseException], None]
) -> None:
    try:
        ray.get(ref)
    except Exception as e:
        on_failure(e)
        cause = unwrap_ray_error(e)
        raise CheckpointWriteError(
            f"save to {storage.display} failed while staging; nothing was committed: "
            f"{type(cause).__name__}: {cause}"
        ) from None


def check_destination(storage: Storage, *, overwrite: bool) -> None:
    """Refuse to save over a committed checkpoint (without ``overwrite``), onto a file, or into
    a directory holding files ray_ckpt did not write; create the directory."""
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
    foreign = sorted(n for n in files if not is_own_file(n)) + storage.list_dirs()
    if foreign:
        raise CheckpointExistsError(
            f"{storage.display} holds files ray_ckpt did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); save into a new or empty directory"
        )
    storage.make_dir()


# --- the writer's half (runs in the writer actor) ---------------------------------------------


@dataclass(frozen=True)
class RankReport:
    """What one rank's save wrote, with item indices local to that rank."""

    rank: int
    save_id: str
    items: list[ItemMeta]
    extents: list[Extent]
    tree_json: str
    replicas: dict[int, tuple[str, int, int | None]]  # item -> (path id, owner rank, crc32c)
    shard_items: dict[int, tuple[str, int]]  # item -> (path id, owner rank)
    files: list[str]
    writers: dict[str, int]
    stage_secs: float
    metadata: dict[str, Any] = field(default_factory=dict)


def commit_save(request: SaveRequest, slot: Any) -> SaveResult:
    """Gather every write of this rank's save, then commit it (one rank) or hand it to the
    checkpoint's coordinator (several ranks). On failure, delete this save's files."""
    storage = request.storage
    outcome: StagingOutcome = slot.outcome
    try:
        shards = gather_shards(outcome.shards, storage, request.barrier_timeout_secs)
        if outcome.error is not None:
            raise outcome.error
        if not slot.begin_commit():
            raise concurrent.futures.CancelledError(
                f"save to {storage.display} was cancelled; nothing was committed"
            )
        report = _report(request, outcome, shards)
        if request.barrier is None:
            return commit_reports(request, [report], request.checkpoint_id)
    except BaseException as e:
        metrics.record_failure()
        if request.barrier is not None:
            request.barrier.fail.remote(request.rank_info.global_rank, _portable(e))
        discard_files(storage, request.checkpoint_id)
        raise
    return _through_barrier(request, report)


def _report(request: SaveRequest, outcome: StagingOutcome, shards: list[ShardResult]) -> RankReport:
    return RankReport(
        rank=request.rank_info.global_rank,
        save_id=request.checkpoint_id,
        items=request.items,
        extents=PackedRows(e for shard in shards for e in shard.extents),
        tree_json=request.tree_json,
        replicas=outcome.replicas,
        shard_items=outcome.shard_items,
        files=[shard.file for shard in shards],
        writers=dict(Counter(shard.node_id for shard in shards)),
        stage_secs=outcome.stats.stage_secs if outcome.stats else 0.0,
        metadata=request.metadata,
    )


def _through_barrier(request: SaveRequest, report: RankReport) -> SaveResult:
    """Hand this rank's report to the checkpoint's coordinator and wait for its decision."""
    assert request.barrier is not None
    try:
        return ray.get(  # type: ignore[no-any-return]
            request.barrier.arrive.remote(report),
            timeout=request.barrier_timeout_secs + 60,
        )
    except Exception as e:
        error = unwrap_ray_error(e)
        if not _committed_with(request.storage, report.files):
            discard_files(request.storage, request.checkpoint_id)
        metrics.record_failure()
        raise error from None


@without_gc
def commit_reports(request: SaveRequest, reports: list[RankReport], checkpoint_id: str) -> SaveResult:
    """Commit the reports of every rank as checkpoint ``checkpoint_id``: manifest (durable),
    ``pre_commit`` hook, marker (exclusive unless overwriting), ``post_commit`` hook, then the
    files of the checkpoint this one replaced."""
    storage = request.storage
    items, extents, trees = merge_reports(reports, storage)
    replaced = _committed_files(storage) if request.overwrite else set()
    table = build_manifest(items, extents, trees[0], checkpoint_id, trees if len(trees) > 1 else None)
    raw = manifest_to_bytes(table)
    manifest = manifest_file_name(checkpoint_id)
    try:
        storage.write_file(manifest, [raw], fsync=request.fsync)
        marker = Marker(
            checkpoint_id=checkpoint_id,
            manifest=manifest,
            manifest_nbytes=len(raw),
            manifest_crc32c=crc32c(raw),
            created_unix=time.time(),
            world_size=len(reports),
            total_nbytes=sum(m.nbytes for m in items),
            metadata=min(reports, key=lambda r: r.rank).metadata,
        )
        if request.hook is not None:
            request.hook.pre_commit(storage.display)
        storage.commit_strategy.commit(
            storage,
            MARKER_NAME,
            marker.to_bytes(),
            marker_temp_name(checkpoint_id),
            exclusive=not request.overwrite,
        )
    except BaseException:
        storage.delete_files([manifest])
        raise
    kept = {e.file for e in extents} | {manifest}
    stale = sorted(replaced - kept)
    if stale:
        storage.delete_files(stale)
    if request.hook is not None:
        request.hook.post_commit(storage.display)
    writers: Counter[str] = Counter()
    for report in reports:
        writers.update(report.writers)
    result = SaveResult(
        path=storage.display,
        checkpoint_id=checkpoint_id,
        nbytes=marker.total_nbytes,
        items=len(items),
        files=len({e.file for e in extents}) + 2,
        stage_secs=max(r.stage_secs for r in reports),
        total_secs=time.time() - request.started_unix,
        writers=dict(writers),
    )
    metrics.record_commit(result.nbytes, result.total_secs)
    logger.debug("committed %s (%s)", result.path, result.checkpoint_id)
    return result


def merge_reports(
    reports: list[RankReport], storage: Storage
) -> tuple[list[ItemMeta], list[Extent], list[str]]:
    """Number every rank's items in one index space (a replicated item or a shard box once, a
    rank-local item per rank), check that the ranks agree, and remap every rank's tree."""
    if len(reports) == 1 and not reports[0].replicas and not reports[0].shard_items:
        only = reports[0]  # one rank, nothing shared: its numbering is the checkpoint's
        _check_written(only.items, only.extents, storage)
        return only.items, only.extents, [only.tree_json]
    merger = _Merger(storage)
    mappings = [merger.add(report) for report in sorted(reports, key=lambda r: r.rank)]
    merger.check()
    shard_lists = {i: merger.shards[path] for path, ids in merger.shards.items() for i in ids}
    trees = [
        remap(report.tree_json, mapping, shard_lists)
        for report, mapping in zip(sorted(reports, key=lambda r: r.rank), mappings)
    ]
    return merger.items, merger.extents, trees


def _unwritten(items: list[ItemMeta], extents: list[Extent]) -> list[str]:
    written: Counter[int] = Counter()
    for extent in extents:
        written[extent.item] += extent.length
    return [f"key {m.key!r}: no rank wrote its bytes" for m in items if written[m.item] != m.nbytes]


def _check_written(items: list[ItemMeta], extents: list[Extent], storage: Storage) -> None:
    problems = _unwritten(items, extents)
    if problems:
        raise CheckpointWriteError(
            f"save to {storage.display} failed; nothing was committed: "
            + "; ".join(problems[:20])
        )


class _Merger:
    """Builds the checkpoint's item list from the ranks' reports; collects every disagreement."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.items: list[ItemMeta] = []
        self.extents: list[Extent] = []
        self.problems: list[str] = []
        self.replicated: dict[str, tuple[int, ItemMeta, int, int | None]] = {}
        self.boxes: dict[tuple[str, tuple[int, ...]], tuple[int, ItemMeta, int]] = {}
        self.shards: dict[str, list[int]] = {}
        self.replica_paths: dict[int, set[str]] = {}

    def _new(self, meta: ItemMeta, **changes: Any) -> int:
        index = len(self.items)
        self.items.append(meta._replace(item=index, **changes))
        return index

    def add(self, report: RankReport) -> dict[int, int]:
        mapping: dict[int, int] = {}
        self.replica_paths[report.rank] = {p for p, _, _ in report.replicas.values()}
        for meta in report.items:
            if meta.item in report.shard_items:
                mapping[meta.item] = self._shard(meta, report.shard_items[meta.item][0], report.rank)
            elif meta.item in report.replicas:
                mapping[meta.item] = self._replica(meta, report.replicas[meta.item], report.rank)
            else:
                mapping[meta.item] = self._new(meta)
        self.extents += [e._replace(item=mapping[e.item]) for e in report.extents]
        return mapping

    def _replica(self, meta: ItemMeta, replica: tuple[str, int, int | None], rank: int) -> int:
        path, _, crc = replica
        known = self.replicated.get(path)
        if known is None:
            index = self._new(meta, replicated=True)
            self.replicated[path] = (index, meta, rank, crc)
            return index
        index, first, first_rank, first_crc = known
        if (first.dtype, first.shape) != (meta.dtype, meta.shape):
            self.problems.append(
                f"key {meta.key!r} is {first.dtype} {list(first.shape or ())} on rank "
                f"{first_rank} but {meta.dtype} {list(meta.shape or ())} on rank {rank}"
            )
        elif None not in (crc, first_crc) and crc != first_crc:
            self.problems.append(
                f"key {meta.key!r} holds different values on ranks {first_rank} and {rank}"
            )
        return index

    def _shard(self, meta: ItemMeta, path: str, rank: int) -> int:
        assert meta.global_offset is not None
        known = self.boxes.get((path, meta.global_offset))
        if known is None:
            index = self._new(meta)
            self.boxes[(path, meta.global_offset)] = (index, meta, rank)
            self.shards.setdefault(path, []).append(index)
            return index
        index, first, first_rank = known
        if (first.dtype, first.shape, first.global_shape) != (meta.dtype, meta.shape, meta.global_shape):
            self.problems.append(
                f"key {meta.key!r}: ranks {first_rank} and {rank} disagree on the shard at "
                f"{list(meta.global_offset)} ({first.dtype} {list(first.shape or ())} of "
                f"{list(first.global_shape or ())} vs {meta.dtype} {list(meta.shape or ())} of "
                f"{list(meta.global_shape or ())})"
            )
        return index

    def check(self) -> None:
        for path, (_, meta, _, _) in self.replicated.items():
            missing = [r for r, paths in self.replica_paths.items() if path not in paths]
            if missing:
                self.problems.append(f"key {meta.key!r} is missing on ranks {missing}")
        for indices in self.shards.values():
            self._check_tiling([self.items[i] for i in indices])
        self.problems += _unwritten(self.items, self.extents)
        if self.problems:
            raise CheckpointWriteError(
                f"save to {self.storage.display} failed; nothing was committed. The ranks "
                "disagree on what they saved:\n  " + "\n  ".join(self.problems[:20])
                + "\nReplicated tensors must be equal on every rank; mark per-rank tensors "
                "with CheckpointStagerConfig(rank_local_keys=(...))."
            )

    def _check_tiling(self, shards: list[ItemMeta]) -> None:
        """The shards of one tensor must agree on it and cover it exactly once."""
        first = shards[0]
        if any((m.dtype, m.global_shape) != (first.dtype, first.global_shape) for m in shards):
            self.problems.append(f"key {first.key!r}: its shards disagree on dtype or global shape")
            return
        total = math.prod(first.global_shape or ())
        covered = sum(math.prod(m.shape or ()) for m in shards)
        boxes = [(m.global_offset or (), m.shape or ()) for m in shards]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                if math.prod(a[1]) and math.prod(b[1]) and overlap(a, b) is not None:
                    self.problems.append(
                        f"key {first.key!r}: shards at {list(a[0])} and {list(b[0])} overlap"
                    )
                    return
        if covered != total:
            self.problems.append(
                f"key {first.key!r}: its shards cover {covered} of the {total} elements of "
                f"{list(first.global_shape or ())}"
            )


def gather_shards(
    shards: list[tuple[str, str, ray.ObjectRef]], storage: Storage, timeout_secs: float
) -> list[ShardResult]:
    """Wait for every write; raise one error naming every failed writer, node and cause."""
    refs = [ref for _, _, ref in shards]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_secs)
    results: list[ShardResult] = []
    failures: list[str] = []
    pending_set = set(pending)
    for node_id, file, ref in shards:
        if ref in pending_set:
            failures.append(f"writer on node {node_id} ({file}): no answer in {timeout_secs:.0f}s")
            continue
        try:
            results.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - collected into one error below
            cause = unwrap_ray_error(e)
            failures.append(f"writer on node {node_id} ({file}): {type(cause).__name__}: {cause}")
    if failures:
        raise CheckpointWriteError(
            f"save to {storage.display} failed; nothing was committed. "
            f"{len(failures)} of {len(shards)} writes failed:\n  " + "\n  ".join(failures)
        )
    return results


def discard_files(storage: Storage, checkpoint_id: str) -> None:
    """Delete every file of checkpoint ``checkpoint_id`` in ``storage`` (and nothing else)."""
    try:
        names = [n for n in storage.list_files() if is_own_file(n) and checkpoint_id in n]
        storage.delete_files(names)
    except Exception as e:  # noqa: BLE001 - cleanup must not hide the error being raised
        logger.warning(
            "could not delete the files of checkpoint %s in %s (%s); they are not committed "
            "and a later save or CheckpointManager.cleanup() removes them",
            checkpoint_id, storage.display, e,
        )


def _committed_marker(storage: Storage) -> Marker | None:
    if not storage.exists(MARKER_NAME):
        return None
    try:
        return Marker.from_bytes(storage.read_file(MARKER_NAME), where=storage.display)
    except CorruptCheckpointError as e:
        logger.warning("the commit marker of %s is unreadable: %s", storage.display, e)
        return None


def _committed_files(storage: Storage) -> set[str]:
    """The files of the checkpoint committed in ``storage`` now (to delete them once an
    overwrite has replaced it)."""
    marker = _committed_marker(storage)
    if marker is None:
        return set()
    try:
        table = manifest_from_bytes(storage.read_file(marker.manifest), where=marker.manifest)
    except (CorruptCheckpointError, FileNotFoundError) as e:
        logger.warning(
            "overwriting %s, whose manifest is unreadable (%s): its data files are left for "
            "CheckpointManager.cleanup()", storage.display, e,
        )
        return {marker.manifest}
    return set(table.column("file").to_pylist()) | {marker.manifest}


def _committed_with(storage: Storage, files: list[str]) -> bool:
    """Whether the checkpoint committed in ``storage`` uses any of ``files`` (then they must
    stay, whatever the caller was told)."""
    return bool(set(files) & _committed_files(storage))


__all__ = ["Coordinator", "SaveResult", "StageStats", "new_checkpoint_id"]

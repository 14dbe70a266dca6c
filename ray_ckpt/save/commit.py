"""The commit: the writer's half of a save (see :mod:`ray_ckpt.save.pipeline` for the whole).

Runs in the writer actor of the saving process's node (a single-rank save) or in the
checkpoint's barrier actor (:mod:`ray_ckpt.save.barrier`, a multi-rank save)::

    gather        wait for every bucket's write; one error names every failed writer, node and
                  cause; nothing is committed
    report        this rank's items, extents and tree (single rank: commit them directly)
    merge         several ranks, each report as it arrives (:class:`Merger`): one index space
                  for the union of the ranks' items (a replicated tensor or a shard box once),
                  every disagreement collected, one tree, the union of the ranks' trees
    commit        manifest (durable), ``pre_commit`` hook, marker last (exclusive unless
                  overwriting: ``storage.atomic.CommitStrategy``), ``post_commit`` hook
    clean up      on failure: every file of this save; after an overwrite: the files of the
                  checkpoint it replaced
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import Counter
from collections.abc import Callable

import ray

from .. import metrics
from .._checksum import crc32c
from .._util import PackedRows, without_gc
from ..errors import CheckpointWriteError, CorruptCheckpointError
from ..format.checks import manifest_listing_problems, marker_listing_problems, raise_first
from ..format.manifest import build_manifest, manifest_from_bytes, manifest_to_bytes
from ..format.marker import Marker
from ..format.names import MARKER_NAME, is_own_file, manifest_file_name, marker_temp_name
from ..futures import unwrap_ray_error
from ..storage.atomic import commit_strategy_for
from ..storage.storage import Storage
from .dedup import Merger
from .protocol import (
    ABANDONED,
    CommitTarget,
    RankReport,
    SaveRequest,
    SaveResult,
    ShardResult,
    StagingOutcome,
    portable_error,
)

logger = logging.getLogger(__name__)


def commit_save(
    request: SaveRequest, outcome: StagingOutcome, begin_commit: Callable[[], bool]
) -> SaveResult:
    """Gather every write of this rank's save (``outcome``: what staging handed over), then
    commit it (one rank) or hand it to the checkpoint's barrier (several ranks), once
    ``begin_commit`` allows it (False: the save was cancelled). On failure, delete this save's
    files."""
    storage = request.storage
    try:
        shards = gather_shards(outcome.shards, storage, request.barrier_timeout_secs)
        if outcome.error is not None:
            raise outcome.error
        if not begin_commit():
            raise concurrent.futures.CancelledError(
                f"save to {storage.display} was cancelled; nothing was committed"
            )
        report = rank_report(request, outcome, shards)
        if request.barrier is None:
            return commit_reports(request.commit_target(), [report])
    except BaseException as e:
        metrics.record_failure()
        if request.barrier is not None:
            request.barrier.fail(request.rank_info.global_rank, portable_error(e))
        discard_files(storage, request.checkpoint_id)
        raise
    return _through_barrier(request, report)


def rank_report(
    request: SaveRequest, outcome: StagingOutcome, shards: list[ShardResult]
) -> RankReport:
    """What this rank's save wrote (``shards``, one per data file), as the commit reads it."""
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
    """Hand this rank's report to the checkpoint's barrier and wait for its decision."""
    assert request.barrier is not None
    try:
        return ray.get(  # type: ignore[no-any-return]
            # the secrets first: inlined in the call's RPC, never with the (large) report
            request.barrier.arrive(request.storage.handoff(), report),
            timeout=request.barrier_timeout_secs + 60,
        )
    except Exception as e:  # noqa: BLE001 - every failure is re-raised after the clean-up
        error = unwrap_ray_error(e)
        if not _committed_with(request.storage, report.files):
            discard_files(request.storage, request.checkpoint_id)
        metrics.record_failure()
        raise error from None


@without_gc
def commit_reports(target: CommitTarget, reports: list[RankReport]) -> SaveResult:
    """Commit the reports of every rank as ``target`` (see :func:`commit_merged`)."""
    merger = Merger(target.storage)
    for report in reports:
        merger.add(report)
    return commit_merged(target, merger)


@without_gc
def commit_merged(target: CommitTarget, merger: Merger) -> SaveResult:
    """Commit the merged reports of every rank as checkpoint ``target.checkpoint_id`` in
    ``target.storage``: manifest (durable), ``pre_commit`` hook, marker (exclusive unless
    overwriting), ``post_commit`` hook, then the files of the checkpoint this one replaced."""
    storage, checkpoint_id, hook = target.storage, target.checkpoint_id, target.hook
    items, extents, tree, rank_trees = merger.finish()
    replaced = _committed_files(storage) if target.overwrite else set()
    table = build_manifest(items, extents, tree, checkpoint_id, rank_trees)
    raw = manifest_to_bytes(table)
    manifest = manifest_file_name(checkpoint_id)
    try:
        storage.write_file(manifest, [raw], fsync=target.fsync)
        marker = Marker(
            checkpoint_id=checkpoint_id,
            manifest=manifest,
            manifest_nbytes=len(raw),
            manifest_crc32c=crc32c(raw),
            created_unix=time.time(),
            world_size=merger.world_size,
            total_nbytes=sum(m.nbytes for m in items),
            metadata=merger.metadata,
        )
        if hook is not None:
            hook.pre_commit(storage.display)
        commit_strategy_for(storage.fs).commit(
            storage,
            MARKER_NAME,
            marker.to_bytes(),
            marker_temp_name(checkpoint_id),
            exclusive=not target.overwrite,
        )
    except BaseException:
        storage.delete_files([manifest])
        raise
    kept = {e.file for e in extents} | {manifest}
    stale = sorted(replaced - kept)
    if stale:
        storage.delete_files(stale)
    if hook is not None:
        hook.post_commit(storage.display)
    result = SaveResult(
        path=storage.display,
        checkpoint_id=checkpoint_id,
        nbytes=marker.total_nbytes,
        items=len(items),
        files=len({e.file for e in extents}) + 2,
        stage_secs=merger.stage_secs,
        total_secs=time.time() - target.started_unix,
        writers=dict(merger.writers),
    )
    metrics.record_commit(result.nbytes, result.total_secs)
    logger.debug("committed %s (%s)", result.path, result.checkpoint_id)
    return result


def gather_shards(
    shards: list[tuple[str, str, ray.ObjectRef]], storage: Storage, timeout_secs: float
) -> list[ShardResult]:
    """Wait for every write; raise one error naming every failed writer, node and cause."""
    refs = [ref for _, _, ref in shards]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_secs)
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
            if isinstance(cause, ray.exceptions.OwnerDiedError):  # not the writer's doing
                failures.append(
                    f"writer on node {node_id} ({file}): the process that staged its bytes died "
                    "before they were written (Ray's OwnerDiedError): save again from a live one"
                )
            else:
                failures.append(
                    f"writer on node {node_id} ({file}): {type(cause).__name__}: {cause}"
                )
    if failures:
        raise CheckpointWriteError(
            f"save to {storage.display} failed; nothing was committed. "
            f"{len(failures)} of {len(shards)} writes failed:\n  " + "\n  ".join(failures)
        )
    return results


def discard_files(storage: Storage, checkpoint_id: str) -> None:
    """Delete every file of checkpoint ``checkpoint_id`` in ``storage`` (and nothing else).
    Writes of it still running in this writer delete their files when they end."""
    ABANDONED.add(checkpoint_id)
    try:
        names = [n for n in storage.list_files() if is_own_file(n) and checkpoint_id in n]
        storage.delete_files(names)
    except Exception as e:  # noqa: BLE001 - cleanup must not hide the error being raised
        logger.warning(
            "could not delete the files of checkpoint %s in %s (%s); they are not committed: "
            "`ray-ckpt clean` on the directory above (or CheckpointManager.cleanup()) removes "
            "them",
            checkpoint_id, storage.display, e,
        )


def _committed_marker(storage: Storage) -> Marker | None:
    if not storage.exists(MARKER_NAME):
        return None
    try:
        raise_first(marker_listing_problems(storage.list_files(), MARKER_NAME, storage.display))
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
        raise_first(manifest_listing_problems(storage.list_files(), marker, storage.display))
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


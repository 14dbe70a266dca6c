"""The commit: the writer's half of a save (see :mod:`ray_ckpt.coordinator` for the whole).

Runs in the writer actor of the saving process's node (a single-rank save) or in the
checkpoint's coordinator actor (:mod:`ray_ckpt.barrier`, a multi-rank save)::

    gather        wait for every bucket's write; one error names every failed writer, node and
                  cause; nothing is committed
    report        this rank's items, extents and tree (single rank: commit them directly)
    merge         several ranks, each report as it arrives (:class:`Merger`): one index space
                  for the union of the ranks' items (a replicated tensor or a shard box once),
                  every disagreement collected, one tree, the union of the ranks' trees
    commit        manifest (durable), ``pre_commit`` hook, marker last (exclusive unless
                  overwriting: ``storage.CommitStrategy``), ``post_commit`` hook
    clean up      on failure: every file of this save; after an overwrite: the files of the
                  checkpoint it replaced
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import ray

from . import metrics
from ._checksum import crc32c
from ._tree import remap, union_trees
from .coordinator import SaveRequest, SaveResult, StagingOutcome, portable_error
from .errors import CheckpointWriteError, CorruptCheckpointError
from .format import (
    MARKER_NAME,
    Extent,
    ItemMeta,
    Marker,
    PackedRows,
    build_manifest,
    is_own_file,
    manifest_file_name,
    manifest_from_bytes,
    manifest_to_bytes,
    marker_temp_name,
    without_gc,
)
from .futures import unwrap_ray_error
from .sharding import Box, overlap
from .storage import Storage
from .validate import manifest_listing_problems, marker_listing_problems, raise_first
from .writer import ABANDONED, ShardResult

logger = logging.getLogger(__name__)

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
            request.barrier.fail.remote(request.rank_info.global_rank, portable_error(e))
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
            # the secrets first: inlined in the call's RPC, never with the (large) report
            request.barrier.arrive.remote(request.storage.handoff(), report),
            timeout=request.barrier_timeout_secs + 60,
        )
    except Exception as e:  # noqa: BLE001 - every failure is re-raised after the clean-up
        error = unwrap_ray_error(e)
        if not _committed_with(request.storage, report.files):
            discard_files(request.storage, request.checkpoint_id)
        metrics.record_failure()
        raise error from None


@without_gc
def commit_reports(
    request: SaveRequest, reports: list[RankReport], checkpoint_id: str
) -> SaveResult:
    """Commit the reports of every rank as checkpoint ``checkpoint_id`` (see
    :func:`commit_merged`)."""
    merger = Merger(request.storage)
    for report in reports:
        merger.add(report)
    return commit_merged(request, merger, checkpoint_id)


@without_gc
def commit_merged(request: SaveRequest, merger: Merger, checkpoint_id: str) -> SaveResult:
    """Commit the merged reports of every rank as checkpoint ``checkpoint_id``: manifest
    (durable), ``pre_commit`` hook, marker (exclusive unless overwriting), ``post_commit`` hook,
    then the files of the checkpoint this one replaced."""
    storage = request.storage
    items, extents, tree, rank_trees = merger.finish()
    replaced = _committed_files(storage) if request.overwrite else set()
    table = build_manifest(items, extents, tree, checkpoint_id, rank_trees)
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
            world_size=merger.world_size,
            total_nbytes=sum(m.nbytes for m in items),
            metadata=merger.metadata,
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
    result = SaveResult(
        path=storage.display,
        checkpoint_id=checkpoint_id,
        nbytes=marker.total_nbytes,
        items=len(items),
        files=len({e.file for e in extents}) + 2,
        stage_secs=merger.stage_secs,
        total_secs=time.time() - request.started_unix,
        writers=dict(merger.writers),
    )
    metrics.record_commit(result.nbytes, result.total_secs)
    logger.debug("committed %s (%s)", result.path, result.checkpoint_id)
    return result


def _unwritten(items: list[ItemMeta], extents: list[Extent]) -> list[str]:
    written: Counter[int] = Counter()
    for extent in extents:
        written[extent.item] += extent.length
    return [f"key {m.key!r}: no rank wrote its bytes" for m in items if written[m.item] != m.nbytes]


class Merger:
    """Builds a checkpoint's item list from the ranks' reports, one report at a time, in any
    order; collects every disagreement. The checkpoint is the union of the ranks' keys: a
    replicated item (held by one rank or several) or a shard box is numbered once, however
    many ranks hold it; a rank-local item once per rank. What it keeps is proportional to the
    checkpoint's items (and, for trees, to the distinct ones), not to ranks x items."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.items: list[ItemMeta] = PackedRows()
        self.extents: list[Extent] = PackedRows()
        self.problems: list[str] = []
        self.replicated: dict[str, tuple[int, int, int | None]] = {}  # path -> index, rank, crc
        self.boxes: dict[tuple[str, tuple[int, ...]], tuple[int, int]] = {}  # -> index, rank
        self.shards: dict[str, list[int]] = {}
        self.trees: dict[str, int] = {}  # distinct tree (in the checkpoint's numbering) -> id
        self.rank_trees: dict[int, int] = {}  # rank -> tree id
        self.world_size = 0
        self.metadata: dict[str, Any] = {}
        self.stage_secs = 0.0
        self.writers: Counter[str] = Counter()
        self._single: RankReport | None = None
        self._metadata_rank: int | None = None
        self._remapped: dict[str, tuple[dict[int, int], int]] = {}  # last remap of each tree

    def _new(self, meta: ItemMeta, **changes: Any) -> int:
        index = len(self.items)
        self.items.append(meta._replace(item=index, **changes))
        return index

    def add(self, report: RankReport) -> None:
        if self.world_size == 0 and not report.replicas and not report.shard_items:
            self._single = report  # alone, nothing shared: its numbering is the checkpoint's
        else:
            if self._single is not None:
                self._add(self._single)
                self._single = None
            self._add(report)
        self.world_size += 1
        self.writers.update(report.writers)
        self.stage_secs = max(self.stage_secs, report.stage_secs)
        if self._metadata_rank is None or report.rank < self._metadata_rank:
            self.metadata, self._metadata_rank = report.metadata, report.rank

    def _add(self, report: RankReport) -> None:
        mapping: dict[int, int] = {}
        for meta in report.items:
            if meta.item in report.shard_items:
                box = report.shard_items[meta.item][0]
                mapping[meta.item] = self._shard(meta, box, report.rank)
            elif meta.item in report.replicas:
                mapping[meta.item] = self._replica(meta, report.replicas[meta.item], report.rank)
            else:
                mapping[meta.item] = self._new(meta)
        self.extents.extend(e._replace(item=mapping[e.item]) for e in report.extents)
        # in the tree a sharded tensor names its first box, whichever box this rank holds, so
        # that ranks holding the same keys have the same tree, kept once
        for item, (path, _) in report.shard_items.items():
            mapping[item] = self.shards[path][0]
        self.rank_trees[report.rank] = self._tree_id(report.tree_json, mapping)

    def _tree_id(self, tree_json: str, mapping: dict[int, int]) -> int:
        """The id of ``tree_json`` renumbered by ``mapping``, among the distinct trees. Ranks
        with the same tree and numbering (DDP, the ranks of a stage) reuse the last remap:
        comparing two mappings costs far less than remapping."""
        known = self._remapped.get(tree_json)
        if known is not None and known[0] == mapping:
            return known[1]
        tree = remap(tree_json, mapping)
        tree_id = self.trees.setdefault(tree, len(self.trees))
        self._remapped[tree_json] = (mapping, tree_id)
        return tree_id

    def _replica(self, meta: ItemMeta, replica: tuple[str, int, int | None], rank: int) -> int:
        path, _, crc = replica
        known = self.replicated.get(path)
        if known is None:
            index = self._new(meta, replicated=True)
            self.replicated[path] = (index, rank, crc)
            return index
        index, first_rank, first_crc = known
        first = self.items[index]
        if (first.dtype, first.shape) != (meta.dtype, meta.shape):
            self.problems.append(
                f"key {meta.key!r} is {first.dtype} {list(first.shape or ())} on rank "
                f"{first_rank} but {meta.dtype} {list(meta.shape or ())} on rank {rank}"
            )
        elif None not in (crc, first_crc) and crc != first_crc:
            self.problems.append(
                f"key {meta.key!r} holds different values on ranks {min(first_rank, rank)} "
                f"and {max(first_rank, rank)}"
            )
        return index

    def _shard(self, meta: ItemMeta, path: str, rank: int) -> int:
        assert meta.global_offset is not None
        known = self.boxes.get((path, meta.global_offset))
        if known is None:
            index = self._new(meta)
            self.boxes[(path, meta.global_offset)] = (index, rank)
            self.shards.setdefault(path, []).append(index)
            return index
        index, first_rank = known
        first = self.items[index]
        layout = (meta.dtype, meta.shape, meta.global_shape)
        if (first.dtype, first.shape, first.global_shape) != layout:
            self.problems.append(
                f"key {meta.key!r}: ranks {first_rank} and {rank} disagree on the shard at "
                f"{list(meta.global_offset)} ({first.dtype} {list(first.shape or ())} of "
                f"{list(first.global_shape or ())} vs {meta.dtype} {list(meta.shape or ())} of "
                f"{list(meta.global_shape or ())})"
            )
        return index

    def finish(self) -> tuple[list[ItemMeta], list[Extent], str, list[str] | None]:
        """Check what the ranks saved and return the checkpoint's items, extents, tree (the
        union of the ranks' trees) and, where ranks would load differently from the union
        (rank-local keys, per-rank values), every rank's tree."""
        if self._single is not None:  # one rank, nothing shared
            only = self._single
            self._raise_if(_unwritten(only.items, only.extents))
            return only.items, only.extents, only.tree_json, None
        for indices in self.shards.values():
            self._check_tiling([self.items[i] for i in indices])
        self._raise_if(self.problems + _unwritten(self.items, self.extents))
        shard_lists = {ids[0]: ids for ids in self.shards.values()}
        first_rank: dict[int, int] = {}
        for rank in sorted(self.rank_trees):
            first_rank.setdefault(self.rank_trees[rank], rank)
        by_rank = sorted(self.trees, key=lambda t: first_rank[self.trees[t]])
        union, over = union_trees(by_rank, shard_lists)
        if len(self.rank_trees) == 1 or all(t == union for t in over):
            return self.items, self.extents, union, None
        tree_of = {self.trees[t]: o for t, o in zip(by_rank, over)}
        return self.items, self.extents, union, [
            tree_of[self.rank_trees[r]] for r in range(max(self.rank_trees) + 1)
        ]

    def _raise_if(self, problems: list[str]) -> None:
        if problems:
            raise CheckpointWriteError(
                f"save to {self.storage.display} failed; nothing was committed. The ranks "
                "disagree on what they saved:\n  " + "\n  ".join(problems[:20])
                + "\nReplicated tensors must be equal on every rank that holds them; mark "
                "per-rank tensors with CheckpointStagerConfig(rank_local_keys=(...))."
            )

    def _check_tiling(self, shards: list[ItemMeta]) -> None:
        """The shards of one tensor must agree on it and cover it exactly once. Overlaps are
        found by a sweep along the dimension the boxes are split most along: O(n log n) for
        the usual layouts (row, column or grid shards), where all pairs would be O(n^2)."""
        first = shards[0]
        if any((m.dtype, m.global_shape) != (first.dtype, first.global_shape) for m in shards):
            self.problems.append(f"key {first.key!r}: its shards disagree on dtype or global shape")
            return
        total = math.prod(first.global_shape or ())
        covered = sum(math.prod(m.shape or ()) for m in shards)
        boxes = [(m.global_offset or (), m.shape or ()) for m in shards if math.prod(m.shape or ())]
        clash = _first_overlap(boxes)
        if clash is not None:
            a, b = clash
            self.problems.append(
                f"key {first.key!r}: shards at {list(a[0])} and {list(b[0])} overlap"
            )
        elif covered != total:
            self.problems.append(
                f"key {first.key!r}: its shards cover {covered} of the {total} elements of "
                f"{list(first.global_shape or ())}"
            )


def _first_overlap(boxes: list[Box]) -> tuple[Box, Box] | None:
    """Two boxes that overlap, or None: a sweep along the dimension with the most distinct
    offsets, comparing each box only with those still open along it."""
    if len(boxes) < 2 or not boxes[0][0]:
        return None if len(boxes) < 2 else (boxes[0], boxes[1])
    dims = len(boxes[0][0])
    axis = max(range(dims), key=lambda d: len({offset[d] for offset, _ in boxes}))
    open_boxes: list[Box] = []
    for box in sorted(boxes, key=lambda b: b[0][axis]):
        start = box[0][axis]
        open_boxes = [o for o in open_boxes if o[0][axis] + o[1][axis] > start]
        for other in open_boxes:
            if overlap(other, box) is not None:
                return other, box
        open_boxes.append(box)
    return None


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
            failures.append(f"writer on node {node_id} ({file}): {type(cause).__name__}: {cause}")
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


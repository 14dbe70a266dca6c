"""Multi-rank dedup: a tensor held by several ranks is written once and numbered once.

In the order a multi-rank save runs::

    (stager, each rank)    replicated_items        which items are replicated; their writers
                                                   come from the barrier (assign_replica_owners
                                                   over the union of the ranks' keys)
    (stager, each rank)    record_staged           path, owner and CRC32C of each, for the report
    (barrier / commit)     Merger                  folds the ranks' reports into one item list,
                                                   a replicated item or shard box once; collects
                                                   every disagreement (values, shapes, tiling)
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._util import PackedRows
from ..errors import CheckpointWriteError
from ..format.checks import first_overlap
from ..format.manifest import Extent, ItemMeta
from ..format.names import KIND_TENSOR
from ..format.refs import union_trees
from ..format.tree import Leaf, remap
from ..storage.storage import Storage
from .protocol import RankReport


@dataclass(frozen=True)
class Replica:
    """A replicated item of a multi-rank save: the same key on every rank, written by one."""

    path_id: str
    owner: int


# A multi-rank save's replica assignment: given this rank's replicated candidates, as
# (path id, bytes), the writing rank of each (asked of the checkpoint's barrier actor, which
# answers once every rank has asked: see :func:`assign_replica_owners`).
AssignReplicas = Callable[[list[tuple[str, int]]], list[int]]


def replicated_items(
    leaves: list[Leaf],
    items: list[ItemMeta],
    world_size: int,
    rank_local_keys: tuple[str, ...],
    assign: AssignReplicas | None,
) -> dict[int, Replica]:
    """Which of a rank's items are replicated across ranks (every tensor that is neither sharded
    nor rank-local: held by one rank or by several, written once), and which rank writes each
    (:func:`assign_replica_owners`, through ``assign``; without it, every rank is taken to hold
    the same keys). Called by the stager when it plans a multi-rank save."""
    if world_size <= 1:
        return {}
    candidates = [
        (leaf, meta)
        for leaf, meta in zip(leaves, items)
        if meta.kind == KIND_TENSOR
        and leaf.shard is None
        and not _under_any(leaf.key, rank_local_keys)
    ]
    keys = [(leaf.path_id, meta.nbytes) for leaf, meta in candidates]
    if assign is None:
        owners = assign_replica_owners([(list(range(world_size)), keys)])[0]
    else:
        owners = assign(keys)
    return {
        meta.item: Replica(leaf.path_id, owner)
        for (leaf, meta), owner in zip(candidates, owners)
    }


def _under_any(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "" or key == p or key.startswith(p + ".") for p in prefixes)


def assign_replica_owners(
    key_sets: list[tuple[list[int], list[tuple[str, int]]]],
) -> list[list[int]]:
    """Which rank writes each replicated key of a multi-rank save: the checkpoint is the union
    of the ranks' keys, so a key is written once, by one of the ranks that hold it.

    ``key_sets`` holds each distinct candidate list (path id, bytes) with the ranks that sent
    it (DDP: one list for every rank; pipeline stages: one per stage). Largest key first, each
    to the least loaded of its holders (ties: lowest rank). Returns, per key set, the owner of
    each of its keys. Cost: O(keys x log ranks) plus O(ranks) per distinct holder group, never
    ranks x keys: the memory is proportional to the distinct key sets, not to the ranks."""
    holders: dict[str, tuple[int, list[int]]] = {}
    for set_id, (_, candidates) in enumerate(key_sets):
        for path, nbytes in candidates:
            holders.setdefault(path, (nbytes, []))[1].append(set_id)
    loads: dict[int, int] = {}
    heaps: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    owners: dict[str, int] = {}
    for path, (nbytes, set_ids) in sorted(holders.items(), key=lambda kv: (-kv[1][0], kv[0])):
        group = tuple(set_ids)
        heap = heaps.get(group)
        if heap is None:
            ranks = sorted({r for s in group for r in key_sets[s][0]})
            heap = heaps[group] = [(loads.get(r, 0), r) for r in ranks]
            heapq.heapify(heap)
        while heap[0][0] != loads.get(heap[0][1], 0):  # stale: loaded through another group
            heapq.heapreplace(heap, (loads.get(heap[0][1], 0), heap[0][1]))
        owner = heap[0][1]
        loads[owner] = loads.get(owner, 0) + nbytes
        heapq.heapreplace(heap, (loads[owner], owner))
        owners[path] = owner
    return [[owners[path] for path, _ in candidates] for _, candidates in key_sets]


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
        clash = first_overlap(boxes)
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

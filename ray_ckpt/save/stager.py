"""Staging: copy a state dict out of the training process into the Ray object store.

Call order, all in the caller's process::

    plan = stager.plan(state_dict, ...)     # flatten, validate, lay out buckets; no copies
    for group in groups:                    # consecutive bucket indices, within the budget
        ref = stager.stage(plan, group)     # one copy per byte, into the object store
    stager.close()                          # releases pinned host buffers

A bucket becomes one data file. ``stage`` puts a group of buckets as one object (a list with
one payload per bucket): a sync save stages one bucket at a time, to start writing at once; an
async save stages up to 256 MiB a put, since each ``ray.put`` has a fixed cost (see
``pipeline.ASYNC_PUT_BYTES``). A bucket's payload is a list of byte arrays, each put as a
list of *pieces* of at most ``PUT_PIECE_BYTES`` (views, no copy; see there why):

* at most one *pack*: tensors up to ``pack_threshold_bytes`` copied side by side, each at a
  64-byte aligned offset, so that 50,000 tiny tensors cost a handful of puts, not 50,000;
* *chunks*: byte views of larger tensors (a whole tensor, or a ``bucket_size_bytes`` slice of
  a larger one). On CPU a chunk is a numpy view of the tensor's own memory; ``ray.put`` copies
  it straight into shared memory (its pieces travel out of band as ``PickleBuffer``s; torch
  tensors would be pickled). That copy is the only one.

CUDA tensors are first copied into a page-locked host buffer laid out exactly like the bucket
(on a side stream, non-blocking, synchronised before the put); the buffer is reused for every
bucket and every save, and freed by :meth:`DefaultStager.close`.
"""

from __future__ import annotations

import abc
import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from .._checksum import crc32c
from .._util import PackedRows, without_gc
from ..config import CheckpointStagerConfig
from ..errors import UnsupportedValueError
from ..format.flatten import flatten
from ..format.header import HEADER_SIZE
from ..format.layout import BucketLayout, Segment
from ..format.manifest import ItemMeta
from ..format.names import ALIGNMENT, KIND_PICKLE, KIND_TENSOR, align, data_file_name, dtype_name
from ..format.tree import Leaf
from .dedup import AssignReplicas, Replica, replicated_items
from .pieces import _group_bytes, byte_view, pieces
from .protocol import StageStats, StagingOutcome

logger = logging.getLogger(__name__)


@dataclass
class _Source:
    """Where the bytes of one array of a bucket come from."""

    # a pack: (leaf index, start in pack, length); a chunk: one entry with start = byte offset
    # within the leaf's bytes
    parts: list[tuple[int, int, int]]
    nbytes: int
    is_pack: bool
    # a pack: its groups, (start in pack, leaf indices) of items of one dtype laid back to back
    groups: list[tuple[int, list[int]]] = field(default_factory=list)


@dataclass
class StagingPlan:
    """Everything :meth:`CheckpointStager.stage` needs, computed before any byte is copied."""

    checkpoint_id: str
    rank: int
    tree_json: str
    items: list[ItemMeta]
    buckets: list[BucketLayout]
    leaves: list[Leaf] = field(repr=False)
    sources: list[list[_Source]] = field(repr=False)
    host_bytes: list[torch.Tensor | np.ndarray] = field(repr=False)
    on_cuda: bool = False
    ready_event: torch.cuda.Event | None = field(default=None, repr=False)  # recorded at plan
    replicas: dict[int, Replica] = field(default_factory=dict)  # item index -> replica
    shard_owners: dict[int, int] = field(default_factory=dict)  # shard item -> writing rank

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.items)

    @property
    def written_bytes(self) -> int:
        """The bytes this rank stages and writes: its buckets. Less than :attr:`nbytes` on a
        rank of a multi-rank save, which writes only its share of the replicated items (under
        DDP, about 1/world of the state) and the shards it owns."""
        return sum(b.nbytes for b in self.buckets)


class CheckpointStager(abc.ABC):
    """Copies state out of the caller's memory; see the module docstring for the call order."""

    @abc.abstractmethod
    def plan(
        self,
        state_dict: dict[Any, Any],
        *,
        checkpoint_id: str,
        rank: int = 0,
        world_size: int = 1,
        allow_pickle: bool = False,
        assign_replicas: AssignReplicas | None = None,
    ) -> StagingPlan:
        """Flatten and validate ``state_dict`` and lay out its buckets. Copies nothing.

        With ``world_size > 1``, replicated tensors owned by other ranks get no bucket; their
        owners come from ``assign_replicas`` (the union of every rank's keys), or, without it,
        from the assumption that every rank holds the same keys."""

    @abc.abstractmethod
    def stage(self, plan: StagingPlan, buckets: Sequence[int]) -> ray.ObjectRef:
        """Copy buckets ``buckets`` of ``plan`` into the object store as one object, a list
        holding each bucket's list of byte arrays (each a list of consecutive pieces), and
        return its ref."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every resource of the stager (pinned buffers, streams)."""


class DefaultStager(CheckpointStager):
    """The stager described in the module docstring."""

    def __init__(self, config: CheckpointStagerConfig | None = None) -> None:
        self._config = config or CheckpointStagerConfig()
        self._pinned: torch.Tensor | None = None
        self._stream: torch.cuda.Stream | None = None

    # --- plan ---------------------------------------------------------------------------------

    @without_gc
    def plan(
        self,
        state_dict: dict[Any, Any],
        *,
        checkpoint_id: str,
        rank: int = 0,
        world_size: int = 1,
        allow_pickle: bool = False,
        assign_replicas: AssignReplicas | None = None,
    ) -> StagingPlan:
        tree_json, leaves = flatten(state_dict, allow_pickle=allow_pickle)
        items: list[ItemMeta] = PackedRows()
        host_bytes: list[torch.Tensor | np.ndarray] = []
        on_cuda = False
        for leaf in leaves:
            meta, raw = _describe(leaf)
            items.append(meta)
            host_bytes.append(raw)
            on_cuda = on_cuda or (isinstance(raw, torch.Tensor) and raw.device.type == "cuda")
        replicas = replicated_items(
            leaves, items, world_size, self._config.rank_local_keys, assign_replicas
        )
        shard_owners = {
            leaf.index: leaf.shard.owner(leaf.path_id, rank)
            for leaf in leaves
            if leaf.shard is not None
        }
        owners = {i: r.owner for i, r in replicas.items()} | shard_owners
        owned = [m for m in items if owners.get(m.item, rank) == rank]
        sources = self._layout(owned)
        buckets = [
            _bucket_layout(seq, data_file_name(rank, seq, checkpoint_id), srcs)
            for seq, srcs in enumerate(sources)
        ]
        ready_event = None
        if on_cuda:
            ready_event = torch.cuda.Event()
            ready_event.record(torch.cuda.current_stream())
        return StagingPlan(
            checkpoint_id=checkpoint_id,
            rank=rank,
            tree_json=tree_json,
            items=items,
            buckets=buckets,
            leaves=leaves,
            sources=sources,
            host_bytes=host_bytes,
            on_cuda=on_cuda,
            ready_event=ready_event,
            replicas=replicas,
            shard_owners=shard_owners,
        )

    def _layout(self, items: list[ItemMeta]) -> list[list[_Source]]:
        """Assign every item's bytes to arrays and arrays to buckets of ``bucket_size_bytes``.

        Small items go to the bucket's pack, grouped by dtype: a group starts at a 64-byte
        aligned offset and holds its items back to back (each at a multiple of its itemsize),
        so that a group is staged with one ``torch.cat``. Larger items are chunks of their own.
        """
        limit = self._config.bucket_size_bytes
        small = self._config.pack_threshold_bytes
        buckets: list[list[_Source]] = []
        chunks: list[_Source] = []
        groups: dict[str, list[ItemMeta]] = {}
        used = 0

        def close_bucket() -> None:
            nonlocal chunks, groups, used
            if groups:
                chunks.insert(0, _pack(groups))
            if chunks:
                buckets.append(chunks)
            chunks, groups, used = [], {}, 0

        for meta in items:
            if meta.nbytes <= small:
                group = meta.dtype or "bytes"
                needed = meta.nbytes + (0 if group in groups else ALIGNMENT)
                if (chunks or groups) and used + needed > limit:
                    close_bucket()
                    needed = meta.nbytes + ALIGNMENT
                groups.setdefault(group, []).append(meta)
                used += needed
                continue
            done = 0
            while done < meta.nbytes:
                room = limit - used
                if room <= 0 or room < min(limit // 4, meta.nbytes - done):
                    close_bucket()
                    room = limit
                length = min(room, meta.nbytes - done)
                chunks.append(
                    _Source(parts=[(meta.item, done, length)], nbytes=length, is_pack=False)
                )
                used += align(length)
                done += length
        close_bucket()
        return buckets

    # --- stage --------------------------------------------------------------------------------

    def stage(self, plan: StagingPlan, buckets: Sequence[int]) -> ray.ObjectRef:
        return ray.put(self.payload(plan, buckets))

    def payload(self, plan: StagingPlan, buckets: Sequence[int]) -> list[list[list[Any]]]:
        """What :meth:`stage` puts, in this process's memory: each bucket's arrays, each a list
        of consecutive pieces. On CPU, views of the caller's tensors (a pack is a copy); on
        CUDA, views of the one pinned buffer, valid until the next call. A save without Ray
        (:mod:`ray_ckpt.save.in_process`) hands it straight to the encoder."""
        if plan.on_cuda:
            arrays = self._via_pinned(plan, [plan.sources[b] for b in buckets])
        else:
            arrays = [[self._cpu_array(plan, src) for src in plan.sources[b]] for b in buckets]
        return [[pieces(a) for a in bucket] for bucket in arrays]

    def _cpu_array(self, plan: StagingPlan, src: _Source) -> np.ndarray:
        if not src.is_pack:
            ((leaf, start, length),) = src.parts
            return byte_view(plan.host_bytes[leaf])[start : start + length]
        if len(src.groups) == 1:
            return _group_bytes([plan.host_bytes[i] for i in src.groups[0][1]])
        pack = np.zeros(src.nbytes, dtype=np.uint8)
        for start, leaves in src.groups:
            data = _group_bytes([plan.host_bytes[i] for i in leaves])
            pack[start : start + data.nbytes] = data
        return pack

    def _via_pinned(
        self, plan: StagingPlan, buckets: list[list[_Source]]
    ) -> list[list[np.ndarray]]:
        """Copy buckets with CUDA sources into the reusable host buffer, then view it."""
        total = sum(align(src.nbytes) for sources in buckets for src in sources)
        host = self._host_buffer(total)
        stream = self._side_stream()
        payload: list[list[np.ndarray]] = []
        position = 0
        context = torch.cuda.stream(stream) if stream is not None else _nullcontext()
        with context:
            if stream is not None and plan.ready_event is not None:
                stream.wait_event(plan.ready_event)
            for sources in buckets:
                payload.append(self._copy_to_host(host, position, sources, plan))
                position += sum(align(src.nbytes) for src in sources)
        if stream is not None:
            stream.synchronize()
        else:
            torch.cuda.synchronize()
        return payload

    def _copy_to_host(
        self, host: torch.Tensor, position: int, sources: list[_Source], plan: StagingPlan
    ) -> list[np.ndarray]:
        """Enqueue the copies of one bucket into ``host`` from ``position`` on; views of it."""
        host_views: list[np.ndarray] = []
        for src in sources:
            region = host[position : position + src.nbytes]
            if src.is_pack:
                region.zero_()
            for leaf, start, length in src.parts:
                raw = byte_view(plan.host_bytes[leaf])
                if src.is_pack:
                    target, source_range = region[start : start + length], slice(0, length)
                else:
                    target, source_range = region, slice(start, start + length)
                source = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(raw)
                non_blocking = self._config.use_non_blocking_copy
                target.copy_(source[source_range], non_blocking=non_blocking)
            host_views.append(region.numpy())
            position += align(src.nbytes)
        return host_views

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        if self._pinned is None or self._pinned.numel() < nbytes:
            pin = self._config.use_pinned_memory and torch.cuda.is_available()
            self._pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return self._pinned

    def _side_stream(self) -> torch.cuda.Stream | None:
        if not self._config.use_non_blocking_copy:
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    def close(self) -> None:
        self._pinned = None
        self._stream = None


def record_staged(
    plan: StagingPlan, outcome: StagingOutcome, verify_replicas: bool, stage_secs: float
) -> StageStats:
    """Once every byte of ``plan`` is staged (before the caller's tensors are released): what
    ``outcome`` hands the commit besides the writes, i.e. the replicas (checksummed with
    ``verify_replicas``), the shard owners and the staging stats, which it returns."""
    outcome.replicas = _replica_checksums(plan.replicas, plan.host_bytes, verify_replicas)
    outcome.shard_items = {
        item: (plan.leaves[item].path_id, owner) for item, owner in plan.shard_owners.items()
    }
    outcome.stats = StageStats(
        nbytes=plan.nbytes, items=len(plan.items), buckets=len(plan.buckets),
        stage_secs=stage_secs,
    )
    return outcome.stats


def _replica_checksums(
    replicas: dict[int, Replica], host_bytes: list[torch.Tensor | np.ndarray], verify: bool
) -> dict[int, tuple[str, int, int | None]]:
    """Path, owner and (with ``verify``, on CPU) CRC32C of each replicated item, as a rank
    reports them (:class:`~ray_ckpt.save.protocol.RankReport`) so that the commit's
    :class:`~ray_ckpt.save.dedup.Merger` can check that the ranks agree."""
    out: dict[int, tuple[str, int, int | None]] = {}
    for item, replica in replicas.items():
        raw = byte_view(host_bytes[item])
        crc = crc32c(raw.data) if verify and isinstance(raw, np.ndarray) else None
        out[item] = (replica.path_id, replica.owner, crc)
    return out


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _describe(leaf: Leaf) -> tuple[ItemMeta, torch.Tensor | np.ndarray]:
    """The manifest entry of a leaf and a flat uint8 view of its bytes (on its device)."""
    if leaf.kind == KIND_PICKLE:
        try:
            raw = np.frombuffer(pickle.dumps(leaf.value, protocol=5), dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - whatever pickle raises, name the key
            raise UnsupportedValueError(
                f"key {leaf.key!r}: a {type(leaf.value).__qualname__} cannot be pickled "
                f"({type(e).__name__}: {e}); convert it to tensors, numbers, strings, bytes, "
                "lists, tuples and dicts"
            ) from None
        meta = ItemMeta(leaf.index, leaf.key, KIND_PICKLE, None, None, None, raw.nbytes)
        return meta, raw
    tensor: torch.Tensor = leaf.value
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    numel = tensor.numel()
    if numel == 0:  # "contiguous" with any strides (x[1::2] of one element): no bytes
        tensor = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    elif not tensor.is_contiguous() or (numel == 1 and tensor.reshape(-1).stride(0) != 1):
        # a one-element tensor counts as contiguous whatever its strides (x[::2] of two)
        try:
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        except RuntimeError as e:  # no copy kernel: sub-byte dtypes (int4, uint3, ...)
            raise UnsupportedValueError(
                f"key {leaf.key!r}: a non-contiguous {dtype_name(tensor.dtype)} tensor cannot be "
                f"made contiguous ({e}); save a contiguous one"
            ) from None
    meta = ItemMeta(
        item=leaf.index,
        key=leaf.key,
        kind=KIND_TENSOR,
        dtype=dtype_name(tensor.dtype),
        shape=tuple(tensor.shape),
        device="cpu" if tensor.is_cpu else str(tensor.device),
        nbytes=numel * tensor.element_size(),
        global_shape=leaf.shard.global_shape if leaf.shard else None,
        global_offset=leaf.shard.global_offset if leaf.shard else None,
    )
    return meta, tensor


def _pack(groups: dict[str, list[ItemMeta]]) -> _Source:
    parts: list[tuple[int, int, int]] = []
    spans: list[tuple[int, list[int]]] = []
    position = 0
    for metas in groups.values():
        position = align(position)
        spans.append((position, [m.item for m in metas]))
        for meta in metas:
            parts.append((meta.item, position, meta.nbytes))
            position += meta.nbytes
    return _Source(parts=parts, nbytes=position, is_pack=True, groups=spans)


def _bucket_layout(seq: int, file: str, sources: list[_Source]) -> BucketLayout:
    offsets: list[int] = []
    segments: list[Segment] = []
    position = HEADER_SIZE
    for index, src in enumerate(sources):
        position = align(position)
        offsets.append(position)
        for leaf, start, length in src.parts:
            if src.is_pack:
                segments.append(Segment(leaf, 0, index, start, length))
            else:
                segments.append(Segment(leaf, start, index, 0, length))
        position += src.nbytes
    return BucketLayout(
        seq=seq,
        file=file,
        array_nbytes=tuple(src.nbytes for src in sources),
        array_offsets=tuple(offsets),
        segments=PackedRows(segments),
    )

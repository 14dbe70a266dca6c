"""``inspect``: what a checkpoint holds, from its manifest alone (no tensor data is read).

A sharded tensor (saved from several ranks as DTensor or ShardedTensor shards) is one leaf with
its global shape and total bytes; ``shards`` lists where each shard sits in it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..config import StorageConfig
from ..format.manifest import Manifest
from ..format.refs import ItemRef, ShardedRef, key_string
from ..format.tree import leaves
from ._open import KIND_OF_TAG, open_checkpoint


@dataclass(frozen=True)
class ShardSummary:
    """One shard of a sharded tensor: its box in the global tensor, and the rank that wrote it."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    rank: int


@dataclass(frozen=True)
class LeafSummary:
    """One leaf of a checkpoint: a stored item (tensor, array, pickle) or a plain value."""

    key: str
    kind: str  # "tensor", "ndarray", "pickle" or "value"
    dtype: str | None  # torch dtype name, or the Python type name of a value
    shape: tuple[int, ...] | None
    nbytes: int
    extents: int
    files: tuple[str, ...]
    value: str | None = None  # repr of a plain value (truncated)
    tied_to: str | None = None  # key of the first leaf holding the same stored item
    shards: tuple[ShardSummary, ...] = ()  # a sharded tensor's shards (shape is the global one)


@dataclass(frozen=True)
class CheckpointSummary:
    """What :func:`inspect_checkpoint` returns: every leaf, and totals."""

    path: str
    checkpoint_id: str
    created_unix: float
    world_size: int
    rank: int
    total_nbytes: int  # every item of every rank
    leaves: list[LeafSummary]
    data_files: dict[str, int]
    manifest_nbytes: int

    @property
    def tensors(self) -> list[LeafSummary]:
        return [leaf for leaf in self.leaves if leaf.kind in ("tensor", "ndarray")]

    @property
    def tensor_nbytes(self) -> int:
        """Bytes of this rank's tensors and arrays, tied ones counted once."""
        return sum(leaf.nbytes for leaf in self.tensors if leaf.tied_to is None)

    @property
    def files_nbytes(self) -> int:
        return sum(self.data_files.values()) + self.manifest_nbytes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``ray-ckpt inspect --json`` prints)."""
        doc = asdict(self)
        doc["leaves"] = [_listed(leaf) for leaf in doc["leaves"]]
        doc["tensor_count"] = len(self.tensors)
        doc["tensor_nbytes"] = self.tensor_nbytes
        doc["files_nbytes"] = self.files_nbytes
        return doc


def _listed(value: Any) -> Any:
    """``value`` with every tuple made a list, for JSON."""
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_listed(v) for v in value]
    return value


def inspect_checkpoint(
    path: str,
    *,
    rank: int = 0,
    filesystem: Any = None,
    storage_config: StorageConfig | None = None,
) -> CheckpointSummary:
    """Describe the committed checkpoint at ``path`` from its manifest alone (no tensor data is
    read): each leaf's key, kind, dtype, shape, bytes and files, and the totals. A multi-rank
    checkpoint is shown as rank ``rank`` saved it (its rank-local keys; the shared ones)."""
    info = open_checkpoint(path, filesystem, storage_config, rank)
    manifest = info.manifest
    rows = []
    first_key: dict[int, str] = {}
    for leaf_path, leaf in leaves(info.tree):
        key = key_string(leaf_path)
        if isinstance(leaf, ItemRef):
            meta = manifest.items[leaf.index]
            exts = manifest.extents[leaf.index]
            rows.append(LeafSummary(
                key=key, kind=KIND_OF_TAG[leaf.tag], dtype=meta.dtype, shape=meta.shape,
                nbytes=meta.nbytes, extents=len(exts),
                files=tuple(sorted({e.file for e in exts})),
                tied_to=first_key.get(leaf.index),
            ))
            first_key.setdefault(leaf.index, key)
        elif isinstance(leaf, ShardedRef):
            rows.append(_sharded_summary(key, leaf, manifest))
        else:
            text = repr(leaf)
            rows.append(LeafSummary(
                key=key, kind="value", dtype=type(leaf).__name__, shape=None, nbytes=0,
                extents=0, files=(), value=text if len(text) <= 80 else text[:77] + "...",
            ))
    return CheckpointSummary(
        path=info.storage.display,
        checkpoint_id=info.marker.checkpoint_id,
        created_unix=info.marker.created_unix,
        world_size=info.marker.world_size,
        rank=rank,
        total_nbytes=info.marker.total_nbytes,
        leaves=rows,
        data_files={f: info.file_sizes[f] for f in manifest.files},
        manifest_nbytes=info.marker.manifest_nbytes,
    )


def _sharded_summary(key: str, ref: ShardedRef, manifest: Manifest) -> LeafSummary:
    metas = [manifest.items[i] for i in ref.indices]
    extents = [e for i in ref.indices for e in manifest.extents[i]]
    shards = sorted((
        ShardSummary(
            offset=m.global_offset or (0,) * len(m.shape or ()),
            shape=m.shape or (),
            rank=manifest.extents[m.item][0].rank,
        )
        for m in metas
    ), key=lambda shard: shard.offset)
    return LeafSummary(
        key=key, kind="tensor", dtype=metas[0].dtype, shape=ref.global_shape,
        nbytes=sum(m.nbytes for m in metas), extents=len(extents),
        files=tuple(sorted({e.file for e in extents})), shards=tuple(shards),
    )

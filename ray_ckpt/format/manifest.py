"""The on-disk format, version 1 (documented byte for byte in docs/FORMAT.md).

A checkpoint is a directory holding three kinds of file:

* data files ``r{rank:05d}-{seq:06d}-{checkpoint_id}.data``: a 64-byte header, then raw
  little-endian tensor bytes in C order, every extent at a 64-byte aligned offset;
* one manifest ``manifest-{checkpoint_id}.arrow``: an Arrow IPC file with one row per extent
  (key, dtype, shape, file, offset, length, CRC32C) and, in its schema metadata, the format
  version and the tree: the state dict's structure with its non-tensor leaves encoded as
  tagged JSON (see :mod:`ray_ckpt.format.tree`), never as pickle;
* the commit marker ``ray_ckpt.commit``, written last: a small JSON document that names the
  manifest and carries its length and CRC32C. A directory without it is not a checkpoint.

Names carry the checkpoint id so that a save can write beside an old checkpoint and replace
it by swapping the marker alone (see :mod:`ray_ckpt.storage.storage`).

This module knows names, layouts and validation. It does no I/O of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from .._util import without_gc
from ..errors import CorruptCheckpointError, FormatVersionError
from .checks import load_json, overlap_problems, raise_first, shape_problems, world_size_problems
from .header import HEADER_SIZE
from .marker import Marker
from .names import (
    _DATA_RE,
    CHECKSUM_ALGORITHM,
    FORMAT_VERSION,
    KIND_PICKLE,
    KIND_TENSOR,
    itemsize,
)

# --- data file header -------------------------------------------------------------------------
#
#   0  8  magic  b"RAYCKPT\0"
#   8  4  format version (uint32 little-endian)
#  12  4  rank (uint32)
#  16  4  sequence number of the file within the rank (uint32)
#  20 16  checkpoint id (ASCII hex)
#  36 24  zero
#  60  4  CRC32C of bytes 0..60 (uint32)


# --- commit marker ----------------------------------------------------------------------------


# --- bulk bookkeeping -------------------------------------------------------------------------


# --- rows that travel between processes ------------------------------------------------------


# --- manifest ---------------------------------------------------------------------------------

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("item", pa.int32(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("dtype", pa.string()),
        pa.field("shape", pa.list_(pa.int64())),
        pa.field("device", pa.string()),
        pa.field("item_nbytes", pa.int64(), nullable=False),
        pa.field("chunk_offset", pa.int64(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("length", pa.int64(), nullable=False),
        pa.field("checksum", pa.uint32()),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("replicated", pa.bool_(), nullable=False),
        pa.field("global_shape", pa.list_(pa.int64())),
        pa.field("global_offset", pa.list_(pa.int64())),
    ]
)

META_VERSION = b"ray_ckpt.format_version"
META_TREE = b"ray_ckpt.tree"
META_CHECKPOINT_ID = b"ray_ckpt.checkpoint_id"
META_CHECKSUM = b"ray_ckpt.checksum_algorithm"
META_TREES = b"ray_ckpt.trees"


class Extent(NamedTuple):
    """One contiguous run of an item's bytes in one data file: one manifest row."""

    item: int
    chunk_offset: int
    file: str
    offset: int
    length: int
    checksum: int | None
    rank: int


class ItemMeta(NamedTuple):
    """What the manifest says about one stored leaf (a tensor or a pickled object)."""

    item: int
    key: str
    kind: str
    dtype: str | None
    shape: tuple[int, ...] | None
    device: str | None
    nbytes: int
    replicated: bool = False
    global_shape: tuple[int, ...] | None = None  # a shard: the shape of the whole tensor
    global_offset: tuple[int, ...] | None = None  # a shard: where this one starts in it


def _storable_key(key: str) -> str:
    """Arrow strings are UTF-8: a key's lone surrogates are kept as \\udXXX escapes (the tree
    keeps the real key)."""
    if key.isascii():
        return key
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


@without_gc
def build_manifest(
    items: list[ItemMeta],
    extents: list[Extent],
    tree_json: str,
    checkpoint_id: str,
    trees: list[str] | None = None,
) -> pa.Table:
    """The manifest table. ``trees`` holds every rank's tree for a multi-rank save (rank r's
    at position r); ``tree_json`` is rank 0's."""
    by_item = {m.item: m for m in items}
    extents = sorted(extents, key=lambda e: (e.item, e.chunk_offset))
    metas = [by_item[e.item] for e in extents]
    cols: dict[str, list[Any]] = {
        "item": [e.item for e in extents],
        "key": [_storable_key(m.key) for m in metas],
        "kind": [m.kind for m in metas],
        "dtype": [m.dtype for m in metas],
        "shape": [list(m.shape) if m.shape is not None else None for m in metas],
        "device": [m.device for m in metas],
        "item_nbytes": [m.nbytes for m in metas],
        "chunk_offset": [e.chunk_offset for e in extents],
        "file": [e.file for e in extents],
        "offset": [e.offset for e in extents],
        "length": [e.length for e in extents],
        "checksum": [e.checksum for e in extents],
        "rank": [e.rank for e in extents],
        "replicated": [m.replicated for m in metas],
        "global_shape": [
            list(m.global_shape) if m.global_shape is not None else None for m in metas
        ],
        "global_offset": [
            list(m.global_offset) if m.global_offset is not None else None for m in metas
        ],
    }
    metadata = {
        META_VERSION: str(FORMAT_VERSION).encode(),
        META_TREE: tree_json.encode(),
        META_CHECKPOINT_ID: checkpoint_id.encode(),
        META_CHECKSUM: CHECKSUM_ALGORITHM.encode(),
    }
    if trees is not None:
        metadata[META_TREES] = json.dumps(trees).encode()
    return pa.table(cols, schema=MANIFEST_SCHEMA.with_metadata(metadata))


def manifest_to_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def manifest_from_bytes(raw: bytes, *, where: str) -> pa.Table:
    try:
        return pa.ipc.open_file(pa.py_buffer(raw)).read_all()
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise CorruptCheckpointError(
            f"manifest {where} is not a readable Arrow file: {e}"
        ) from None


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: the tree, the items and their extents, ready for a reader."""

    checkpoint_id: str
    tree_json: str
    items: dict[int, ItemMeta]
    extents: dict[int, list[Extent]]
    table: pa.Table
    trees: tuple[str, ...] = ()  # every rank's tree, for a multi-rank save

    def tree_for(self, rank: int) -> str:
        """The tree rank ``rank`` saved (rank 0's for ranks the save did not have)."""
        if rank < len(self.trees):
            return self.trees[rank]
        return self.tree_json

    @property
    def files(self) -> list[str]:
        return sorted({e.file for exts in self.extents.values() for e in exts})


@without_gc
def parse_manifest(table: pa.Table, *, where: str, marker: Marker) -> Manifest:
    """Validate a manifest table completely before a single byte of tensor data is read.

    Refuses, with :class:`CorruptCheckpointError`: a schema that is not ours, an unknown
    format version or dtype, negative or absurd shapes, sizes that disagree with shapes,
    extents that do not tile their item exactly, offsets outside the data area, overlapping
    byte ranges within a file, and file names that are not ray_ckpt data file names (so a
    key or a file name can never lead outside the checkpoint directory).
    """
    meta = table.schema.metadata or {}
    version = meta.get(META_VERSION, b"").decode("ascii", "replace")
    if version != str(FORMAT_VERSION):
        raise FormatVersionError(
            f"manifest {where} is format version {version!r}; this ray_ckpt reads version "
            f"{FORMAT_VERSION}. Upgrade ray_ckpt to read it."
        )
    checkpoint_id = meta.get(META_CHECKPOINT_ID, b"").decode("ascii", "replace")
    if checkpoint_id != marker.checkpoint_id:
        raise CorruptCheckpointError(
            f"manifest {where} belongs to checkpoint {checkpoint_id!r} but the commit marker "
            f"names {marker.checkpoint_id!r}"
        )
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.schema.names]
    if missing:
        raise CorruptCheckpointError(f"manifest {where} lacks columns {missing}")
    mistyped = [
        f"{n} is {table.schema.field(n).type}, not {MANIFEST_SCHEMA.field(n).type}"
        for n in MANIFEST_SCHEMA.names
        if not table.schema.field(n).type.equals(MANIFEST_SCHEMA.field(n).type)
    ]
    if mistyped:
        raise CorruptCheckpointError(f"manifest {where}: columns of the wrong type: {mistyped}")
    tree_json = meta.get(META_TREE, b"").decode("utf-8", "replace")
    trees = _parse_trees(meta.get(META_TREES), where=where)
    raise_first(world_size_problems(marker.world_size, trees, where))
    table = table.select(MANIFEST_SCHEMA.names)
    _check_columns(table, where=where)
    cols = {name: table.column(name).to_pylist() for name in MANIFEST_SCHEMA.names}
    items: dict[int, ItemMeta] = {}
    extents: dict[int, list[Extent]] = {}
    for row in range(table.num_rows):
        index = cols["item"][row]
        item_meta = items.get(index)
        if item_meta is None:
            row_values = {n: c[row] for n, c in cols.items()}
            item_meta = items[index] = _parse_item(row_values, where=where)
        elif (cols["key"][row], cols["item_nbytes"][row]) != (item_meta.key, item_meta.nbytes):
            raise CorruptCheckpointError(
                f"manifest {where}: rows of item {index} ({item_meta.key!r}) disagree"
            )
        extents.setdefault(index, []).append(
            Extent(index, cols["chunk_offset"][row], cols["file"][row], cols["offset"][row],
                   cols["length"][row], cols["checksum"][row], cols["rank"][row] or 0)
        )
    for item, exts in extents.items():
        _check_tiling(items[item], exts, where=where)
    raise_first(overlap_problems(
        (e for exts in extents.values() for e in exts),
        {index: meta.key for index, meta in items.items()}, where,
    ))
    total = sum(m.nbytes for m in items.values())
    if total != marker.total_nbytes:
        raise CorruptCheckpointError(
            f"manifest {where} describes {total} bytes but the commit marker says "
            f"{marker.total_nbytes}"
        )
    return Manifest(checkpoint_id, tree_json, items, extents, table, trees)


def _check_columns(table: pa.Table, *, where: str) -> None:
    """Whole-column checks, before any row is looked at: no nulls where a value is needed,
    no negative sizes or offsets, no offset inside a header, only data-file names."""
    keys = table.column("key")
    for name in ("item", "key", "kind", "item_nbytes", "chunk_offset", "file", "offset", "length"):
        column = table.column(name)
        if column.null_count:
            row = pc.index(pc.is_null(column), True).as_py()
            raise CorruptCheckpointError(
                f"manifest {where}, row {row} (key {keys[row].as_py()!r}): {name} is missing"
            )
    for name, low in (("item", 0), ("item_nbytes", 0), ("chunk_offset", 0), ("length", 0),
                      ("offset", HEADER_SIZE)):
        column = table.column(name)
        smallest = pc.min(column).as_py()  # not pc.less(column, low): pyarrow would import
        if smallest is not None and smallest < low:  # pandas to convert `low`, for 0.3 s
            row = pc.index(pc.less(column, low), True).as_py()
            value = column[row].as_py()
            label = "item index" if name == "item" else name
            problem = (
                f"offset {value} lies inside the file header"
                if name == "offset" and value >= 0
                else f"invalid {label} {value!r}"
            )
            raise CorruptCheckpointError(f"manifest {where}, key {keys[row].as_py()!r}: {problem}")
    for file in pc.unique(table.column("file")).to_pylist():
        if _DATA_RE.match(file) is None:
            row = pc.index(table.column("file"), file).as_py()
            raise CorruptCheckpointError(
                f"manifest {where}, key {keys[row].as_py()!r}: {file!r} is not a ray_ckpt data "
                "file name"
            )


def _parse_trees(raw: bytes | None, *, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    trees = load_json(raw, what=f"manifest {where}: the per-rank trees")
    if not isinstance(trees, list) or not all(isinstance(t, str) for t in trees):
        raise CorruptCheckpointError(f"manifest {where}: the per-rank trees are malformed")
    return tuple(trees)


def _parse_item(row: dict[str, Any], *, where: str) -> ItemMeta:
    """The item described by its first row (the column checks have run)."""
    key = row["key"]
    kind = row["kind"]
    nbytes = row["item_nbytes"]
    shape: tuple[int, ...] | None = None
    if kind == KIND_TENSOR:
        here = f"manifest {where}, key {key!r}"
        size = itemsize(row["dtype"], where=here)
        raise_first(shape_problems(row["shape"], size, here))
        shape = tuple(row["shape"])
        numel = 1
        for d in shape:
            numel *= d
        if numel * size != nbytes:
            raise CorruptCheckpointError(
                f"{here}: shape {list(shape)} of {row['dtype']} needs {numel * size} "
                f"bytes but the manifest records {nbytes}"
            )
        global_shape, global_offset = _global_box(row, shape, here)
    elif kind == KIND_PICKLE:
        global_shape = global_offset = None
    else:
        raise CorruptCheckpointError(f"manifest {where}, key {key!r}: unknown kind {kind!r}")
    return ItemMeta(
        item=row["item"],
        key=key,
        kind=kind,
        dtype=row["dtype"],
        shape=shape,
        device=row["device"],
        nbytes=nbytes,
        replicated=bool(row["replicated"]),
        global_shape=global_shape,
        global_offset=global_offset,
    )


def _global_box(
    row: dict[str, Any], shape: tuple[int, ...] | None, here: str
) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """A shard's global shape and offset, checked to hold its local shape."""
    gshape, goffset = row.get("global_shape"), row.get("global_offset")
    if gshape is None and goffset is None:
        return None, None
    if shape is None or gshape is None or goffset is None:
        raise CorruptCheckpointError(f"{here}: a shard needs a shape, a global shape and an offset")
    raise_first(shape_problems(gshape, 1, f"{here} (global shape)"))
    if not (len(gshape) == len(goffset) == len(shape)) or any(
        not isinstance(o, int) or o < 0 or o + s > g for g, o, s in zip(gshape, goffset, shape)
    ):
        raise CorruptCheckpointError(
            f"{here}: the shard at {goffset} of shape {list(shape)} does not fit in the global "
            f"shape {gshape}"
        )
    return tuple(gshape), tuple(goffset)


def _check_tiling(meta: ItemMeta, exts: list[Extent], *, where: str) -> None:
    exts.sort(key=lambda e: e.chunk_offset)
    position = 0
    for ext in exts:
        if ext.chunk_offset != position:
            raise CorruptCheckpointError(
                f"manifest {where}, key {meta.key!r}: extents leave a gap or overlap at byte "
                f"{position}"
            )
        position += ext.length
    if position != meta.nbytes:
        raise CorruptCheckpointError(
            f"manifest {where}, key {meta.key!r}: extents cover {position} of {meta.nbytes} bytes"
        )

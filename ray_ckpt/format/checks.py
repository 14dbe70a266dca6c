"""The structural checks a checkpoint must pass before anything is read or allocated for it.

One set of checks, called by the reader (:meth:`ray_ckpt.CheckpointReader.open`), by every tool
(``verify``, ``inspect``, ``diff``, ``export``), by the catalog (``ls``) and by the manifest
parser (:func:`ray_ckpt.format.manifest.parse_manifest`). A tool never re-implements one.

The checks are pure: they look at sizes from a listing, a parsed marker, manifest rows and a
decoded tree, and do no I/O. Each is a generator of :class:`Problem` records, so a caller can
*collect* every problem (``verify`` reports them all) or *raise* the first one as a
:class:`~ray_ckpt.errors.CorruptCheckpointError` with :func:`raise_first` (a load stops at the
first). Generators are lazy: in raise mode nothing past the first problem is computed.

The rules (docs/FORMAT.md, "Structural rules", states them for writers of other readers):

* the marker and the manifest are no larger than :data:`MAX_MARKER_BYTES` and
  :data:`MAX_MANIFEST_BYTES`, and the manifest's listed size is the marker's, before either
  is read;
* JSON (marker, trees) nests at most :data:`MAX_JSON_DEPTH` levels;
* the marker's numbers are finite and in range, its world size at most the trees present;
* a shape has at most 64 dimensions, none negative, and every stride fits in int64;
* extents of one file never overlap: sorted by offset, each starts at or after the furthest
  end so far (zero-length ones included), so a load allocates no more than the data files hold;
* every shard of a sharded tensor has its dtype, rank and global shape; the boxes lie inside
  it, do not overlap, and exactly tile it;
* a numpy leaf (``N``) has a dtype numpy can hold; the tree refers only to items of its kind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CorruptCheckpointError
from .names import ITEMSIZES, KIND_PICKLE, KIND_TENSOR, NUMPY_DTYPES
from .refs import ItemRef, ShardedRef

if TYPE_CHECKING:
    from ..sharding import Box  # not at run time: ray_ckpt.sharding imports torch (ls does not)
    from .manifest import Extent, ItemMeta, Manifest
    from .marker import Marker

MAX_MARKER_BYTES = 16 << 20  # the marker is a few hundred bytes plus the caller's metadata
MAX_MANIFEST_BYTES = 512 << 20  # ~2.5 million extents; far above any real model's manifest
MAX_JSON_DEPTH = 520  # the tree's MAX_DEPTH (512) plus its tags
MAX_DIMS = 64
MAX_CREATED_UNIX = 1e11  # the year 5138
MAX_WORLD_SIZE = 1 << 24
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint.

    ``kind`` is one of ``not-found``, ``incomplete`` (no commit marker), ``marker``,
    ``manifest``, ``missing-file``, ``truncated``, ``header``, ``checksum`` or ``structure``
    (a rule of the format broken: overlapping extents, shards that do not tile, ...);
    ``file`` and ``key`` name the file and state-dict key when they are known.
    """

    kind: str
    message: str
    file: str | None = None
    key: str | None = None


def raise_first(problems: Iterable[Problem]) -> None:
    """Raise the first problem as a :class:`CorruptCheckpointError` (none: return)."""
    for problem in problems:
        raise CorruptCheckpointError(problem.message)


# --- sizes before reading -----------------------------------------------------------------------


def marker_listing_problems(
    files: Mapping[str, int], marker_name: str, where: str
) -> Iterator[Problem]:
    """The marker's listed size, before it is read: at most :data:`MAX_MARKER_BYTES`."""
    size = files.get(marker_name)
    if size is not None and size > MAX_MARKER_BYTES:
        yield Problem(
            "marker",
            f"commit marker {where}/{marker_name} is {size} bytes, more than the "
            f"{MAX_MARKER_BYTES} a marker may hold: it is not a ray_ckpt marker (not read)",
            file=marker_name,
        )


def manifest_listing_problems(
    files: Mapping[str, int], marker: Marker, where: str
) -> Iterator[Problem]:
    """The manifest's listed size, before it is read: present, the marker's, under the cap."""
    size = files.get(marker.manifest)
    name = marker.manifest
    if size is None:
        yield Problem(
            "manifest",
            f"checkpoint {where} is damaged: its manifest {name} is missing. Restore the file "
            "or use another checkpoint.",
            file=name,
        )
    elif size != marker.manifest_nbytes:
        yield Problem(
            "manifest",
            f"checkpoint {where} is damaged: manifest {name} is {size} bytes but the commit "
            f"marker says {marker.manifest_nbytes} (not read). Restore the file or use another "
            "checkpoint.",
            file=name,
        )
    elif size > MAX_MANIFEST_BYTES:
        yield Problem(
            "manifest",
            f"checkpoint {where}: manifest {name} is {size} bytes, more than the "
            f"{MAX_MANIFEST_BYTES} this reader accepts (not read)",
            file=name,
        )


# --- JSON -----------------------------------------------------------------------------------


def load_json(raw: bytes | str, *, what: str) -> Any:
    """Parse JSON whose nesting is bounded by :data:`MAX_JSON_DEPTH`; anything else (invalid,
    too deep) is a :class:`CorruptCheckpointError` naming ``what``."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        doc = None
        depth: int | None = MAX_JSON_DEPTH + 1
    else:
        depth = None
    if depth is None:
        depth = json_depth(doc, MAX_JSON_DEPTH + 1)
    if depth > MAX_JSON_DEPTH:
        raise CorruptCheckpointError(
            f"{what} is not a ray_ckpt document: its JSON nests deeper than {MAX_JSON_DEPTH} levels"
        )
    return doc


def json_depth(doc: Any, limit: int) -> int:
    """The nesting depth of parsed JSON, counted without recursion up to ``limit``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        deepest = max(deepest, depth + 1)
        if deepest >= limit:
            return deepest
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)
    return deepest


# --- marker ---------------------------------------------------------------------------------


def marker_problems(marker: Marker, where: str) -> Iterator[Problem]:
    """Numbers in the marker finite and in range."""
    here = f"commit marker {where}"
    created = marker.created_unix
    if not (math.isfinite(created) and 0 <= created <= MAX_CREATED_UNIX):
        yield Problem("marker", f"{here}: created_unix {created!r} is not a time", file=None)
    for name, value, high in (
        ("manifest_nbytes", marker.manifest_nbytes, _INT64_MAX),
        ("manifest_crc32c", marker.manifest_crc32c, (1 << 32) - 1),
        ("total_nbytes", marker.total_nbytes, _INT64_MAX),
        ("world_size", marker.world_size, MAX_WORLD_SIZE),
    ):
        if value > high:
            yield Problem("marker", f"{here}: {name} {value} is out of range (at most {high})")
    if marker.world_size < 1:
        yield Problem("marker", f"{here}: world_size {marker.world_size} is not a number of ranks")


def world_size_problems(world_size: int, trees: Sequence[str], where: str) -> Iterator[Problem]:
    """Per-rank trees, when a multi-rank checkpoint has them (ranks that load different
    values), are one per rank; without them the union tree serves every rank. The marker
    bounds ``world_size`` itself (:func:`marker_problems`)."""
    if trees and len(trees) != world_size:
        yield Problem(
            "marker",
            f"checkpoint {where}: the commit marker says {world_size} ranks saved it but the "
            f"manifest holds the trees of {len(trees)}",
        )


# --- shapes ---------------------------------------------------------------------------------


def shape_problems(shape: Any, itemsize: int, here: str) -> Iterator[Problem]:
    """At most 64 dimensions, none negative, every stride (and the byte size) within int64."""
    if not isinstance(shape, (list, tuple)) or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape
    ):
        yield Problem("structure", f"{here}: invalid shape {shape!r}")
        return
    if len(shape) > MAX_DIMS:
        yield Problem("structure", f"{here}: {len(shape)} dimensions is absurd (at most 64)")
        return
    span = max(itemsize, 1)
    for d in shape:
        span *= max(d, 1)
    if span > _INT64_MAX:
        yield Problem(
            "structure",
            f"{here}: shape {list(shape)} overflows: its strides do not fit in 64 bits",
        )


# --- extents --------------------------------------------------------------------------------


def overlap_problems(
    extents: Iterable[Extent], key_of: Mapping[int, str], where: str
) -> Iterator[Problem]:
    """Extents of one file never overlap. Sorted by (offset, length), every extent must start
    at or after the furthest end of those before it; a zero-length extent is held to the same
    rule (it may sit at a boundary, never inside another extent)."""
    by_file: dict[str, list[Extent]] = {}
    for extent in extents:
        by_file.setdefault(extent.file, []).append(extent)
    for file, runs in sorted(by_file.items()):
        runs.sort(key=lambda e: (e.offset, e.length))
        furthest, owner = 0, runs[0]
        for extent in runs:
            if extent.offset < furthest:
                yield Problem(
                    "structure",
                    f"manifest {where}: in {file}, the bytes of key {key_of.get(extent.item)!r} "
                    f"(item {extent.item}, {extent.offset}..{extent.offset + extent.length}) "
                    f"overlap those of key {key_of.get(owner.item)!r} (item {owner.item}, "
                    f"{owner.offset}..{owner.offset + owner.length}): extents may not share bytes",
                    file=file, key=key_of.get(extent.item),
                )
                return
            if extent.offset + extent.length > furthest:
                furthest, owner = extent.offset + extent.length, extent


def file_size_problems(
    manifest: Manifest, sizes: Mapping[str, int], display: str
) -> Iterator[Problem]:
    """Every data file the manifest names is listed and long enough for its last extent."""
    needed: dict[str, tuple[int, set[str]]] = {}
    for index, extents in manifest.extents.items():
        key = manifest.items[index].key
        for e in extents:
            end, keys = needed.setdefault(e.file, (0, set()))
            keys.add(key)
            needed[e.file] = (max(end, e.offset + e.length), keys)
    for file, (end, key_set) in sorted(needed.items()):
        held = sorted(key_set)
        listed = ", ".join(repr(k) for k in held[:5])
        more = f" and {len(held) - 5} more" if len(held) > 5 else ""
        where = f"{display}/{file}"
        if file not in sizes:
            yield Problem(
                "missing-file",
                f"data file {where} is missing; it holds keys {listed}{more}. Restore it or use "
                "another checkpoint.",
                file=file, key=held[0],
            )
        elif sizes[file] < end:
            yield Problem(
                "truncated",
                f"data file {where} is truncated to {sizes[file]} bytes, but the manifest needs "
                f"{end}; it holds keys {listed}{more}. Restore it or use another checkpoint.",
                file=file, key=held[0],
            )


def allocation_problems(
    manifest: Manifest, sizes: Mapping[str, int], display: str
) -> Iterator[Problem]:
    """What a load allocates (every item's bytes) is no more than the data files hold."""
    total = sum(m.nbytes for m in manifest.items.values())
    held = sum(sizes.get(f, 0) for f in manifest.files)
    if total > held:
        yield Problem(
            "structure",
            f"checkpoint {display}: its items need {total} bytes but its data files hold "
            f"{held}: the manifest is damaged or forged",
        )


# --- the tree -------------------------------------------------------------------------------


def tree_problems(tree: Any, manifest: Manifest, where: str) -> Iterator[Problem]:
    """Every stored leaf of a decoded tree refers to items of its kind; ``N`` leaves have a
    numpy dtype; every sharded tensor's shards tile it (see :func:`shard_problems`)."""

    seen: set[Any] = set()
    for ref in _stored_refs(tree):
        ident = ref.indices if isinstance(ref, ShardedRef) else (ref.index, ref.tag)
        if ident in seen:
            continue
        seen.add(ident)
        if isinstance(ref, ShardedRef):
            yield from shard_problems(ref.indices, ref.global_shape, manifest, where)
            continue
        assert isinstance(ref, ItemRef)
        meta = manifest.items.get(ref.index)
        if meta is None or (ref.tag == "P") != (meta.kind == KIND_PICKLE):
            yield Problem(
                "manifest",
                f"{where}: the tree refers to item {ref.index} as {ref.tag!r}, which the "
                "manifest does not hold",
            )
        elif ref.tag == "N" and meta.dtype not in NUMPY_DTYPES:
            yield Problem(
                "structure",
                f"{where}, key {meta.key!r}: a numpy array of dtype {meta.dtype}, which numpy "
                "cannot hold",
                key=meta.key,
            )


def shard_problems(
    indices: Sequence[int], global_shape: tuple[int, ...], manifest: Manifest, where: str
) -> Iterator[Problem]:
    """The shards of one sharded tensor: tensors of one dtype, each of the tensor's rank and
    global shape, whose boxes lie inside it, do not overlap and tile it exactly."""

    metas = [manifest.items.get(i) for i in indices]
    if any(m is None or m.kind != KIND_TENSOR for m in metas):
        yield Problem("manifest", f"{where}: a sharded tensor refers to items {list(indices)}, "
                      "which the manifest does not hold as tensors")
        return
    shards: list[ItemMeta] = [m for m in metas if m is not None]
    key = shards[0].key
    here = f"{where}, key {key!r}"
    names = {m.dtype for m in shards}
    if len(names) != 1:
        yield Problem("structure", f"{here}: its shards have dtypes {sorted(map(str, names))}",
                      key=key)
        return
    size = ITEMSIZES.get(shards[0].dtype or "", 1)
    problem = next(shape_problems(list(global_shape), size, here), None)
    if problem is not None:
        yield problem
        return
    boxes = []
    for m in shards:
        shape = m.shape or ()
        offset = m.global_offset if m.global_offset is not None else (0,) * len(shape)
        gshape = m.global_shape if m.global_shape is not None else shape
        if tuple(gshape) != tuple(global_shape) or len(offset) != len(global_shape) or any(
            o + s > g for o, s, g in zip(offset, shape, global_shape)
        ):
            yield Problem(
                "structure",
                f"{here}: the shard at {list(offset)} of shape {list(shape)} (global shape "
                f"{list(gshape)}) is not a box of the tensor's global shape {list(global_shape)}",
                key=key,
            )
            return
        boxes.append((tuple(offset), tuple(shape)))
    yield from tiling_problems(boxes, tuple(global_shape), here, key)


def tiling_problems(
    boxes: list[Box],
    global_shape: tuple[int, ...],
    here: str,
    key: str | None = None,
) -> Iterator[Problem]:
    """Boxes (offset, shape) inside ``global_shape`` tile it exactly: no two share an element
    and together they hold as many elements as it does (so they cover all of it)."""
    boxes = [b for b in boxes if all(b[1])]  # an empty box holds nothing
    clash = first_overlap(boxes)
    if clash is not None:
        yield Problem(
            "structure",
            f"{here}: the shards at {list(clash[0][0])} and {list(clash[1][0])} overlap; a "
            "sharded tensor's shards must tile it exactly",
            key=key,
        )
        return
    covered = sum(math.prod(shape) for _, shape in boxes)
    if covered != math.prod(global_shape):
        yield Problem(
            "structure",
            f"{here}: its shards cover {covered} of the {math.prod(global_shape)} elements of "
            f"its global shape {list(global_shape)}: a shard is missing",
            key=key,
        )


def first_overlap(boxes: Sequence[Box]) -> tuple[Box, Box] | None:
    """Two of the (non-empty) boxes that share an element, or None. A sweep along the dimension
    with the most distinct offsets, comparing each box only with those still open along it:
    O(n log n) for the usual layouts (row, column or grid shards), where all pairs would be
    O(n^2). Used on load (:func:`tiling_problems`) and by the multi-rank save's dedup."""
    if len(boxes) < 2 or not boxes[0][0]:
        return None if len(boxes) < 2 else (boxes[0], boxes[1])
    dims = len(boxes[0][0])
    axis = max(range(dims), key=lambda d: len({offset[d] for offset, _ in boxes}))
    open_boxes: list[Box] = []
    for box in sorted(boxes, key=lambda b: b[0][axis]):
        start = box[0][axis]
        open_boxes = [o for o in open_boxes if o[0][axis] + o[1][axis] > start]
        for other in open_boxes:
            if all(o < b + t and b < o + s for o, s, b, t in zip(*other, *box)):
                return other, box
        open_boxes.append(box)
    return None


def _stored_refs(tree: Any) -> Iterator[Any]:
    """Every :class:`ItemRef` and :class:`ShardedRef` of a decoded tree, without recursion."""

    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ItemRef, ShardedRef)):
            yield node
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):  # a torch.Size holds ints: nothing to find
            stack.extend(node)

"""The format on its own: bucket layout, manifest validation, marker, tree encoding. No Ray."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch

import ray_ckpt
from ray_ckpt import _tree
from ray_ckpt.config import CheckpointStagerConfig
from ray_ckpt.format import (
    ALIGNMENT,
    HEADER_SIZE,
    Extent,
    ItemMeta,
    Marker,
    build_manifest,
    data_file_name,
    parse_manifest,
)
from ray_ckpt.stager import DefaultStager

CKPT_ID = "0123456789abcdef"


def _plan(sizes: list[int], bucket: int = 4096, pack: int = 256):
    config = CheckpointStagerConfig(bucket_size_bytes=bucket, pack_threshold_bytes=pack)
    stager = DefaultStager(config)
    state = {f"t{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    return stager.plan(state, checkpoint_id=CKPT_ID)


@pytest.mark.parametrize(
    "sizes",
    [[1] * 100, [0, 5, 300, 5000, 1, 9000, 64, 4096, 4097], [10_000], [], [256, 257, 255] * 20],
)
def test_layout_covers_every_byte_once_aligned_and_bounded(sizes):
    plan = _plan(sizes)
    covered: dict[int, list[tuple[int, int]]] = {}
    for bucket in plan.buckets:
        assert bucket.array_offsets[0] == HEADER_SIZE if bucket.array_offsets else True
        assert bucket.nbytes <= 4096 + len(bucket.array_nbytes) * ALIGNMENT
        for off in bucket.array_offsets:
            assert off % ALIGNMENT == 0
        for seg in bucket.segments:  # packed items: back to back within their dtype's group
            itemsize = 1  # every tensor here is uint8; chunks start their arrays
            assert (bucket.array_offsets[seg.array] + seg.start) % itemsize == 0
            if seg.length > 256:
                assert seg.start == 0 and bucket.array_offsets[seg.array] % ALIGNMENT == 0
            assert seg.start + seg.length <= bucket.array_nbytes[seg.array]
            covered.setdefault(seg.item, []).append((seg.chunk_offset, seg.length))
    for item, meta in enumerate(plan.items):
        runs = sorted(covered[item])
        position = 0
        for start, length in runs:
            assert start == position
            position += length
        assert position == meta.nbytes == sizes[item]


def _manifest(rows: list[dict], total: int | None = None) -> tuple[pa.Table, Marker]:
    items = {}
    extents = []
    for r in rows:
        items[r["item"]] = ItemMeta(
            r["item"], r.get("key", f"k{r['item']}"), r.get("kind", "tensor"),
            r.get("dtype", "float32"), r.get("shape", (2,)), "cpu", r.get("nbytes", 8),
        )
        extents.append(Extent(
            r["item"], r.get("chunk_offset", 0), r.get("file", data_file_name(0, 0, CKPT_ID)),
            r.get("offset", HEADER_SIZE), r.get("length", 8), 0, 0,
        ))
    table = build_manifest(list(items.values()), extents, '{"d":[]}', CKPT_ID)
    nbytes = sum(m.nbytes for m in items.values()) if total is None else total
    return table, Marker(CKPT_ID, f"manifest-{CKPT_ID}.arrow", 0, 0, 0.0, 1, nbytes)


def test_valid_manifest_parses():
    table, marker = _manifest([{"item": 0}, {"item": 1, "offset": HEADER_SIZE + 64}])
    manifest = parse_manifest(table, where="m", marker=marker)
    assert set(manifest.items) == {0, 1}


@pytest.mark.parametrize(
    "row, match",
    [
        ({"item": 0, "offset": -1}, "invalid offset"),
        ({"item": 0, "offset": 3}, "inside the file header"),
        ({"item": 0, "file": "../../etc/passwd"}, "not a ray_ckpt data file"),
        ({"item": 0, "file": "r0-0-x.data"}, "not a ray_ckpt data file"),
        ({"item": 0, "dtype": "evil"}, "unknown dtype"),
        ({"item": 0, "shape": (-1,)}, "invalid shape"),
        ({"item": 0, "shape": (2**40, 2**40), "nbytes": 2**82}, None),
        ({"item": 0, "shape": (3,)}, "needs 12 bytes"),
        ({"item": 0, "length": 4}, "cover 4 of 8"),
        ({"item": 0, "kind": "exec"}, "unknown kind"),
    ],
)
def test_bad_rows_are_refused(row, match):
    try:
        table, marker = _manifest([row])
    except (OverflowError, pa.ArrowInvalid):
        return  # not even representable in the manifest's int64 columns
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=match or ""):
        parse_manifest(table, where="m", marker=marker)


def test_petabyte_claim_is_refused_before_allocation():
    pb = 2**50
    table, marker = _manifest([{"item": 0, "shape": (pb // 4,), "nbytes": pb, "length": pb}])
    manifest = parse_manifest(table, where="m", marker=marker)  # consistent on paper...
    assert manifest.items[0].nbytes == pb  # ...the reader's file-size check refuses it (test_load)


def test_overlapping_ranges_are_refused():
    table, marker = _manifest([{"item": 0}, {"item": 1, "offset": HEADER_SIZE + 4}])
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="overlap"):
        parse_manifest(table, where="m", marker=marker)


def test_unknown_format_version_is_refused():
    table, marker = _manifest([{"item": 0}])
    meta = dict(table.schema.metadata)
    meta[b"ray_ckpt.format_version"] = b"99"
    with pytest.raises(ray_ckpt.FormatVersionError, match="version '99'"):
        parse_manifest(table.replace_schema_metadata(meta), where="m", marker=marker)
    doc = json.loads(marker.to_bytes())
    doc["format_version"] = 2
    with pytest.raises(ray_ckpt.FormatVersionError, match="Upgrade ray_ckpt"):
        Marker.from_bytes(json.dumps(doc).encode(), where="x")


@pytest.mark.parametrize(
    "tree",
    [
        '{"d":[["a",{"T":5}]]}',  # item out of range
        '{"d":[["a",{"X":1}]]}',  # unknown tag
        '{"l":[]}',  # root not a dict
        '{"d":[[{"l":[]},1]]}',  # unhashable key
        '{"d":[["a",{"b":"!!"}]]}',  # bad base64
        "[" * 100_000,  # deep nesting
        '{"d":[["a",{"dt":"evil"}]]}',
    ],
)
def test_hostile_trees_are_refused(tree):
    with pytest.raises(ray_ckpt.CorruptCheckpointError):
        _tree.decode(tree, n_items=1, where="t")


def test_reference_cycles_are_refused():
    state: dict = {"a": 1}
    state["self"] = state
    with pytest.raises(ray_ckpt.UnsupportedValueError, match="cycle"):
        _tree.flatten(state)


def test_errors_survive_pickling():
    import pickle

    error = ray_ckpt.MissingKeysError("missing a")
    error.missing_keys = ["a"]
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ray_ckpt.MissingKeysError and str(again) == "missing a"
    assert again.missing_keys == ["a"] and isinstance(again, RuntimeError)
    not_found = pickle.loads(pickle.dumps(ray_ckpt.CheckpointNotFoundError("gone")))
    assert isinstance(not_found, FileNotFoundError) and str(not_found) == "gone"

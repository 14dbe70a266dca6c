"""The format on its own: bucket layout, manifest validation, marker, tree encoding. No Ray."""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt._checksum import crc32c
from ray_ckpt.config import CheckpointStagerConfig
from ray_ckpt.format import tree as _tree
from ray_ckpt.format.flatten import flatten
from ray_ckpt.format.header import HEADER_SIZE
from ray_ckpt.format.manifest import (
    Extent,
    ItemMeta,
    build_manifest,
    manifest_from_bytes,
    manifest_to_bytes,
    parse_manifest,
)
from ray_ckpt.format.marker import Marker
from ray_ckpt.format.names import (
    ALIGNMENT,
    ITEMSIZES,
    NUMPY_DTYPES,
    data_file_name,
    dtype_from_name,
    dtype_name,
    dtypes,
    itemsize,
)
from ray_ckpt.save.encoder import CheckpointWriter, _Pieces
from ray_ckpt.save.pieces import PUT_PIECE_BYTES, pieces
from ray_ckpt.save.stager import DefaultStager
from ray_ckpt.storage.storage import Storage

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


def test_pieces_are_views_under_a_mebibyte_that_cover_the_array():
    array = np.arange(3 * PUT_PIECE_BYTES + 100, dtype=np.int64).view(np.uint8)[: 3 << 20]
    parts = [np.frombuffer(p, np.uint8) for p in pieces(array)]
    assert [len(p) for p in parts] == [PUT_PIECE_BYTES] * 3 + [(3 << 20) - 3 * PUT_PIECE_BYTES]
    assert PUT_PIECE_BYTES < 1 << 20 and PUT_PIECE_BYTES % ALIGNMENT == 0
    assert all(np.shares_memory(p, array) for p in parts)  # no copy before ray.put
    assert np.array_equal(np.concatenate(parts), array)
    assert pieces(array[:0]) == []


def test_crc_of_a_range_spanning_pieces():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 10_000, dtype=np.uint8)
    cuts = [0, 1, 64, 4000, 4001, 9000, 10_000]
    view = _Pieces([data[a:b] for a, b in itertools.pairwise(cuts)])
    assert view.nbytes == len(data)
    for start, length in [(0, 10_000), (0, 0), (63, 2), (100, 8900), (4000, 1), (8999, 1001)]:
        assert view.crc32c(start, length) == crc32c(data[start : start + length]), (start, length)


def test_writer_writes_the_same_file_from_any_split_of_its_arrays(tmp_path):
    """A bucket written from its arrays whole and from pieces cut anywhere (through packed
    items too) gives the same bytes and the same checksums."""
    sizes = [300, 5000, 77, 120_000, 3, 40_000, 999] * 3
    plan = _plan(sizes, bucket=1 << 20, pack=50_000)
    stager = DefaultStager()
    writer = CheckpointWriter()
    rng = np.random.default_rng(1)
    for bucket, sources in zip(plan.buckets, plan.sources):
        whole = [stager._cpu_array(plan, src) for src in sources]
        cut = []
        for array in whole:
            cuts = sorted({0, len(array), *rng.integers(0, len(array) + 1, 5).tolist()})
            cut.append([array[a:b] for a, b in itertools.pairwise(cuts)])
        results = []
        for name, arrays in (("whole", [[a] for a in whole]), ("cut", cut)):
            storage = Storage.from_path(str(tmp_path / name))
            storage.make_dir()
            extents = writer.write_bucket(
                storage, bucket, arrays, rank=0, checkpoint_id=CKPT_ID, checksum=True,
                fsync=False,
            )
            results.append(((tmp_path / name / bucket.file).read_bytes(), list(extents)))
        assert results[0] == results[1]
        assert len(results[0][0]) == bucket.file_nbytes
        assert all(e.checksum is not None for e in results[0][1])


def test_writer_refuses_an_array_of_the_wrong_size(tmp_path):
    plan = _plan([5000], bucket=8192)
    storage = Storage.from_path(str(tmp_path))
    (bucket,) = plan.buckets
    with pytest.raises(
        ray_ckpt.errors.CheckpointWriteError, match="array 0 arrived with 4999 bytes"
    ):
        CheckpointWriter().write_bucket(
            storage, bucket, [[np.zeros(4999, np.uint8)]], rank=0, checkpoint_id=CKPT_ID,
            checksum=True, fsync=False,
        )


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
    with pytest.raises(ray_ckpt.errors.FormatVersionError, match="version '99'"):
        parse_manifest(table.replace_schema_metadata(meta), where="m", marker=marker)
    doc = json.loads(marker.to_bytes())
    doc["format_version"] = 2
    with pytest.raises(ray_ckpt.errors.FormatVersionError, match="Upgrade ray_ckpt"):
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
    with pytest.raises(ray_ckpt.errors.UnsupportedValueError, match="cycle"):
        flatten(state)


def test_errors_survive_pickling():
    import pickle

    error = ray_ckpt.errors.MissingKeysError("missing a")
    error.missing_keys = ["a"]
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is ray_ckpt.errors.MissingKeysError and str(again) == "missing a"
    assert again.missing_keys == ["a"] and isinstance(again, RuntimeError)
    not_found = pickle.loads(pickle.dumps(ray_ckpt.CheckpointNotFoundError("gone")))
    assert isinstance(not_found, FileNotFoundError) and str(not_found) == "gone"


# --- reading a manifest and a tree without torch (issue 16: a quick `ray-ckpt inspect`) --------


def _storable_torch_dtypes() -> dict[str, torch.dtype]:
    """Every dtype of this torch with a fixed element size (quantized ones need scales the
    format does not carry), by its name without ``torch.``."""
    return {
        str(d).removeprefix("torch."): d for d in vars(torch).values()
        if isinstance(d, torch.dtype) and not str(d).startswith(("torch.qint", "torch.quint"))
    }


def test_the_itemsize_table_is_torchs_for_every_dtype_it_names():
    """ITEMSIZES (torch-free, for parsing manifests) cannot drift from torch: the same names
    as this torch's storable dtypes, each with torch's ``itemsize``."""
    storable = _storable_torch_dtypes()
    assert {name: d.itemsize for name, d in storable.items()} == ITEMSIZES
    assert dtypes() == storable
    assert all(dtype_name(d) == name for name, d in storable.items())


def test_the_numpy_dtypes_are_those_whose_tensors_convert_to_numpy():
    convertible = set()
    for name, dtype in _storable_torch_dtypes().items():
        try:
            with warnings.catch_warnings():  # complex32 is "experimental"
                warnings.simplefilter("ignore")
                torch.empty(0, dtype=dtype).numpy()
        except (TypeError, RuntimeError):
            continue
        convertible.add(name)
    assert convertible == NUMPY_DTYPES


def test_an_unknown_dtype_name_is_a_corrupt_manifest_naming_it():
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="'float7'"):
        itemsize("float7", where="m")
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="'float7'"):
        dtype_from_name("float7", where="m")


_READ_WITHOUT_TORCH = """
import json, sys
from ray_ckpt.format.manifest import manifest_from_bytes, parse_manifest
from ray_ckpt.format.marker import Marker
from ray_ckpt.format.tree import decode, leaves
doc = json.load(sys.stdin)
marker = Marker.from_bytes(doc["marker"].encode("latin-1"), where="m")
manifest = parse_manifest(manifest_from_bytes(doc["manifest"].encode("latin-1"), where="m"),
                          where="m", marker=marker)
tree = decode(manifest.tree_json, n_items=len(manifest.items), where="t")
out = [sorted((m.key, m.dtype, m.nbytes) for m in manifest.items.values()),
       repr(list(leaves(tree))), "torch" in sys.modules]
special = decode('{"d":[["s",{"S":[2,3]}],["t",{"dt":"bfloat16"}]]}', n_items=0, where="t")
out += [repr(special), "torch" in sys.modules]
print(json.dumps(out))
"""


def test_manifest_and_tree_are_read_without_torch_until_a_torch_value_needs_it():
    """Parsing a manifest and decoding a tree of containers, tensors, arrays and plain values
    import no torch (and give what they give with torch loaded); a torch.Size or dtype leaf
    imports it."""
    state = {
        "w": torch.ones(3, dtype=torch.bfloat16), "e": torch.zeros(2, dtype=torch.float8_e4m3fn),
        "a": np.arange(4), "o": collections.OrderedDict(x=(1, 2.5, None)),
        (1, "k"): [float("nan"), b"\x00\xff", "s", True], "empty": {},
    }
    tree_json, leaves = flatten(state)
    items = [
        ItemMeta(leaf.index, leaf.key, "tensor", dtype_name(t.dtype), tuple(t.shape), "cpu",
                 t.nbytes)
        for leaf in leaves
        for t in [torch.as_tensor(leaf.value)]
    ]
    extents, offset = [], HEADER_SIZE
    for meta in items:
        extents.append(Extent(meta.item, 0, data_file_name(0, 0, CKPT_ID), offset, meta.nbytes,
                              0, 0))
        offset += 64
    raw = manifest_to_bytes(build_manifest(items, extents, tree_json, CKPT_ID))
    marker = Marker(CKPT_ID, f"manifest-{CKPT_ID}.arrow", len(raw), crc32c(raw), 0.0, 1,
                    sum(m.nbytes for m in items))
    doc = {"marker": marker.to_bytes().decode("latin-1"), "manifest": raw.decode("latin-1")}
    done = subprocess.run(
        [sys.executable, "-c", _READ_WITHOUT_TORCH], input=json.dumps(doc), capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    metas, leaves_repr, torch_before, special, torch_after = json.loads(done.stdout)
    manifest = parse_manifest(manifest_from_bytes(raw, where="m"), where="m", marker=marker)
    tree = _tree.decode(manifest.tree_json, n_items=len(manifest.items), where="t")
    assert metas == [list(m) for m in sorted(
        (m.key, m.dtype, m.nbytes) for m in manifest.items.values()
    )]
    assert leaves_repr == repr(list(_tree.leaves(tree)))
    assert torch_before is False
    assert special == repr({"s": torch.Size([2, 3]), "t": torch.bfloat16}) and torch_after

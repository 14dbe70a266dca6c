"""Property-based tests (hypothesis): random state dicts round-trip exactly; random and mutated
manifests, markers and trees are refused cleanly.

* Round trip: random nested dicts, OrderedDicts, lists and tuples of tensors of every dtype and
  random shape (0-d, empty, non-contiguous), numpy arrays, ints of any size, floats (nan, inf,
  -0.0), bools, strings (any code point, lone surrogates included), bytes, None, torch.Size,
  dtypes and devices, under keys of every allowed type, saved to local disk and loaded back:
  equal to the bit, container types included.
* Mutation: a real checkpoint whose manifest (a cell, a row, a column's type, the schema
  metadata, the tree) or marker is changed and then *re-signed* (the marker's manifest size and
  CRC32C updated) so that the change reaches the parser. Loading it either succeeds or raises a
  :class:`ray_ckpt.CheckpointError`; never another exception, never a hang, never an allocation
  beyond what the data files hold. (A re-signed checkpoint may legitimately load different
  values: the CRC32Cs guard against damage, not against someone who rewrites the manifest.)

The default run tries a few examples of each; ``slow`` tries many more.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import os
import shutil
import struct
import time
import tracemalloc
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.vendor.pretty import for_type_by_name

import ray_ckpt
import ray_ckpt.tools
from ray_ckpt._checksum import crc32c
from ray_ckpt.format import checks as validate
from ray_ckpt.format.manifest import Extent, manifest_from_bytes, manifest_to_bytes
from ray_ckpt.format.marker import Marker
from ray_ckpt.format.names import MARKER_NAME, dtypes

FEW = settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
MANY = settings(FEW, max_examples=400)
LOAD_TIMEOUT_SECS = 30.0
ALLOC_LIMIT_BYTES = 64 << 20  # what one load of these small checkpoints may add to the peak RSS

# --- random state dicts -----------------------------------------------------------------------

SAVEABLE = sorted(n for n, d in dtypes().items() if d.itemsize > 0)
# sub-byte dtypes (int1..int7, uint1..uint7) have no copy kernel: torch cannot make a
# non-contiguous one contiguous, so only contiguous ones are generated for them
SUB_BYTE = {f"{u}int{i}" for u in ("", "u") for i in range(1, 8)}
COPYABLE = [n for n in SAVEABLE if n not in SUB_BYTE]
NUMPY_OK = [
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]


@st.composite
def tensors(draw: Any) -> torch.Tensor:
    name = draw(st.sampled_from(SAVEABLE))
    dtype = dtypes()[name]
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    layout = (
        draw(st.sampled_from(["contiguous", "transposed", "strided"]))
        if name in COPYABLE
        else "contiguous"
    )
    base_shape = shape if layout == "contiguous" else tuple(2 * d + 1 for d in shape)
    numel = math.prod(base_shape)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    t = raw.view(dtype).reshape(base_shape)
    if layout == "strided":
        t = t[tuple(slice(1, None, 2) for _ in shape)]
    elif layout == "transposed" and len(shape) >= 2:
        t = t[tuple(slice(1, None, 2) for _ in shape)].transpose(0, -1)
    elif layout == "transposed":
        t = t[tuple(slice(1, None, 2) for _ in shape)]
    return t


def _pretty_tensor(t: torch.Tensor, printer: Any, cycle: bool) -> None:
    # torch's repr fails for sub-byte dtypes (no .item()); hypothesis prints failing examples
    printer.text(
        f"tensor(dtype={t.dtype}, shape={tuple(t.shape)}, stride={t.stride()}, "
        f"bytes={t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8).tolist()[:16]})"
        if t.dtype not in SUB_BYTE_DTYPES
        else f"tensor(dtype={t.dtype}, shape={tuple(t.shape)}, stride={t.stride()})"
    )


SUB_BYTE_DTYPES = {dtypes()[n] for n in SUB_BYTE}
for_type_by_name("torch", "Tensor", _pretty_tensor)


def _numpy(t: torch.Tensor) -> Any:
    return t.contiguous().numpy()


any_text = st.text(
    alphabet=st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=12
)
leaves = st.one_of(
    tensors(),
    tensors().filter(lambda t: str(t.dtype).removeprefix("torch.") in NUMPY_OK).map(_numpy),
    st.integers(min_value=-(2**100), max_value=2**100),
    st.floats(),
    st.booleans(),
    st.none(),
    any_text,
    st.binary(max_size=24),
    st.lists(st.integers(0, 9), max_size=4).map(torch.Size),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.complex64]),
    st.sampled_from([torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")]),
)
scalar_keys = st.one_of(
    any_text, st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.booleans(), st.none()
)
keys = st.one_of(scalar_keys, st.tuples(scalar_keys, scalar_keys))


def _containers(children: Any) -> Any:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.dictionaries(keys, children, max_size=4).map(lambda d: OrderedDict(d)),
    )


state_dicts = st.one_of(
    st.dictionaries(keys, st.recursive(leaves, _containers, max_leaves=16), max_size=6),
    st.dictionaries(keys, st.recursive(leaves, _containers, max_leaves=16), max_size=6).map(
        lambda d: OrderedDict(d)
    ),
)


def exactly(a: Any, b: Any, path: str = "root") -> None:
    """Equal to the bit: the same types (OrderedDict is not dict, tuple is not list), the same
    tensor dtype, shape and bytes, the same float bits (-0.0 is not 0.0; NaN is NaN)."""
    if isinstance(a, torch.Tensor):
        assert type(b) is torch.Tensor, f"{path}: {type(b)}"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (
            f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        )
        assert b.is_contiguous()
        assert _raw(a) == _raw(b), f"{path}: bytes differ"
        return
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert len(a) == len(b) and all(
            type(x) is type(y) and _same_scalar(x, y) for x, y in zip(a, b)
        ), f"{path}: keys {list(a)} != {list(b)}"
        for (k, x), y in zip(a.items(), b.values()):
            exactly(x, y, f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            exactly(x, y, f"{path}[{i}]")
    else:
        assert _same_scalar(a, b), f"{path}: {a!r} != {b!r}"


def _raw(t: torch.Tensor) -> bytes:
    flat = t.reshape(-1)
    if not t.is_contiguous() or flat.stride(0) != 1:  # (sub-byte dtypes have no copy kernel,
        flat = t.clone(memory_format=torch.contiguous_format).reshape(-1)  # and are contiguous)
    return bytes(flat.view(torch.uint8).numpy())


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(
            type(x) is type(y) and _same_scalar(x, y) for x, y in zip(a, b)
        )
    return bool(a == b)


@pytest.fixture(scope="module")
def ckptr(cluster):
    config = ray_ckpt.CheckpointerConfig(
        staging_config=ray_ckpt.CheckpointStagerConfig(
            bucket_size_bytes=4096, pack_threshold_bytes=256
        )
    )
    with ray_ckpt.make_sync_checkpointer(config=config) as c:
        yield c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _round_trip(ckptr: Any, workdir: Path, state: dict[Any, Any], reliability: Any) -> None:
    path = workdir / f"rt-{os.urandom(6).hex()}"
    try:
        ckptr.save(str(path), state)
        exactly(state, ckptr.load(str(path)))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    reliability.add("fuzz", "random state dicts round-tripped exactly", "cases")


@FEW
@given(state=state_dicts)
def test_random_state_dicts_round_trip_exactly(ckptr, workdir, reliability, state):
    _round_trip(ckptr, workdir, state, reliability)


@pytest.mark.slow
@MANY
@given(state=state_dicts)
def test_random_state_dicts_round_trip_exactly_many(ckptr, workdir, reliability, state):
    _round_trip(ckptr, workdir, state, reliability)


# --- mutated manifests and markers ------------------------------------------------------------


@pytest.fixture(scope="module")
def base(ckptr, workdir) -> Path:
    """A real checkpoint to mutate: packed and chunked tensors, a tied one, plain values."""
    torch.manual_seed(0)
    shared = torch.randn(3, 3)
    state = {
        "model": {"w": torch.randn(40, 50), "b": torch.randn(7), "tied": shared, "also": shared},
        "opt": {"m": [torch.randn(5, dtype=torch.float64), torch.zeros(0, 2)], "step": 12},
        "np": np.arange(6, dtype=np.int32),
        "meta": {"name": "base", "bytes": b"\x01\x02", "size": torch.Size([2, 3])},
    }
    path = workdir / "base"
    ckptr.save(str(path), state)
    return path


def _resign(
    path: Path,
    table: pa.Table | None = None,
    marker: dict[str, Any] | None = None,
    keep_sign: bool = False,
) -> None:
    """Write ``table`` as the manifest and ``marker`` as the marker, the marker's manifest size
    and CRC32C updated to match (unless ``keep_sign``)."""
    doc = marker if marker is not None else json.loads((path / MARKER_NAME).read_bytes())
    manifest = path / _manifest_name(path)
    if table is not None:
        manifest.write_bytes(manifest_to_bytes(table))
    if not keep_sign:
        raw = manifest.read_bytes()
        doc = {**doc, "manifest_nbytes": len(raw), "manifest_crc32c": crc32c(raw)}
    (path / MARKER_NAME).write_text(json.dumps(doc))


def _manifest_name(path: Path) -> str:
    return next(f for f in os.listdir(path) if f.startswith("manifest-"))


def _table(path: Path) -> pa.Table:
    return manifest_from_bytes((path / _manifest_name(path)).read_bytes(), where="fuzz")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load_bounded(path: Path, reliability: Any, case: str) -> str:
    """Load ``path``: returns "loaded" or "refused"; fails on any other exception, a load that
    takes longer than LOAD_TIMEOUT_SECS, or one whose peak memory grows by more than
    ALLOC_LIMIT_BYTES."""
    reliability.add("fuzz", case, "cases")
    _reset_peak_rss()
    before = _peak_rss_bytes()
    tracemalloc.start()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        future = pool.submit(ray_ckpt.CheckpointReader().read, str(path))
        try:
            future.result(timeout=LOAD_TIMEOUT_SECS)
            outcome = "loaded"
        except concurrent.futures.TimeoutError:
            raise AssertionError(f"{case}: the load hung (> {LOAD_TIMEOUT_SECS}s)") from None
        except ray_ckpt.CheckpointError:
            outcome = "refused"
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pool.shutdown(wait=False)
    grown = _peak_rss_bytes() - before
    assert traced_peak < ALLOC_LIMIT_BYTES, f"{case}: Python allocated {traced_peak} bytes"
    assert grown < ALLOC_LIMIT_BYTES, f"{case}: the peak RSS grew by {grown} bytes"
    reliability.add("fuzz", case, outcome)
    return outcome


def _copy(base: Path, workdir: Path) -> Path:
    path = workdir / f"m-{os.urandom(6).hex()}"
    shutil.copytree(base, path)
    return path


INTS = st.one_of(
    st.sampled_from(
        [0, 1, -1, 63, 64, 65, 4096, 2**31 - 1, -(2**31), 2**40, 2**50, 2**62, 2**63 - 1, -(2**63)]
    ),
    st.integers(-(2**63), 2**63 - 1),
)
STRINGS = st.one_of(
    st.sampled_from(
        [
            "",
            "tensor",
            "pickle",
            "float32",
            "bfloat16",
            "evil",
            "..",
            "../x.data",
            "/etc/passwd",
            "r00000-000000-0000000000000000.data",
            "cpu",
            "cuda:9",
        ]
    ),
    st.text(max_size=40),
)
JSON = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=10)
    ),
    lambda c: st.one_of(
        st.lists(c, max_size=4), st.dictionaries(st.text(max_size=4), c, max_size=4)
    ),
    max_leaves=12,
)


def _value_for(draw: Any, dtype: pa.DataType) -> Any:
    if pa.types.is_integer(dtype):
        bits = dtype.bit_width
        lo, hi = (
            (0, 2**bits - 1)
            if pa.types.is_unsigned_integer(dtype)
            else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        )
        return draw(st.one_of(st.none(), INTS.filter(lambda v: lo <= v <= hi)))
    if pa.types.is_string(dtype):
        return draw(st.one_of(st.none(), STRINGS))
    if pa.types.is_boolean(dtype):
        return draw(st.one_of(st.none(), st.booleans()))
    if pa.types.is_list(dtype) and pa.types.is_integer(dtype.value_type):
        return draw(st.one_of(st.none(), st.lists(st.one_of(st.none(), INTS), max_size=70)))
    if pa.types.is_list(dtype):
        return draw(st.one_of(st.none(), st.lists(STRINGS, max_size=4)))
    if pa.types.is_floating(dtype):
        return draw(st.one_of(st.none(), st.floats()))
    return None


def _mutate_table(draw: Any, table: pa.Table) -> pa.Table:
    kind = draw(
        st.sampled_from(
            [
                "cell",
                "cell",
                "cell",
                "drop-row",
                "dup-row",
                "column-type",
                "drop-column",
                "metadata",
                "tree",
            ]
        )
    )
    names = table.schema.names
    if kind == "cell":
        col = draw(st.sampled_from(names))
        row = draw(st.integers(0, table.num_rows - 1))
        field = table.schema.field(col)
        values = table.column(col).to_pylist()
        values[row] = _value_for(draw, field.type)
        try:
            array = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            values[row] = None
            array = pa.array(values, type=field.type)
        return table.set_column(names.index(col), field.with_nullable(True), array)
    if kind in ("drop-row", "dup-row"):
        row = draw(st.integers(0, table.num_rows - 1))
        rows = list(range(table.num_rows))
        rows = rows[:row] + rows[row + 1 :] if kind == "drop-row" else [*rows, row]
        return table.take(rows)
    if kind == "column-type":
        col = draw(st.sampled_from(names))
        target = draw(
            st.sampled_from(
                [
                    pa.string(),
                    pa.float64(),
                    pa.int8(),
                    pa.int64(),
                    pa.bool_(),
                    pa.list_(pa.string()),
                ]
            )
        )
        try:
            array = table.column(col).cast(target, safe=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            array = pa.nulls(table.num_rows, type=target)
        return table.set_column(names.index(col), pa.field(col, target), array)
    if kind == "drop-column":
        return table.drop_columns([draw(st.sampled_from(names))])
    meta = dict(table.schema.metadata or {})
    if kind == "metadata":
        key = draw(st.sampled_from([*sorted(meta), b"ray_ckpt.trees"]))
        if draw(st.booleans()):
            meta.pop(key, None)
        else:
            meta[key] = (
                json.dumps(draw(JSON)).encode()
                if draw(st.booleans())
                else draw(st.binary(max_size=40))
            )
        return table.replace_schema_metadata(meta)
    try:  # an earlier mutation of this table may have dropped or garbled the tree already
        tree = meta[b"ray_ckpt.tree"].decode()
    except (KeyError, UnicodeDecodeError):
        tree = ""
    if not tree or draw(st.booleans()):
        tree = json.dumps(draw(JSON))
    else:  # change a few characters of the real tree
        chars = list(tree)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(chars) - 1))
            chars[i] = draw(st.sampled_from([*list('0123456789{}[]":,TNPdolt'), "9" * 30]))
        tree = "".join(chars)
    meta[b"ray_ckpt.tree"] = tree.encode("utf-8", "surrogatepass")
    return table.replace_schema_metadata(meta)


def _mutate_marker(draw: Any, doc: dict[str, Any]) -> dict[str, Any]:
    key = draw(st.sampled_from([*sorted(doc), "extra"]))
    doc = dict(doc)
    if draw(st.integers(0, 3)) == 0:
        doc.pop(key, None)
    else:
        doc[key] = draw(st.one_of(JSON, INTS, STRINGS))
    return doc


def _fuzz_manifest(base: Path, workdir: Path, reliability: Any, data: Any) -> None:
    path = _copy(base, workdir)
    try:
        target = data.draw(st.sampled_from(["manifest", "manifest", "marker"]))
        if target == "manifest":
            table = _table(path)
            for _ in range(data.draw(st.integers(1, 3))):
                table = _mutate_table(data.draw, table)
            _resign(path, table)
        else:
            doc = json.loads((path / MARKER_NAME).read_bytes())
            keep = data.draw(st.booleans())
            _resign(path, marker=_mutate_marker(data.draw, doc), keep_sign=keep)
        load_bounded(path, reliability, f"mutated {target}, re-signed")
    finally:
        shutil.rmtree(path, ignore_errors=True)


@FEW
@given(data=st.data())
def test_mutated_manifests_and_markers_are_refused_cleanly(base, workdir, reliability, data):
    _fuzz_manifest(base, workdir, reliability, data)


@pytest.mark.slow
@MANY
@given(data=st.data())
def test_mutated_manifests_and_markers_are_refused_cleanly_many(base, workdir, reliability, data):
    _fuzz_manifest(base, workdir, reliability, data)


@FEW
@given(raw=st.one_of(st.binary(max_size=4096), JSON.map(lambda v: json.dumps(v).encode())))
def test_random_bytes_as_marker_or_manifest_are_refused(base, workdir, reliability, raw):
    for target in (MARKER_NAME, "manifest"):
        path = _copy(base, workdir)
        try:
            if target == MARKER_NAME:
                (path / MARKER_NAME).write_bytes(raw)
            else:
                (path / _manifest_name(path)).write_bytes(raw)
                _resign(path)
            case = "random bytes as the " + ("marker" if target == MARKER_NAME else "manifest")
            assert load_bounded(path, reliability, case) == "refused"
        finally:
            shutil.rmtree(path, ignore_errors=True)


def test_a_manifest_claiming_a_petabyte_tensor_is_refused_before_allocating(
    base, workdir, reliability
):
    """The largest item claims 1 PiB (a consistent shape, size and extent): the reader compares
    the claim with the data file's size and refuses it without allocating anything."""
    path = _copy(base, workdir)
    table = _table(path)
    rows = table.to_pylist()
    last_in_file = {
        r["file"]: i for i, r in sorted(enumerate(rows), key=lambda ir: ir[1]["offset"])
    }
    single = [
        i for i in last_in_file.values() if sum(q["item"] == rows[i]["item"] for q in rows) == 1
    ]
    big = max(single, key=lambda i: rows[i]["item_nbytes"])  # one extent, the last in its file
    pib = 2**50
    claimed = {"shape": [pib // 4], "item_nbytes": pib, "length": pib, "dtype": "float32"}
    rows[big].update(claimed)
    total = sum({r["item"]: r["item_nbytes"] for r in rows}.values())
    table = pa.Table.from_pylist(rows, schema=table.schema)
    doc = json.loads((path / MARKER_NAME).read_bytes())
    _resign(path, table, {**doc, "total_nbytes": total})
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=r"truncated|needs"):
        ray_ckpt.CheckpointReader().read(str(path))
    assert load_bounded(path, reliability, "manifest claims a 1 PiB tensor") == "refused"
    assert not ray_ckpt.tools.verify(str(path)).ok


# --- the structural checks (ray_ckpt.validate), each against a brute-force oracle -------------

CHECKS = settings(FEW, max_examples=300)


@CHECKS
@given(st.lists(st.tuples(st.integers(64, 160), st.integers(0, 40)), min_size=1, max_size=8))
def test_fuzz_overlap_check_agrees_with_byte_by_byte(runs: list[tuple[int, int]]) -> None:
    """Extents of one file are refused exactly when two share a byte, or a zero-length one
    sits strictly inside another (the rule that keeps a load within the data files)."""
    extents = [Extent(i, 0, "f", off, length, None, 0) for i, (off, length) in enumerate(runs)]
    shared = any(
        (max(a.offset, b.offset) < min(a.offset + a.length, b.offset + b.length))
        or (a.length == 0 and b.offset < a.offset < b.offset + b.length)
        for a, b in itertools.permutations(extents, 2)
    )
    problems = list(validate.overlap_problems(extents, {}, "fuzz"))
    assert bool(problems) == shared, (runs, problems)


@CHECKS
@given(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).flatmap(
        lambda shape: st.tuples(
            st.just(tuple(shape)),
            st.lists(
                st.tuples(*(st.integers(0, d - 1) for d in shape)).flatmap(
                    lambda offset, shape=shape: st.tuples(
                        st.just(offset),
                        st.tuples(*(st.integers(1, d - o) for d, o in zip(shape, offset))),
                    )
                ),
                min_size=1, max_size=5,
            ),
        )
    )
)
def test_fuzz_tiling_check_agrees_with_counting_elements(case: Any) -> None:
    """Boxes inside a global shape pass exactly when every element is covered once."""
    shape, boxes = case
    count = np.zeros(shape, dtype=np.int64)
    for offset, size in boxes:
        count[tuple(slice(o, o + s) for o, s in zip(offset, size))] += 1
    problems = list(validate.tiling_problems(boxes, shape, "fuzz"))
    assert bool(problems) == bool((count != 1).any()), (shape, boxes, problems)


@CHECKS
@given(
    st.lists(st.one_of(st.integers(0, 8), st.integers(0, 2**64)), max_size=6),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.uint8]),
)
def test_fuzz_shape_check_admits_only_shapes_torch_can_build(
    shape: list[int], dtype: torch.dtype
) -> None:
    """A shape the check admits can be built by torch (strides and size in int64); one it
    refuses overflows."""
    problems = list(validate.shape_problems(shape, dtype.itemsize, "fuzz"))
    span = dtype.itemsize * math.prod(max(d, 1) for d in shape)
    assert bool(problems) == (span >= 2**63)
    if not problems:
        torch.empty(shape, dtype=dtype, device="meta")


@CHECKS
@given(st.integers(0, 3000), st.sampled_from(["[", '{"a":']))
def test_fuzz_json_depth_is_bounded_without_recursion_error(levels: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = opener * levels + "0" + closer * levels
    if levels > validate.MAX_JSON_DEPTH:
        with pytest.raises(ray_ckpt.CorruptCheckpointError, match="nests deeper"):
            validate.load_json(text, what="fuzz")
    else:
        assert validate.json_depth(validate.load_json(text, what="fuzz"), 10**6) == levels


@CHECKS
@given(
    st.one_of(st.floats(), st.integers(-(2**70), 2**70)),
    st.integers(-5, 2**40),
    st.integers(-5, 2**70),
)
def test_fuzz_marker_numbers_are_finite_and_in_range(
    created: float, world_size: int, total: int
) -> None:
    """A marker parses only when its numbers are usable (a time ``time.localtime`` takes,
    sizes within int64); otherwise a CorruptCheckpointError, never another exception."""
    doc = {
        "format": "ray_ckpt", "format_version": 1, "checkpoint_id": "0" * 16,
        "manifest": "manifest-" + "0" * 16 + ".arrow", "manifest_nbytes": 10,
        "manifest_crc32c": 1, "created_unix": created, "world_size": world_size,
        "total_nbytes": total, "metadata": {},
    }
    raw = json.dumps(doc).encode()
    try:
        marker = Marker.from_bytes(raw, where="fuzz")
    except ray_ckpt.CorruptCheckpointError:
        assert not (
            math.isfinite(created) and 0 <= created <= validate.MAX_CREATED_UNIX
            and 1 <= world_size <= validate.MAX_WORLD_SIZE and 0 <= total < 2**63
        )
        return
    time.localtime(marker.created_unix)
    assert 1 <= marker.world_size <= validate.MAX_WORLD_SIZE and marker.total_nbytes < 2**63


@CHECKS
@given(st.integers(0, 2**40), st.integers(0, 2**40))
def test_fuzz_sizes_are_checked_before_reading(listed: int, claimed: int) -> None:
    marker = Marker("0" * 16, "manifest-" + "0" * 16 + ".arrow", claimed, 0, 0.0, 1, 0)
    files = {MARKER_NAME: listed, marker.manifest: listed}
    assert bool(list(validate.marker_listing_problems(files, MARKER_NAME, "fuzz"))) == (
        listed > validate.MAX_MARKER_BYTES
    )
    assert bool(list(validate.manifest_listing_problems(files, marker, "fuzz"))) == (
        listed != claimed or listed > validate.MAX_MANIFEST_BYTES
    )

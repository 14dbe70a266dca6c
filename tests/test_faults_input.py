"""Hostile checkpoints and bad arguments.

Hostile: a checkpoint that carries a pickle payload (it would create a file if ever unpickled)
is refused without ``allow_pickle=True`` by ``load`` and by every tool, and never executed; a
re-signed manifest that points outside the directory, claims absurd shapes, negative offsets or
overlapping byte ranges, or carries an unknown format version in the marker, the manifest or a
data-file header, is refused with a clear error. (tests/test_format.py checks the parser on
hand-built tables; these run whole checkpoints through ``load`` and ``verify``.)

Bad arguments: values ray_ckpt cannot save (sparse, meta, quantized, nested and subclassed
tensors, lambdas, open files, locks, generators, unsupported keys) fail at save time, before
anything is written, with a CheckpointError naming the key, with or without ``allow_pickle``;
a wrong ``default_map_location``, a state dict that is not a dict, a path that is not a
directory: a clear error.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.errors
import ray_ckpt.tools
from ray_ckpt._checksum import crc32c
from ray_ckpt.format.manifest import manifest_from_bytes, manifest_to_bytes
from ray_ckpt.format.names import MARKER_NAME

from .helpers import small_config

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ckptr(cluster):
    with ray_ckpt.make_sync_checkpointer(config=small_config()) as c:
        yield c


class Payload:
    """Unpickling this runs ``touch <marker>``: proof of execution if the file appears."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def hostile(ckptr, tmp_path) -> tuple[Path, Path]:
    """A checkpoint holding a pickle payload under "evil" (saved with allow_pickle=True)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile"
    ckptr.save(str(path), {"evil": Payload(str(marker)), "w": torch.ones(3)}, allow_pickle=True)
    assert not marker.exists()
    return path, marker


def test_a_pickle_payload_is_never_executed_without_allow_pickle(
    ckptr, hostile, tmp_path, reliability
):
    path, marker = hostile
    reliability.add("hostile", "pickle payload", "tried")
    with pytest.raises(
        ray_ckpt.errors.PickleNotAllowedError, match=r"\['evil'\].*allow_pickle=True"
    ):
        ckptr.load(str(path))
    assert torch.equal(ckptr.load(str(path), {"w": torch.zeros(3)})["w"], torch.ones(3))
    assert ray_ckpt.tools.verify(str(path)).ok
    summary = ray_ckpt.tools.inspect_checkpoint(str(path))
    assert any("evil" in str(leaf) for leaf in summary.leaves)
    ray_ckpt.tools.diff_checkpoints(str(path), str(path))
    with pytest.raises(ray_ckpt.CheckpointError, match="pickle"):
        ray_ckpt.tools.export_checkpoint(str(path), str(tmp_path / "out.pt"), to="torch")
    exported = ray_ckpt.tools.export_checkpoint(str(path), str(tmp_path / "st"), to="safetensors")
    assert "evil" in str(exported.skipped)  # skipped, never unpickled
    assert not marker.exists(), "the payload ran"
    reliability.add("hostile", "pickle payload", "refused")
    # the payload is real: with allow_pickle=True (trusting the file) it runs
    ckptr.load(str(path), allow_pickle=True)
    assert marker.exists()


def _resign(path: Path, table: pa.Table | None = None, **marker: Any) -> None:
    manifest = next(p for p in path.iterdir() if p.name.startswith("manifest-"))
    if table is not None:
        manifest.write_bytes(manifest_to_bytes(table))
    raw = manifest.read_bytes()
    doc = json.loads((path / MARKER_NAME).read_bytes())
    doc.update(manifest_nbytes=len(raw), manifest_crc32c=crc32c(raw), **marker)
    (path / MARKER_NAME).write_text(json.dumps(doc))


def _table(path: Path) -> pa.Table:
    manifest = next(p for p in path.iterdir() if p.name.startswith("manifest-"))
    return manifest_from_bytes(manifest.read_bytes(), where=str(manifest))


def _with_rows(table: pa.Table, rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=table.schema)


def test_a_pickle_relabelled_as_a_tensor_is_read_as_bytes_never_unpickled(
    ckptr, hostile, reliability
):
    path, marker = hostile
    table = _table(path)
    rows = table.to_pylist()
    for row in rows:
        if row["kind"] == "pickle":
            row.update(kind="tensor", dtype="uint8", shape=[row["item_nbytes"]])
    meta = dict(table.schema.metadata)
    meta[b"ray_ckpt.tree"] = meta[b"ray_ckpt.tree"].replace(b'{"P":', b'{"T":')
    _resign(path, _with_rows(table, rows).replace_schema_metadata(meta))
    reliability.add("hostile", "pickle relabelled as a tensor", "tried")
    loaded = ckptr.load(str(path))
    assert loaded["evil"].dtype == torch.uint8 and not marker.exists()
    # and a tree that calls a tensor a pickle is refused (the manifest says what each item is)
    meta[b"ray_ckpt.tree"] = meta[b"ray_ckpt.tree"].replace(b'{"T":', b'{"P":')
    _resign(path, _with_rows(table, rows).replace_schema_metadata(meta))
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="the tree refers to item"):
        ckptr.load(str(path), allow_pickle=True)
    assert not marker.exists()
    reliability.add("hostile", "pickle relabelled as a tensor", "refused")


@pytest.fixture
def victim(ckptr, tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "victim"
    ckptr.save(str(path), {"a": torch.randn(64), "b": torch.randn(64), "big": torch.randn(300_000)})
    return path


def _edit_rows(path: Path, edit: Any) -> None:
    table = _table(path)
    rows = table.to_pylist()
    edit(rows)
    _resign(path, _with_rows(table, rows))


HOSTILE = {
    "file outside the directory (relative)": (
        lambda rows: rows[0].update(file="../victim2/" + rows[0]["file"]),
        "not a ray_ckpt data file",
    ),
    "file outside the directory (absolute)": (
        lambda rows: rows[0].update(file="/etc/passwd"),
        "not a ray_ckpt data file",
    ),
    "file with a path separator": (
        lambda rows: rows[0].update(file=rows[0]["file"] + "/x"),
        "not a ray_ckpt data file",
    ),
    "65 dimensions": (lambda rows: rows[0].update(shape=[1] * 65), "dimensions is absurd"),
    "negative dimension": (lambda rows: rows[0].update(shape=[-16]), "invalid shape"),
    "shape larger than its bytes": (lambda rows: rows[0].update(shape=[2**40, 2**20]), "needs"),
    "negative offset": (lambda rows: rows[0].update(offset=-64), "invalid offset"),
    "negative length": (lambda rows: rows[0].update(length=-8), "invalid length"),
    "offset inside the header": (lambda rows: rows[0].update(offset=8), "inside the file header"),
    "offset beyond the file": (lambda rows: rows[0].update(offset=2**40), "truncated|overlap"),
    "negative item index": (lambda rows: rows[0].update(item=-1), "invalid item index"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifests_are_refused_by_load_and_verify(ckptr, victim, case, reliability):
    edit, match = HOSTILE[case]
    _edit_rows(victim, edit)
    reliability.add("hostile", case, "tried")
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=match):
        ckptr.load(str(victim))
    report = ray_ckpt.tools.verify(str(victim))
    assert not report.ok
    reliability.add("hostile", case, "refused")


def test_overlapping_byte_ranges_are_refused_even_with_matching_checksums(
    ckptr, victim, reliability
):
    """Item "b" is pointed at item "a"'s bytes, checksum and all: each extent verifies, but two
    items claiming the same bytes is refused (it would let a manifest multiply what a small
    file makes a reader allocate)."""

    def edit(rows: list[dict[str, Any]]) -> None:
        a = next(r for r in rows if r["key"] == "a")
        b = next(r for r in rows if r["key"] == "b")
        b.update(file=a["file"], offset=a["offset"], checksum=a["checksum"])

    _edit_rows(victim, edit)
    reliability.add("hostile", "overlapping byte ranges", "tried")
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="overlap"):
        ckptr.load(str(victim))
    assert not ray_ckpt.tools.verify(str(victim)).ok
    reliability.add("hostile", "overlapping byte ranges", "refused")


@pytest.mark.parametrize("where", ["marker", "manifest", "data-file header"])
def test_an_unknown_format_version_is_refused_with_upgrade_advice(
    ckptr, victim, where, reliability
):
    if where == "marker":
        _resign(victim, format_version=2)
    elif where == "manifest":
        table = _table(victim)
        meta = {**table.schema.metadata, b"ray_ckpt.format_version": b"2"}
        _resign(victim, table.replace_schema_metadata(meta))
    else:
        for data in victim.glob("*.data"):
            raw = bytearray(data.read_bytes())
            raw[8:12] = struct.pack("<I", 2)
            raw[60:64] = struct.pack("<I", crc32c(bytes(raw[:60])))  # a valid header, version 2
            data.write_bytes(bytes(raw))
    reliability.add("hostile", f"unknown format version in the {where}", "tried")
    with pytest.raises(ray_ckpt.errors.FormatVersionError, match="Upgrade ray_ckpt") as info:
        ckptr.load(str(victim))
    assert "version 2" in str(info.value) or "'2'" in str(info.value)
    assert not ray_ckpt.tools.verify(str(victim)).ok
    reliability.add("hostile", f"unknown format version in the {where}", "refused")


def test_a_data_file_named_in_a_sibling_directory_is_never_read(ckptr, victim, tmp_path):
    """Even a well-formed data-file name resolves inside the checkpoint directory only."""
    sibling = tmp_path / "victim2"
    shutil.copytree(victim, sibling)
    for data in victim.glob("*.data"):
        data.unlink()
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="missing"):
        ckptr.load(str(victim))


# --- bad arguments ----------------------------------------------------------------------------


def _generator():
    yield 1


class Sub(torch.Tensor):
    pass


UNSUPPORTED = {
    "sparse COO": (lambda: torch.ones(3).to_sparse(), "to_dense"),
    "sparse CSR": (lambda: torch.eye(3).to_sparse_csr(), "to_dense"),
    "meta": (lambda: torch.empty(3, device="meta"), "meta tensor"),
    "quantized": (
        lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8),
        "quantized",
    ),
    "nested": (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
    "subclass": (lambda: torch.ones(2).as_subclass(Sub), "subclass"),
    "non-contiguous int4": (
        lambda: torch.zeros(8, dtype=torch.uint8).view(torch.int4)[::2],
        "int4",
    ),
    "lambda": (lambda: lambda x: x, "allow_pickle|pickle"),
    "open file": (lambda: open(os.devnull), "allow_pickle|pickle"),
    "lock": (lambda: threading.Lock(), "allow_pickle|pickle"),
    "generator": (_generator, "allow_pickle|pickle"),
    "numpy object array": (lambda: np.array([object()]), "numpy dtype object"),
}


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["plain", "allow_pickle"])
@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_values_fail_at_save_naming_the_key(
    ckptr, tmp_path, case, allow_pickle, reliability
):
    make, match = UNSUPPORTED[case]
    value = make()
    path = tmp_path / "c"
    reliability.add("bad arguments", f"unsupported value: {case}", "tried")
    try:
        with pytest.raises(ray_ckpt.CheckpointError) as info:
            ckptr.save(
                str(path),
                {"model": {"layer": value}, "ok": torch.ones(2)},
                allow_pickle=allow_pickle,
            )
    finally:
        if hasattr(value, "close"):
            value.close()
    message = str(info.value)
    assert "model.layer" in message, message
    if not allow_pickle or "pickle" not in match:
        import re

        assert re.search(match, message), message
    assert not path.exists() or os.listdir(path) == [], "bytes were written for a refused save"
    reliability.add("bad arguments", f"unsupported value: {case}", "refused")


@pytest.mark.parametrize(
    "key",
    [object(), frozenset({1}), torch.ones(1), b"bytes-key", (1, object())],
    ids=["object", "frozenset", "tensor", "bytes", "tuple-with-object"],
)
def test_unsupported_keys_fail_at_save_naming_the_key(ckptr, tmp_path, key, reliability):
    reliability.add("bad arguments", "unsupported dict key", "tried")
    state = {"outer": {key: torch.ones(1)}}
    with pytest.raises(ray_ckpt.errors.UnsupportedValueError, match="dict keys must be") as info:
        ckptr.save(str(tmp_path / "c"), state)
    assert "outer" in str(info.value)
    reliability.add("bad arguments", "unsupported dict key", "refused")


@pytest.mark.parametrize(
    "state",
    [None, torch.ones(2), "state", [("a", torch.ones(1))], torch.nn.Linear(2, 2)],
    ids=["None", "tensor", "str", "list-of-pairs", "module-not-its-state-dict"],
)
def test_a_state_dict_that_is_not_a_dict_is_refused(ckptr, tmp_path, state, reliability):
    reliability.add("bad arguments", "state dict that is not a dict", "tried")
    with pytest.raises(ray_ckpt.errors.UnsupportedValueError, match="must be a dict") as info:
        ckptr.save(str(tmp_path / "c"), state)
    assert type(state).__name__ in str(info.value)
    assert not (tmp_path / "c").exists() or os.listdir(tmp_path / "c") == []
    reliability.add("bad arguments", "state dict that is not a dict", "refused")


@pytest.mark.parametrize(
    "location",
    [{"cpu": "nowhere"}, {"cpu": 3}, object(), 1.5, "gpu"],
    ids=["dict-bad-device", "dict-int", "object", "float", "unknown-device"],
)
def test_a_wrong_map_location_is_refused_before_reading(ckptr, tmp_path, location, reliability):
    path = tmp_path / "c"
    ckptr.save(str(path), {"w": torch.ones(2)})
    reliability.add("bad arguments", "wrong default_map_location", "tried")
    with pytest.raises(ray_ckpt.errors.UnsupportedValueError, match="default_map_location"):
        ckptr.load(str(path), default_map_location=location)
    reliability.add("bad arguments", "wrong default_map_location", "refused")


@pytest.mark.parametrize("path", [None, 42, "", b"/tmp/x"], ids=["None", "int", "empty", "bytes"])
def test_a_path_that_is_not_a_path_is_refused(ckptr, path, reliability):
    reliability.add("bad arguments", "path that is not a path", "tried")
    with pytest.raises((TypeError, ValueError), match="path"):
        ckptr.save(path, {"w": torch.ones(1)})
    with pytest.raises((TypeError, ValueError), match="path"):
        ckptr.load(path)
    reliability.add("bad arguments", "path that is not a path", "refused")


@pytest.mark.parametrize("path", [
    "mem://run/../step-1", "mem://run/./step-1", "mem://run//step-1",
    "s3://bucket/run/../step-1?endpoint_override=http://127.0.0.1:9&region=us-east-1",
], ids=["mem-dotdot", "mem-dot", "mem-empty", "s3-dotdot"])
def test_a_dot_component_off_local_disk_is_refused(ckptr, path, reliability):
    # an object store or the memory tier would keep '..' as a name: a checkpoint no listing of
    # its directory could show, and a directory no listing could read past
    reliability.add("bad arguments", "'.', '..' or '//' in an object-store path", "tried")
    for call in (lambda: ckptr.save(path, {"w": torch.ones(1)}), lambda: ckptr.load(path)):
        with pytest.raises(ValueError, match="component") as info:
            call()
        assert path.partition("?")[0] in str(info.value)
    reliability.add("bad arguments", "'.', '..' or '//' in an object-store path", "refused")


def test_dot_components_of_a_local_uri_are_resolved(ckptr, tmp_path):
    ckptr.save(f"file://{tmp_path}/run/../step-1", {"w": torch.ones(2)})
    assert torch.equal(ckptr.load(str(tmp_path / "step-1"))["w"], torch.ones(2))
    assert not (tmp_path / "run").exists()


def test_a_path_under_a_file_is_refused(ckptr, tmp_path, reliability):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    reliability.add("bad arguments", "path under a file", "tried")
    with pytest.raises(ray_ckpt.CheckpointError) as info:
        ckptr.save(str(file / "step-1"), {"w": torch.ones(1)})
    assert "notes.txt" in str(info.value)
    with pytest.raises(ray_ckpt.CheckpointNotFoundError):
        ckptr.load(str(file / "step-1"))
    assert file.read_text() == "mine"
    reliability.add("bad arguments", "path under a file", "refused")


def test_a_save_into_a_run_root_is_refused_naming_what_it_holds(ckptr, tmp_path):
    """Saving into the directory that holds the run's checkpoints (its root) would mix the
    new checkpoint's files with them: refused, naming them and the path to use instead."""
    root = tmp_path / "run"
    ckptr.save(str(root / "step-1"), {"w": torch.ones(2)})
    (root / "notes.txt").write_text("mine")
    with pytest.raises(ray_ckpt.errors.CheckpointExistsError) as info:
        ckptr.save(str(root), {"w": torch.zeros(2)})
    message = str(info.value)
    assert "notes.txt, step-1" in message and f"{root}/step-N" in message
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-1"]
    assert torch.equal(ckptr.load(str(root / "step-1"))["w"], torch.ones(2))


@pytest.mark.parametrize(
    "leaf",
    [
        '{"dv":"nowhere:7"}',
        '{"S":[1e400]}',
        '{"S":["x"]}',
        '{"dt":"evil"}',
        '{"b":"!!"}',
        '{"f":"-nan"}',
        '{"T":99}',
        '{"P":0}',
        '{"D":{"i":[0],"g":[-1]}}',
        '{"o":{"a":1}}',
    ],
)
def test_hostile_tree_leaves_are_refused_by_load(ckptr, victim, leaf, reliability):
    """A re-signed manifest whose tree holds a value no save writes: a clean refusal."""
    table = _table(victim)
    meta = dict(table.schema.metadata)
    meta[b"ray_ckpt.tree"] = b'{"d":[["a",' + leaf.encode() + b"]]}"
    _resign(victim, table.replace_schema_metadata(meta))
    reliability.add("hostile", "hostile tree leaf", "tried")
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="tree"):
        ckptr.load(str(victim))
    reliability.add("hostile", "hostile tree leaf", "refused")


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: ray_ckpt.CheckpointStagerConfig(put_threads=0), "put_threads"),
        (lambda: ray_ckpt.CheckpointStagerConfig(bucket_size_bytes=100), "bucket_size_bytes"),
        (lambda: ray_ckpt.CheckpointStagerConfig(memory_budget_bytes=1), "memory_budget_bytes"),
        (lambda: ray_ckpt.CheckpointWriterConfig(io_threads=0), "io_threads"),
        (lambda: ray_ckpt.CheckpointReaderConfig(io_threads=100), "io_threads"),
        (lambda: ray_ckpt.StorageConfig(part_size_bytes=1), "part_size_bytes"),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        make()


def test_a_save_refused_before_staging_leaves_no_directory(ckptr, tmp_path):
    """A lambda is refused when the state dict is planned, before a byte is written: the
    directory the save had created is gone again (a run dir gets no empty debris)."""
    path = tmp_path / "run" / "checkpoint_refused"
    with pytest.raises(ray_ckpt.errors.PickleNotAllowedError):
        ckptr.save(str(path), {"w": torch.ones(2), "fn": lambda: 1})
    assert not path.exists() and (tmp_path / "run").exists()
    existing = tmp_path / "existing"
    existing.mkdir()  # a directory the caller made is left as it was
    with pytest.raises(ray_ckpt.errors.PickleNotAllowedError):
        ckptr.save(str(existing), {"fn": lambda: 1})
    assert existing.is_dir()

"""Corruption, systematically: every file of a checkpoint, every class of byte position in it,
every way to cut it short, and deleting it.

One small checkpoint is saved once (a pack of small tensors with padding between them, a tensor
chunked over two files, an empty tensor, a 0-d tensor, a numpy array). Each case copies it,
damages the copy, and asserts two things:

* ``load`` (``CheckpointReader.read``) raises a :class:`ray_ckpt.CheckpointError` subclass whose
  message names the damaged file (the commit marker as "commit marker"), and the key when the
  damage is in a tensor's bytes; or, where the damage cannot change what loads, the load returns
  exactly the saved values. It never returns anything else.
* ``ray_ckpt.tools.verify`` finds the same problem without loading: a report that is not
  ``ok``, with a problem naming the file (and the key), whenever the load failed; ``ok`` when it
  loaded.

What is *required* to be detected: any byte of the manifest (CRC32C in the marker), any byte of
a data-file header (its own CRC32C), any byte of tensor data (CRC32C per extent), any truncation
or deletion of a file the checkpoint needs. The marker is JSON: damage is detected when it
makes the JSON invalid or changes a field a reader checks (format, version, ids, manifest size
and CRC, total bytes); damage to informational fields (``created_unix``, ``world_size``,
``metadata``) or to whitespace changes nothing that loads. **Padding** between extents is not
covered by any checksum (it is not data: ``docs/FORMAT.md`` says it is zero, and no reader
looks at it): damage there must, and does, leave the load exact and ``verify`` clean.

The default run tries a bounded sample of byte positions per class; ``slow`` tries every byte of
every file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.ipc as ipc
import pytest
import torch

import ray_ckpt
import ray_ckpt.errors
import ray_ckpt.tools
from ray_ckpt.format.header import HEADER_SIZE
from ray_ckpt.format.names import MARKER_NAME

from .helpers import assert_same

SAMPLE = 6  # byte positions per class and file in the default run


def _state() -> dict[str, Any]:
    torch.manual_seed(3)
    return {
        "model": {"w": torch.randn(100, 400), "b": torch.randn(9), "e": torch.empty(0, 3)},
        "opt": {"m": [torch.randn(5) for _ in range(3)], "step": 3},
        "s": torch.tensor(2.5, dtype=torch.bfloat16),
        "np": np.arange(10, dtype=np.int16),
        "note": "corruption",
    }


@dataclass(frozen=True)
class Extent:
    file: str
    offset: int
    length: int
    key: str


@dataclass(frozen=True)
class Pristine:
    path: Path
    state: dict[str, Any]
    files: dict[str, int]  # name -> size
    extents: list[Extent]
    manifest: str

    @property
    def data_files(self) -> list[str]:
        return sorted(f for f in self.files if f.endswith(".data"))

    def extents_of(self, file: str) -> list[Extent]:
        return sorted((e for e in self.extents if e.file == file), key=lambda e: e.offset)

    def gaps(self, file: str) -> list[range]:
        """Byte ranges of ``file`` between its header and extents that hold no data."""
        out, position = [], HEADER_SIZE
        for e in self.extents_of(file):
            if e.offset > position:
                out.append(range(position, e.offset))
            position = max(position, e.offset + e.length)
        if self.files[file] > position:
            out.append(range(position, self.files[file]))
        return out


@pytest.fixture(scope="module")
def pristine(cluster, tmp_path_factory) -> Pristine:
    path = tmp_path_factory.mktemp("corruption") / "ckpt"
    config = ray_ckpt.CheckpointerConfig(
        staging_config=ray_ckpt.CheckpointStagerConfig(
            bucket_size_bytes=64 << 10, pack_threshold_bytes=1 << 10
        )
    )
    state = _state()
    with ray_ckpt.make_sync_checkpointer(config=config) as ckptr:
        ckptr.save(str(path), state)
    files = {f: os.path.getsize(path / f) for f in os.listdir(path)}
    manifest = next(f for f in files if f.startswith("manifest-"))
    table = ipc.open_file(str(path / manifest)).read_all()
    extents = [
        Extent(r["file"], r["offset"], r["length"], r["key"])
        for r in table.select(["file", "offset", "length", "key"]).to_pylist()
    ]
    p = Pristine(path, state, files, extents, manifest)
    assert len(p.data_files) >= 3, "the checkpoint should span several data files"
    assert any(p.gaps(f) for f in p.data_files), "the pack should have padding between extents"
    assert any(e.length == 0 for e in extents), "an empty tensor: an extent of zero bytes"
    return p


# --- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One damage to one file of a copy of the checkpoint."""

    id: str
    file: str  # the file damaged (a key into Pristine.files)
    cls: str  # position class, or "truncate" / "delete" / "swap"
    damage: Callable[[Path], None]
    must_fail: bool  # the damage is in bytes a reader must check
    key: str | None = None  # the key whose bytes were hit
    other_file: str | None = None  # the second file of a swap: naming either is enough


def _flip(name: str, offset: int, how: str = "xor") -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with open(path / name, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([_plausible(byte) if how == "plausible" else byte ^ 0xFF]))

    return damage


def _plausible(byte: int) -> int:
    """A change a careless editor or a bit flip in text could make: the next digit or letter,
    a space for a tab; anything else flips its lowest bit."""
    c = chr(byte)
    if c.isdigit():
        return ord(str((int(c) + 1) % 10))
    if "a" <= c <= "z":
        return ord("a") + (ord(c) - ord("a") + 1) % 26
    if c == " ":
        return ord("\t")
    return byte ^ 0x01


def _truncate(name: str, size: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        os.truncate(path / name, size)

    return damage


def _delete(name: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        os.remove(path / name)

    return damage


def _swap(a: str, b: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        os.rename(path / a, path / "tmp")
        os.rename(path / b, path / a)
        os.rename(path / "tmp", path / b)

    return damage


def _spread(positions: range | list[int], exhaustive: bool) -> list[int]:
    """Every position, or ``SAMPLE`` of them spread evenly (first and last included)."""
    positions = list(positions)
    if exhaustive or len(positions) <= SAMPLE:
        return positions
    step = (len(positions) - 1) / (SAMPLE - 1)
    return sorted({positions[round(i * step)] for i in range(SAMPLE)})


def cases(p: Pristine, exhaustive: bool) -> Iterator[Case]:
    marker_size, manifest_size = p.files[MARKER_NAME], p.files[p.manifest]
    for offset in _spread(range(marker_size), exhaustive):
        for how in ("xor", "plausible"):
            yield Case(
                f"marker-{how}@{offset}",
                MARKER_NAME,
                f"marker JSON ({how})",
                _flip(MARKER_NAME, offset, how),
                must_fail=how == "xor",
            )
    for offset in _spread(range(manifest_size), exhaustive):
        yield Case(
            f"manifest@{offset}",
            p.manifest,
            "manifest bytes",
            _flip(p.manifest, offset),
            must_fail=True,
        )
    data_files = p.data_files if exhaustive else [p.data_files[0], p.data_files[-1]]
    for file in data_files:
        for offset in _spread(range(HEADER_SIZE), exhaustive):
            yield Case(
                f"{file}-header@{offset}",
                file,
                "data-file header",
                _flip(file, offset),
                must_fail=True,
            )
    for file in p.data_files:
        for e in p.extents_of(file):
            if e.length == 0:
                continue
            inside = range(e.offset, e.offset + e.length)
            chosen = list(inside) if exhaustive and e.length <= 4096 else _spread(inside, False)[:3]
            if exhaustive and e.length > 4096:
                chosen = _spread(inside, False) + list(range(e.offset, e.offset + 64))
            for offset in sorted(set(chosen)):
                yield Case(
                    f"{file}-data@{offset}",
                    file,
                    "tensor data",
                    _flip(file, offset),
                    must_fail=True,
                    key=e.key,
                )
        for gap in p.gaps(file):
            for offset in gap if exhaustive else [gap.start, gap.stop - 1]:
                yield Case(
                    f"{file}-padding@{offset}",
                    file,
                    "padding between extents",
                    _flip(file, offset),
                    must_fail=False,
                )
    for name, size in sorted(p.files.items()):
        cuts = {"to-0": 0, "by-1": size - 1, "mid": size // 2}
        if name.endswith(".data"):
            cuts["mid-header"] = HEADER_SIZE // 2
            last = p.extents_of(name)[-1]
            cuts["mid-data"] = last.offset + last.length // 2
        for label, size_after in sorted(cuts.items()):
            if name == MARKER_NAME and label == "by-1":
                # cut by its last byte (the newline), the marker is still the whole document
                yield Case(
                    f"{name}-truncate-{label}",
                    name,
                    "truncate the marker's newline",
                    _truncate(name, size_after),
                    must_fail=False,
                )
                continue
            yield Case(
                f"{name}-truncate-{label}",
                name,
                "truncate",
                _truncate(name, size_after),
                must_fail=True,
            )
        yield Case(f"{name}-delete", name, "delete", _delete(name), must_fail=True)
    first, second = p.data_files[:2]
    yield Case(
        f"swap-{first}-{second}",
        first,
        "swap two data files",
        _swap(first, second),
        must_fail=True,
        other_file=second,
    )


# --- the check --------------------------------------------------------------------------------


def _names_file(message: str, case: Case, p: Pristine) -> bool:
    if case.file == MARKER_NAME:
        # the marker is named as such, or a check it feeds (manifest size/CRC, id) names the
        # manifest it points at
        return "commit marker" in message or p.manifest in message or MARKER_NAME in message
    return case.file in message or (case.other_file is not None and case.other_file in message)


def check(case: Case, p: Pristine, workdir: Path, reliability: Any) -> str:
    """Damage a copy, then load and verify it; returns "detected" or "harmless"."""
    copy = workdir / case.id
    shutil.copytree(p.path, copy)
    try:
        case.damage(copy)
        reliability.add("corruptions", case.cls, "tried")
        try:
            loaded, _ = ray_ckpt.CheckpointReader().read(str(copy))
        except ray_ckpt.CheckpointError as e:
            message = str(e)
            assert _names_file(message, case, p), (
                f"{case.id}: the error does not name the file: {e}"
            )
            if case.key is not None:
                assert repr(case.key) in message, f"{case.id}: the error does not name the key: {e}"
            report = ray_ckpt.tools.verify(str(copy))
            assert not report.ok, f"{case.id}: load failed ({e}) but verify found nothing"
            named = [
                pr
                for pr in report.problems
                if _names_file(f"{pr.file} {pr.message}", case, p)
                and (case.key is None or pr.key == case.key or repr(case.key) in pr.message)
            ]
            assert named, f"{case.id}: verify's problems do not name the file: {report.problems}"
            reliability.add("corruptions", case.cls, "detected by load")
            reliability.add("corruptions", case.cls, "detected by verify")
            return "detected"
        assert not case.must_fail, f"{case.id}: damage in checked bytes went unnoticed"
        assert_same(p.state, loaded, case.id)  # never anything but the saved values
        report = ray_ckpt.tools.verify(str(copy))
        assert report.ok, f"{case.id}: loads exactly, yet verify reports {report.problems}"
        reliability.add("corruptions", case.cls, "harmless, loads exactly")
        return "harmless"
    finally:
        shutil.rmtree(copy)


def _run(
    p: Pristine, workdir: Path, reliability: Any, exhaustive: bool
) -> dict[str, dict[str, int]]:
    seen: dict[str, dict[str, int]] = {}
    for case in cases(p, exhaustive):
        outcome = check(case, p, workdir, reliability)
        counts = seen.setdefault(case.cls, {})
        counts[outcome] = counts.get(outcome, 0) + 1
    return seen


def test_every_file_position_class_truncation_and_deletion(pristine, tmp_path, reliability):
    seen = _run(pristine, tmp_path, reliability, exhaustive=False)
    # every class was tried, and the checked ones were all detected
    for cls in (
        "manifest bytes",
        "data-file header",
        "tensor data",
        "truncate",
        "delete",
        "swap two data files",
        "marker JSON (xor)",
    ):
        assert set(seen[cls]) == {"detected"}, (cls, seen[cls])
    assert set(seen["padding between extents"]) == {"harmless"}
    assert set(seen["truncate the marker's newline"]) == {"harmless"}
    assert "detected" in seen["marker JSON (plausible)"]


@pytest.mark.slow
def test_every_byte_of_every_file(pristine, tmp_path, reliability):
    seen = _run(pristine, tmp_path, reliability, exhaustive=True)
    for cls in ("manifest bytes", "data-file header", "tensor data", "delete"):
        assert set(seen[cls]) == {"detected"}, (cls, seen[cls])
    assert set(seen["padding between extents"]) == {"harmless"}


def test_plausible_marker_edits_change_nothing_or_are_refused(pristine, tmp_path, reliability):
    """Each field of the marker, edited to another plausible value: the checked fields are
    refused, the informational ones load exactly."""
    doc = json.loads((pristine.path / MARKER_NAME).read_text())
    edits = {
        "format": "ray_ckpx",
        "format_version": 2,
        "checkpoint_id": "0" * 16,
        "manifest": "manifest-" + "0" * 16 + ".arrow",
        "manifest_nbytes": doc["manifest_nbytes"] + 1,
        "manifest_crc32c": doc["manifest_crc32c"] ^ 1,
        "total_nbytes": doc["total_nbytes"] - 1,
        "created_unix": 0.0,
        "world_size": 3,
        "metadata": {"x": 1},
    }
    # world_size is informational when the checkpoint has no per-rank trees (the union tree
    # serves every rank); with per-rank trees their number must match it (tests/test_crafted.py)
    harmless = {"created_unix", "world_size", "metadata"}
    for field, value in edits.items():
        copy = tmp_path / field
        shutil.copytree(pristine.path, copy)
        (copy / MARKER_NAME).write_text(json.dumps({**doc, field: value}))
        reliability.add("corruptions", "marker field edited", "tried")
        if field in harmless:
            assert_same(pristine.state, ray_ckpt.CheckpointReader().read(str(copy))[0])
            reliability.add("corruptions", "marker field edited", "harmless, loads exactly")
            continue
        with pytest.raises(ray_ckpt.CorruptCheckpointError) as info:
            ray_ckpt.CheckpointReader().read(str(copy))
        if field == "format_version":
            assert isinstance(info.value, ray_ckpt.errors.FormatVersionError)
            assert "Upgrade ray_ckpt" in str(info.value)
        assert not ray_ckpt.tools.verify(str(copy)).ok
        reliability.add("corruptions", "marker field edited", "detected by load")
        reliability.add("corruptions", "marker field edited", "detected by verify")

"""Loading: partial, strict, in place, relocation, and every way a checkpoint can be bad."""

from __future__ import annotations

import os

import pytest
import torch

import ray_ckpt
from ray_ckpt.format import HEADER_SIZE

from .helpers import data_files, flip_byte, manifest_file, marker, small_config


@pytest.fixture(scope="module")
def ckptr(cluster):
    with ray_ckpt.make_sync_checkpointer(config=small_config()) as c:
        yield c


@pytest.fixture
def saved(ckptr, tmp_path):
    state = {
        "model": {"w": torch.randn(300, 300), "b": torch.arange(5.0)},
        "step": 7,
        "optim": {"lr": 0.1},
    }
    path = str(tmp_path / "ckpt")
    ckptr.save(path, state)
    return path, state


def test_partial_load_reads_only_given_keys_in_place(ckptr, saved):
    path, state = saved
    w = torch.zeros(300, 300)
    target = {"model": {"w": w}}
    out = ckptr.load(path, target)
    assert out is target and out["model"]["w"] is w
    assert torch.equal(w, state["model"]["w"])
    assert set(out["model"]) == {"w"} and "step" not in out


def test_partial_load_into_non_contiguous_target(ckptr, saved):
    path, state = saved
    w = torch.zeros(300, 300).t()
    ckptr.load(path, {"model": {"w": w}})
    assert torch.equal(w, state["model"]["w"])


def test_none_leaf_loads_the_whole_subtree(ckptr, saved):
    path, state = saved
    out = ckptr.load(path, {"model": None, "step": 0})
    assert torch.equal(out["model"]["b"], state["model"]["b"]) and out["step"] == 7


def test_strict_names_every_missing_key(ckptr, saved):
    path, _ = saved
    target = {"model": {"w": torch.zeros(300, 300), "extra": torch.zeros(1)}, "nope": 1}
    with pytest.raises(ray_ckpt.MissingKeysError) as info:
        ckptr.load(path, target, strict=True)
    assert isinstance(info.value, RuntimeError)
    assert info.value.missing_keys == ["model.extra", "nope"]
    assert "model.extra" in str(info.value) and "nope" in str(info.value)
    # without strict the same load succeeds and fills what exists
    ckptr.load(path, target)
    assert torch.count_nonzero(target["model"]["w"]) > 0


@pytest.mark.parametrize(
    "target, match",
    [
        (torch.zeros(300, 299), r"float32 \[300, 300\].*float32 \[300, 299\]"),
        (torch.zeros(300, 300, dtype=torch.float64), "float64"),
    ],
    ids=["shape", "dtype"],
)
def test_mismatch_names_the_key(ckptr, saved, target, match):
    path, _ = saved
    with pytest.raises(ray_ckpt.StateDictMismatchError, match=match) as info:
        ckptr.load(path, {"model": {"w": target}})
    assert "model.w" in str(info.value)
    assert torch.count_nonzero(target) == 0  # nothing was read into it


def test_structure_mismatch_names_the_key(ckptr, saved):
    path, _ = saved
    with pytest.raises(ray_ckpt.StateDictMismatchError, match="'step'"):
        ckptr.load(path, {"step": torch.zeros(1)})


def test_map_location(ckptr, saved):
    path, state = saved
    assert ckptr.load(path, default_map_location="cpu")["model"]["w"].device.type == "cpu"
    moved = ckptr.load(path, default_map_location=lambda t, saved_on: t * 0 + 1)
    assert torch.equal(moved["model"]["b"], torch.ones(5))
    assert ckptr.load(path, default_map_location={"cuda:0": "cpu"})["model"]["b"].device.type == "cpu"


@pytest.mark.parametrize("bad", [42, "not-a-device", "cuda:0"] if not torch.cuda.is_available() else [42, "nope"])
def test_bad_map_location_is_refused(ckptr, saved, bad):
    path, _ = saved
    with pytest.raises(ray_ckpt.UnsupportedValueError, match="default_map_location"):
        ckptr.load(path, default_map_location=bad)


def test_missing_path(ckptr, tmp_path):
    with pytest.raises(ray_ckpt.CheckpointNotFoundError, match="does not exist") as info:
        ckptr.load(str(tmp_path / "nothing"))
    assert isinstance(info.value, FileNotFoundError)


def test_path_that_is_a_file(ckptr, tmp_path):
    (tmp_path / "f").write_text("hello")
    with pytest.raises(ray_ckpt.CheckpointNotFoundError, match="is a file"):
        ckptr.load(str(tmp_path / "f"))
    with pytest.raises(ray_ckpt.CheckpointExistsError, match="is a file"):
        ckptr.save(str(tmp_path / "f"), {"a": torch.ones(1)})
    assert (tmp_path / "f").read_text() == "hello"


def test_incomplete_directory_is_refused(ckptr, saved):
    path, _ = saved
    os.remove(marker(path))
    with pytest.raises(ray_ckpt.IncompleteCheckpointError, match="no commit marker"):
        ckptr.load(path)


def test_flipped_data_byte_names_key_and_file(ckptr, saved):
    path, _ = saved
    files = data_files(path)
    biggest = max(files, key=lambda f: os.path.getsize(os.path.join(path, f)))
    flip_byte(os.path.join(path, biggest), HEADER_SIZE + 1000)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="checksum mismatch") as info:
        ckptr.load(path)
    assert "model.w" in str(info.value) and biggest in str(info.value)
    # an in-place load of the untouched key still works
    b = torch.zeros(5)
    ckptr.load(path, {"model": {"b": b}})
    assert torch.equal(b, torch.arange(5.0))


def test_flipped_header_byte_is_detected(ckptr, saved):
    path, _ = saved
    file = data_files(path)[0]
    flip_byte(os.path.join(path, file), 20)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=f"{file} has a damaged header"):
        ckptr.load(path)


def test_flipped_manifest_byte_is_detected(ckptr, saved):
    path, _ = saved
    flip_byte(os.path.join(path, manifest_file(path)), 100)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="manifest .* does not match"):
        ckptr.load(path)


def test_damaged_marker_is_detected(ckptr, saved):
    path, _ = saved
    flip_byte(marker(path), 2)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="commit marker"):
        ckptr.load(path)


def test_truncated_file_names_key_and_file(ckptr, saved):
    path, _ = saved
    file = data_files(path)[-1]
    full = os.path.join(path, file)
    os.truncate(full, os.path.getsize(full) - 10)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="truncated") as info:
        ckptr.load(path)
    assert file in str(info.value) and "model." in str(info.value)


def test_deleted_data_file_is_detected_before_reading(ckptr, saved):
    path, _ = saved
    file = data_files(path)[0]
    os.remove(os.path.join(path, file))
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=f"{file} .*missing"):
        ckptr.load(path)


def test_checksums_off_skips_verification(cluster, saved):
    path, _ = saved
    file = max(data_files(path), key=lambda f: os.path.getsize(os.path.join(path, f)))
    flip_byte(os.path.join(path, file), HEADER_SIZE + 8)
    config = ray_ckpt.CheckpointerConfig(
        reader_config=ray_ckpt.CheckpointReaderConfig(verify_checksums=False)
    )
    with ray_ckpt.make_sync_checkpointer(config=config) as unchecked:
        unchecked.load(path)  # no error: verification is off


def test_overwrite_policy(ckptr, saved):
    path, _ = saved
    with pytest.raises(ray_ckpt.CheckpointExistsError, match="overwrite=True"):
        ckptr.save(path, {"x": torch.ones(1)})
    assert "model" in ckptr.load(path)  # untouched
    ckptr.save(path, {"x": torch.ones(1)}, overwrite=True)
    out = ckptr.load(path)
    assert list(out) == ["x"]
    # the replaced checkpoint's files are gone; only the new one's remain
    ids = {f.split("-")[-1].split(".")[0] for f in os.listdir(path) if f != "ray_ckpt.commit"}
    assert len(ids) == 1


def test_directory_with_foreign_files_is_refused(ckptr, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ray_ckpt.CheckpointExistsError, match="notes.txt"):
        ckptr.save(str(tmp_path), {"x": torch.ones(1)})
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_closed_checkpointer_refuses(cluster, tmp_path):
    c = ray_ckpt.make_sync_checkpointer()
    c.close()
    with pytest.raises(ray_ckpt.CheckpointerClosedError, match="closed"):
        c.save(str(tmp_path / "c"), {"x": torch.ones(1)})

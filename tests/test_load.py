"""Loading: partial, strict, in place, relocation, and every way a checkpoint can be bad.

Everything that touches storage runs once per backend (``local``, ``s3`` on a real S3 server,
``custom`` pyarrow filesystem; see ``backend`` in conftest.py); damage is done through the
backend's own filesystem. What only exercises the reader's logic (map locations, closed
checkpointers) runs on local disk alone.
"""

from __future__ import annotations

import pytest
import torch

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt.format.header import HEADER_SIZE
from ray_ckpt.format.names import MARKER_NAME

from .helpers import assert_same, small_config, tiny_model, trained


@pytest.fixture(scope="module")
def ckptr(cluster):
    with ray_ckpt.make_sync_checkpointer(config=small_config()) as c:
        yield c


def _state():
    return {
        "model": {"w": torch.randn(300, 300), "b": torch.arange(5.0)},
        "step": 7,
        "optim": {"lr": 0.1},
    }


@pytest.fixture
def saved(backend):
    state = _state()
    path = backend.path("ckpt")
    backend.ckptr.save(path, state)
    return path, state


@pytest.fixture
def saved_locally(ckptr, tmp_path):
    state = _state()
    path = str(tmp_path / "ckpt")
    ckptr.save(path, state)
    return path, state


def _data_files(backend, path):
    return backend.files(path, ".data")


def _manifest(backend, path):
    return next(f for f in backend.files(path) if f.startswith("manifest-"))


def test_partial_load_reads_only_given_keys_in_place(backend, saved):
    path, state = saved
    w = torch.zeros(300, 300)
    target = {"model": {"w": w}}
    out = backend.ckptr.load(path, target)
    assert out is target and out["model"]["w"] is w
    assert torch.equal(w, state["model"]["w"])
    assert set(out["model"]) == {"w"} and "step" not in out


def test_partial_load_into_non_contiguous_target(backend, saved):
    path, state = saved
    w = torch.zeros(300, 300).t()
    backend.ckptr.load(path, {"model": {"w": w}})
    assert torch.equal(w, state["model"]["w"])


def test_none_leaf_loads_the_whole_subtree(backend, saved):
    path, state = saved
    out = backend.ckptr.load(path, {"model": None, "step": 0})
    assert torch.equal(out["model"]["b"], state["model"]["b"]) and out["step"] == 7


def test_strict_names_every_missing_key(backend, saved):
    path, _ = saved
    target = {"model": {"w": torch.zeros(300, 300), "extra": torch.zeros(1)}, "nope": 1}
    with pytest.raises(ray_ckpt.errors.MissingKeysError) as info:
        backend.ckptr.load(path, target, strict=True)
    assert isinstance(info.value, RuntimeError)
    assert info.value.missing_keys == ["model.extra", "nope"]
    assert "model.extra" in str(info.value) and "nope" in str(info.value)
    # without strict the same load succeeds and fills what exists
    backend.ckptr.load(path, target)
    assert torch.count_nonzero(target["model"]["w"]) > 0


@pytest.mark.parametrize(
    "target, match",
    [
        (torch.zeros(300, 299), r"float32 \[300, 300\].*float32 \[300, 299\]"),
        (torch.zeros(300, 300, dtype=torch.float64), "float64"),
    ],
    ids=["shape", "dtype"],
)
def test_mismatch_names_the_key(backend, saved, target, match):
    path, _ = saved
    with pytest.raises(ray_ckpt.errors.StateDictMismatchError, match=match) as info:
        backend.ckptr.load(path, {"model": {"w": target}})
    assert "model.w" in str(info.value)
    assert torch.count_nonzero(target) == 0  # nothing was read into it


def test_structure_mismatch_names_the_key(backend, saved):
    path, _ = saved
    with pytest.raises(ray_ckpt.errors.StateDictMismatchError, match="'step'"):
        backend.ckptr.load(path, {"step": torch.zeros(1)})


def test_map_location(ckptr, saved_locally):
    path, _ = saved_locally
    assert ckptr.load(path, default_map_location="cpu")["model"]["w"].device.type == "cpu"
    moved = ckptr.load(path, default_map_location=lambda t, saved_on: t * 0 + 1)
    assert torch.equal(moved["model"]["b"], torch.ones(5))
    mapped = ckptr.load(path, default_map_location={"cuda:0": "cpu"})
    assert mapped["model"]["b"].device.type == "cpu"


@pytest.mark.parametrize(
    "bad", [42, "not-a-device", "cuda:0"] if not torch.cuda.is_available() else [42, "nope"]
)
def test_bad_map_location_is_refused(ckptr, saved_locally, bad):
    path, _ = saved_locally
    with pytest.raises(ray_ckpt.errors.UnsupportedValueError, match="default_map_location"):
        ckptr.load(path, default_map_location=bad)


def test_missing_path(backend):
    with pytest.raises(ray_ckpt.CheckpointNotFoundError, match="does not exist") as info:
        backend.ckptr.load(backend.path("nothing"))
    assert isinstance(info.value, FileNotFoundError)


def test_path_that_is_a_file(backend):
    file = backend.path("f")
    backend.write(file, b"hello")
    with pytest.raises(ray_ckpt.CheckpointNotFoundError, match="is a file"):
        backend.ckptr.load(file)
    with pytest.raises(ray_ckpt.errors.CheckpointExistsError, match="is a file"):
        backend.ckptr.save(file, {"a": torch.ones(1)})
    assert backend.read(file) == b"hello"


def test_incomplete_directory_is_refused(backend, saved):
    path, _ = saved
    backend.delete(f"{path}/{MARKER_NAME}")
    with pytest.raises(ray_ckpt.errors.IncompleteCheckpointError, match="no commit marker"):
        backend.ckptr.load(path)


def test_flipped_data_byte_names_key_and_file(backend, saved):
    path, _ = saved
    biggest = max(_data_files(backend, path), key=lambda f: backend.size(f"{path}/{f}"))
    backend.flip_byte(f"{path}/{biggest}", HEADER_SIZE + 1000)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="checksum mismatch") as info:
        backend.ckptr.load(path)
    assert "model.w" in str(info.value) and biggest in str(info.value)
    # an in-place load of the untouched key still works
    b = torch.zeros(5)
    backend.ckptr.load(path, {"model": {"b": b}})
    assert torch.equal(b, torch.arange(5.0))


def test_flipped_header_byte_is_detected(backend, saved):
    path, _ = saved
    file = _data_files(backend, path)[0]
    backend.flip_byte(f"{path}/{file}", 20)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=f"{file} has a damaged header"):
        backend.ckptr.load(path)


def test_data_file_from_another_checkpoint_is_detected(backend, saved):
    path, state = saved
    other = path + "-other"
    backend.ckptr.save(other, state)  # same shapes, so the same layout; other file names
    mine, theirs = _data_files(backend, path)[0], _data_files(backend, other)[0]
    backend.write(f"{path}/{mine}", backend.read(f"{other}/{theirs}"))
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=f"{mine} holds the data of {theirs}"):
        backend.ckptr.load(path)


def test_flipped_manifest_byte_is_detected(backend, saved):
    path, _ = saved
    backend.flip_byte(f"{path}/{_manifest(backend, path)}", 100)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=r"manifest .* does not match"):
        backend.ckptr.load(path)


def test_damaged_marker_is_detected(backend, saved):
    path, _ = saved
    backend.flip_byte(f"{path}/{MARKER_NAME}", 2)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="commit marker"):
        backend.ckptr.load(path)


def test_truncated_file_names_key_and_file(backend, saved):
    path, _ = saved
    file = _data_files(backend, path)[-1]
    full = f"{path}/{file}"
    backend.truncate(full, backend.size(full) - 10)
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match="truncated") as info:
        backend.ckptr.load(path)
    assert file in str(info.value) and "model." in str(info.value)


def test_deleted_data_file_is_detected_before_reading(backend, saved):
    path, _ = saved
    file = _data_files(backend, path)[0]
    backend.delete(f"{path}/{file}")
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=f"{file} .*missing"):
        backend.ckptr.load(path)


def test_checksums_off_skips_verification(backend, saved):
    path, _ = saved
    file = max(_data_files(backend, path), key=lambda f: backend.size(f"{path}/{f}"))
    backend.flip_byte(f"{path}/{file}", HEADER_SIZE + 8)
    config = ray_ckpt.CheckpointerConfig(
        reader_config=ray_ckpt.CheckpointReaderConfig(verify_checksums=False)
    )
    with backend.checkpointer(config) as unchecked:
        unchecked.load(path)  # no error: verification is off


def test_overwrite_policy(backend, saved):
    path, _ = saved
    ckptr = backend.ckptr
    before = backend.files(path)
    with pytest.raises(ray_ckpt.errors.CheckpointExistsError, match="overwrite=True"):
        ckptr.save(path, {"x": torch.ones(1)})
    assert "model" in ckptr.load(path)  # untouched
    assert backend.files(path) == before
    ckptr.save(path, {"x": torch.ones(1)}, overwrite=True)
    out = ckptr.load(path)
    assert list(out) == ["x"]
    # the replaced checkpoint's files are gone; only the new one's remain
    ids = {f.split("-")[-1].split(".")[0] for f in backend.files(path) if f != MARKER_NAME}
    assert len(ids) == 1 and not set(before) & set(backend.files(path)) - {MARKER_NAME}


def test_directory_with_foreign_files_is_refused(backend):
    notes = backend.path("notes.txt")
    backend.write(notes, b"mine")
    with pytest.raises(ray_ckpt.errors.CheckpointExistsError, match=r"notes\.txt"):
        backend.ckptr.save(backend.root, {"x": torch.ones(1)})
    assert backend.read(notes) == b"mine"
    assert backend.listdir(backend.root) == ["notes.txt"]


def test_closed_checkpointer_refuses(cluster, tmp_path):
    c = ray_ckpt.make_sync_checkpointer()
    c.close()
    with pytest.raises(ray_ckpt.errors.CheckpointerClosedError, match="closed"):
        c.save(str(tmp_path / "c"), {"x": torch.ones(1)})


def test_reads_coalesce_small_neighbours_only_and_never_past_one_slice():
    """Neighbouring small items share a read (through a scratch buffer, then copied out);
    an item larger than a slice is read alone, straight into its tensor."""
    from ray_ckpt.format.manifest import Extent
    from ray_ckpt.load.extents import _SLICE_BYTES, _coalesce, _Piece

    sizes = [1000] * 300 + [4 << 20, 4 << 20, 3000, 3000]
    pieces, offset = [], 64
    for item, size in enumerate(sizes):
        extent = Extent(item, 0, "f.data", offset, size, None, 0)
        pieces.append(_Piece(extent, 0, size, memoryview(bytearray(0)), None))
        offset += (size + 63) // 64 * 64
    reads = _coalesce(pieces)
    assert sorted(p.extent.item for r in reads for p in r.pieces) == list(range(len(sizes)))
    assert all(r.length <= _SLICE_BYTES for r in reads if len(r.pieces) > 1)
    big = [r for r in reads if r.length > _SLICE_BYTES]
    assert [len(r.pieces) for r in big] == [1, 1]
    assert [len(r.pieces) for r in reads] == [300, 1, 1, 2]


# --- partial loads that would load nothing (issue 13, item 13) -------------------------------


def test_a_dict_none_of_whose_keys_exist_fails_even_without_strict(ckptr, tmp_path):
    """Loading another model's state dict, whose keys match none of the checkpoint's, raises
    (naming the closest keys the checkpoint holds) instead of returning with nothing loaded."""
    path = str(tmp_path / "ckpt")
    ckptr.save(path, {"model": tiny_model().state_dict(), "step": 3})
    other = torch.nn.Sequential()
    other.add_module("fc1", torch.nn.Linear(16, 32))
    target = {"model": other.state_dict(), "step": 0}
    with pytest.raises(
        ray_ckpt.errors.MissingKeysError, match=r"none of the 2 key\(s\).*'model'"
    ) as info:
        ckptr.load(path, target, strict=False)
    assert "'fc1.weight' -> '1.weight'" in str(info.value)  # difflib's closest match
    assert info.value.missing_keys == ["model.fc1.weight", "model.fc1.bias"]
    assert target["step"] == 0  # nothing was assigned
    with pytest.raises(ray_ckpt.errors.MissingKeysError, match="at the root"):
        ckptr.load(path, {"mdl": None})
    # a partial match is no mistake: strict=False loads what exists
    assert ckptr.load(path, {"step": 0, "epoch": 1}) == {"step": 3, "epoch": 1}


def test_a_module_given_as_target_is_loaded_into(ckptr, tmp_path):
    path = str(tmp_path / "ckpt")
    model = tiny_model()
    trained(model)
    ckptr.save(path, {"model": model.state_dict()})
    fresh = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )
    target = {"model": fresh}
    out = ckptr.load(path, target, strict=True)
    assert out is target and out["model"] is fresh  # the module, not a dict in its place
    assert_same(fresh.state_dict(), model.state_dict())


def test_an_optimizer_given_as_target_is_loaded_into(ckptr, tmp_path):
    path = str(tmp_path / "ckpt")
    model = tiny_model()
    optimizer = trained(model)
    ckptr.save(path, {"model": model, "optim": optimizer})  # saved as their state dicts
    assert_same(ckptr.load(path)["optim"], optimizer.state_dict())
    fresh_model = tiny_model()
    fresh = torch.optim.Adam(fresh_model.parameters(), lr=1.0)
    assert not fresh.state_dict()["state"]
    ckptr.load(path, {"model": fresh_model, "optim": fresh})
    assert_same(fresh.state_dict(), optimizer.state_dict())
    assert_same(fresh_model.state_dict(), model.state_dict())


def _wrapped(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in a data-parallel wrapper that adds ``module.`` to every name, as DDP does
    (DataParallel: the same prefix without a process group)."""
    return torch.nn.DataParallel(model)


def test_a_wrapped_module_is_saved_under_unwrapped_names_and_loads_both_ways(ckptr, tmp_path):
    path = str(tmp_path / "ckpt")
    model = tiny_model()
    trained(model)
    ckptr.save(path, {"model": _wrapped(model)})
    assert list(ckptr.load(path)["model"]) == list(model.state_dict())  # no "module." prefix
    plain = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )
    ckptr.load(path, {"model": plain}, strict=True)
    assert_same(plain.state_dict(), model.state_dict())
    again = _wrapped(torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ))
    ckptr.load(path, {"model": again}, strict=True)
    assert_same(again.module.state_dict(), model.state_dict())


def test_keys_saved_with_the_module_prefix_load_into_unwrapped_targets_and_back(ckptr, tmp_path):
    """Checkpoints saved from a wrapped model's own state dict (``module.``-prefixed keys, as
    before ray_ckpt unwrapped them) load into an unwrapped model and its state dict; and an
    unwrapped checkpoint loads into a wrapped model's state dict."""
    model = tiny_model()
    trained(model)
    prefixed, plain_path = str(tmp_path / "prefixed"), str(tmp_path / "plain")
    ckptr.save(prefixed, {"model": _wrapped(model).state_dict()})
    ckptr.save(plain_path, {"model": model.state_dict()})
    assert all(k.startswith("module.") for k in ckptr.load(prefixed)["model"])
    for path in (prefixed, plain_path):
        for target_of in (
            lambda m: m, lambda m: m.state_dict(), lambda m: _wrapped(m).state_dict()
        ):
            fresh = torch.nn.Sequential(
                torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(),
                torch.nn.Linear(32, 4),
            )
            ckptr.load(path, {"model": target_of(fresh)}, strict=True)
            assert_same(fresh.state_dict(), model.state_dict())


def test_the_module_prefix_is_not_guessed_when_ambiguous(ckptr, tmp_path):
    """Only a prefix on every key of one side and none of the other is mapped."""
    path = str(tmp_path / "ckpt")
    ckptr.save(path, {"model": {"module.a": torch.ones(1), "b": torch.ones(1)}})
    with pytest.raises(ray_ckpt.errors.MissingKeysError, match="none of the 1 key"):
        ckptr.load(path, {"model": {"a": torch.zeros(1)}})

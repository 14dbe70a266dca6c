"""Round trips through the real path: stager -> object store -> writer actor -> storage -> reader.

Every round trip runs once per storage backend (``local``, ``s3`` on a real S3 server, ``custom``
pyarrow filesystem; see ``backend`` in conftest.py). Values refused before any byte is written
are checked on local disk alone.
"""

from __future__ import annotations

import pytest
import torch

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt import cli
from ray_ckpt.format import tree as _tree
from ray_ckpt.format.names import MARKER_NAME, dtypes

from .helpers import assert_same, nested_state, small_config, tiny_model, trained


@pytest.fixture(scope="module")
def ckptr(cluster):
    with ray_ckpt.make_sync_checkpointer(config=small_config()) as c:
        yield c


def _random_bytes_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random, NaN and denormal patterns included."""
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


SAVEABLE = sorted(n for n, d in dtypes().items() if d.itemsize > 0)


def test_every_dtype_round_trips_bit_for_bit(backend):
    ckptr, path = backend.ckptr, backend.path("c")
    state = {name: _random_bytes_tensor(dtypes()[name], (3, 5)) for name in SAVEABLE}
    state["scalar_bf16"] = torch.tensor(1.5, dtype=torch.bfloat16)
    ckptr.save(path, state)
    loaded = ckptr.load(path)
    assert_same(state, loaded)
    for name in (
        "bfloat16", "float8_e4m3fn", "float8_e5m2", "complex64", "complex128",
        "bool", "uint16", "uint32", "uint64",
    ):
        assert loaded[name].dtype == dtypes()[name]


def test_odd_tensors(backend):
    ckptr, path = backend.ckptr, backend.path("c")
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    state = {
        "zero_d": torch.tensor(3.25),
        "empty": torch.zeros(0, 7),
        "empty_bf16": torch.empty(0, dtype=torch.bfloat16),
        "transposed": base.t(),  # non-contiguous
        "strided": base[::2, 1::3],
        "view_a": base[1],  # views of one storage
        "view_b": base[1:3],
        "conj": torch.tensor([1 + 2j, 3 - 4j]).conj(),
        "neg": torch.tensor([1.0, -2.0])._neg_view(),
        "param": torch.nn.Parameter(torch.ones(3)),
    }
    ckptr.save(path, state)
    loaded = ckptr.load(path)
    for key, value in state.items():
        expected = value.detach().resolve_conj().resolve_neg()
        assert loaded[key].shape == expected.shape, key
        assert torch.equal(loaded[key], expected), key
        assert loaded[key].is_contiguous()


def test_tied_tensors_load_as_one_tensor(backend):
    ckptr, path = backend.ckptr, backend.path("c")
    shared = torch.randn(4, 4)
    ckptr.save(path, {"embed": shared, "head": shared})
    loaded = ckptr.load(path)
    assert loaded["embed"] is loaded["head"]
    assert torch.equal(loaded["embed"], shared)


def test_nested_structures_and_safe_leaves(backend):
    ckptr, path = backend.ckptr, backend.path("c")
    state = nested_state()
    ckptr.save(path, state)
    assert_same(state, ckptr.load(path))


def test_model_and_adam_resume_identically(backend):
    ckptr, path = backend.ckptr, backend.path("c")
    model = tiny_model()
    optimizer = trained(model)
    ckptr.save(path, {"model": model.state_dict(), "optim": optimizer.state_dict()})

    restored = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )
    restored_opt = torch.optim.Adam(restored.parameters(), lr=1e-2)
    # the model's tensors are filled in place; None loads the optimizer's subtree whole (a fresh
    # Adam has no per-parameter state yet to load into)
    target = {"model": restored.state_dict(), "optim": None}
    loaded = ckptr.load(path, target, strict=True)
    restored_opt.load_state_dict(loaded["optim"])

    # continue both for three steps on the same data: identical to the bit
    for i in range(3):
        for m, opt in ((model, optimizer), (restored, restored_opt)):
            torch.manual_seed(1000 + i)
            loss = m(torch.randn(8, 16)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p, q in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same(optimizer.state_dict()["state"], restored_opt.state_dict()["state"])


def test_ten_thousand_small_tensors(backend):
    ckptr, path = backend.ckptr, backend.path("c")
    state = {f"t{i}": torch.full((i % 7 + 1,), float(i)) for i in range(10_000)}
    ckptr.save(path, state)
    # packed: far fewer files than tensors
    assert len(backend.files(path, ".data")) <= 3
    assert_same(state, ckptr.load(path))


def test_large_tensor_is_chunked_across_files(backend):
    ckptr, path = backend.ckptr, backend.path("c")
    big = torch.randn(1_000_000)  # 4 MB with 1 MiB buckets
    ckptr.save(path, {"big": big, "small": torch.ones(3)})
    assert len(backend.files(path, ".data")) >= 4
    assert torch.equal(ckptr.load(path)["big"], big)


def test_empty_state_dict(backend):
    ckptr, path = backend.ckptr, backend.path("c")
    ckptr.save(path, {})
    assert ckptr.load(path) == {}


def test_hostile_keys_never_name_files(backend):
    ckptr, path = backend.ckptr, backend.path("c")
    keys = ["../../escape", "/abs/path", "a/b", "nul\x00byte", "ключ🔑", "..", ".", "", " "]
    state = {k: torch.tensor([i]) for i, k in enumerate(keys)}
    state["nested"] = {"../../../etc/passwd": torch.ones(1)}
    ckptr.save(path, state)
    # nothing was written outside the checkpoint directory, and inside it only our own files
    assert backend.listdir(backend.root) == ["c"]
    for name in backend.listdir(path):
        assert name.startswith(("r00000-", "manifest-", "ray_ckpt.commit")), name
    assert_same(state, ckptr.load(path))


def test_pickle_needs_allow_pickle_on_save_and_on_load(backend):
    ckptr, path = backend.ckptr, backend.path("c")

    class Custom:
        def __init__(self) -> None:
            self.value = 42

    with pytest.raises(
        ray_ckpt.errors.PickleNotAllowedError, match=r"key 'obj'.*allow_pickle=True"
    ):
        ckptr.save(backend.path("refused"), {"obj": Custom()})
    assert not backend.exists(f"{backend.path('refused')}/{MARKER_NAME}")

    ckptr.save(path, {"obj": {1, 2, 3}, "t": torch.ones(2)}, allow_pickle=True)
    with pytest.raises(ray_ckpt.errors.PickleNotAllowedError, match=r"\['obj'\]"):
        ckptr.load(path)
    # tensors can still be loaded without the pickled key, and with allow_pickle all of it
    assert torch.equal(ckptr.load(path, {"t": torch.zeros(2)})["t"], torch.ones(2))
    assert ckptr.load(path, allow_pickle=True)["obj"] == {1, 2, 3}


@pytest.mark.parametrize(
    "value, match",
    [
        (torch.ones(3).to_sparse(), "to_dense"),
        (torch.empty(3, device="meta"), "meta tensor"),
        (torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), "quantized"),
        (lambda x: x, "allow_pickle"),
    ],
    ids=["sparse", "meta", "quantized", "lambda"],
)
def test_unsupported_values_name_the_key(ckptr, tmp_path, value, match):
    with pytest.raises(ray_ckpt.CheckpointError, match=match) as info:
        ckptr.save(str(tmp_path / "c"), {"layer": {"bad": value}})
    assert "layer.bad" in str(info.value)


def test_non_dict_state_dict_is_refused(ckptr, tmp_path):
    with pytest.raises(ray_ckpt.errors.UnsupportedValueError, match="must be a dict"):
        ckptr.save(str(tmp_path / "c"), [torch.ones(1)])  # type: ignore[arg-type]


def _nested(depth: int) -> dict:
    """A state dict of ``depth`` nested containers (the root included), dicts, lists and tuples
    in turn, with a tensor and a plain value at the bottom."""
    value: object = {"w": torch.arange(6.0).reshape(2, 3), "n": 7}
    for level in reversed(range(1, depth - 1)):
        kind = level % 3
        value = {f"k{level}": value} if kind == 0 else [value] if kind == 1 else (value, level)
    return {"root": value}


def _depth(value: object) -> int:
    levels = 0
    while isinstance(value, (dict, list, tuple)):
        levels += 1
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
    return levels


@pytest.mark.parametrize("depth", [330, _tree.MAX_DEPTH])
def test_state_dict_nested_up_to_max_depth_saves_loads_and_inspects(
    ckptr, tmp_path, capsys, depth
):
    """README: state dicts nest "to any depth" up to MAX_DEPTH (512): save, full and partial
    load, inspect and verify all work there, without a RecursionError (issue 13, item 12)."""
    state = _nested(depth)
    assert _depth(state) == depth
    path = str(tmp_path / "deep")
    ckptr.save(path, state)
    assert_same(ckptr.load(path), state)
    target = _nested(depth)
    bottom = target
    while not (isinstance(bottom, dict) and "w" in bottom):
        bottom = next(iter(bottom.values())) if isinstance(bottom, dict) else bottom[0]
    w = bottom["w"] = torch.zeros(2, 3)
    loaded = ckptr.load(path, target, strict=True)
    assert loaded is target and torch.equal(w, torch.arange(6.0).reshape(2, 3))
    assert cli.main(["inspect", path]) == 0
    assert cli.main(["verify", path]) == 0
    assert ".k3." in capsys.readouterr().out  # inspect printed the deep key


def test_state_dict_nested_deeper_than_max_depth_is_refused_naming_the_key(ckptr, tmp_path):
    path = tmp_path / "too-deep"
    with pytest.raises(
        ray_ckpt.errors.UnsupportedValueError, match=r"nesting deeper than 512"
    ) as info:
        ckptr.save(str(path), _nested(_tree.MAX_DEPTH + 1))
    assert str(info.value).startswith("key 'root.0.0.k3.0")  # the key path's prefix
    assert not path.exists() or not any(path.iterdir())

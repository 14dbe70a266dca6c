"""The tools on sharded checkpoints, and import.

One checkpoint saved from 2 ranks (Ray actors, gloo, real DTensors: a Shard(0) weight, a
Replicate bias, a Shard(1) 3-d tensor; the fixture of tests/test_sharding.py) is inspected,
verified, diffed against an unsharded save of the same model, exported to torch and to
sharded safetensors (every tensor consolidated, bit for bit), imported back, and exported
again to the very same bytes. Memory: exports and diffs of a 160 MiB sharded checkpoint, and
imports of 160 MiB files, measured in a subprocess against a full load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.tools
from ray_ckpt import cli
from ray_ckpt.tools._source import _windows, opened, stored_refs

from . import test_sharding
from .helpers import assert_same, flip_byte
from .test_cli import run
from .test_sharding import FULL_SHAPE, _full

saved_on_two = test_sharding.saved_on_two  # the fixture: 2 ranks save DTensors (module scope)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tasks below run on the cluster

MiB = 1 << 20


def _original() -> dict:
    """What the 2 ranks of ``saved_on_two`` saved, as one process holds it."""
    return {"model": {name: _full(name) for name in ("w", "b", "e")}, "step": 3}


def _flat(state: dict) -> dict:
    return {f"model.{name}": tensor for name, tensor in state["model"].items()}


@pytest.fixture(scope="module")
def unsharded(cluster, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("unsharded") / "step-3")
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        ckptr.save(path, _original())
    return path


def _shard_items(path: str, key: str) -> list:
    """(global offset, extents) of each shard of ``key``."""
    manifest = ray_ckpt.CheckpointReader().open(path).manifest
    return sorted(
        (meta.global_offset, manifest.extents[index])
        for index, meta in manifest.items.items() if meta.key == key
    )


# --- inspect ---------------------------------------------------------------------------------


def test_inspect_shows_a_sharded_tensor_as_one_key_with_its_shards(capsys, saved_on_two):
    rc, out, _ = run(capsys, "inspect", "--json", saved_on_two)
    assert rc == 0
    doc = json.loads(out)
    leaves = {leaf["key"]: leaf for leaf in doc["leaves"]}
    assert list(leaves) == ["model.w", "model.b", "model.e", "step"]  # each key once
    w, b, e = leaves["model.w"], leaves["model.b"], leaves["model.e"]
    assert (w["kind"], w["dtype"], w["shape"], w["nbytes"]) == (
        "tensor", "float32", list(FULL_SHAPE), 37 * 12 * 4
    )
    assert [(s["offset"], s["shape"], s["rank"]) for s in w["shards"]] == [
        ([0, 0], [19, 12], 0), ([19, 0], [18, 12], 1)
    ]
    assert [(s["offset"], s["shape"]) for s in e["shards"]] == [
        ([0, 0, 0], [5, 4, 3]), ([0, 4, 0], [5, 3, 3])
    ]
    assert [(s["offset"], s["shape"]) for s in b["shards"]] == [([0], [12])]  # replicated: once
    assert doc["tensor_count"] == 3
    assert doc["tensor_nbytes"] == doc["total_nbytes"] == (37 * 12 + 12 + 5 * 7 * 3) * 4

    rc, out, _ = run(capsys, "inspect", saved_on_two)
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert rows["KEY"][-1] == "SHARDS"
    assert rows["model.w"] == ["model.w", "tensor", "float32", "[37,", "12]", "1.7", "KiB", "2"]
    assert rows["model.e"][-1] == "2" and rows["model.b"][-1] == "1"
    assert f"total: 3 tensors, {cli.human_bytes(doc['total_nbytes'])}, 1 other values" in out


# --- verify ----------------------------------------------------------------------------------


def test_verify_checks_every_shard_and_names_a_damaged_one(saved_on_two, tmp_path):
    info = ray_ckpt.CheckpointReader().open(saved_on_two)
    report = ray_ckpt.tools.verify(saved_on_two)
    assert report.ok, report.problems
    assert report.bytes_checked == info.marker.total_nbytes
    assert report.extents_checked == info.table.num_rows
    assert report.files_checked == len(info.manifest.files) >= 2  # both ranks wrote

    damaged = tmp_path / "damaged"
    shutil.copytree(saved_on_two, damaged)
    (_, second), = [s for s in _shard_items(str(damaged), "model.w") if s[0] == (19, 0)]
    flip_byte(str(damaged / second[0].file), second[0].offset + 5)
    report = ray_ckpt.tools.verify(str(damaged))
    assert [(p.kind, p.key, p.file) for p in report.problems] == [
        ("checksum", "model.w", second[0].file)
    ]
    # every tool that reads the tensor stops there, naming the key; exports leave nothing
    with pytest.raises(ray_ckpt.CorruptCheckpointError, match=r"key 'model\.w': checksum mismatch"):
        ray_ckpt.tools.diff_checkpoints(saved_on_two, str(damaged))
    for to, out in (("torch", tmp_path / "m.pt"), ("safetensors", tmp_path / "hf")):
        with pytest.raises(ray_ckpt.CorruptCheckpointError, match=r"key 'model\.w': checksum"):
            ray_ckpt.tools.export_checkpoint(str(damaged), str(out), to=to)
        assert not out.exists() or not any(out.iterdir())
    # small windows read each shard in pieces: the CRC32C still covers every byte
    with opened(str(damaged), None, None) as source:
        w = source.tensor(next(iter(stored_refs(source.info.tree))))
        with pytest.raises(ray_ckpt.CorruptCheckpointError, match=r"model\.w"):
            for _ in source.chunks(w, window_bytes=40):
                pass


# --- streaming a sharded tensor in C order ------------------------------------------------------


@pytest.mark.parametrize("window_bytes", [4, 40, 100, 1 << 20])
def test_chunks_consolidate_in_c_order_through_any_window(saved_on_two, window_bytes):
    """Windows smaller than a row (40 B < 48 B of a row of w), of a few rows, and whole."""
    with opened(saved_on_two, None, None) as source:
        for ref in stored_refs(source.info.tree):
            tensor = source.tensor(ref)
            parts = [c.clone() for c in source.chunks(tensor, window_bytes)]
            assert all(p.numel() * 4 <= max(window_bytes, 4) for p in parts)
            assert torch.equal(torch.cat(parts).view(tensor.shape), _full(tensor.key[-1]))


def test_windows_tile_a_tensor_in_c_order():
    for shape, window in [((37, 12), 40), ((5, 7, 3), 50), ((4, 6), 1000), ((), 8), ((3, 0), 8)]:
        flat = []
        for offset, size in _windows(shape, 4, window):
            assert 4 * torch.Size(size).numel() <= max(window, 4)
            index = torch.arange(torch.Size(shape).numel()).view(shape)
            box = tuple(slice(o, o + s) for o, s in zip(offset, size))
            flat += index[box].reshape(-1).tolist() if shape else [0]
        assert flat == list(range(torch.Size(shape).numel())), shape


# --- diff ------------------------------------------------------------------------------------


def test_diff_compares_sharded_with_unsharded_by_global_value(
    capsys, cluster, saved_on_two, unsharded, tmp_path
):
    report = ray_ckpt.tools.diff_checkpoints(saved_on_two, unsharded)
    assert report.same and report.unchanged == 4, report
    assert run(capsys, "diff", "--exit-code", unsharded, saved_on_two)[0] == 0

    changed = _original()
    changed["model"]["w"][20, 7] += 1.0  # in rank 1's shard of w
    changed["model"]["e"][2, 5, 1] -= 0.5  # in rank 1's shard of e (Shard(1): columns 4..6)
    other = str(tmp_path / "changed")
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        ckptr.save(other, changed)
    report = ray_ckpt.tools.diff_checkpoints(saved_on_two, other)
    assert {c.key: (c.what, c.numel_changed, c.max_abs_diff) for c in report.changed} == {
        "model.w": ("values", 1, pytest.approx(1.0)), "model.e": ("values", 1, pytest.approx(0.5))
    }
    rc, out, _ = run(capsys, "diff", "--exit-code", saved_on_two, other)
    assert rc == 1 and "0 added, 0 removed, 2 changed, 2 unchanged" in out


# --- export, import, export again ----------------------------------------------------------------


def test_export_torch_consolidates_and_imports_back(capsys, cluster, saved_on_two, tmp_path):
    out = tmp_path / "model.pt"
    rc, text, _ = run(capsys, "export", saved_on_two, "--to", "torch", str(out))
    assert rc == 0 and "exported 3 tensors" in text
    assert_same(_original(), torch.load(out, weights_only=True))
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None  # the CRC-32 of every consolidated record is right

    imported = str(tmp_path / "imported")
    rc, text, _ = run(capsys, "import", str(out), imported)
    assert rc == 0 and f"imported 3 tensors ({cli.human_bytes(1776 + 48 + 420)})" in text
    assert f"from {out} (torch, 1 file(s)) to {imported}" in text
    assert_same(_original(), ray_ckpt.CheckpointReader().read(imported)[0])
    assert ray_ckpt.tools.verify(imported).ok
    entry, = ray_ckpt.list_checkpoints(str(tmp_path))
    assert entry.metadata["imported_from"] == {"source": str(out), "format": "torch"}


def test_export_safetensors_shards_import_and_export_again_to_the_same_bytes(
    cluster, saved_on_two, tmp_path
):
    from safetensors import safe_open

    first = tmp_path / "hf"
    result = ray_ckpt.tools.export_checkpoint(saved_on_two, str(first), max_shard_bytes=400)
    assert result.skipped == ["step"]
    files = sorted(os.listdir(first))
    assert files == [*(f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)),
                     "model.safetensors.index.json"]
    exported = {}
    for name in files[:-1]:
        with safe_open(first / name, framework="pt") as f:
            exported.update({key: f.get_tensor(key) for key in f.keys()})
    assert_same(dict(sorted(_flat(_original()).items())), dict(sorted(exported.items())))

    imported = str(tmp_path / "imported")
    result = ray_ckpt.tools.import_checkpoint(str(first), imported)
    assert (result.format, result.tensors, len(result.files)) == ("safetensors", 3, 3)
    assert_same(_flat(_original()), ray_ckpt.CheckpointReader().read(imported)[0])

    second = tmp_path / "hf2"
    ray_ckpt.tools.export_checkpoint(imported, str(second), max_shard_bytes=400)
    assert sorted(os.listdir(second)) == files
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    # the single file and the index file itself are sources too; under= nests the state
    single = tmp_path / "single"
    ray_ckpt.tools.export_checkpoint(saved_on_two, str(single), only="model")
    nested = str(tmp_path / "nested")
    ray_ckpt.tools.import_checkpoint(str(single / "model.safetensors"), nested, under="model")
    assert_same({"model": _original()["model"]}, ray_ckpt.CheckpointReader().read(nested)[0])
    again = str(tmp_path / "again")
    ray_ckpt.tools.import_checkpoint(str(first / "model.safetensors.index.json"), again)
    assert_same(_flat(_original()), ray_ckpt.CheckpointReader().read(again)[0])


# --- import: what it refuses -------------------------------------------------------------------


class _Planted:
    """Unpickling it would create a file: it must never happen."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_import_refuses_arbitrary_objects_without_running_them(tmp_path):
    planted = tmp_path / "planted"
    source = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": _Planted(str(planted))}, source)
    with pytest.raises(ray_ckpt.CheckpointError, match="never unpickles arbitrary objects") as e:
        ray_ckpt.tools.import_checkpoint(str(source), str(tmp_path / "out"))
    assert str(source) in str(e.value) and "open" in str(e.value)
    assert not planted.exists() and not (tmp_path / "out").exists()


def test_import_names_what_is_wrong_with_a_source(capsys, tmp_path):
    rc, _, err = run(capsys, "import", str(tmp_path / "none.pt"), str(tmp_path / "out"))
    assert rc == 1 and "nothing to import at" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "import", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert rc == 1 and "without model.safetensors.index.json or model.safetensors" in err
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    ))
    rc, _, err = run(capsys, "import", str(hf), str(tmp_path / "out"))
    assert rc == 1 and "maps tensor 'a' to model-00001-of-00002.safetensors, which is not" in err
    torch.save(torch.ones(3), tmp_path / "bare.pt")
    rc, _, err = run(capsys, "import", str(tmp_path / "bare.pt"), str(tmp_path / "out"))
    assert rc == 1 and "holds a Tensor, not a dict" in err and "--under model" in err
    (tmp_path / "junk.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json at all")
    rc, _, err = run(capsys, "import", str(tmp_path / "junk.safetensors"), str(tmp_path / "out"))
    assert rc == 1 and "junk.safetensors is not a valid safetensors file" in err
    rc, _, err = run(capsys, "import", "s3://bucket/model.pt", str(tmp_path / "out"))
    assert rc == 2 and "import reads a local path" in err
    assert not (tmp_path / "out").exists()


def test_import_of_a_legacy_torch_file_and_of_a_bare_tensor_under_a_key(cluster, tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save(_original(), legacy, _use_new_zipfile_serialization=False)
    ray_ckpt.tools.import_checkpoint(str(legacy), str(tmp_path / "a"))
    assert_same(_original(), ray_ckpt.CheckpointReader().read(str(tmp_path / "a"))[0])
    torch.save(torch.arange(5), tmp_path / "bare.pt")
    ray_ckpt.tools.import_checkpoint(str(tmp_path / "bare.pt"), str(tmp_path / "b"), under="x")
    assert_same({"x": torch.arange(5)}, ray_ckpt.CheckpointReader().read(str(tmp_path / "b"))[0])


# --- memory stays bounded ----------------------------------------------------------------------

ROWS, COLS, LAYERS = 512, 8192, 10  # 10 tensors of 16 MiB, each split by columns over 2 ranks


def _layer(i: int, rows: int, cols: int) -> torch.Tensor:
    return torch.arange(rows * cols, dtype=torch.float32).view(rows, cols) + i


@ray.remote(num_cpus=0)
def _save_column_shards(path: str, rank: int, rows: int, cols: int) -> None:
    half = cols // 2
    state = {
        f"layer{i}": ray_ckpt.ShardedTensor(
            _layer(i, rows, cols)[:, rank * half:(rank + 1) * half].contiguous(),
            (rows, cols), (0, rank * half),
        )
        for i in range(LAYERS)
    }
    with ray_ckpt.make_sync_checkpointer(rank_info=ray_ckpt.RankInfo(rank, 2)) as ckptr:
        ckptr.save(path, state)


# Each command runs twice in one process: on the tiny checkpoint (imports, allocator warm-up),
# then, after resetting the peak-RSS mark (Linux: clear_refs 5), on the big one; prints how far
# the peak rose above the resident size before. "load PATH" is a full load, the control.
_GROWTH = r"""
import re, sys
import ray_ckpt
import ray_ckpt.tools
from ray_ckpt.cli import main

def mib(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

def run(argv):
    if argv[0] == "load":
        ray_ckpt.CheckpointReader().read(argv[1])
    else:
        assert main(argv) == 0, argv

for pair in sys.argv[1:]:
    tiny, big = (p.split("|") for p in pair.split("||"))
    run(tiny)
    before = mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run(big)
    print("GROWTH_MIB", big[0], mib("VmHWM") - before)
"""

# Imports peak in anonymous memory, sampled every millisecond: the mapped source files and the
# shared memory of Ray's object store are not the process's own copies. "naive" reads the
# safetensors file into memory (safetensors.torch.load_file maps it: the tensors are cloned)
# and saves that: the control.
_IMPORT_GROWTH = r"""
import re, sys, threading, time
import ray_ckpt
import ray_ckpt.tools

def anon_mib():
    return int(re.search(r"RssAnon:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

def run(src, dest):
    if src.startswith("naive:"):
        from safetensors.torch import load_file
        with ray_ckpt.make_sync_checkpointer() as ckptr:
            state = {k: v.clone() for k, v in load_file(src[6:] + "/model.safetensors").items()}
            ckptr.save(dest, state)
    else:
        ray_ckpt.tools.import_checkpoint(src, dest)

for pair in sys.argv[1:]:
    (tiny_src, tiny_dest), (big_src, big_dest) = (p.split("|") for p in pair.split("||"))
    run(tiny_src, tiny_dest)
    before = peak = anon_mib()
    done = False
    def sample():
        global peak
        while not done:
            peak = max(peak, anon_mib())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    run(big_src, big_dest)
    done = True
    sampler.join()
    print("GROWTH_MIB", big_src, peak - before)
"""


def _growths(
    script: str, pairs: list[tuple[list[str], list[str]]], env: dict | None = None
) -> list[float]:
    result = subprocess.run(
        [sys.executable, "-c", script, *("|".join(t) + "||" + "|".join(b) for t, b in pairs)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [float(m) for m in re.findall(r"^GROWTH_MIB \S+ (\S+)$", result.stdout, re.M)]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux procfs")
def test_export_diff_and_import_memory_does_not_grow_with_the_checkpoint(cluster, tmp_path):
    """A 160 MiB checkpoint of 10 tensors, each in 2 column shards (every window of every tensor
    gathers strided pieces): export, diff and import rise by far less than the checkpoint, a
    full load (and a naive import) by all of it."""
    for name, rows, cols in (("big", ROWS, COLS), ("tiny", 4, 8)):
        ray.get([_save_column_shards.remote(str(tmp_path / name), r, rows, cols)
                 for r in range(2)], timeout=300)
    argv = {
        "torch": lambda n: ["export", "-q", str(tmp_path / n), "--to", "torch",
                            str(tmp_path / f"{n}.pt")],
        "safetensors": lambda n: ["export", "-q", str(tmp_path / n), "--to", "safetensors",
                                  str(tmp_path / f"{n}-st")],
        "diff": lambda n: ["diff", str(tmp_path / n), str(tmp_path / n)],
        "load": lambda n: ["load", str(tmp_path / n)],
    }
    growth = dict(zip(argv, _growths(_GROWTH, [(f("tiny"), f("big")) for f in argv.values()])))
    # one 16 MiB window (+ one 8 MiB shard piece), per side for diff, plus allocator slack
    bounds_mib = {"torch": 40, "safetensors": 40, "diff": 72}
    for command, bound in bounds_mib.items():
        assert growth[command] < bound, f"{command}: +{growth[command]:.0f} MiB ({growth})"
    assert growth["load"] > 150, growth  # the control: the measurement sees a whole copy
    full = _layer(7, ROWS, COLS)
    assert torch.equal(torch.load(tmp_path / "big.pt", mmap=True)["layer7"], full)
    from safetensors import safe_open

    with safe_open(tmp_path / "big-st" / "model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("layer7"), full)

    pairs = [
        ([str(tmp_path / "tiny-st"), str(tmp_path / "i-tiny-st")],
         [str(tmp_path / "big-st"), str(tmp_path / "i-big-st")]),
        ([str(tmp_path / "tiny.pt"), str(tmp_path / "i-tiny.pt")],
         [str(tmp_path / "big.pt"), str(tmp_path / "i-big.pt")]),
        ([f"naive:{tmp_path / 'tiny-st'}", str(tmp_path / "n-tiny")],
         [f"naive:{tmp_path / 'big-st'}", str(tmp_path / "n-big")]),
    ]
    safetensors_growth, torch_growth, naive_growth = _growths(
        _IMPORT_GROWTH, pairs, env={"RAY_ADDRESS": cluster.cluster.address}
    )
    growth = {"safetensors": safetensors_growth, "torch": torch_growth, "naive": naive_growth}
    assert safetensors_growth < 48 and torch_growth < 48, growth
    assert naive_growth > 150, growth  # the control: the sampling sees a whole copy
    imported = ray_ckpt.CheckpointReader().read(str(tmp_path / "i-big-st"), {"layer7": full * 0})
    assert torch.equal(imported[0]["layer7"], full)

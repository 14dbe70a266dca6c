"""The ``ray-ckpt`` CLI and the tools under it (inspect, verify, ls, diff, export, bench) on
real checkpoints: good ones, damaged ones, and bad arguments.

Most tests call ``ray_ckpt.cli.main`` in-process and read what it printed; a few run the real
console script to check exit statuses and that memory stays bounded as checkpoints grow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.tools
from ray_ckpt import cli

from .helpers import assert_same, flip_byte, manifest_file, small_config

MiB = 1 << 20

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tasks below run on the cluster


@pytest.fixture(scope="module")
def ckptr(cluster):
    with ray_ckpt.make_sync_checkpointer(config=small_config()) as c:
        yield c


def _state(step: int) -> dict:
    torch.manual_seed(0)
    w = torch.arange(300 * 300, dtype=torch.float32).reshape(300, 300)
    return {
        "model": {
            "w": w,
            "b": torch.zeros(300),
            "emb": torch.randn(500, 200),
            "head": torch.randn(800, 500),  # larger than a 1 MiB bucket: chunked over files
            "half": torch.ones(64, dtype=torch.bfloat16),
        },
        "optim": {"state": {0: {"exp_avg": torch.full((300,), 0.5)}}, "lr": 0.1},
        "step": step,
    }


@pytest.fixture(scope="module")
def run_root(ckptr, tmp_path_factory) -> Path:
    """step-000001 and step-000002 (w changed at 3 elements, bias gone, a new key, step 2),
    and an incomplete step-000003."""
    root = tmp_path_factory.mktemp("run")
    ckptr.save(str(root / "step-000001"), _state(1))
    second = _state(2)
    second["model"]["w"][0, :3] += torch.tensor([1.0, 2.0, -0.5])
    del second["model"]["b"]
    second["model"]["new"] = torch.ones(3, dtype=torch.int64)
    ckptr.save(str(root / "step-000002"), second)
    incomplete = root / "step-000003"
    incomplete.mkdir()
    data = sorted((root / "step-000001").glob("*.data"))[0]
    shutil.copy(data, incomplete / data.name)
    return root


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _extents(path: str) -> dict[str, list]:
    """key -> its extents, from the manifest (through the reader)."""
    manifest = ray_ckpt.CheckpointReader().open(path).manifest
    return {manifest.items[i].key: exts for i, exts in manifest.extents.items()}


# --- inspect ---------------------------------------------------------------------------------


def test_inspect_prints_every_key_with_dtype_shape_size_and_totals(capsys, run_root):
    rc, out, _ = run(capsys, "inspect", str(run_root / "step-000001"))
    assert rc == 0
    lines = out.splitlines()
    row = next(line.split() for line in lines if line.startswith("model.w "))
    assert row[:3] == ["model.w", "tensor", "float32"] and row[3:5] == ["[300,", "300]"]
    assert " ".join(row[5:]) == "351.6 KiB"  # 300*300*4 bytes
    half = next(line.split() for line in lines if line.startswith("model.half "))
    assert half[1:3] == ["tensor", "bfloat16"] and half[-2:] == ["128", "B"]
    assert next(line.split() for line in lines if line.startswith("step "))[1:4] == [
        "value", "int", "1"
    ]
    assert any(line.startswith("optim.state.0.exp_avg ") for line in lines)
    total = 300 * 300 * 4 + 300 * 4 + 500 * 200 * 4 + 800 * 500 * 4 + 64 * 2 + 300 * 4
    assert f"total: 6 tensors, {cli.human_bytes(total)}, 2 other values" in out


def test_inspect_json_agrees_with_the_manifest(capsys, run_root):
    path = str(run_root / "step-000001")
    rc, out, _ = run(capsys, "inspect", "--json", path)
    assert rc == 0
    doc = json.loads(out)
    info = ray_ckpt.CheckpointReader().open(path)
    tensors = {leaf["key"]: leaf for leaf in doc["leaves"] if leaf["kind"] == "tensor"}
    assert set(tensors) == {m.key for m in info.manifest.items.values()}
    assert tensors["model.emb"]["shape"] == [500, 200]
    assert tensors["model.emb"]["nbytes"] == 500 * 200 * 4
    assert doc["total_nbytes"] == info.marker.total_nbytes == sum(
        leaf["nbytes"] for leaf in tensors.values()
    )
    assert doc["checkpoint_id"] == info.marker.checkpoint_id
    assert {leaf["key"]: leaf["value"] for leaf in doc["leaves"] if leaf["kind"] == "value"} == {
        "optim.lr": "0.1", "step": "1"
    }


# --- verify ----------------------------------------------------------------------------------


@pytest.fixture
def copy_of(run_root, tmp_path):
    def copy(name: str = "step-000001") -> Path:
        target = tmp_path / name
        shutil.copytree(run_root / name, target)
        return target

    return copy


def test_verify_passes_an_intact_checkpoint(capsys, run_root):
    path = str(run_root / "step-000001")
    rc, out, _ = run(capsys, "verify", path)
    assert rc == 0
    info = ray_ckpt.CheckpointReader().open(path)
    assert out.startswith(f"OK {path}: {len(info.manifest.files)} data files")
    assert f"{cli.human_bytes(info.marker.total_nbytes)} checked" in out
    rc, out, err = run(capsys, "verify", "--quiet", path)
    assert (rc, out, err) == (0, "", "")


def test_verify_names_every_damaged_missing_and_truncated_file(capsys, copy_of):
    path = copy_of()
    first_key_in: dict[str, tuple[str, object]] = {}
    for key, extents in _extents(str(path)).items():
        for extent in extents:
            first_key_in.setdefault(extent.file, (key, extent))
    assert len(first_key_in) >= 3
    (file_a, (key_a, ext_a)), (file_b, (key_b, ext_b)), (file_c, _) = sorted(
        first_key_in.items()
    )[:3]
    flip_byte(str(path / file_a), ext_a.offset + ext_a.length // 2)
    flip_byte(str(path / file_b), ext_b.offset)
    (path / file_c).unlink()

    rc, out, _ = run(capsys, "verify", str(path))
    assert rc == 1
    assert out.startswith(f"FAILED {path}: 3 problems")
    assert f"[checksum] key {key_a!r}: checksum mismatch in {path}/{file_a}" in out
    assert f"[checksum] key {key_b!r}: checksum mismatch in {path}/{file_b}" in out
    assert f"[missing-file] data file {path}/{file_c} is missing" in out

    report = ray_ckpt.tools.verify(str(path))
    assert not report.ok
    assert sorted((p.kind, p.file) for p in report.problems) == sorted(
        [("checksum", file_a), ("checksum", file_b), ("missing-file", file_c)]
    )
    assert [p.key for p in report.problems if p.file in (file_a, file_b)] == [key_a, key_b]


def test_verify_reports_a_truncated_file_and_still_checks_the_rest(copy_of):
    path = copy_of()
    extents = _extents(str(path))
    emb = extents["model.emb"][0]
    with open(path / emb.file, "r+b") as f:
        f.truncate(emb.offset + 100)
    report = ray_ckpt.tools.verify(str(path))
    assert [(p.kind, p.file) for p in report.problems] == [("truncated", emb.file)]
    assert "model.emb" in report.problems[0].message
    assert report.files_checked == len({e.file for x in extents.values() for e in x}) - 1


def test_verify_reports_a_missing_marker_manifest_or_path(capsys, copy_of, tmp_path):
    no_marker = copy_of()
    (no_marker / "ray_ckpt.commit").unlink()
    rc, out, _ = run(capsys, "verify", str(no_marker))
    assert rc == 1 and "[incomplete]" in out and "no commit marker" in out

    no_manifest = copy_of("step-000002")
    (no_manifest / manifest_file(str(no_manifest))).unlink()
    rc, out, _ = run(capsys, "verify", str(no_manifest))
    assert rc == 1 and "[manifest]" in out and "manifest" in out and "missing" in out

    rc, out, _ = run(capsys, "verify", str(tmp_path / "nowhere"))
    assert rc == 1 and "[not-found]" in out and str(tmp_path / "nowhere") in out


def test_verify_streams_through_a_small_buffer_and_still_finds_one_flipped_byte(copy_of):
    path = copy_of()
    emb = _extents(str(path))["model.emb"][0]
    assert ray_ckpt.tools.verify(str(path), chunk_bytes=4096).ok
    flip_byte(str(path / emb.file), emb.offset + emb.length - 1)  # in the extent's last chunk
    report = ray_ckpt.tools.verify(str(path), chunk_bytes=4096)
    assert [(p.kind, p.key) for p in report.problems] == [("checksum", "model.emb")]


# --- ls --------------------------------------------------------------------------------------


def test_ls_lists_steps_state_and_size(capsys, run_root):
    rc, out, _ = run(capsys, "ls", str(run_root))
    assert rc == 0
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:4] == ["NAME", "STEP", "STATE", "SIZE"]
    assert [r[:3] for r in rows[1:]] == [
        ["step-000001", "1", "committed"],
        ["step-000002", "2", "committed"],
        ["step-000003", "3", "incomplete"],
    ]
    rc, out, _ = run(capsys, "ls", "--json", str(run_root))
    entries = json.loads(out)
    marker = ray_ckpt.CheckpointReader().open(str(run_root / "step-000001")).marker
    assert entries[0]["nbytes"] == marker.total_nbytes
    assert entries[0]["created_unix"] == marker.created_unix
    assert [e["committed"] for e in entries] == [True, True, False]


def test_ls_of_a_missing_root_fails(capsys, tmp_path):
    rc, out, err = run(capsys, "ls", str(tmp_path / "none"))
    assert rc == 1 and out == ""
    assert f"ray-ckpt ls: error: no such directory: {tmp_path / 'none'}" in err


# --- diff ------------------------------------------------------------------------------------


def test_diff_lists_added_removed_and_changed_keys_with_max_abs_difference(capsys, run_root):
    a, b = str(run_root / "step-000001"), str(run_root / "step-000002")
    rc, out, _ = run(capsys, "diff", "--json", a, b)
    assert rc == 0
    doc = json.loads(out)
    assert doc["added"] == ["model.new"] and doc["removed"] == ["model.b"]
    changed = {c["key"]: c for c in doc["changed"]}
    assert set(changed) == {"model.w", "step"}
    assert changed["model.w"]["numel_changed"] == 3
    assert changed["model.w"]["max_abs_diff"] == 2.0
    assert changed["step"]["detail"] == "1 -> 2"
    assert doc["unchanged"] == 5  # emb, head, half, exp_avg, lr

    rc, out, _ = run(capsys, "diff", a, b)
    assert "- model.b" in out and "+ model.new" in out
    assert next(line.split() for line in out.splitlines() if "model.w" in line) == [
        "~", "model.w", "values", "3", "2"
    ]
    assert "1 added, 1 removed, 2 changed, 5 unchanged" in out
    assert run(capsys, "diff", "--exit-code", a, b)[0] == 1
    rc, out, _ = run(capsys, "diff", "--exit-code", a, a)
    assert rc == 0 and "0 added, 0 removed, 0 changed" in out


def test_diff_reports_dtype_and_shape_changes_and_nan(ckptr, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ckptr.save(a, {"x": torch.zeros(4), "y": torch.zeros(2, 2), "z": torch.tensor([1.0, 2.0])})
    ckptr.save(b, {"x": torch.zeros(4, dtype=torch.float64), "y": torch.zeros(4),
                   "z": torch.tensor([1.0, float("nan")])})
    report = ray_ckpt.tools.diff_checkpoints(a, b)
    changed = {c.key: c for c in report.changed}
    assert changed["x"].what == "dtype" and changed["x"].detail == "float32 -> float64"
    assert changed["y"].what == "shape" and changed["y"].detail == "[2, 2] -> [4]"
    assert changed["z"].numel_changed == 1 and np.isnan(changed["z"].max_abs_diff)


# --- export ----------------------------------------------------------------------------------


def test_export_torch_loads_back_identical_with_ties_and_a_valid_zip(capsys, ckptr, tmp_path):
    shared = torch.randn(40, 40)
    state = {"model": {"w": shared, "tied": shared, "b": torch.arange(7, dtype=torch.int16)},
             "opt": [torch.ones(3, dtype=torch.bfloat16), {"lr": 0.5}], "step": 9,
             "empty": torch.zeros(0), "scalar": torch.tensor(3.5)}
    path = str(tmp_path / "ckpt")
    ckptr.save(path, state)
    out = tmp_path / "model.pt"
    rc, text, _ = run(capsys, "export", path, "--to", "torch", str(out))
    assert rc == 0 and f"to {out} as torch" in text
    loaded = torch.load(out, weights_only=True)
    assert_same(state, loaded)
    assert loaded["model"]["w"].data_ptr() == loaded["model"]["tied"].data_ptr()
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None  # every record's CRC-32 is right
    assert_same(state, torch.load(out, weights_only=True, mmap=True))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "model.pt"]  # no temporary left

    rc, _, err = run(capsys, "export", path, "--to", "torch", str(out))
    assert rc == 1 and "already exists" in err and "--overwrite" in err
    assert run(capsys, "export", path, "--to", "torch", str(out), "--overwrite")[0] == 0


def test_export_torch_keeps_arrays_and_refuses_pickles_unless_allowed(capsys, ckptr, tmp_path):
    path = str(tmp_path / "ckpt")
    state = {"a": np.arange(6, dtype=np.int32).reshape(2, 3), "obj": {1, 2, 3},
             "t": torch.ones(2)}
    ckptr.save(path, state, allow_pickle=True)
    out = str(tmp_path / "x.pt")
    rc, _, err = run(capsys, "export", path, "--to", "torch", out)
    assert rc == 1 and "pickled" in err and "'obj'" in err and "--allow-pickle" in err
    assert not os.path.exists(out)
    assert run(capsys, "export", path, "--to", "torch", out, "--allow-pickle")[0] == 0
    assert_same(state, torch.load(out, weights_only=False))


def test_export_safetensors_single_file_with_only_and_skipped_values(capsys, run_root, tmp_path):
    from safetensors.torch import load_file

    path = str(run_root / "step-000001")
    out = tmp_path / "hf"
    rc, text, _ = run(capsys, "export", path, "--to", "safetensors", "--only", "model", str(out))
    assert rc == 0
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    tensors = load_file(out / "model.safetensors")
    assert_same(dict(sorted(tensors.items())), dict(sorted(_state(1)["model"].items())))

    rc, text, _ = run(capsys, "export", path, "--to", "safetensors", str(tmp_path / "all"))
    assert "skipped 2 non-tensor values (optim.lr, step)" in text
    assert set(load_file(tmp_path / "all" / "model.safetensors")) == {
        "model.w", "model.b", "model.emb", "model.head", "model.half", "optim.state.0.exp_avg"
    }


def test_export_safetensors_shards_with_an_index(capsys, run_root, tmp_path):
    from safetensors import safe_open

    path = str(run_root / "step-000001")
    out = tmp_path / "hf"
    rc, _, _ = run(capsys, "export", path, "--to", "safetensors", str(out),
                   "--max-shard-size", "400KB")
    assert rc == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(os.listdir(out)) == sorted([*shards, "model.safetensors.index.json"])
    expected = {"model." + k: v for k, v in _state(1)["model"].items()}
    expected["optim.state.0.exp_avg"] = _state(1)["optim"]["state"][0]["exp_avg"]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    seen = {}
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            names = list(f.keys())
            assert sum(f.get_tensor(n).nbytes for n in names) <= 400_000 or len(names) == 1
            seen.update({n: f.get_tensor(n) for n in names})
            assert all(index["weight_map"][n] == shard for n in names)
    assert_same(dict(sorted(seen.items())), dict(sorted(expected.items())))

    # re-export as one file: refused without --overwrite, and the old shards go with it
    rc, _, err = run(capsys, "export", path, "--to", "safetensors", str(out))
    assert rc == 1 and "--overwrite" in err
    assert run(capsys, "export", path, "--to", "safetensors", str(out), "--overwrite")[0] == 0
    assert os.listdir(out) == ["model.safetensors"]


def test_export_refuses_what_safetensors_cannot_hold(capsys, ckptr, tmp_path):
    path = str(tmp_path / "ckpt")
    ckptr.save(path, {"ok": torch.ones(2), "z": torch.ones(2, dtype=torch.complex128)})
    rc, _, err = run(capsys, "export", path, "--to", "safetensors", str(tmp_path / "out"))
    assert rc == 1 and "key 'z' is torch.complex128" in err
    assert not (tmp_path / "out").exists()
    rc, _, err = run(capsys, "export", path, "--to", "safetensors", "--only", "nope",
                     str(tmp_path / "out"))
    assert rc == 1 and "no key 'nope'" in err


def test_export_stops_at_a_damaged_extent_and_leaves_nothing(capsys, copy_of, tmp_path):
    path = copy_of()
    emb = _extents(str(path))["model.emb"][0]
    flip_byte(str(path / emb.file), emb.offset + 3)
    for to, out in (("torch", tmp_path / "m.pt"), ("safetensors", tmp_path / "hf")):
        rc, _, err = run(capsys, "export", str(path), "--to", to, str(out))
        assert rc == 1 and "key 'model.emb': checksum mismatch" in err
        assert not out.exists() or not any(out.iterdir())
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


# --- multi-rank checkpoints ---------------------------------------------------------------------


@ray.remote(num_cpus=0)
def _save_as_rank(path: str, rank: int, world: int) -> None:
    config = ray_ckpt.CheckpointerConfig(
        staging_config=ray_ckpt.CheckpointStagerConfig(rank_local_keys=("rng",))
    )
    state = {"model": {"w": torch.arange(6.0)}, "rng": torch.full((4,), float(rank))}
    with ray_ckpt.make_sync_checkpointer(config, rank_info=ray_ckpt.RankInfo(rank, world)) as c:
        c.save(path, state)


def test_rank_option_shows_and_exports_one_ranks_view(capsys, cluster, tmp_path):
    path = str(tmp_path / "two-ranks")
    ray.get([_save_as_rank.remote(path, rank, 2) for rank in range(2)], timeout=120)
    rc, out, _ = run(capsys, "inspect", "--rank", "1", path)
    assert rc == 0 and "world size 2 (rank 1's view)" in out
    for rank in (0, 1):
        out_file = tmp_path / f"rank{rank}.pt"
        rc, _, _ = run(capsys, "export", path, "--to", "torch", "--rank", str(rank), str(out_file))
        assert rc == 0
        exported = torch.load(out_file, weights_only=True)
        assert torch.equal(exported["rng"], torch.full((4,), float(rank)))
        assert torch.equal(exported["model"]["w"], torch.arange(6.0))
    rc, _, err = run(capsys, "inspect", "--rank", "2", path)
    assert rc == 1 and "saved by 2 rank(s); rank 2 is not one of them" in err
    report = ray_ckpt.tools.verify(path)  # every rank's files
    files = ray_ckpt.CheckpointReader().open(path).manifest.files
    assert report.ok and report.files_checked == len(files) >= 2


# --- errors, help, progress, bench -------------------------------------------------------------


def test_errors_are_one_line_with_exit_status_1_or_2(capsys, run_root, tmp_path):
    rc, out, err = run(capsys, "inspect", str(tmp_path / "missing"))
    assert rc == 1 and out == ""
    assert err.strip() == (
        f"ray-ckpt inspect: error: no checkpoint at {tmp_path / 'missing'}: the path does not "
        "exist"
    )
    rc, _, err = run(capsys, "inspect", str(run_root / "step-000003"))
    assert rc == 1 and "incomplete checkpoint" in err and "Traceback" not in err
    rc, _, err = run(capsys, "export", str(run_root / "step-000001"), "--to", "torch",
                     "s3://bucket/model.pt")
    assert rc == 2 and "export writes to a local path" in err
    rc, _, err = run(capsys, "export", "x", "--to", "safetensors", "--max-shard-size", "5XB", "o")
    assert rc == 2 and "'5XB' is not a size" in err
    assert run(capsys, "frobnicate")[0] == 2


def test_every_command_has_help_with_an_example(capsys):
    for command in ("inspect", "verify", "ls", "diff", "export", "import", "demo", "bench"):
        rc, out, _ = run(capsys, command, "--help")
        assert rc == 0 and "examples:\n  ray-ckpt " + command in out, command


def test_parse_size_and_human_bytes():
    assert cli.parse_size("5GB") == 5 * 10**9
    assert cli.parse_size("2 MiB") == 2 * MiB
    assert cli.parse_size("123") == 123
    assert cli.human_bytes(1536) == "1.5 KiB" and cli.human_bytes(10) == "10 B"


def test_progress_bar_only_on_a_terminal(capsys, monkeypatch, run_root):
    path = str(run_root / "step-000001")
    monkeypatch.setattr(cli.output, "PROGRESS_DELAY_SECS", 0.0)
    rc, _, err = run(capsys, "verify", path)
    assert rc == 0 and "\r" not in err  # captured output is not a terminal

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    rc, _, err = run(capsys, "verify", path)
    assert rc == 0 and "\rverify  [" in err and "100%" in err and err.endswith("\r\033[K")
    rc, _, err = run(capsys, "verify", "--quiet", path)
    assert rc == 0 and err == ""


def test_bench_runs_the_checkouts_benchmarks_or_says_they_are_missing(
    capsys, monkeypatch, tmp_path
):
    monkeypatch.setattr(cli.commands, "source_checkout", lambda: tmp_path)
    rc, _, err = run(capsys, "bench")
    assert rc == 1 and "run it from a source checkout" in err

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "bench.py").write_text(
        "import sys\nprint('BENCH', sys.argv[1:])\nsys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from ray_ckpt import cli; "
         f"cli.commands.source_checkout = lambda: __import__('pathlib').Path({str(tmp_path)!r}); "
         "sys.exit(cli.main(['bench', '--', '--quick', '--size', '1GB']))"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 3, result.stderr
    assert "BENCH ['--quick', '--size', '1GB']" in result.stdout


def test_console_script_exit_statuses(run_root, copy_of):
    script = Path(sys.executable).with_name("ray-ckpt")
    assert script.exists(), "pip install -e . registers the ray-ckpt console script"
    good = subprocess.run([script, "verify", str(run_root / "step-000001")],
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and good.stdout.startswith("OK "), good.stderr
    bad = copy_of()
    emb = _extents(str(bad))["model.emb"][0]
    flip_byte(str(bad / emb.file), emb.offset)
    result = subprocess.run([script, "verify", "-q", str(bad)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "key 'model.emb'" in result.stdout
    result = subprocess.run([sys.executable, "-m", "ray_ckpt", "ls"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "the following arguments are required: ROOT" in result.stderr


# --- memory stays bounded ----------------------------------------------------------------------

# Runs a command twice in one process: on a tiny checkpoint (imports, allocator warm-up), then,
# after resetting the peak-RSS mark (Linux: clear_refs 5), on a big one; prints how far the peak
# rose above the resident size before the big run. "load PATH" is a full load, the control.
_GROWTH = r"""
import re, sys
import ray_ckpt
import ray_ckpt.tools
from ray_ckpt.cli import main

def mib(field):
    status = open("/proc/self/status").read()
    return int(re.search(field + r":\s+(\d+) kB", status).group(1)) / 1024

def run(argv):
    if argv[0] == "load":
        ray_ckpt.CheckpointReader().read(argv[1])
    else:
        assert main(argv) == 0

run(sys.argv[1].split("|"))
before = mib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
run(sys.argv[2].split("|"))
print("GROWTH_MIB", mib("VmHWM") - before)
"""


def _growth_mib(tiny: list[str], big: list[str]) -> float:
    result = subprocess.run(
        [sys.executable, "-c", _GROWTH, "|".join(tiny), "|".join(big)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("GROWTH_MIB"))
    return float(line.split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux procfs")
def test_verify_diff_and_export_memory_does_not_grow_with_the_checkpoint(ckptr, tmp_path):
    """How far each command's peak RSS rises while it works on a 160 MiB checkpoint stays far
    below the checkpoint's size (a full load rises by all of it: checked as a control)."""
    big = {f"layer{i}": torch.full((2 * MiB,), float(i)) for i in range(20)}  # 20 x 8 MiB
    tiny = {f"layer{i}": torch.full((4,), float(i)) for i in range(20)}
    for name, state in (("big", big), ("tiny", tiny)):
        ckptr.save(str(tmp_path / name), state)
        state["layer3"][0] += 1
        ckptr.save(str(tmp_path / f"{name}2"), state)
    commands = {
        "verify": lambda n: ["verify", "-q", str(tmp_path / n)],
        "diff": lambda n: ["diff", str(tmp_path / n), str(tmp_path / f"{n}2")],
        "torch": lambda n: ["export", "-q", str(tmp_path / n), "--to", "torch",
                            str(tmp_path / f"{n}.pt")],
        "safetensors": lambda n: ["export", "-q", str(tmp_path / n), "--to", "safetensors",
                                  str(tmp_path / f"{n}-st")],
    }
    # diff holds one 8 MiB item per side, plus what the allocator keeps between items
    bounds_mib = {"verify": 32, "diff": 100, "torch": 32, "safetensors": 32}
    for command, argv in commands.items():
        growth = _growth_mib(argv("tiny"), argv("big"))
        assert growth < bounds_mib[command], f"{command}: +{growth:.0f} MiB for 160 MiB"
    assert torch.equal(torch.load(tmp_path / "big.pt")["layer19"], big["layer19"])
    # control: the measurement does see a command that holds the whole state dict
    assert _growth_mib(["load", str(tmp_path / "tiny")], ["load", str(tmp_path / "big")]) > 150


# --- latency: commands import only what they need (issue 16) --------------------------------


@pytest.mark.parametrize("argv", [
    ["--help"], ["ls", "ROOT"], ["ls", "--json", "ROOT"], ["inspect", "CKPT"],
    ["inspect", "--json", "CKPT"],
])
def test_help_ls_and_inspect_import_neither_torch_nor_ray(capsys, monkeypatch, run_root, argv):
    """torch and Ray take seconds to import; --help, ls and inspect need neither (the
    whole-process times are in benchmarks/cli_latency.py), and print what they print in a
    process that has both (this one)."""
    argv = [str(run_root) if a == "ROOT" else str(run_root / "step-000001") if a == "CKPT"
            else a for a in argv]
    probe = (
        "import sys\nfrom ray_ckpt import cli\n"
        f"try:\n    rc = cli.main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        "print(rc, sorted(m for m in ('torch', 'ray', 'ray_ckpt.load.reader') "
        "if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "COLUMNS": "100"},
    )
    assert done.returncode == 0, done.stderr
    *printed, last = done.stdout.splitlines()
    assert last == "0 []"
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps --help to the terminal's width
    rc, out, _ = run(capsys, *argv)
    assert rc == 0 and "torch" in sys.modules
    assert printed == out.splitlines() and printed


def test_inspect_imports_torch_only_for_torch_values_and_shows_them_as_before(
    ckptr, tmp_path, capsys
):
    """A tree's torch.Size, dtype and device leaves are real torch objects: inspect of a
    checkpoint holding them imports torch, shows their repr, and loads give them back."""
    state = {"w": torch.ones(2), "size": torch.Size([2, 3]), "dtype": torch.bfloat16,
             "device": torch.device("cpu"), "n": 1}
    ckptr.save(str(tmp_path / "ckpt"), state)
    rc, out, _ = run(capsys, "inspect", str(tmp_path / "ckpt"))
    assert rc == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:-1]}
    assert rows["size"] == ["value", "Size", "torch.Size([2,", "3])"]
    assert rows["dtype"] == ["value", "dtype", "torch.bfloat16"]
    assert rows["device"] == ["value", "device", "device(type='cpu')"]
    assert_same(ckptr.load(str(tmp_path / "ckpt")), state)
    probe = (
        "import sys\nfrom ray_ckpt import cli\n"
        f"rc = cli.main({['inspect', str(tmp_path / 'ckpt')]!r})\n"
        "print(rc, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    *printed, last = done.stdout.splitlines()
    assert last == "0 True" and printed == out.splitlines()


def test_an_address_where_no_ray_answers_is_refused_at_once_naming_it(tmp_path):
    """A stale cluster address (``RAY_ADDRESS``, the file a ``ray start`` leaves, or a
    checkpointer's ``ray_address``) made ``ray.init`` wait without end; it fails at once now,
    naming the address and where it came from."""
    import socket

    with socket.socket() as s:  # a port that nothing listens on once the socket closes
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base["PYTHONPATH"] = os.pathsep.join(sys.path)
    stale = tmp_path / "ray" / "ray_current_cluster"
    stale.parent.mkdir()
    stale.write_text(dead)
    ls = [sys.executable, "-m", "ray_ckpt", "ls", "mem://run"]
    make = [sys.executable, "-c", "import ray_ckpt; ray_ckpt.make_sync_checkpointer("
            f"ray_ckpt.CheckpointerConfig(ray_address={dead!r}))"]
    cases = [
        (ls, {**base, "RAY_ADDRESS": dead}, "RAY_ADDRESS"),
        (ls, {**base, "RAY_TMPDIR": str(tmp_path)}, f"the address of the last `ray start` on "
         f"this node, in {stale}"),
        (make, {**base, "RAY_ADDRESS": "127.0.0.1:1"}, "CheckpointerConfig(ray_address=...)"),
    ]
    for argv, env, source in cases:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert f"no Ray cluster answers at {dead} ({source})" in done.stderr, done.stderr
        assert "ray start --head" in done.stderr

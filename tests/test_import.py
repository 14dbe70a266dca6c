"""``ray-ckpt import`` to a local directory needs no Ray (issue 16): the importing process writes
the checkpoint itself (``ray_ckpt.save.in_process``), with the bytes a checkpointer writes."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file, save_file

import ray_ckpt
import ray_ckpt.errors
import ray_ckpt.tools
import ray_ckpt.tools.importer
from ray_ckpt.format.names import MARKER_NAME
from ray_ckpt.save.in_process import is_local

from .helpers import assert_same, small_config

REPO = Path(__file__).resolve().parent.parent


def _tensors() -> dict[str, torch.Tensor]:
    """About 1.4 MiB: with small_config's 1 MiB buckets, two data files, a pack and chunks."""
    g = torch.Generator().manual_seed(3)
    return {
        "embed.weight": torch.randn(640, 512, generator=g),
        "layers.0.weight": torch.randn(128, 512, generator=g).to(torch.bfloat16),
        "layers.0.bias": torch.randn(128, generator=g),
        "norm.weight": torch.ones(512),
        "steps": torch.arange(10, dtype=torch.int64),
    }


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    torch_file = tmp_path / "model.pt"
    torch.save({"model": _tensors(), "step": 7, "name": "run-1", "lrs": [0.1, 0.01]}, torch_file)
    safetensors_file = tmp_path / "model.safetensors"
    save_file(_tensors(), safetensors_file)
    return {"torch": torch_file, "safetensors": safetensors_file}


def _expected(fmt: str, src: Path) -> Any:
    if fmt == "torch":
        return torch.load(src, weights_only=True)
    return load_file(src)


_PROBE = textwrap.dedent(
    """
    import json, sys
    import psutil
    from ray_ckpt.cli import main

    rc = main(["import", *sys.argv[1:]])
    ray = sys.modules.get("ray")
    children = [p.name() for p in psutil.Process().children(recursive=True)]
    print(json.dumps({"rc": rc, "ray_initialized": bool(ray and ray.is_initialized()),
                      "children": children}))
    """
)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_import_to_a_local_dir_starts_no_ray_and_loads_exactly(sources, tmp_path, fmt):
    """The whole command in a fresh process: Ray is not initialised and no Ray process (raylet,
    GCS) is started; the checkpoint verifies and loads equal to the source."""
    src, dest = sources[fmt], tmp_path / f"ckpt-{fmt}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(src), str(dest)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["rc"] == 0
    assert probe["ray_initialized"] is False
    assert probe["children"] == []  # no raylet, no gcs_server, no workers
    report = ray_ckpt.tools.verify(str(dest))
    assert report.ok, report.problems
    loaded, _ = ray_ckpt.CheckpointReader().read(str(dest))
    expected = _expected(fmt, src)
    if fmt == "safetensors":  # a flat dict in the file's byte order; compare by name
        loaded, expected = dict(sorted(loaded.items())), dict(sorted(expected.items()))
    assert_same(expected, loaded)
    marker = json.loads((dest / MARKER_NAME).read_bytes())
    assert marker["metadata"]["imported_from"] == {"source": str(src), "format": fmt}


def _normalised(path: Path) -> dict[str, Any]:
    """Every file of checkpoint ``path``, its checkpoint id replaced by zeros (same length), a
    data file's header CRC (of the id too) zeroed; the marker as JSON without the fields that
    depend on time or on the id's bytes."""
    marker = json.loads((path / MARKER_NAME).read_bytes())
    ckpt_id = marker["checkpoint_id"]
    zeros = "0" * len(ckpt_id)
    files: dict[str, Any] = {}
    for name in sorted(os.listdir(path)):
        if name == MARKER_NAME:
            continue
        raw = (path / name).read_bytes().replace(ckpt_id.encode(), zeros.encode())
        if name.endswith(".data"):
            raw = raw[:60] + bytes(4) + raw[64:]
        files[name.replace(ckpt_id, zeros)] = raw
    for field in ("checkpoint_id", "manifest", "created_unix", "manifest_crc32c"):
        marker.pop(field)
    files[MARKER_NAME] = marker
    return files


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_import_without_ray_writes_what_a_checkpointer_writes(cluster, sources, tmp_path, fmt):
    """Byte for byte (but for the checkpoint id and the commit time): data files, headers,
    checksums, manifest and marker of the import without Ray and of one through a real
    checkpointer, with the same config."""
    src = str(sources[fmt])
    direct, through_ray = tmp_path / "direct", tmp_path / "ray"
    ray_ckpt.tools.import_checkpoint(src, str(direct), config=small_config())
    with ray_ckpt.make_sync_checkpointer(config=small_config()) as ckptr:
        ray_ckpt.tools.import_checkpoint(src, str(through_ray), checkpointer=ckptr)
    a, b = _normalised(direct), _normalised(through_ray)
    assert len([n for n in a if n.endswith(".data")]) >= 2
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs"


def test_import_without_ray_overwrites_and_refuses_like_a_save(sources, tmp_path):
    """A committed destination is refused without --overwrite and replaced with it (the old
    files deleted); a source that needs pickle is refused before anything is written, leaving
    no directory."""
    dest = tmp_path / "ckpt"
    ray_ckpt.tools.import_checkpoint(str(sources["safetensors"]), str(dest))
    first = set(os.listdir(dest))
    with pytest.raises(ray_ckpt.errors.CheckpointExistsError, match="overwrite"):
        ray_ckpt.tools.import_checkpoint(str(sources["torch"]), str(dest))
    ray_ckpt.tools.import_checkpoint(str(sources["torch"]), str(dest), overwrite=True)
    assert not first & set(os.listdir(dest)) - {MARKER_NAME}
    assert_same(_expected("torch", sources["torch"]),
                ray_ckpt.CheckpointReader().read(str(dest))[0])

    counter = tmp_path / "counter.pt"
    torch.save({"w": torch.ones(3), "seen": collections.Counter("abca")}, counter)
    refused = tmp_path / "refused"
    with pytest.raises(ray_ckpt.errors.PickleNotAllowedError, match="seen"):
        ray_ckpt.tools.import_checkpoint(str(counter), str(refused))
    assert not refused.exists()
    ray_ckpt.tools.import_checkpoint(str(counter), str(refused), allow_pickle=True)
    loaded = ray_ckpt.CheckpointReader().read(str(refused), allow_pickle=True)[0]
    assert loaded["seen"] == collections.Counter("abca")


def test_only_local_destinations_skip_ray(tmp_path, s3_fs):
    assert is_local(str(tmp_path / "a"))
    assert is_local(f"file://{tmp_path}/a")
    assert is_local(str(tmp_path / "a"), filesystem=pafs.LocalFileSystem())
    assert not is_local("s3://bucket/run/step-0")
    assert not is_local("gs://bucket/run/step-0")
    assert not is_local("mem://run/step-0")
    assert not is_local("bucket/run/step-0", filesystem=s3_fs)



def test_import_to_s3_goes_through_ray_and_loads_exactly(
    cluster, sources, s3_fs, tmp_path, monkeypatch
):
    """An object store is not written in-process: the import saves through a checkpointer on
    the running Ray, and the result loads exactly."""

    def not_here(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an import to S3 was written in-process")

    monkeypatch.setattr(ray_ckpt.tools.importer, "save_in_process", not_here)
    dest = f"ray-ckpt-tests/import-{tmp_path.name}/ckpt"
    result = ray_ckpt.tools.import_checkpoint(str(sources["torch"]), dest, filesystem=s3_fs)
    assert result.path == dest
    with ray_ckpt.make_sync_checkpointer(filesystem=s3_fs) as ckptr:
        assert_same(_expected("torch", sources["torch"]), ckptr.load(dest))

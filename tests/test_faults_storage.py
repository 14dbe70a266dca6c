"""Storage faults: a full disk (injected ENOSPC, and a real 8 MiB tmpfs), a read-only disk,
permission denied at every step, slow and stuck storage.

Each test asserts the error is clear (names the file and the fix), retried only when retrying
can help, that nothing of the failed save stays behind (no data file, manifest or marker temp),
that nothing was committed, and that what was committed before still loads.
(tests/test_storage_faults.py covers torn writes, transient S3 errors and retries; these add
the faults it does not.)
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch

import ray_ckpt
import ray_ckpt.errors
import ray_ckpt.tools
from ray_ckpt.config import StorageConfig
from ray_ckpt.format.names import MARKER_NAME

from .faulty_fs import Fault, FaultPlan, faulty
from .helpers import assert_same, small_config

ENOSPC = OSError(errno.ENOSPC, "No space left on device (injected)")


def _config(**writer: Any) -> ray_ckpt.CheckpointerConfig:
    return ray_ckpt.CheckpointerConfig(
        staging_config=small_config().staging_config,
        writer_config=ray_ckpt.CheckpointWriterConfig(**writer),
        storage_config=StorageConfig(
            max_attempts=3, retry_initial_backoff_secs=0.01, retry_max_backoff_secs=0.05
        ),
    )


def _state(seed: int, mib: int = 2) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(mib * 256, 1024, generator=g),
        "small": [torch.randn(9, generator=g) for _ in range(20)],
        "seed": seed,
    }


def _leftovers(names: list[str]) -> list[str]:
    """Files a failed save must not leave: data files, manifests, marker temporaries."""
    return [n for n in names if n.endswith((".data", ".arrow")) or n.startswith(MARKER_NAME)]


# --- disk full ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["data", "manifest", "marker"])
def test_disk_full_fails_at_once_names_the_fix_and_leaves_nothing(
    backend, tmp_path, target, reliability
):
    pattern = {"data": "r*.data", "manifest": "manifest-*", "marker": f"{MARKER_NAME}*"}[target]
    # a data file or the manifest is torn (100 bytes land); the marker is refused whole, as an
    # object store's PUT and a rename-commit's temporary file both are
    torn = None if target == "marker" else 100
    plan = FaultPlan(
        tmp_path / "faults",
        [Fault("write", pattern, nth=2 if target == "data" else 1, after_bytes=torn, error=ENOSPC)],
    )
    previous = backend.path("step-1")
    backend.ckptr.save(previous, _state(1))
    case = f"disk full while writing the {target} (injected ENOSPC, {backend.name})"
    reliability.add("faults", case, "injected")
    path = backend.path("step-2")
    with ray_ckpt.make_sync_checkpointer(
        config=_config(), filesystem=faulty(backend.fs, plan)
    ) as c:
        with pytest.raises(ray_ckpt.CheckpointError) as info:
            c.save(path, _state(2))
    message = str(info.value)
    assert "No space left on device" in message and "free space" in message, message
    assert "attempts" not in message, "a full disk is not retried"
    (failed,) = {call.name for call in plan.journal() if call.fault == 0}
    assert failed in message
    assert [c.name for c in plan.journal("write")].count(failed) == 1, "written once, not retried"
    assert _leftovers(backend.files(path)) == [], backend.files(path)
    with pytest.raises(
        (ray_ckpt.errors.IncompleteCheckpointError, ray_ckpt.CheckpointNotFoundError)
    ):
        backend.ckptr.load(path)
    assert_same(_state(1), backend.ckptr.load(previous))
    reliability.add("faults", case, "survived")


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs, mounted for this test (root only; skipped where not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        done = subprocess.run(["umount", str(mount)], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:  # a writer still holds a file open: detach it now, freed later
            subprocess.run(["umount", "-l", str(mount)], check=True, timeout=30)


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_real_full_disk(cluster, small_disk, reliability):
    """16 MiB into an 8 MiB tmpfs: the save fails with ENOSPC from the kernel, deletes every
    file it wrote (the space is free again), commits nothing; a save that fits then works."""
    empty = _free_bytes(small_disk)
    path = small_disk / "big"
    reliability.add("faults", "disk full (real 8 MiB tmpfs)", "injected")
    with ray_ckpt.make_sync_checkpointer(config=_config()) as ckptr:
        with pytest.raises(ray_ckpt.CheckpointError) as info:
            ckptr.save(str(path), _state(1, mib=16))
        message = str(info.value)
        assert "No space left on device" in message and "free space" in message, message
        assert "attempts" not in message
        assert _leftovers(os.listdir(path)) == []
        assert _free_bytes(small_disk) == empty, "the failed save's bytes were not all freed"
        small = small_disk / "small"
        ckptr.save(str(small), _state(2, mib=1))
        assert_same(_state(2, mib=1), ckptr.load(str(small)))
    reliability.add("faults", "disk full (real 8 MiB tmpfs)", "survived")


def test_a_disk_that_fills_up_at_each_step_of_the_commit(cluster, small_disk, reliability):
    """The disk is filled to leave 0, 1, 2, ... pages free, so that the save runs out of space
    while writing its data file, its manifest or its marker, or fits: every outcome is a clean
    failure (no file left, nothing committed) or a checkpoint that loads."""
    state = {"x": torch.arange(100.0), "step": 1}  # one data file of one page
    outcomes = []
    with ray_ckpt.make_sync_checkpointer(config=_config()) as ckptr:
        for pages in range(6):
            filler = small_disk / "filler"
            free = _free_bytes(small_disk)
            with open(filler, "wb") as f:
                f.write(bytes(max(0, free - pages * 4096)))
            path = small_disk / f"c{pages}"
            reliability.add(
                "faults", "disk full at each step of the commit (real tmpfs)", "injected"
            )
            try:
                ckptr.save(str(path), state)
            except ray_ckpt.CheckpointError as e:
                assert "No space left on device" in str(e), str(e)
                assert _leftovers(os.listdir(path)) == [], os.listdir(path)
                with pytest.raises(ray_ckpt.errors.IncompleteCheckpointError):
                    ckptr.load(str(path))
                outcomes.append(("failed", str(e).split("failed")[0]))
            else:
                assert_same(state, ckptr.load(str(path)))
                outcomes.append(("committed", ""))
            os.remove(filler)
            reliability.add(
                "faults", "disk full at each step of the commit (real tmpfs)", "survived"
            )
    kinds = [kind for kind, _ in outcomes]
    assert "failed" in kinds and "committed" in kinds, outcomes


def test_a_read_only_disk_still_loads_and_refuses_saves_at_once(cluster, small_disk, reliability):
    path = small_disk / "c"
    with ray_ckpt.make_sync_checkpointer(config=_config()) as ckptr:
        ckptr.save(str(path), _state(1, mib=1))
        done = _mount("-o", "remount,ro", str(small_disk))
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {done.stderr.strip()}")
        try:
            reliability.add("faults", "read-only disk", "injected")
            assert_same(_state(1, mib=1), ckptr.load(str(path)))
            assert ray_ckpt.tools.verify(str(path)).ok
            started = time.monotonic()
            for target, kwargs in ((small_disk / "new", {}), (path, {"overwrite": True})):
                with pytest.raises(ray_ckpt.CheckpointError) as info:
                    ckptr.save(str(target), _state(2, mib=1), **kwargs)
                assert "read-only" in str(info.value), str(info.value)
            assert time.monotonic() - started < 30, "not retried"
            assert_same(_state(1, mib=1), ckptr.load(str(path)))
        finally:
            _mount("-o", "remount,rw", str(small_disk))
    reliability.add("faults", "read-only disk", "survived")


# --- permission denied ------------------------------------------------------------------------

DENIED = PermissionError(errno.EACCES, "Permission denied (injected)")


@pytest.mark.parametrize(
    "op, pattern, when",
    [
        ("mkdir", "*", "save"),
        ("list", "*", "save"),
        ("list", "*", "load"),
        ("read", MARKER_NAME, "load"),
        ("read", "manifest-*", "load"),
    ],
    ids=["mkdir", "list-on-save", "list-on-load", "read-marker", "read-manifest"],
)
def test_permission_denied_names_the_path_and_the_fix(
    backend, tmp_path, op, pattern, when, reliability
):
    path = backend.path("c")
    if when == "load":
        backend.ckptr.save(path, _state(1))
    plan = FaultPlan(tmp_path / "faults", [Fault(op, pattern, times=None, error=DENIED)])
    case = f"permission denied: {op} on {when}"
    reliability.add("faults", case, "injected")
    with ray_ckpt.make_sync_checkpointer(
        config=_config(), filesystem=faulty(backend.fs, plan)
    ) as c:
        with pytest.raises(ray_ckpt.errors.StorageError) as info:
            if when == "save":
                c.save(path, _state(1))
            else:
                c.load(path)
    message = str(info.value)
    assert "Permission denied" in message and "Fix:" in message and "access" in message, message
    assert sum(1 for call in plan.journal(op) if call.fault == 0) == 1, "not retried"
    if when == "load":
        assert_same(_state(1), backend.ckptr.load(path))
    else:
        assert not backend.exists(f"{path}/{MARKER_NAME}")
    reliability.add("faults", case, "survived")


def test_a_cleanup_that_is_denied_too_keeps_the_first_error(backend, tmp_path, reliability):
    """The data write fails and so does deleting the failed save's files: the caller sees the
    write's error (not the cleanup's), and the leftovers are refused and cleaned later."""
    plan = FaultPlan(
        tmp_path / "faults",
        [
            Fault("write", "r*.data", nth=2, error=PermissionError("injected: write denied")),
            Fault("delete", "*", times=None, error=PermissionError("injected: delete denied")),
        ],
    )
    root = backend.path("run")
    path = f"{root}/step-000000002"
    reliability.add("faults", "failed save whose cleanup is denied", "injected")
    with ray_ckpt.make_sync_checkpointer(
        config=_config(), filesystem=faulty(backend.fs, plan)
    ) as c:
        with pytest.raises(ray_ckpt.CheckpointError, match="write denied") as info:
            c.save(path, _state(2))
    assert "delete denied" not in str(info.value)
    assert plan.hits(1) >= 1, "the cleanup was attempted"
    leftovers = backend.files(path)
    assert leftovers and MARKER_NAME not in leftovers
    with pytest.raises(ray_ckpt.errors.IncompleteCheckpointError):
        backend.ckptr.load(path)
    manager = ray_ckpt.CheckpointManager(
        root, backend.ckptr, filesystem=backend.filesystem, incomplete_grace_secs=0
    )
    assert len(manager.cleanup()) == 1
    assert backend.listdir(root) == []
    reliability.add("faults", "failed save whose cleanup is denied", "survived")


# --- slow and stuck storage -------------------------------------------------------------------


def test_slow_storage_saves_without_retries_and_without_stalling_staging(
    cluster, tmp_path, reliability
):
    plan = FaultPlan(
        tmp_path / "faults",
        [
            Fault("write", "r*.data", times=None, delay_secs=0.25),
            Fault("write", "manifest-*", times=None, delay_secs=0.25),
            Fault("read", "r*.data", times=None, delay_secs=0.1),
        ],
    )
    fs = faulty(pafs.LocalFileSystem(), plan)
    path = str(tmp_path / "c")
    reliability.add("faults", "slow storage (0.25 s per write, 0.1 s per read)", "injected")
    with ray_ckpt.make_async_checkpointer(config=_config(io_threads=1), filesystem=fs) as c:
        stage, write = c.save(path, _state(1))
        stage.result(timeout=60)
        assert not write.done(), "staging waited for the slow storage"
        write.result(timeout=120)
        assert_same(_state(1), c.load(path))
    names = [call.name for call in plan.journal("write")]
    assert len(names) == len(set(names)), "a slow write was retried"
    reliability.add("faults", "slow storage (0.25 s per write, 0.1 s per read)", "survived")


def test_stuck_storage_fails_the_save_at_the_barrier_timeout(cluster, tmp_path, reliability):
    """A data write that does not return for longer than barrier_timeout_secs fails the save
    then, naming the writer and the file; nothing is committed. (The stuck write may still land
    later: that file is refused as incomplete and removed by CheckpointManager.cleanup().)"""
    plan = FaultPlan(tmp_path / "faults", [Fault("write", "r*.data", nth=2, delay_secs=10.0)])
    fs = faulty(pafs.LocalFileSystem(), plan)
    root = tmp_path / "run"
    path = root / "step-000000001"
    reliability.add("faults", "stuck storage (a write that never returns in time)", "injected")
    with ray_ckpt.make_sync_checkpointer(
        config=_config(barrier_timeout_secs=3), filesystem=fs
    ) as c:
        started = time.monotonic()
        with pytest.raises(ray_ckpt.errors.CheckpointWriteError, match="no answer in 3s") as info:
            c.save(str(path), _state(1))
        assert time.monotonic() - started < 10, "the save waited for the stuck write"
        stuck = next(call.name for call in plan.journal() if call.fault == 0)
        assert stuck in str(info.value) and "nothing was committed" in str(info.value)
        assert not (path / MARKER_NAME).exists()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and plan.hits(0) and not (path / stuck).exists():
            time.sleep(0.2)
        time.sleep(1.0)
        with pytest.raises(
            (ray_ckpt.errors.IncompleteCheckpointError, ray_ckpt.CheckpointNotFoundError)
        ):
            c.load(str(path))
        manager = ray_ckpt.CheckpointManager(str(root), c, incomplete_grace_secs=0)
        manager.cleanup()
        assert os.listdir(root) == []
    reliability.add("faults", "stuck storage (a write that never returns in time)", "survived")

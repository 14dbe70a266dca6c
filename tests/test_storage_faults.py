"""Saves and loads under injected storage faults, on every backend.

Each test wraps the backend's real filesystem in tests/faulty_fs.py's ``FaultyHandler`` (a
``pyarrow.fs.PyFileSystem`` that travels to the writer actors and counts calls across
processes) and asserts what was not committed, what was cleaned up and what still loads.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt.config import StorageConfig
from ray_ckpt.format.names import MARKER_NAME

from .faulty_fs import Fault, FaultPlan, faulty
from .helpers import assert_same, small_config

SLOW_DOWN = OSError(
    "When uploading part for key 'k' in bucket 'b': AWS Error SLOW_DOWN during UploadPart "
    "operation: Please reduce your request rate."
)


def _config() -> ray_ckpt.CheckpointerConfig:
    config = small_config()
    return ray_ckpt.CheckpointerConfig(
        staging_config=config.staging_config,
        storage_config=StorageConfig(
            max_attempts=3, retry_initial_backoff_secs=0.01, retry_max_backoff_secs=0.05
        ),
    )


def _state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    # ~3 MiB in 1 MiB buckets: several data files per save
    return {"w": torch.randn(512, 1024), "small": [torch.randn(9) for _ in range(20)], "seed": seed}


@pytest.fixture
def faulty_ckptr(backend, tmp_path):
    """``make(faults)`` -> (checkpointer on the backend's filesystem behind ``faults``, plan)."""
    made: list[Any] = []

    def make(*faults: Fault) -> tuple[Any, FaultPlan]:
        plan = FaultPlan(tmp_path / f"faults-{len(made)}", faults)
        ckptr = ray_ckpt.make_sync_checkpointer(
            config=_config(), filesystem=faulty(backend.fs, plan)
        )
        made.append(ckptr)
        return ckptr, plan

    yield make
    for ckptr in made:
        ckptr.close()


def _faulted_names(plan: FaultPlan, index: int = 0) -> list[str]:
    return [call.name for call in plan.journal() if call.fault == index]


@pytest.mark.parametrize(
    "fault",
    [
        # the 2nd data file: half of it reaches storage, then the upload fails for good
        Fault("write", "r*.data", nth=2, after_bytes=200, error=PermissionError(
            "injected: AWS Error ACCESS_DENIED during UploadPart operation: Access Denied")),
        Fault("write", "manifest-*", error=PermissionError("injected: access denied")),
        Fault("write", f"{MARKER_NAME}*", error=PermissionError("injected: access denied")),
    ],
    ids=["torn-data-file", "manifest", "marker"],
)
def test_a_failed_save_commits_nothing_and_leaves_other_checkpoints_alone(
    backend, faulty_ckptr, fault
):
    previous = backend.path("step-1")
    backend.ckptr.save(previous, _state(1))
    before = {name: backend.read(f"{previous}/{name}") for name in backend.files(previous)}

    ckptr, plan = faulty_ckptr(fault)
    path = backend.path("step-2")
    with pytest.raises(ray_ckpt.CheckpointError) as info:
        ckptr.save(path, _state(2))
    (failed,) = _faulted_names(plan)
    assert failed in str(info.value) and "injected" in str(info.value)
    assert "nothing was committed" in str(info.value) or "Fix:" in str(info.value)
    # permanent: tried once, never again
    assert [c.name for c in plan.journal("write")].count(failed) == 1

    assert backend.files(path) == [], "every file of the failed save was deleted"
    with pytest.raises(
        (ray_ckpt.errors.IncompleteCheckpointError, ray_ckpt.CheckpointNotFoundError)
    ):
        backend.ckptr.load(path)
    after = {name: backend.read(f"{previous}/{name}") for name in backend.files(previous)}
    assert after == before, "the previous checkpoint is byte for byte untouched"
    assert_same(_state(1), backend.ckptr.load(previous))


def test_transient_failures_are_retried_and_the_save_commits(backend, faulty_ckptr):
    ckptr, plan = faulty_ckptr(
        Fault("write", "r*.data", nth=1, times=2, error=SLOW_DOWN),
        Fault("write", "r*.data", nth=3, after_bytes=5000, error=ConnectionResetError(
            "injected: connection reset by peer")),
        Fault("write", "manifest-*", error=TimeoutError("injected: request timed out")),
        Fault("write", "r*.data", nth=4, delay_secs=0.3),
        Fault("read", "r*.data", nth=2, error=OSError(
            "AWS Error SERVICE_UNAVAILABLE during GetObject operation: Service Unavailable")),
    )
    path = backend.path("step-3")
    state = _state(3)
    ckptr.save(path, state)
    assert_same(state, ckptr.load(path))
    # each failed object was written (or read) again, whole, and the save went on
    for index in (0, 1, 2, 4):
        names = _faulted_names(plan, index)
        assert names, f"fault {index} never fired"
        op = plan.faults[index].op
        for name in names:
            last = [c for c in plan.journal(op) if c.name == name][-1]
            assert last.fault is None or plan.faults[last.fault].error is None, (
                f"{name} was not retried after fault {index}"
            )
    assert _faulted_names(plan, 3), "the delayed write never happened"
    assert not [n for n in backend.files(path) if ".tmp-" in n]


def test_too_many_transient_failures_fail_the_save_after_max_attempts(backend, faulty_ckptr):
    ckptr, plan = faulty_ckptr(Fault("write", "r*.data", nth=2, times=None, error=SLOW_DOWN))
    path = backend.path("step-4")
    with pytest.raises(ray_ckpt.errors.CheckpointWriteError, match="after 3 attempts") as info:
        ckptr.save(path, _state(4))
    assert "max_attempts" in str(info.value)
    first = _faulted_names(plan)[0]
    assert [c.name for c in plan.journal("write")].count(first) == 3
    assert backend.files(path) == []


@pytest.mark.parametrize(
    "fault",
    [
        Fault("write", "r*.data", nth=3, after_bytes=200, error=PermissionError("injected")),
        Fault("write", f"{MARKER_NAME}*", error=PermissionError("injected")),
        Fault("move", MARKER_NAME, error=PermissionError("injected")),
    ],
    ids=["data", "marker", "rename"],
)
def test_an_interrupted_overwrite_leaves_the_old_checkpoint(backend, faulty_ckptr, fault):
    if fault.op == "move" and backend.name == "s3":
        pytest.skip("object stores commit without a rename")
    path = backend.path("latest")
    backend.ckptr.save(path, _state(5))
    old_files = backend.files(path)
    ckptr, plan = faulty_ckptr(fault)
    with pytest.raises(ray_ckpt.CheckpointError, match="injected"):
        ckptr.save(path, _state(6), overwrite=True)
    assert _faulted_names(plan), "the fault never fired"
    assert backend.files(path) == old_files, "the old files, and only them"
    assert_same(_state(5), backend.ckptr.load(path))
    # the next overwrite goes through and removes the old checkpoint's files
    backend.ckptr.save(path, _state(7), overwrite=True)
    assert_same(_state(7), backend.ckptr.load(path))
    assert not set(old_files) - {MARKER_NAME} & set(backend.files(path))


def test_a_read_that_keeps_failing_names_the_file(backend, faulty_ckptr):
    path = backend.path("step-8")
    backend.ckptr.save(path, _state(8))
    ckptr, plan = faulty_ckptr(
        Fault("read", "r*.data", times=None, error=PermissionError("injected: access denied"))
    )
    with pytest.raises(ray_ckpt.errors.StorageError, match="injected") as info:
        ckptr.load(path)
    # the load's threads read its files at once: the error names one whose reads failed
    faulted = _faulted_names(plan)
    assert any(name in str(info.value) for name in faulted), (faulted, str(info.value))
    assert "Fix:" in str(info.value)
    assert_same(_state(8), backend.ckptr.load(path))

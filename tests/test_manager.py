"""CheckpointManager: step directories, retention rules, restart, failures, cleanup."""

from __future__ import annotations

import os
import sys

import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt.save.encoder import CheckpointWriter

from .helpers import small_config

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _state(step: int) -> dict:
    return {"w": torch.full((1000,), float(step)), "step": step}


@pytest.fixture(scope="module")
def sync_ckptr(cluster):
    with ray_ckpt.make_sync_checkpointer(config=small_config()) as c:
        yield c


def _run(manager: ray_ckpt.CheckpointManager, steps, loss=lambda s: float(s)) -> None:
    for step in steps:
        manager.save(step, _state(step), metrics={"loss": loss(step)})
    manager.wait()


def test_keep_last(sync_ckptr, tmp_path):
    manager = ray_ckpt.CheckpointManager(str(tmp_path), sync_ckptr, keep_last=2)
    _run(manager, range(5))
    assert manager.steps() == [3, 4] and manager.latest() == 4
    assert sorted(os.listdir(tmp_path)) == ["step-000000003", "step-000000004"]


def test_keep_every_and_last(sync_ckptr, tmp_path):
    manager = ray_ckpt.CheckpointManager(str(tmp_path), sync_ckptr, keep_last=1, keep_every=2)
    _run(manager, range(6))
    assert manager.steps() == [0, 2, 4, 5]


@pytest.mark.parametrize("mode, kept", [("min", [1, 3, 5]), ("max", [0, 4, 5])])
def test_keep_best(sync_ckptr, tmp_path, mode, kept):
    losses = {0: 9.0, 1: 1.0, 2: 5.0, 3: 2.0, 4: 8.0, 5: 7.0}
    manager = ray_ckpt.CheckpointManager(
        str(tmp_path), sync_ckptr, keep_best=2, metric="loss", mode=mode
    )
    _run(manager, range(6), loss=losses.__getitem__)
    assert manager.steps() == kept  # the two best, plus the newest
    assert manager.best() == (1 if mode == "min" else 0)
    assert manager.metrics(3 if mode == "min" else 4) == {"loss": losses[3 if mode == "min" else 4]}


def test_state_survives_a_restart(sync_ckptr, tmp_path):
    first = ray_ckpt.CheckpointManager(str(tmp_path), sync_ckptr, keep_last=3, metric="loss")
    _run(first, [10, 20, 30], loss=lambda s: 100.0 - s)
    again = ray_ckpt.CheckpointManager(str(tmp_path), sync_ckptr, keep_last=3, metric="loss")
    assert again.steps() == [10, 20, 30] and again.latest() == 30 and again.best() == 30
    target = {"w": torch.zeros(1000)}
    again.load(state_dict=target)
    assert torch.equal(target["w"], torch.full((1000,), 30.0))
    assert again.load(20)["step"] == 20
    again.save(40, _state(40))
    assert again.steps() == [20, 30, 40]


def test_async_checkpointer_retention_after_commit(cluster, tmp_path):
    with ray_ckpt.make_async_checkpointer(config=small_config()) as actor:
        manager = ray_ckpt.CheckpointManager(str(tmp_path), actor, keep_last=2)
        for step in range(4):
            stage, _ = manager.save(step, _state(step))
            stage.result()
        manager.wait()
        assert manager.steps() == [2, 3]


class FailOnStep(CheckpointWriter):
    """A real writer that fails every bucket of one step's save (half-way: other files exist)."""

    def __init__(self, config, step_dir: str) -> None:
        super().__init__(config)
        self.step_dir = step_dir

    def write_bucket(self, storage, layout, arrays, **kwargs):
        if storage.path.endswith(self.step_dir) and layout.seq > 0:
            raise OSError(5, "I/O error (injected)")
        return super().write_bucket(storage, layout, arrays, **kwargs)


def test_a_save_that_fails_half_way_keeps_the_committed_ones(cluster, tmp_path):
    with ray_ckpt.make_async_checkpointer(
        config=small_config(bucket_size_bytes=4096, pack_threshold_bytes=1024),
        checkpoint_writer_init_fn=FailOnStep,
        checkpoint_writer_init_args={"step_dir": "step-000000003"},
    ) as actor:
        manager = ray_ckpt.CheckpointManager(str(tmp_path), actor, keep_last=2)
        _run(manager, range(3))
        manager.save(3, _state(3) | {"more": torch.ones(1000)})  # two buckets: one fails
        with pytest.raises(ray_ckpt.errors.CheckpointWriteError, match="injected"):
            manager.wait()
        assert manager.steps() == [1, 2] and manager.latest() == 2  # nothing lost
        assert torch.equal(manager.load()["w"], torch.full((1000,), 2.0))
        _run(manager, [4])
        assert manager.steps() == [2, 4]


def test_cleanup_removes_leftovers_of_crashed_saves_only(sync_ckptr, tmp_path):
    manager = ray_ckpt.CheckpointManager(str(tmp_path), sync_ckptr, incomplete_grace_secs=0)
    _run(manager, [1])
    crashed = tmp_path / "step-000000002"
    sync_ckptr.save(str(crashed), _state(2))
    os.remove(crashed / "ray_ckpt.commit")  # as if the save died before its commit
    (tmp_path / "notes").mkdir()  # not a checkpoint: never touched
    patient = ray_ckpt.CheckpointManager(str(tmp_path), sync_ckptr, incomplete_grace_secs=3600)
    assert patient.cleanup() == []  # too recent: another process may still be writing it
    assert manager.cleanup() == [str(crashed)]
    assert sorted(os.listdir(tmp_path)) == ["notes", "step-000000001"]
    assert manager.steps() == [1]


def test_bad_arguments(sync_ckptr, tmp_path):
    with pytest.raises(ValueError, match="keep_best needs metric"):
        ray_ckpt.CheckpointManager(str(tmp_path), sync_ckptr, keep_best=1)
    with pytest.raises(ValueError, match="mode"):
        ray_ckpt.CheckpointManager(str(tmp_path), sync_ckptr, mode="median")
    manager = ray_ckpt.CheckpointManager(str(tmp_path), sync_ckptr)
    with pytest.raises(ValueError, match="step"):
        manager.save(-1, _state(0))
    with pytest.raises(ray_ckpt.CheckpointNotFoundError):
        manager.load()
    with pytest.raises(ray_ckpt.errors.UnsupportedValueError, match="JSON"):
        manager.save(1, _state(1), metrics={"loss": object()})

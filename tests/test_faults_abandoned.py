"""A save cut short leaves no data files once its writer has noticed (issue 16, item 3): not the
files written before (``commit.discard_files`` deletes them), and not a file whose write was
still running then (the write deletes its own file when it ends: ``protocol.ABANDONED``).

The saving process is a real Ray actor, killed mid-save; the write still running is held in the
real writer actor by a filesystem wrapper until the test lets it go.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt.format.names import MARKER_NAME
from ray_ckpt.save.stager import DefaultStager

from .faulty_fs import FaultPlan, FaultyHandler
from .helpers import assert_same

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor and handler below

WAIT_SECS = 60.0  # no single step of the test waits longer than this
_SECOND_FILE = re.compile(r"r\d{5}-000001-[0-9a-f]+\.data$")


class _HoldSecondFile(FaultyHandler):
    """The real local filesystem (every call journaled), except that opening data file 1 of a
    save waits until ``gate`` exists, after touching ``gate + ".held"``."""

    def __init__(self, fs: pafs.FileSystem, plan: FaultPlan, gate: str) -> None:
        super().__init__(fs, plan)
        self.gate = gate

    def __reduce__(self) -> tuple[Any, ...]:
        return (_HoldSecondFile, (self.fs, self.plan, self.gate))

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        if _SECOND_FILE.search(path):
            Path(self.gate + ".held").touch()
            deadline = time.monotonic() + 10 * WAIT_SECS  # never hang the writer for good
            while not os.path.exists(self.gate) and time.monotonic() < deadline:
                time.sleep(0.02)
        return super().open_output_stream(path, metadata)


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(16)
    return {"w": torch.randn(320, 1024, generator=g), "step": 16}  # 1.25 MiB: five buckets


@ray.remote(num_cpus=0)
class _Saver:
    """A process that saves: it stages buckets 0 and 1, hands them to its node's writer, then
    never finishes staging (it is killed there)."""

    def save(self, path: str, fs: pafs.FileSystem, stuck: str, spread: bool) -> None:
        stage = DefaultStager.stage

        def stage_or_stick(stager: Any, plan: Any, buckets: Any) -> Any:
            if 2 in buckets:
                Path(stuck).touch()
                threading.Event().wait()
            return stage(stager, plan, buckets)

        DefaultStager.stage = stage_or_stick  # type: ignore[method-assign]
        config = ray_ckpt.CheckpointerConfig(
            staging_config=ray_ckpt.CheckpointStagerConfig(bucket_size_bytes=256 << 10),
            writer_config=ray_ckpt.CheckpointWriterConfig(spread_across_nodes=spread),
        )
        with ray_ckpt.make_sync_checkpointer(config=config, filesystem=fs) as ckptr:
            ckptr.save(path, _state())


def _wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_SECS:.0f}s waiting for {what}")
        time.sleep(0.05)


def _data_files(path: Path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".data")) if path.exists() else []


@pytest.mark.parametrize("spread", [False, True], ids=["one-writer", "spread-across-nodes"])
def test_a_cut_short_save_leaves_no_data_file_once_its_writer_noticed(cluster, tmp_path, spread):
    """With ``spread_across_nodes``, data file 1 is written by another node's writer: the
    writer that noticed tells it."""
    plan = FaultPlan(tmp_path / "journal")
    gate = tmp_path / "gate"
    stuck = tmp_path / "stuck"
    fs = pafs.PyFileSystem(_HoldSecondFile(pafs.LocalFileSystem(), plan, str(gate)))
    path = tmp_path / "run" / "step-1"

    saver = _Saver.remote()  # type: ignore[attr-defined]
    saver.save.remote(str(path), fs, str(stuck), spread)
    _wait_for(lambda: stuck.exists(), "the saver to stage buckets 0 and 1")
    _wait_for(lambda: Path(str(gate) + ".held").exists(), "the writer to start data file 1")
    _wait_for(lambda: len(_data_files(path)) == 1, "data file 0 to be written")
    ray.kill(saver)  # the saving process dies mid-save

    # its writer notices (it watches the saver while staging) and deletes data file 0 ...
    _wait_for(lambda: not _data_files(path), "the writer to delete the dead save's data file 0")
    # ... while the write of data file 1 is still running: let it end, writing its file
    gate.touch()

    def second_file_deleted() -> bool:
        deleted = [c.name for c in plan.journal("delete") if _SECOND_FILE.search(c.name)]
        return bool(deleted) and not _data_files(path)

    _wait_for(second_file_deleted, "data file 1, written after the save was abandoned, to be "
              "deleted by its write")
    written = [c.name for c in plan.journal("write") if _SECOND_FILE.search(c.name)]
    assert len(written) == 1, written  # it was written, then deleted
    assert not (path / MARKER_NAME).exists()

    # nothing of the dead save is in the way: the next save to the same path, on the same
    # writer actor, commits and loads
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        with pytest.raises(
            (ray_ckpt.errors.IncompleteCheckpointError, ray_ckpt.CheckpointNotFoundError)
        ):
            ckptr.load(str(path))
        ckptr.save(str(path), _state())
        assert_same(_state(), ckptr.load(str(path)))

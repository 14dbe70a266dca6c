"""Faults injected into the processes of a save: writer actors killed, the saving process
killed, two saves racing to one path, ``close`` racing ``save``.

Every test asserts what was not committed, what still loads, that nothing hangs (each wait is
bounded), that the error is clear, and that the next save works. Counts go to the session's
``reliability`` figures (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import ray
import torch
from ray.util.state import list_actors

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt.format.names import MARKER_NAME

from .faulty_fs import Fault, FaultPlan, faulty
from .helpers import assert_same, small_config

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT_SECS = 60.0  # no single step of a test waits longer than this


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)  # not the global RNG: threads build states at once
    # ~2.5 MiB in 1 MiB buckets: a pack and several chunk files per save
    return {
        "w": torch.randn(640, 1024, generator=g),
        "small": [torch.randn(9, generator=g) for _ in range(20)],
        "seed": seed,
    }


def _wait_for(condition: Any, what: str, timeout: float = WAIT_SECS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def _data_files(path: Path) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".data")) if path.exists() else []


def _refused(ckptr: Any, path: Path) -> None:
    """``path`` holds no checkpoint: load refuses it with a clear error."""
    with pytest.raises(
        (ray_ckpt.errors.IncompleteCheckpointError, ray_ckpt.CheckpointNotFoundError)
    ):
        ckptr.load(str(path))


class GatedWriter(ray_ckpt.CheckpointWriter):
    """A real writer that writes bucket 0 at once and holds every later bucket until the file
    ``gate`` exists, touching ``gate + ".reached"`` when it starts waiting."""

    def __init__(self, config: Any, gate: str) -> None:
        super().__init__(config)
        self.gate = gate

    def write_bucket(self, storage: Any, layout: Any, arrays: Any, **kwargs: Any) -> Any:
        if layout.seq > 0 and not os.path.exists(self.gate):
            open(self.gate + ".reached", "w").close()  # only when it really holds a bucket
            while not os.path.exists(self.gate):
                time.sleep(0.02)
        return super().write_bucket(storage, layout, arrays, **kwargs)


def _gated(gate: Path, **config: Any) -> ray_ckpt.AsyncCheckpointer:
    return ray_ckpt.make_async_checkpointer(
        config=config.pop("config", None) or small_config(),
        checkpoint_writer_init_fn=GatedWriter,
        checkpoint_writer_init_args={"gate": str(gate)},
    )


def _writer_pid(name: str) -> int:
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("name", "=", name), ("state", "=", "ALIVE")],
        detail=True,
    )
    assert len(actors) == 1, actors
    return int(actors[0].pid)


# --- a writer actor killed mid-save -----------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    # a restarted writer is what SIGKILL exercises too; the third variant runs under slow
    ["ray.kill", pytest.param("ray.kill-restart", marks=pytest.mark.slow), "SIGKILL"],
)
def test_a_writer_killed_mid_save_fails_it_cleanly_and_the_next_save_works(
    cluster, tmp_path, how, reliability
):
    gate = tmp_path / "gate"
    gate.touch()
    root = tmp_path / "run"
    manager_paths = [root / f"step-{step:09d}" for step in (1, 2, 3)]
    previous, path, nxt = manager_paths
    with _gated(gate) as ckptr:
        ckptr.save(str(previous), _state(1))[1].result(timeout=WAIT_SECS)
        gate.unlink()

        _, write = ckptr.save(str(path), _state(2))
        _wait_for(lambda: os.path.exists(str(gate) + ".reached"), "the writer to hold bucket 1")
        _wait_for(lambda: _data_files(path), "bucket 0 to reach storage")
        node = ray.get_runtime_context().get_node_id()
        name = ckptr._pool.actor_name(node)
        writer = ray.get_actor(name, namespace="ray_ckpt")  # found by name, as any process would
        reliability.add("faults", f"writer actor killed mid-save ({how})", "injected")
        if how == "SIGKILL":
            os.kill(_writer_pid(name), signal.SIGKILL)
        else:
            ray.kill(writer, no_restart=how == "ray.kill")

        started = time.monotonic()
        with pytest.raises(ray_ckpt.errors.CheckpointWriteError, match="writer actor died") as info:
            write.result(timeout=WAIT_SECS)
        assert time.monotonic() - started < 30, "the failure took too long to surface"
        assert "nothing was committed" in str(info.value)
        assert not (path / MARKER_NAME).exists()
        _refused(ckptr, path)  # the half-written directory is refused, never loaded
        assert_same(_state(1), ckptr.load(str(previous)))

        gate.touch()
        _, write = ckptr.save(str(nxt), _state(3))  # on the restarted (or a new) writer
        write.result(timeout=WAIT_SECS)
        assert_same(_state(3), ckptr.load(str(nxt)))

        # what the dead save left is not a checkpoint, and the manager removes it
        manager = ray_ckpt.CheckpointManager(str(root), ckptr, incomplete_grace_secs=0)
        assert manager.steps() == [1, 3]
        assert manager.cleanup() == [str(path)]
        assert sorted(os.listdir(root)) == [previous.name, nxt.name]
    reliability.add("faults", f"writer actor killed mid-save ({how})", "survived")


# --- two saves to one path; close racing save -------------------------------------------------


class Rendezvous(ray_ckpt.WriterHook):
    """Holds each commit, just before its marker, until ``parties`` commits have arrived."""

    def __init__(self, folder: str, parties: int) -> None:
        self.folder = folder
        self.parties = parties

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        open(
            os.path.join(self.folder, f"arrived-{os.getpid()}-{threading.get_ident()}"), "w"
        ).close()
        deadline = time.monotonic() + WAIT_SECS
        while len(os.listdir(self.folder)) < self.parties and time.monotonic() < deadline:
            time.sleep(0.01)

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


@pytest.mark.parametrize("race", ["at-commit", "free"])
def test_two_checkpointers_saving_to_one_path_one_wins_the_other_is_refused(
    cluster, tmp_path, race, reliability
):
    folder = tmp_path / "rendezvous"
    folder.mkdir()
    hook = Rendezvous(str(folder), 2) if race == "at-commit" else None
    path = tmp_path / "c"
    outcomes: dict[int, BaseException | None] = {}

    def save(seed: int, ckptr: Any, start: threading.Barrier) -> None:
        start.wait()
        try:
            ckptr.save(str(path), _state(seed))
            outcomes[seed] = None
        except BaseException as e:  # noqa: BLE001 - asserted below
            outcomes[seed] = e

    reliability.add("faults", f"two saves to one path ({race})", "injected")
    ckptrs = [
        ray_ckpt.make_sync_checkpointer(config=small_config(), commit_hook=hook) for _ in range(2)
    ]
    try:
        start = threading.Barrier(2)
        threads = [threading.Thread(target=save, args=(s, c, start)) for s, c in enumerate(ckptrs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_SECS)
            assert not t.is_alive(), "a save hung"
        winners = [seed for seed, error in outcomes.items() if error is None]
        losers = {seed: error for seed, error in outcomes.items() if error is not None}
        assert len(winners) == 1, outcomes
        ((_loser, error),) = losers.items()
        assert isinstance(error, ray_ckpt.errors.CheckpointExistsError), repr(error)
        assert "overwrite=True" in str(error)
        if race == "at-commit":
            assert "another save committed" in str(error)
        assert_same(_state(winners[0]), ckptrs[0].load(str(path)))
        # the loser's files are gone: only the winner's checkpoint is in the directory
        info = ray_ckpt.CheckpointReader().open(str(path))
        own = set(info.manifest.files) | {MARKER_NAME, info.marker.manifest}
        assert set(os.listdir(path)) == own
    finally:
        for c in ckptrs:
            c.close()
    reliability.add("faults", f"two saves to one path ({race})", "survived")


def test_close_during_a_save_waits_for_it(cluster, tmp_path, reliability):
    gate = tmp_path / "gate"
    ckptr = _gated(gate)
    path = tmp_path / "c"
    _, write = ckptr.save(str(path), _state(1))
    _wait_for(lambda: os.path.exists(str(gate) + ".reached"), "the writer to hold bucket 1")
    reliability.add("faults", "close() from another thread during a save", "injected")
    closer = threading.Thread(target=ckptr.close)
    closer.start()
    closer.join(1.0)
    assert closer.is_alive(), "close returned while the save was in flight"
    gate.touch()
    closer.join(WAIT_SECS)
    assert not closer.is_alive()
    assert write.done() and write.result().nbytes > 0
    assert_same(_state(1), ray_ckpt.CheckpointReader().read(str(path))[0])
    with pytest.raises(ray_ckpt.errors.CheckpointerClosedError):
        ckptr.save(str(tmp_path / "d"), _state(2))
    assert not (tmp_path / "d").exists()
    reliability.add("faults", "close() from another thread during a save", "survived")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_save_and_close_racing_from_two_threads(cluster, tmp_path, kind, reliability):
    """One thread is inside ``save`` (async: waiting for the previous save, held in its writer;
    sync: writing to slow storage) when another calls ``close``: close waits for every save it
    let in, and either that save commits whole or it raises CheckpointerClosedError."""
    gate = tmp_path / "gate"
    first = None
    if kind == "async":
        ckptr: Any = _gated(gate)
        _, first = ckptr.save(str(tmp_path / "a"), _state(1))
        _wait_for(lambda: os.path.exists(str(gate) + ".reached"), "the writer to hold bucket 1")
    else:
        plan = FaultPlan(
            tmp_path / "faults", [Fault("write", "r*.data", times=None, delay_secs=1.5)]
        )
        ckptr = ray_ckpt.make_sync_checkpointer(
            config=small_config(), filesystem=faulty(pafs.LocalFileSystem(), plan)
        )
    outcome: dict[str, Any] = {}

    def second_save() -> None:
        try:
            if kind == "async":
                _, outcome["write"] = ckptr.save(str(tmp_path / "b"), _state(2))  # waits for "a"
            else:
                ckptr.save(str(tmp_path / "b"), _state(2))
            outcome["error"] = None
        except BaseException as e:  # noqa: BLE001 - asserted below
            outcome["error"] = e

    reliability.add("faults", f"save and close racing ({kind})", "injected")
    saver = threading.Thread(target=second_save)
    saver.start()
    time.sleep(0.5)  # the save is inside save(): waiting for "a" (async) or writing (sync)
    closer = threading.Thread(target=ckptr.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive(), "close returned while a save was in flight"
    gate.touch()
    closer.join(WAIT_SECS)
    saver.join(WAIT_SECS)
    assert not closer.is_alive() and not saver.is_alive(), "close or save hung"
    if first is not None:
        assert first.result().nbytes > 0
        assert_same(_state(1), ray_ckpt.CheckpointReader().read(str(tmp_path / "a"))[0])
    error = outcome["error"]
    if error is None:  # the save got in before close, and close waited for it to commit
        if kind == "async":
            assert outcome["write"].done()
        assert_same(_state(2), ray_ckpt.CheckpointReader().read(str(tmp_path / "b"))[0])
    else:
        assert isinstance(error, ray_ckpt.errors.CheckpointerClosedError), repr(error)
        assert not (tmp_path / "b").exists()
    reliability.add("faults", f"save and close racing ({kind})", "survived")


# --- the saving process killed ----------------------------------------------------------------

_DRIVER = textwrap.dedent(
    """
    import sys, time
    import ray, torch
    import ray_ckpt
    import ray_ckpt.errors
    from ray_ckpt.save.stager import DefaultStager

    address, root, mode, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def state_for(step):
        g = torch.Generator().manual_seed(step)
        return {"model": {"w": torch.randn(320, 1024, generator=g),
                          "b": torch.full((7,), float(step))},
                "tiny": [torch.randn(16, generator=g) for _ in range(50)], "step": step,
                "name": f"step {step}"}

    if mode == "hang-in-staging":  # stage bucket 0, then never finish staging
        stage = DefaultStager.stage
        def stuck(self, plan, buckets):
            if 1 in buckets:
                print("stuck", flush=True)
                time.sleep(3600)
            return stage(self, plan, buckets)
        DefaultStager.stage = stuck

    ray.init(address=address, log_to_driver=False)
    config = ray_ckpt.CheckpointerConfig(staging_config=ray_ckpt.CheckpointStagerConfig(
        bucket_size_bytes=256 << 10, pack_threshold_bytes=16 << 10))
    make = ray_ckpt.make_async_checkpointer if mode == "async" else ray_ckpt.make_sync_checkpointer
    ckptr = make(config=config)
    manager = ray_ckpt.CheckpointManager(root, ckptr, keep_last=3)
    print("ready", flush=True)
    step = first
    while True:
        print(f"start {step}", flush=True)
        manager.save(step, state_for(step))
        print(f"done {step}", flush=True)
        step += 1
    """
)


def _state_for(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(320, 1024, generator=g), "b": torch.full((7,), float(step))},
        "tiny": [torch.randn(16, generator=g) for _ in range(50)],
        "step": step,
        "name": f"step {step}",
    }


class _Driver:
    """A subprocess that connects to the test cluster and saves with a CheckpointManager."""

    def __init__(self, script: Path, address: str, root: Path, mode: str, first: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(script), address, str(root), mode, str(first)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.log.append(line)
            if line.startswith(prefix):
                return line
        self.kill()
        raise AssertionError(
            f"the saving process never printed {prefix!r}; its output:\n"
            + "\n".join(self.log[-40:])
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT_SECS)


def _settled(root: Path, quiet_secs: float = 1.5, timeout: float = WAIT_SECS) -> None:
    """Wait until nothing under ``root`` has changed for ``quiet_secs`` (a save whose caller
    died may still be committing in its writer actor, which is what should happen)."""

    def snapshot() -> set[tuple[str, int, int]]:
        return {
            (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.exists()
        }

    deadline = time.monotonic() + timeout
    last, since = snapshot(), time.monotonic()
    while time.monotonic() - since < quiet_secs:
        if time.monotonic() > deadline:
            raise AssertionError(f"{root} kept changing for {timeout:.0f}s")
        time.sleep(0.2)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()


def _audit(root: Path) -> tuple[int, int]:
    """Every directory under ``root`` loads with exactly its step's values, or is refused as
    incomplete. Returns (committed, incomplete)."""
    reader = ray_ckpt.CheckpointReader()
    committed = incomplete = 0
    for entry in sorted(root.iterdir()):
        step = int(entry.name.removeprefix("step-"))
        try:
            loaded, _ = reader.read(str(entry))
        except ray_ckpt.errors.IncompleteCheckpointError:
            incomplete += 1
            continue
        assert_same(_state_for(step), loaded, entry.name)
        committed += 1
    return committed, incomplete


def _kill_drivers(cluster: Any, tmp_path: Path, kills: int, reliability: Any) -> None:
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    root = tmp_path / "run"
    root.mkdir()
    rng = random.Random(8)
    step = 1
    for i in range(kills):
        mode = ("sync", "async")[i % 2]
        driver = _Driver(script, cluster.cluster.address, root, mode, step)
        try:
            driver.wait_for("ready")
            # a random save of the first few, at a random point of it
            for _ in range(rng.randint(1, 3)):
                step = int(driver.wait_for("start ").split()[1]) + 1
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            driver.kill()
        reliability.add("faults", "saving process SIGKILLed mid-save", "injected")
        _settled(root)
        _audit(root)
        step = max([step, *(int(p.name.removeprefix("step-")) + 1 for p in root.iterdir())])
        reliability.add("faults", "saving process SIGKILLed mid-save", "survived")
    # the manager removes every directory that is not a checkpoint; every other one loads
    committed, incomplete = _audit(root)
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        manager = ray_ckpt.CheckpointManager(str(root), ckptr, incomplete_grace_secs=0)
        removed = manager.cleanup()
    assert len(removed) == incomplete
    assert _audit(root) == (committed, 0) and committed >= 1
    reliability.add(
        "faults", "saving process SIGKILLed mid-save", "incomplete directories cleaned", incomplete
    )
    reliability.add(
        "faults", "saving process SIGKILLed mid-save", "committed directories verified", committed
    )


def test_the_saving_process_killed_at_random_points(cluster, tmp_path, reliability):
    _kill_drivers(cluster, tmp_path, kills=3, reliability=reliability)


@pytest.mark.slow
def test_the_saving_process_killed_at_random_points_many_times(cluster, tmp_path, reliability):
    _kill_drivers(cluster, tmp_path, kills=30, reliability=reliability)


def test_a_saving_process_killed_during_staging_is_noticed_by_its_writer(
    cluster, tmp_path, reliability
):
    """The writer holding the session of a save whose process died before staging ended gives
    up on it at once (not after barrier_timeout_secs, 30 min by default) and deletes its files."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    root = tmp_path / "run"
    driver = _Driver(script, cluster.cluster.address, root, "hang-in-staging", 1)
    try:
        driver.wait_for("stuck")
        path = root / "step-000000001"
        _wait_for(lambda: _data_files(path), "bucket 0 to reach storage")
    finally:
        driver.kill()
    reliability.add("faults", "saving process SIGKILLed during staging", "injected")
    _wait_for(lambda: not _data_files(path), "the writer to discard the dead save's files", 30)
    assert not (path / MARKER_NAME).exists()
    # and the writer still serves saves
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        ckptr.save(str(tmp_path / "after"), _state(5))
        assert_same(_state(5), ckptr.load(str(tmp_path / "after")))
    shutil.rmtree(root)
    reliability.add("faults", "saving process SIGKILLed during staging", "survived")


def test_cleanup_removes_the_empty_directory_a_failed_save_leaves(cluster, tmp_path, reliability):
    """A save that fails deletes its files but may leave its (empty) step directory; a save
    whose process dies before its first file leaves one too. cleanup() removes them once old
    enough, and nothing else."""
    plan = FaultPlan(
        tmp_path / "faults",
        [Fault("write", "r*.data", times=None, error=PermissionError("injected: denied"))],
    )
    root = tmp_path / "run"
    with (
        ray_ckpt.make_sync_checkpointer(
            config=small_config(), filesystem=faulty(pafs.LocalFileSystem(), plan)
        ) as failing,
        ray_ckpt.make_sync_checkpointer(config=small_config()) as ckptr,
    ):
        good = ray_ckpt.CheckpointManager(str(root), ckptr, incomplete_grace_secs=0)
        good.save(1, _state(1))
        bad = ray_ckpt.CheckpointManager(
            str(root), failing, filesystem=faulty(pafs.LocalFileSystem(), plan)
        )
        reliability.add("faults", "failed save leaves an empty step directory", "injected")
        with pytest.raises(ray_ckpt.errors.CheckpointWriteError, match="injected"):
            bad.save(2, _state(2))
        assert os.listdir(root / "step-000000002") == []
        (root / "notes").mkdir()  # not a step directory: never touched
        patient = ray_ckpt.CheckpointManager(str(root), ckptr, incomplete_grace_secs=3600)
        assert patient.cleanup() == []
        assert good.cleanup() == [str(root / "step-000000002")]
        assert sorted(os.listdir(root)) == ["notes", "step-000000001"]
        assert good.steps() == [1]
    reliability.add("faults", "failed save leaves an empty step directory", "survived")

"""Writer actors have a lifetime: they start ahead of the first save but after a restore, exit
once idle for ``idle_timeout_secs``, and the next save starts them again (issue 16: a detached
writer outlived every job on the cluster)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.tools
from ray_ckpt.save.pool import PRESTART_AFTER_LOADS_SECS

from .faulty_fs import Fault, FaultPlan, faulty
from .helpers import assert_same, small_config

IDLE_SECS = 2.0


def _config(idle: float | None, io_threads: int = 4) -> ray_ckpt.CheckpointerConfig:
    """``io_threads`` names the writer pool: a test with a value of its own gets fresh writers."""
    base = small_config()
    writer = dataclasses.replace(base.writer_config, idle_timeout_secs=idle, io_threads=io_threads)
    return dataclasses.replace(base, writer_config=writer)


def _alive(name: str, namespace: str) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
        return True
    except ValueError:
        return False


def _wait_until_gone(name: str, namespace: str, limit_secs: float = 120.0) -> float:
    start = time.monotonic()
    while _alive(name, namespace):
        assert time.monotonic() - start < limit_secs, f"{name} still alive after {limit_secs} s"
        time.sleep(0.25)
    return time.monotonic() - start


def test_an_idle_writer_exits_and_the_next_save_starts_it_again(cluster, tmp_path):
    config = _config(IDLE_SECS)
    state = {"w": torch.arange(1000.0), "step": 1}
    with ray_ckpt.make_sync_checkpointer(config=config) as ckptr:
        ckptr.save(str(tmp_path / "a"), state)
        name = ckptr._pool.actor_name(ckptr._pool.local_node_id())
        assert _alive(name, config.namespace)
        _wait_until_gone(name, config.namespace)
        ckptr.save(str(tmp_path / "b"), state)  # the cached handle is dead: started anew
        assert _alive(name, config.namespace)
        assert ray_ckpt.tools.verify(str(tmp_path / "b")).ok
        assert ckptr.load(str(tmp_path / "b"))["step"] == 1
        _wait_until_gone(name, config.namespace)


def _wait_until_alive(name: str, namespace: str, limit_secs: float = 120.0) -> None:
    start = time.monotonic()
    while not _alive(name, namespace):
        assert time.monotonic() - start < limit_secs, f"{name} not started in {limit_secs} s"
        time.sleep(0.1)


def test_a_checkpointer_made_to_restore_starts_its_writer_after_the_load(cluster, tmp_path):
    """A process restarted after a failure makes its checkpointer and restores at once. Its
    node's writer (a new process, whose start takes the cores the restore needs) starts once the
    process has not loaded for ``PRESTART_AFTER_LOADS_SECS``: not beside the load, but still
    ahead of the first save."""
    state = {"w": torch.arange(1000.0), "step": 1}
    with ray_ckpt.make_sync_checkpointer() as saver:
        saver.save(str(tmp_path / "ckpt"), state)
    load_secs = PRESTART_AFTER_LOADS_SECS + 3.0
    plan = FaultPlan(tmp_path / "faults", [Fault("read", "*.data", delay_secs=load_secs)])
    config = _config(None, io_threads=5)
    fs = faulty(pafs.LocalFileSystem(), plan)
    with ray_ckpt.make_sync_checkpointer(config=config, filesystem=fs) as ckptr:
        name = ckptr._pool.actor_name(ckptr._pool.local_node_id())
        during: list[bool] = []
        probe = threading.Timer(
            load_secs - 1.0, lambda: during.append(_alive(name, config.namespace))
        )
        probe.start()
        loaded = ckptr.load(str(tmp_path / "ckpt"))
        probe.join()
        assert plan.hits(0) == 1  # the load took load_secs at least
        assert during == [False]  # no writer while the process loaded
        assert_same(loaded, state)
        _wait_until_alive(name, config.namespace)  # started once the load was over
        ckptr.save(str(tmp_path / "again"), state)
    assert ray_ckpt.tools.verify(str(tmp_path / "again")).ok
    ray.kill(ray.get_actor(name, namespace=config.namespace), no_restart=True)


_LATE_PRESTART = """
import json, sys, threading, time
import ray, ray_ckpt
wait = float(sys.argv[1]) + 1.5
ray.init(address="local", num_cpus=1, include_dashboard=False)
closed = ray_ckpt.make_sync_checkpointer()
name = closed._pool.actor_name(closed._pool.local_node_id())
closed.close()
time.sleep(wait)
try:
    ray.get_actor(name, namespace="ray_ckpt")
    started = True
except ValueError:
    started = False
left_open = ray_ckpt.make_sync_checkpointer()
ray.shutdown()
time.sleep(wait)
for thread in threading.enumerate():  # a Ray a late prestart started takes seconds to come up
    if thread.name == "ray_ckpt-writer-prestart":
        thread.join(120)
print(json.dumps([started, ray.is_initialized()]))
"""


def test_a_prestart_that_comes_too_late_does_nothing():
    """A prestart waits (for loads, and a moment): by then its checkpointer may be closed, or
    Ray shut down. It then starts no writer, and does not attach this process to a Ray on its
    own (which would break the caller's next ``ray.init``). In a process of its own: it shuts
    down its Ray."""
    done = subprocess.run(
        [sys.executable, "-c", _LATE_PRESTART, str(PRESTART_AFTER_LOADS_SECS)],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    started, attached = json.loads(done.stdout.splitlines()[-1])
    assert not started, "a writer started for a checkpointer closed before its prestart"
    assert not attached, "a late prestart attached this process to a Ray after ray.shutdown()"


def test_a_writer_saves_without_ever_importing_torch(cluster, tmp_path):
    """A writer handles bytes: its process never imports torch, whose import takes a core for
    about a second (of a start otherwise a fifth of that), beside a restore or a training
    step. Sync and async saves of tensors of several dtypes and of torch leaves."""
    config = _config(None, io_threads=6)
    state = {"w": torch.randn(300, 100), "h": torch.ones(7, dtype=torch.bfloat16),
             "i": torch.arange(10), "size": torch.Size([2, 3]), "dtype": torch.float16,
             "device": torch.device("cpu"), "step": 4}
    with ray_ckpt.make_sync_checkpointer(config=config) as ckptr:
        ckptr.save(str(tmp_path / "sync"), state)
        name = ckptr._pool.actor_name(ckptr._pool.local_node_id())
    with ray_ckpt.make_async_checkpointer(config=config) as ckptr:
        _, write = ckptr.save(str(tmp_path / "async"), state)
        write.result()
        for path in ("sync", "async"):
            assert_same(ckptr.load(str(tmp_path / path)), state)
    writer = ray.get_actor(name, namespace=config.namespace)
    imported = ray.get(writer.__ray_call__.remote(
        lambda _: sorted(m for m in ("torch", "ray_ckpt.save.writer") if m in sys.modules)))
    assert imported == ["ray_ckpt.save.writer"]
    ray.kill(writer, no_restart=True)


def test_idle_timeout_is_validated():
    with pytest.raises(ValueError, match="idle_timeout_secs must be positive or None"):
        ray_ckpt.CheckpointWriterConfig(idle_timeout_secs=0)

"""Object-store pressure: state dicts larger than the object store, and no leak over many saves.

Runs on its own cluster whose object stores are tiny (100 MiB per node), so that a 400 MB save
must stage and write in pieces within the memory budget.
"""

from __future__ import annotations

import functools
import gc
import os
import threading
import time

import pytest
import ray
import torch
from ray._private.internal_api import get_memory_info_reply, get_state_from_address
from ray.util.state import list_actors

import ray_ckpt
import ray_ckpt.catalog
from ray_ckpt.builder import LOCAL_RAY_SYSTEM_CONFIG

from .conftest import CLUSTERS, MiB, ensure_cluster
from .helpers import assert_same

CLUSTERS["small_store"] = {
    # frees every 10 ms, as the README advises for clusters (Ray's default batches frees for 1 s)
    "head": {
        "num_cpus": 2,
        "object_store_memory": 100 * MiB,
        "_system_config": LOCAL_RAY_SYSTEM_CONFIG,
    },
    "workers": [{"num_cpus": 1, "object_store_memory": 100 * MiB}],
}


@pytest.fixture(scope="module")
def small_cluster():
    return ensure_cluster("small_store")


def _config(**staging) -> ray_ckpt.CheckpointerConfig:
    staging.setdefault("bucket_size_bytes", 8 * MiB)
    return ray_ckpt.CheckpointerConfig(
        staging_config=ray_ckpt.CheckpointStagerConfig(**staging)
    )


@functools.cache
def _gcs_state(address: str):
    return get_state_from_address(address)


def _store_used_bytes() -> int:
    reply = get_memory_info_reply(_gcs_state(ray.get_runtime_context().gcs_address))
    return int(reply.store_stats.object_store_bytes_used)


def _settled_store_bytes(timeout_secs: float = 10.0) -> int:
    """Object-store usage once released buckets are gone (Ray frees them asynchronously, a few
    milliseconds after the write that used them returns)."""
    deadline = time.monotonic() + timeout_secs
    used = _store_used_bytes()
    while used > 1 * MiB and time.monotonic() < deadline:
        time.sleep(0.2)
        used = _store_used_bytes()
    return used


def _writer_heap(node_id: str) -> int:
    writers = [
        a for a in list_actors(
            address=ray.get_runtime_context().gcs_address,
            filters=[("state", "=", "ALIVE")],
            detail=True,
            limit=1000,
        )
        if a.class_name == "_WriterActor" and a.node_id == node_id
    ]
    return sum(_heap_bytes(a.pid) for a in writers)


def _heap_bytes(pid: int) -> int:
    """Anonymous memory of a process: its heap, without the object-store pages it maps."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        line = next(line for line in f if line.startswith("Anonymous:"))
    return int(line.split()[1]) * 1024


def test_state_larger_than_the_object_store_saves(small_cluster, tmp_path):
    torch.manual_seed(0)
    state = {f"layer{i}": torch.randn(5_000_000) for i in range(20)}  # 400 MB vs a 100 MiB store
    with ray_ckpt.make_async_checkpointer(config=_config()) as ckptr:
        stage, write = ckptr.save(str(tmp_path / "big"), state)
        stage.result(timeout=300)
        result = write.result(timeout=300)
        assert result.nbytes == 400_000_000
        loaded = ckptr.load(str(tmp_path / "big"))
    assert_same(state, loaded)


def test_peak_memory_of_an_async_save_is_the_state_plus_the_budget(small_cluster, tmp_path):
    """While a 200 MB state saves through a 100 MiB store, the object store never holds more
    than the staging budget plus two buckets (a written bucket leaves the store when Ray frees
    it, in batches every 10 ms on this cluster; staging may put a bucket or two meanwhile), and
    neither the caller's nor the writer's own heap takes a copy of the state: staging copies
    straight into the store."""
    torch.manual_seed(2)
    state = {f"layer{i}": torch.randn(2_500_000) for i in range(20)}  # 200 MB
    budget, bucket = 32 * MiB, 8 * MiB
    node_id = ray.get_runtime_context().get_node_id()
    me = os.getpid()
    with ray_ckpt.make_async_checkpointer(config=_config(memory_budget_bytes=budget)) as ckptr:
        ckptr.save(str(tmp_path / "warm"), {"w": torch.ones(10)})[1].result(timeout=120)
        gc.collect()
        base_driver, base_writer = _heap_bytes(me), _writer_heap(node_id)
        peaks = {"store": 0, "driver": 0, "writer": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peaks["store"] = max(peaks["store"], _store_used_bytes())
                peaks["driver"] = max(peaks["driver"], _heap_bytes(me) - base_driver)
                peaks["writer"] = max(peaks["writer"], _writer_heap(node_id) - base_writer)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            stage, write = ckptr.save(str(tmp_path / "big"), state)
            stage.result(timeout=300)
            write.result(timeout=300)
        finally:
            done.set()
            sampler.join()
        assert_same(state, ckptr.load(str(tmp_path / "big")))
    store_peak = peaks["store"]
    assert 0 < store_peak <= budget + 2 * bucket, f"store peaked at {store_peak / MiB:.0f} MiB"
    assert peaks["driver"] < 48 * MiB, f"caller's heap grew by {peaks['driver'] / MiB:.0f} MiB"
    assert peaks["writer"] < 48 * MiB, f"writer's heap grew by {peaks['writer'] / MiB:.0f} MiB"


def test_explicit_budget_smaller_than_the_store(small_cluster, tmp_path):
    state = {f"t{i}": torch.full((1_000_000,), float(i)) for i in range(12)}  # 48 MB
    with ray_ckpt.make_sync_checkpointer(config=_config(memory_budget_bytes=16 * MiB)) as ckptr:
        ckptr.save(str(tmp_path / "c"), state)
        assert_same(state, ckptr.load(str(tmp_path / "c")))


def test_twenty_saves_in_a_row_do_not_grow_memory(small_cluster, tmp_path):
    torch.manual_seed(1)
    state = {"w": torch.randn(4_000_000), "tiny": [torch.randn(8) for _ in range(2000)]}
    me = os.getpid()
    node_id = ray.get_runtime_context().get_node_id()
    with ray_ckpt.make_async_checkpointer(config=_config()) as ckptr:

        def save(i: int) -> None:
            path = str(tmp_path / f"step-{i}")
            _, write = ckptr.save(path, state)
            write.result(timeout=120)
            ray_ckpt.catalog.delete_checkpoint(path)

        for i in range(8):  # warm up: actors, thread pools, allocator arenas
            save(i)
        gc.collect()
        base_driver, base_writer = _heap_bytes(me), _writer_heap(node_id)
        store_after = []
        for i in range(8, 28):
            save(i)
            store_after.append(_settled_store_bytes())
        gc.collect()
        driver_growth = _heap_bytes(me) - base_driver
        writer_growth = _writer_heap(node_id) - base_writer
    assert max(store_after) <= 1 * MiB, f"object store not released: {store_after}"
    assert driver_growth < 64 * MiB, f"driver grew by {driver_growth / MiB:.0f} MiB over 20 saves"
    assert writer_growth < 64 * MiB, f"writer grew by {writer_growth / MiB:.0f} MiB over 20 saves"
    assert not os.listdir(tmp_path)

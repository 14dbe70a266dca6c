"""Object-store pressure: state dicts larger than the object store, and no leak over many saves.

Runs on its own cluster whose object stores are tiny (100 MiB per node), so that a 400 MB save
must stage and write in pieces within the memory budget.
"""

from __future__ import annotations

import functools
import gc
import os
import time

import pytest
import ray
import torch
from ray._private.internal_api import get_memory_info_reply, get_state_from_address
from ray.util.state import list_actors

import ray_ckpt

from .conftest import CLUSTERS, MiB, ensure_cluster
from .helpers import assert_same

CLUSTERS["small_store"] = {
    "head": {"num_cpus": 2, "object_store_memory": 100 * MiB},
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
            ray_ckpt.delete_checkpoint(path)

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

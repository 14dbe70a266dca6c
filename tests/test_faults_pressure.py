"""Object-store pressure over many saves: 50 in a row with a steady bound on the object store,
the saving process's heap and the writer actor's heap (slow; the 20-save version runs by default
in tests/test_async_pressure.py, whose cluster and measurements this reuses)."""

from __future__ import annotations

import gc
import os

import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.catalog

from .conftest import MiB
from .test_async_pressure import _config, _heap_bytes, _settled_store_bytes, _writer_heap
from .test_async_pressure import small_cluster as small_cluster  # the module's fixture

SAVES = 50
WARMUP = 8


@pytest.mark.slow
def test_fifty_saves_in_a_row_keep_memory_and_the_object_store_steady(
    small_cluster,
    tmp_path,
    reliability,
):
    torch.manual_seed(1)
    state = {"w": torch.randn(4_000_000), "tiny": [torch.randn(8) for _ in range(2000)]}
    me = os.getpid()
    node_id = ray.get_runtime_context().get_node_id()
    driver, writer, store = [], [], []
    with ray_ckpt.make_async_checkpointer(config=_config()) as ckptr:
        for i in range(WARMUP + SAVES):
            path = str(tmp_path / f"step-{i}")
            _, write = ckptr.save(path, state)
            write.result(timeout=120)
            ray_ckpt.catalog.delete_checkpoint(path)
            if i >= WARMUP:
                gc.collect()
                store.append(_settled_store_bytes())
                driver.append(_heap_bytes(me))
                writer.append(_writer_heap(node_id))
    assert max(store) <= 1 * MiB, f"object store not released: {store}"
    half = SAVES // 2
    for name, heap in (("driver", driver), ("writer", writer)):
        total = heap[-1] - heap[0]
        late = max(heap[half:]) - min(heap[half:])
        assert total < 64 * MiB, f"{name} grew by {total / MiB:.0f} MiB over {SAVES} saves"
        assert late < 24 * MiB, (
            f"{name} still moves by {late / MiB:.0f} MiB in the last {half} saves"
        )
    assert not os.listdir(tmp_path)
    reliability.most(
        "pressure", "saves in a row without leak (16 MB state, 2,000 tensors)", "saves", SAVES
    )
    reliability.most(
        "pressure",
        "saves in a row without leak (16 MB state, 2,000 tensors)",
        "driver heap growth MiB",
        round((driver[-1] - driver[0]) / MiB),
    )
    reliability.most(
        "pressure",
        "saves in a row without leak (16 MB state, 2,000 tensors)",
        "writer heap growth MiB",
        round((writer[-1] - writer[0]) / MiB),
    )
    reliability.most(
        "pressure",
        "saves in a row without leak (16 MB state, 2,000 tensors)",
        "object store after each save, max MiB",
        round(max(store) / MiB),
    )

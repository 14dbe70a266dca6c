"""Peak memory of an async save: what it adds to the state it saves.

The state already lives in the caller; while an async save runs, memory grows by

* the object store's bytes in use: the staged buckets, which ``memory_budget_bytes`` bounds;
* the caller's heap (anonymous memory; the object-store pages it maps are not counted): staging
  copies straight into the store, so no copy of the state should land here;
* the writer actor's heap: it reads the buckets zero-copy from shared memory.

(The page cache that the writes fill is the kernel's, clean once fsynced, and not counted.)
Three sampler threads read one each every 2 ms during one untimed save per budget: the default
(half the object store) and, when the state is larger, a quarter of the state, so that it
stages in pieces. The target (issue 3): the sum stays within the budget plus a small constant,
:data:`SLACK_BYTES`.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Any

MiB = 1 << 20
SLACK_BYTES = 64 * MiB  # "a small constant": one bucket of the default size
_SAMPLE_SECS = 0.002


def heap_bytes(pid: int) -> int:
    """Anonymous memory of a process: its heap, without the object-store pages it maps."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        line = next(line for line in f if line.startswith("Anonymous:"))
    return int(line.split()[1]) * 1024


def _store_used() -> Any:
    """A function returning this node's object-store bytes in use."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    return lambda: int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


def _writer_pid(checkpointer: Any) -> int:
    import ray

    writer = checkpointer._pool.local()
    return int(ray.get(writer.__ray_call__.remote(lambda _self: os.getpid())))


def peak_of_one_save(state: Any, path: str, budget_bytes: int | None) -> dict[str, int]:
    """Peaks above the baseline during one async save of ``state`` to ``path``."""
    import ray_ckpt
    import torch

    config = ray_ckpt.CheckpointerConfig(
        staging_config=ray_ckpt.CheckpointStagerConfig(memory_budget_bytes=budget_bytes)
    )
    store_used = _store_used()
    me = os.getpid()
    with ray_ckpt.make_async_checkpointer(config) as checkpointer:
        checkpointer.save(path + "-warm", {"w": torch.ones(16)})[1].result()  # writer up
        shutil.rmtree(path + "-warm")
        writer = _writer_pid(checkpointer)
        probes = {
            "store": store_used,
            "caller": lambda: heap_bytes(me),
            "writer": lambda: heap_bytes(writer),
        }
        base = {name: probe() for name, probe in probes.items()}
        peaks = dict.fromkeys(probes, 0)
        done = threading.Event()

        def sample(name: str) -> None:  # each probe on its own thread: none waits for another
            while not done.is_set():
                peaks[name] = max(peaks[name], probes[name]() - base[name])
                done.wait(_SAMPLE_SECS)

        samplers = [threading.Thread(target=sample, args=(name,)) for name in probes]
        for sampler in samplers:
            sampler.start()
        try:
            stage, write = checkpointer.save(path, state)
            stage.result()
            write.result()
        finally:
            done.set()
            for sampler in samplers:
                sampler.join()
        budget = checkpointer._coordinator._memory_budget()
    shutil.rmtree(path, ignore_errors=True)
    return {
        "budget_bytes": budget,
        "store_peak_bytes": peaks["store"],
        "caller_heap_peak_bytes": peaks["caller"],
        "writer_heap_peak_bytes": peaks["writer"],
    }


def measure(state: Any, nbytes: int, scratch: str) -> list[dict[str, int]]:
    """Peaks of one save with the default budget and, for a state of 256 MiB or more, one
    with a budget of a quarter of the state."""
    budgets: list[int | None] = [None]
    if nbytes // 4 >= 64 * MiB:
        budgets.append(nbytes // 4)
    return [
        peak_of_one_save(state, os.path.join(scratch, f"memory-{i}"), budget)
        for i, budget in enumerate(budgets)
    ]

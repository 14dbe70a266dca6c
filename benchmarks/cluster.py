"""The 2-node part: ray_ckpt saves from one node vs from two nodes at once.

A ``ray.cluster_utils.Cluster`` of a head and one worker node, both on this machine (so both
write to the same disk: the comparison shows what running writers on several nodes costs or
gains when storage is shared, not how a real cluster scales; see README.md for the formula).

One saver actor per node (``num_cpus=0``, pinned with ``NodeAffinitySchedulingStrategy``)
builds its part of a transformer state dict (split in two parts of equal bytes: the head holds
both, the worker the second) and a sync checkpointer up front; then

* one node: the head's saver saves both parts (``nbytes``);
* two nodes: the head saves the first part and the worker the second, at the same time, each
  to its own path.

Throughput is the bytes saved over the time from the first save's start to the last save's
end (every actor stamps ``time.time()`` on the same machine).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

MiB = 1 << 20


@ray.remote(num_cpus=0)
class _Saver:
    """Holds parts ``keep`` of the state split in two, and a sync checkpointer."""

    def __init__(self, nbytes: int, keep: list[int]) -> None:
        import ray_ckpt

        from .state_dicts import split, transformer_state

        parts = split(transformer_state(nbytes), 2)
        self.parts = {i: parts[i] for i in keep}
        self.ckptr = ray_ckpt.make_sync_checkpointer()

    def node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def save(self, path: str, parts: list[int]) -> tuple[float, float, int]:
        from .state_dicts import nbytes_of

        state = {k: v for i in parts for k, v in self.parts[i].items()}
        start = time.time()
        self.ckptr.save(path, state)
        return start, time.time(), nbytes_of(state)

    def close(self) -> None:
        self.ckptr.close()


def _on(node_id: str) -> dict[str, Any]:
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def run(nbytes: int, *, runs: int, warmup: int, scratch: str) -> dict[str, Any]:
    """Start the 2-node cluster, time both layouts, shut the cluster down."""
    from ray.cluster_utils import Cluster
    from ray_ckpt.builder import LOCAL_RAY_SYSTEM_CONFIG

    store = max(2 * nbytes + 64 * MiB, 256 * MiB)  # budget (half) holds the whole state
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": store,
            "include_dashboard": False,
            "_system_config": LOCAL_RAY_SYSTEM_CONFIG,
        },
    )
    savers: list[Any] = []
    try:
        worker = cluster.add_node(num_cpus=1, object_store_memory=store)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        assert cluster.head_node is not None
        head_id, worker_id = cluster.head_node.node_id, worker.node_id
        saver: Any = _Saver
        head = saver.options(**_on(head_id)).remote(nbytes, [0, 1])
        other = saver.options(**_on(worker_id)).remote(nbytes, [1])
        savers = [head, other]
        placed = ray.get([s.node_id.remote() for s in savers])
        if placed != [head_id, worker_id]:
            raise RuntimeError(f"savers were not placed as asked: {placed}")
        counter = 0

        def timed(calls: list[tuple[Any, list[int]]]) -> tuple[float, int]:
            nonlocal counter
            paths = []
            for _ in calls:
                counter += 1
                paths.append(os.path.join(scratch, f"cluster-{counter}"))
            pending = [s.save.remote(p, parts) for (s, parts), p in zip(calls, paths, strict=True)]
            spans = ray.get(pending)
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)
            secs = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
            return secs, sum(n for _, _, n in spans)

        one: list[float] = []
        two: list[float] = []
        one_bytes = two_bytes = 0
        for r in range(warmup + runs):
            secs_one, one_bytes = timed([(head, [0, 1])])
            secs_two, two_bytes = timed([(head, [0]), (other, [1])])
            if r >= warmup:
                one.append(secs_one)
                two.append(secs_two)
        return {
            "nbytes_one_node": one_bytes,
            "nbytes_two_nodes": two_bytes,
            "one_node_secs": one,
            "two_nodes_secs": two,
            "one_node_gbps": one_bytes / statistics.median(one) / 1e9,
            "two_nodes_gbps": two_bytes / statistics.median(two) / 1e9,
            "object_store_bytes_per_node": store,
        }
    finally:
        for saver in savers:
            try:
                ray.get(saver.close.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        ray.shutdown()
        cluster.shutdown()

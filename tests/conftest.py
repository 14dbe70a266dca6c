"""Shared fixtures: one simulated Ray cluster per configuration, reused across test modules.

Starting Ray costs seconds, so the cluster outlives a module: a module asks for a
configuration by name (``default``: head + 2 worker nodes; others for special cases) and the
cluster is only replaced when the next module asks for a different one. Every process started
here is stopped here, by its own handle (``cluster.shutdown()``).

``./dev test`` runs the suite in a network namespace with only ``lo`` up, where Ray binds to
127.0.0.1 by itself; it sets RAY_CKPT_REQUIRE_LOOPBACK=1 and the cluster fixture then refuses
to run on any other address.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

MiB = 1 << 20

CLUSTERS: dict[str, dict[str, Any]] = {
    # head + 2 workers; the head's store is big enough for the 1 GiB tests
    "default": {
        "head": {"num_cpus": 2, "object_store_memory": 1536 * MiB},
        "workers": [
            {"num_cpus": 1, "object_store_memory": 400 * MiB, "resources": {"worker1": 1}},
            {"num_cpus": 1, "object_store_memory": 400 * MiB, "resources": {"worker2": 1}},
        ],
    },
}


@dataclass
class RunningCluster:
    name: str
    cluster: Cluster
    head_node_id: str = ""
    worker_node_ids: list[str] = field(default_factory=list)

    @property
    def node_ids(self) -> list[str]:
        return [self.head_node_id, *self.worker_node_ids]


_current: RunningCluster | None = None


def _start(name: str) -> RunningCluster:
    spec = CLUSTERS[name]
    cluster = Cluster(initialize_head=True, head_node_args=dict(spec["head"]))
    workers = [cluster.add_node(**dict(w)) for w in spec["workers"]]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="ray_ckpt_tests", log_to_driver=False)
    if os.environ.get("RAY_CKPT_REQUIRE_LOOPBACK") == "1":
        ip = ray.util.get_node_ip_address()
        if ip != "127.0.0.1":
            cluster.shutdown()
            ray.shutdown()
            pytest.exit(f"Ray bound to {ip}, not 127.0.0.1: run the suite through ./dev test")
    running = RunningCluster(name, cluster)
    running.head_node_id = cluster.head_node.node_id
    running.worker_node_ids = [w.node_id for w in workers]
    return running


def _stop() -> None:
    global _current
    if _current is not None:
        ray.shutdown()
        _current.cluster.shutdown()
        _current = None


def ensure_cluster(name: str) -> RunningCluster:
    global _current
    if _current is not None and _current.name == name:
        return _current
    _stop()
    _current = _start(name)
    return _current


@pytest.fixture(scope="session", autouse=True)
def _shutdown_clusters() -> Iterator[None]:
    yield
    _stop()


@pytest.fixture(scope="module")
def cluster() -> RunningCluster:
    """The default cluster: head (2 CPUs) + 2 worker nodes, connected."""
    return ensure_cluster("default")


def on_node(node_id: str) -> dict[str, Any]:
    """Options that run a Ray task or actor on ``node_id`` and nowhere else."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}

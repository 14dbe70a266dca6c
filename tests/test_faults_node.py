"""A node removed mid-save (``Cluster.remove_node``), on a cluster of this module's own.

Each test adds a worker node, gets a save stuck on it, removes it, and asserts: the save fails
within a bounded time with an error naming the node; nothing was committed; the previous
checkpoint loads; the next save succeeds on the nodes that remain.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt.format.names import MARKER_NAME

from .conftest import CLUSTERS, MiB, ensure_cluster, on_node
from .helpers import assert_same

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CLUSTERS["faults_nodes"] = {
    "head": {"num_cpus": 2, "object_store_memory": 300 * MiB},
    "workers": [{"num_cpus": 1, "object_store_memory": 150 * MiB}],
}
FAIL_WITHIN_SECS = 45.0


@pytest.fixture(scope="module")
def nodes_cluster():
    return ensure_cluster("faults_nodes")


@pytest.fixture
def doomed(nodes_cluster):
    """A worker node added for this test; the test removes it (or this fixture does)."""
    node = nodes_cluster.cluster.add_node(num_cpus=1, object_store_memory=150 * MiB)
    nodes_cluster.cluster.wait_for_nodes()
    yield node
    if any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
        nodes_cluster.cluster.remove_node(node)


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(1024, 1024, generator=g),
        "b": torch.randn(9, generator=g),
        "seed": seed,
    }


def _config(spread: bool) -> ray_ckpt.CheckpointerConfig:
    return ray_ckpt.CheckpointerConfig(
        staging_config=ray_ckpt.CheckpointStagerConfig(
            bucket_size_bytes=512 << 10, pack_threshold_bytes=16 << 10
        ),
        writer_config=ray_ckpt.CheckpointWriterConfig(spread_across_nodes=spread),
    )


class NodeGatedWriter(ray_ckpt.CheckpointWriter):
    """A real writer that, on node ``node_id`` only, holds every bucket until ``gate`` exists,
    touching ``gate + ".reached"`` when it starts holding one."""

    def __init__(self, config: Any, gate: str, node_id: str) -> None:
        super().__init__(config)
        self.gate, self.node_id = gate, node_id

    def write_bucket(self, storage: Any, layout: Any, arrays: Any, **kwargs: Any) -> Any:
        if ray.get_runtime_context().get_node_id() == self.node_id and not os.path.exists(
            self.gate
        ):
            open(self.gate + ".reached", "w").close()  # only when it really holds a bucket
            while not os.path.exists(self.gate):
                time.sleep(0.02)
        return super().write_bucket(storage, layout, arrays, **kwargs)


def _wait_for(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


def test_a_node_removed_while_its_writer_holds_buckets(
    nodes_cluster, doomed, tmp_path, reliability
):
    """The saving process is on the head; with spread_across_nodes, buckets go to the writers of
    every node, and the doomed node's writer holds its own."""
    gate = tmp_path / "gate"
    gate.touch()
    root = tmp_path / "run"
    with ray_ckpt.make_async_checkpointer(
        config=_config(spread=True),
        checkpoint_writer_init_fn=NodeGatedWriter,
        checkpoint_writer_init_args={"gate": str(gate), "node_id": doomed.node_id},
    ) as ckptr:
        previous = root / "step-000000001"
        first = ckptr.save(str(previous), _state(1))[1].result(timeout=120)
        assert doomed.node_id in first.writers, "the doomed node took part"
        gate.unlink()
        path = root / "step-000000002"
        _, write = ckptr.save(str(path), _state(2))
        _wait_for(str(gate) + ".reached")
        reliability.add("faults", "node removed mid-save (its writer holds buckets)", "injected")
        started = time.monotonic()
        nodes_cluster.cluster.remove_node(doomed)
        with pytest.raises(ray_ckpt.errors.CheckpointWriteError) as info:
            write.result(timeout=FAIL_WITHIN_SECS * 2)
        assert time.monotonic() - started < FAIL_WITHIN_SECS, "the failure took too long"
        assert doomed.node_id in str(info.value) and "nothing was committed" in str(info.value)
        assert not (path / MARKER_NAME).exists()
        assert_same(_state(1), ckptr.load(str(previous)))

        gate.touch()
        nxt = root / "step-000000003"
        result = ckptr.save(str(nxt), _state(3))[1].result(timeout=120)
        assert doomed.node_id not in result.writers and len(result.writers) >= 2
        assert_same(_state(3), ckptr.load(str(nxt)))
        manager = ray_ckpt.CheckpointManager(str(root), ckptr, incomplete_grace_secs=0)
        manager.cleanup()
        assert manager.steps() == [1, 3] and sorted(os.listdir(root)) == [previous.name, nxt.name]
    reliability.add("faults", "node removed mid-save (its writer holds buckets)", "survived")


@ray.remote(num_cpus=0)
class Saver:
    """A training process on a worker node, saving through that node's (gated) writer."""

    def __init__(self, gate: str, node_id: str) -> None:
        self.ckptr = ray_ckpt.make_async_checkpointer(
            config=_config(spread=False),
            checkpoint_writer_init_fn=NodeGatedWriter,
            checkpoint_writer_init_args={"gate": gate, "node_id": node_id},
        )

    def save(self, path: str, seed: int) -> Any:
        return self.ckptr.save(path, _state(seed))[1].result()


def test_a_node_removed_with_the_saving_process_and_its_session(
    nodes_cluster, doomed, tmp_path, reliability
):
    """The saving process and its session (in its node's writer) are on the doomed node."""
    gate = tmp_path / "gate"
    root = tmp_path / "run"
    saver = Saver.options(**on_node(doomed.node_id)).remote(str(gate), doomed.node_id)
    path = root / "step-000000001"
    pending = saver.save.remote(str(path), 1)
    _wait_for(str(gate) + ".reached", timeout=120)
    reliability.add("faults", "node removed mid-save (with the saving process)", "injected")
    started = time.monotonic()
    nodes_cluster.cluster.remove_node(doomed)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(pending, timeout=FAIL_WITHIN_SECS * 2)
    assert time.monotonic() - started < FAIL_WITHIN_SECS
    assert not (path / MARKER_NAME).exists()
    with ray_ckpt.make_sync_checkpointer(config=_config(spread=False)) as ckptr:
        with pytest.raises(
            (ray_ckpt.errors.IncompleteCheckpointError, ray_ckpt.CheckpointNotFoundError)
        ):
            ckptr.load(str(path))
        # the remaining nodes save; the manager removes what the dead save left
        manager = ray_ckpt.CheckpointManager(str(root), ckptr, incomplete_grace_secs=0)
        manager.save(2, _state(2))
        manager.cleanup()
        assert manager.steps() == [2] and os.listdir(root) == ["step-000000002"]
        assert_same(_state(2), manager.load())
    reliability.add("faults", "node removed mid-save (with the saving process)", "survived")

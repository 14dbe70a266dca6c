"""Saves to S3 from two worker nodes of the simulated cluster, loaded back on other nodes.

S3 is a real S3 API server (``moto_server``) on 127.0.0.1. Each worker node runs one saving
task (one "rank"), which stages into its node's object store and is written by its node's
writer actor; every checkpoint is then read on the other worker node and on the driver, and
compared byte for byte with the state regenerated from its seed. The 1 GiB run is ``slow``; the
same path runs in the default suite with a few MiB per node.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import ray
import torch

import ray_ckpt
from ray_ckpt._checksum import crc32c

from .conftest import S3_BUCKET, on_node

MiB = 1 << 20
logger = logging.getLogger(__name__)


def _state(seed: int, nbytes: int) -> dict[str, Any]:
    """Transformer-shaped float32 weights totalling ``nbytes``, plus optimizer-like scalars."""
    generator = torch.Generator().manual_seed(seed)
    hidden = 1024
    rows = max(1, nbytes // (8 * hidden * 4))
    state: dict[str, Any] = {
        f"layers.{i}.weight": torch.randn(rows, hidden, generator=generator) for i in range(8)
    }
    state["layers.0.bias"] = torch.randn(hidden, generator=generator)
    state["step"] = seed
    return state


def _digests(state: dict[str, Any]) -> dict[str, int]:
    return {
        k: crc32c(v.contiguous().view(torch.uint8).numpy())
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


@ray.remote(num_cpus=0)
def _save_here(fs: Any, path: str, seed: int, nbytes: int, bucket_bytes: int) -> dict[str, Any]:
    config = ray_ckpt.CheckpointerConfig(
        staging_config=ray_ckpt.CheckpointStagerConfig(bucket_size_bytes=bucket_bytes)
    )
    state = _state(seed, nbytes)
    with ray_ckpt.make_async_checkpointer(config=config, filesystem=fs) as ckptr:
        _, write = ckptr.save(path, state)
        result = write.result(timeout=600)
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "writers": result.writers,
        "nbytes": result.nbytes,
        "secs": result.total_secs,
    }


@ray.remote(num_cpus=0)
def _load_here(fs: Any, path: str) -> tuple[str, dict[str, int], float]:
    started = time.perf_counter()
    state, _ = ray_ckpt.CheckpointReader(filesystem=fs).read(path)
    secs = time.perf_counter() - started
    return ray.get_runtime_context().get_node_id(), _digests(state), secs


def _two_nodes_round_trip(cluster: Any, fs: Any, run: str, nbytes: int, bucket_bytes: int) -> None:
    workers = cluster.worker_node_ids
    paths = [f"{S3_BUCKET}/{run}/node-{i}" for i in range(2)]
    saves = ray.get([
        _save_here.options(**on_node(node)).remote(fs, path, seed, nbytes, bucket_bytes)
        for seed, (node, path) in enumerate(zip(workers, paths, strict=True))
    ])
    for node, save in zip(workers, saves, strict=True):
        assert save["node"] == node
        assert list(save["writers"]) == [node], "each node's writer wrote what it staged"
        assert save["nbytes"] >= nbytes * 0.99
        logger.info("saved %.0f MiB from node %s in %.1fs (%.0f MiB/s)", save["nbytes"] / MiB,
                    node[:8], save["secs"], save["nbytes"] / MiB / save["secs"])

    # every checkpoint read on the other worker node ...
    loads = ray.get([
        _load_here.options(**on_node(workers[1 - i])).remote(fs, path)
        for i, path in enumerate(paths)
    ])
    for seed, (node, digests, secs) in enumerate(loads):
        assert node == workers[1 - seed]
        assert digests == _digests(_state(seed, nbytes))
        logger.info("loaded %.0f MiB on node %s in %.1fs", saves[seed]["nbytes"] / MiB,
                    node[:8], secs)
    # ... and in place, on the driver, into preallocated tensors
    for seed, path in enumerate(paths):
        expected = _state(seed, nbytes)
        target = {k: torch.empty_like(v) for k, v in expected.items() if torch.is_tensor(v)}
        ray_ckpt.CheckpointReader(filesystem=fs).read(path, target)
        assert all(torch.equal(target[k], expected[k]) for k in target)
    entries = ray_ckpt.list_checkpoints(f"{S3_BUCKET}/{run}", filesystem=fs)
    assert [(e.name, e.committed) for e in entries] == [("node-0", True), ("node-1", True)]


def test_two_nodes_save_to_s3_and_load_on_the_other_node(cluster, s3_fs):
    _two_nodes_round_trip(cluster, s3_fs, "two-nodes-small", nbytes=12 * MiB, bucket_bytes=4 * MiB)


@pytest.mark.slow
def test_one_gib_to_s3_from_two_nodes(cluster, s3_fs):
    """1 GiB in all: 0.5 GiB from each worker node, in 64 MiB data files (multipart uploads of
    pyarrow's 10 MiB parts), each read back on the other node and on the driver."""
    _two_nodes_round_trip(cluster, s3_fs, "two-nodes-1gib", nbytes=512 * MiB, bucket_bytes=64 * MiB)

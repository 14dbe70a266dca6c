"""Sharded tensors: DTensors saved on N ranks load on M, in other layouts, reading only their share.

Ranks are Ray actors with a gloo process group on CPU over loopback.
"""

from __future__ import annotations

import socket
import sys

import pytest
import ray
import torch
import torch.distributed as dist

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt.sharding import ShardedTensor, overlap, runs

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

FULL_SHAPE = (37, 12)  # uneven on purpose: 37 rows do not split evenly over 2 or 3 ranks


def _full(name: str) -> torch.Tensor:
    torch.manual_seed({"w": 1, "b": 2, "e": 3}[name])
    shape = {"w": FULL_SHAPE, "b": (12,), "e": (5, 7, 3)}[name]
    return torch.randn(shape)


def _placement(spec: str):
    from torch.distributed.tensor import Replicate, Shard

    return {"S0": [Shard(0)], "S1": [Shard(1)], "R": [Replicate()]}[spec]


@ray.remote(num_cpus=0)
class ShardRank:
    def __init__(self, rank: int, world: int, port: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        self.rank = rank
        self.mesh = init_device_mesh("cpu", (world,))
        self.ckptr = ray_ckpt.make_sync_checkpointer()  # rank info from torch.distributed

    def _dtensor(self, name: str, spec: str, fill=None):
        from torch.distributed.tensor import distribute_tensor

        full = _full(name) if fill is None else torch.full(_full(name).shape, fill)
        return distribute_tensor(full, self.mesh, _placement(spec))

    def save(self, path: str, layout: dict[str, str]) -> None:
        state = {"model": {n: self._dtensor(n, spec) for n, spec in layout.items()}, "step": 3}
        self.ckptr.save(path, state)

    def load(self, path: str, layout: dict[str, str]) -> dict:
        """Load into DTensors of ``layout``; return per key whether the local shard is exact,
        and the bytes read."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        targets = {n: self._dtensor(n, spec, fill=-1.0) for n, spec in layout.items()}
        locals_before = {n: t.to_local().data_ptr() for n, t in targets.items()}
        self.ckptr.load(path, {"model": targets}, strict=True)
        out = {"read": self.ckptr._reader.last_stats.nbytes_read, "exact": {}, "share": 0}
        for name, target in targets.items():
            shape, offset = compute_local_shape_and_global_offset(
                target.shape, target.device_mesh, target.placements
            )
            index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
            local = target.to_local()
            assert local.data_ptr() == locals_before[name]  # filled in place
            out["exact"][name] = torch.equal(local, _full(name)[index])
            out["share"] += local.numel() * local.element_size()
        return out

    def close(self) -> None:
        self.ckptr.close()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group(world: int) -> list:
    port = _free_port()
    return [ShardRank.remote(r, world, port) for r in range(world)]


def _close(ranks) -> None:
    ray.get([r.close.remote() for r in ranks])
    for r in ranks:
        ray.kill(r)


@pytest.fixture(scope="module")
def saved_on_two(cluster, tmp_path_factory):
    """A model with a Shard(0) weight, a Replicate bias and a Shard(1) 3-d tensor, on 2 ranks."""
    path = str(tmp_path_factory.mktemp("sharded") / "step-3")
    ranks = _group(2)
    ray.get([r.save.remote(path, {"w": "S0", "b": "R", "e": "S1"}) for r in ranks], timeout=120)
    _close(ranks)
    return path


def test_manifest_records_shards_once(saved_on_two):
    table = ray_ckpt.CheckpointReader().open(saved_on_two).table.to_pylist()
    w = [r for r in table if r["key"] == "model.w"]
    assert sorted(tuple(r["global_offset"]) for r in w) == [(0, 0), (19, 0)]
    assert {tuple(r["global_shape"]) for r in w} == {FULL_SHAPE}
    b = [r for r in table if r["key"] == "model.b"]
    assert len(b) == 1  # replicated across the mesh: its bytes are written once


@pytest.mark.parametrize(
    "world, layout",
    [
        (1, {"w": "S0", "b": "R", "e": "S1"}),
        (3, {"w": "S0", "b": "R", "e": "S1"}),
        (2, {"w": "S1", "b": "S0", "e": "S0"}),
        (3, {"w": "S1", "b": "R", "e": "R"}),
    ],
    ids=["1-rank", "3-ranks-S0", "2-ranks-S1", "3-ranks-S1"],
)
def test_load_into_another_mesh_and_layout(saved_on_two, world, layout):
    ranks = _group(world)
    try:
        results = ray.get([r.load.remote(saved_on_two, layout) for r in ranks], timeout=120)
    finally:
        _close(ranks)
    for rank, result in enumerate(results):
        assert all(result["exact"].values()), (rank, result["exact"])
        # each rank reads its own share of the bytes, not the whole tensors
        assert result["read"] <= result["share"] + 64 * len(layout), (rank, result)


def test_full_load_without_process_group_consolidates(saved_on_two):
    state = ray_ckpt.CheckpointReader().read(saved_on_two)[0]
    for name in ("w", "b", "e"):
        assert torch.equal(state["model"][name], _full(name)), name
    assert state["step"] == 3
    # a plain full tensor as target, and a ShardedTensor box as target
    target = {"model": {"w": torch.zeros(FULL_SHAPE)}}
    ray_ckpt.CheckpointReader().read(saved_on_two, target)
    assert torch.equal(target["model"]["w"], _full("w"))
    box = ShardedTensor(torch.zeros(10, 5), FULL_SHAPE, (15, 4))
    ray_ckpt.CheckpointReader().read(saved_on_two, {"model": {"w": box}})
    assert torch.equal(box.local, _full("w")[15:25, 4:9])


def test_global_shape_mismatch_names_both_layouts(saved_on_two):
    with pytest.raises(
        ray_ckpt.errors.StateDictMismatchError, match=r"float32 \[37, 12\].*\[36, 12\]"
    ):
        ray_ckpt.CheckpointReader().read(saved_on_two, {"model": {"w": torch.zeros(36, 12)}})


def test_missing_shard_is_named(cluster, tmp_path):
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        # a ShardedTensor covering only half of its global tensor: refused at save time
        half = ShardedTensor(torch.ones(5, 4), (10, 4), (0, 0))
        with pytest.raises(
            ray_ckpt.errors.CheckpointWriteError, match="cover 20 of the 40 elements"
        ):
            ckptr.save(str(tmp_path / "c"), {"w": half})


def test_runs_and_overlap():
    assert list(runs((4, 6), ((1, 0), (2, 6)))) == [(6, 12)]  # whole rows: one run
    assert list(runs((4, 6), ((0, 2), (3, 2)))) == [(2, 2), (8, 2), (14, 2)]
    assert list(runs((), ((), ()))) == [(0, 1)]
    assert overlap(((0, 0), (4, 6)), ((3, 5), (4, 4))) == ((3, 5), (1, 1))
    assert overlap(((0,), (3,)), ((3,), (3,))) is None

"""Multi-rank saves: ranks as Ray actors on the simulated cluster, one checkpoint, one barrier."""

from __future__ import annotations

import os
import sys
import time

import pyarrow.ipc as ipc
import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt.format.refs import MAX_DEPTH
from ray_ckpt.save.barrier import HOST_NAME, barrier_name
from ray_ckpt.save.commit import gather_shards

from .conftest import on_node
from .helpers import assert_same, manifest_file

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _model_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)  # same seed on every rank: replicated, as under DDP
    return {f"layer{i}.weight": torch.randn(64 * (i + 1), 64) for i in range(6)} | {
        "layer0.bias": torch.zeros(64)
    }


class _Rank:
    def __init__(self, rank: int, world: int, sync: bool, timeout: float = 60.0, **staging) -> None:
        config = ray_ckpt.CheckpointerConfig(
            staging_config=ray_ckpt.CheckpointStagerConfig(
                bucket_size_bytes=256 << 10, pack_threshold_bytes=16 << 10,
                rank_local_keys=("rng",), **staging
            ),
            writer_config=ray_ckpt.CheckpointWriterConfig(barrier_timeout_secs=timeout),
        )
        info = ray_ckpt.RankInfo(rank, world)
        make = ray_ckpt.make_sync_checkpointer if sync else ray_ckpt.make_async_checkpointer
        self.rank, self.sync = rank, sync
        self.ckptr = make(config=config, rank_info=info)

    def state(self, seed: int = 0) -> dict:
        return {"model": _model_state(seed), "rng": torch.full((4,), float(self.rank)),
                "step": 10, "rank_note": f"rank {self.rank}"}

    def save(self, path: str, seed: int = 0, **kwargs):  # -> SaveResult
        state = self.state(seed)
        state.update(kwargs.pop("extra", {}))
        if self.sync:
            self.ckptr.save(path, state, **kwargs)
            return None
        _, write = self.ckptr.save(path, state, **kwargs)
        return write.result()

    def load(self, path: str) -> dict:
        return self.ckptr.load(path)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


Rank = ray.remote(num_cpus=0)(_Rank)


def _ranks(cluster, world: int, sync: bool, **kwargs) -> list:
    nodes = cluster.node_ids
    return [
        Rank.options(**on_node(nodes[r % len(nodes)])).remote(r, world, sync, **kwargs)
        for r in range(world)
    ]


@pytest.mark.parametrize("world, sync", [(2, True), (3, False)], ids=["2-sync", "3-async"])
def test_ranks_save_one_checkpoint_with_replicas_written_once(cluster, tmp_path, world, sync):
    ranks = _ranks(cluster, world, sync)
    path = str(tmp_path / "step-10")
    results = ray.get([r.save.remote(path) for r in ranks], timeout=120)
    if not sync:
        assert len({res.checkpoint_id for res in results}) == 1
    table = ipc.open_file(os.path.join(path, manifest_file(path))).read_all().to_pylist()

    # each replicated key is stored once; rank-local keys once per rank
    replicated = [row for row in table if row["replicated"]]
    keys = [row["key"] for row in replicated if row["chunk_offset"] == 0]
    assert sorted(keys) == sorted(f"model.{k}" for k in _model_state())
    local = [row for row in table if not row["replicated"]]
    assert sorted((row["key"], row["rank"]) for row in local) == [("rng", r) for r in range(world)]

    # the writing of replicated bytes is balanced, not all on rank 0
    by_rank = [sum(row["length"] for row in replicated if row["rank"] == r) for r in range(world)]
    assert min(by_rank) > 0 and max(by_rank) / sum(by_rank) < 0.6, by_rank

    # every rank loads what it saved: the shared model, its own rng and note
    for rank, loaded in enumerate(ray.get([r.load.remote(path) for r in ranks])):
        expected = {"model": _model_state(), "rng": torch.full((4,), float(rank)),
                    "step": 10, "rank_note": f"rank {rank}"}
        assert_same(expected, loaded)
    # without a rank, a notebook sees rank 0's view
    assert ray_ckpt.CheckpointReader().read(path)[0]["rank_note"] == "rank 0"


def _dicts_nested(depth: int, bottom: dict) -> dict:
    """``bottom`` under ``depth - 1`` nested dicts (dicts merge across ranks; lists do not)."""
    for level in range(depth - 1):
        bottom = {f"k{level}": bottom}
    return bottom


def _bottom(tree: dict) -> dict:
    while "w" not in tree:
        (tree,) = tree.values()
    return tree


def test_ranks_save_a_state_dict_nested_max_depth_deep(cluster, tmp_path):
    """The union of the ranks' trees is merged by loops: a state dict nested MAX_DEPTH deep,
    each rank with a key of its own at the bottom, saves on 2 ranks as on one, and each rank
    loads the union there (it was a RecursionError at commit)."""
    ranks = _ranks(cluster, 2, sync=True)
    path = str(tmp_path / "deep")
    deeps = [  # under the state's root: MAX_DEPTH levels in all
        _dicts_nested(MAX_DEPTH - 1, {"w": torch.arange(6.0), f"only_rank{rank}": rank})
        for rank in range(2)
    ]
    ray.get([r.save.remote(path, extra={"deep": d}) for r, d in zip(ranks, deeps)], timeout=120)
    for loaded in ray.get([r.load.remote(path) for r in ranks]):
        bottom = _bottom(loaded["deep"])
        assert sorted(bottom) == ["only_rank0", "only_rank1", "w"]
        assert (bottom["only_rank0"], bottom["only_rank1"]) == (0, 1)
        assert torch.equal(bottom["w"], torch.arange(6.0))


def test_a_rank_that_raises_fails_the_save_everywhere(cluster, tmp_path):
    ranks = _ranks(cluster, 2, sync=False)
    path = str(tmp_path / "c")
    bad = ranks[1].save.remote(path, extra={"oops": object()})  # refused at save time
    with pytest.raises(ray_ckpt.errors.PickleNotAllowedError):
        ray.get(bad, timeout=60)
    good = ranks[0].save.remote(path)  # opens the barrier rank 1's failure decided: fails too
    with pytest.raises(
        ray_ckpt.errors.CheckpointWriteError, match=r"rank 1: PickleNotAllowedError"
    ):
        ray.get(good, timeout=60)
    assert not os.path.exists(os.path.join(path, "ray_ckpt.commit"))
    assert not os.path.exists(path) or not [f for f in os.listdir(path) if f.endswith(".data")]
    # a retry to the same path at once gets a fresh barrier (not the failed save's decision)
    ray.get([r.save.remote(path) for r in ranks], timeout=120)
    assert ray.get(ranks[1].load.remote(path))["rank_note"] == "rank 1"


def test_one_long_lived_actor_holds_the_barriers_of_every_multi_rank_save(cluster, tmp_path):
    """Multi-rank saves share one barrier host: no actor started per checkpoint (starting one
    took seconds, in every multi-rank save's stall)."""
    ranks = _ranks(cluster, 2, sync=True)
    host = None
    for step in range(3):
        ray.get([r.save.remote(str(tmp_path / f"step-{step}")) for r in ranks], timeout=120)
        actor = ray.get_actor(HOST_NAME, namespace="ray_ckpt")
        assert host is None or actor._actor_id == host._actor_id
        host = actor
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith("ray_ckpt.checkpoint.")], names


def test_a_rank_that_never_arrives_times_out_on_every_rank(cluster, tmp_path):
    ranks = _ranks(cluster, 3, sync=False, timeout=3.0)
    ray.get([r.node.remote() for r in ranks])  # the ranks are up
    path = str(tmp_path / "c")
    started = time.monotonic()
    refs = [ranks[0].save.remote(path), ranks[1].save.remote(path)]  # rank 2 never saves
    for ref in refs:
        with pytest.raises(ray_ckpt.errors.BarrierTimeoutError, match=r"ranks \[2\] did not reach"):
            ray.get(ref, timeout=60)
    assert time.monotonic() - started < 45  # 3 s of barrier plus saving on a busy machine
    assert not os.path.exists(os.path.join(path, "ray_ckpt.commit"))
    assert not os.path.exists(path) or not [f for f in os.listdir(path) if f.endswith(".data")]


def test_replicas_that_differ_are_refused(cluster, tmp_path):
    ranks = _ranks(cluster, 2, sync=False)
    path = str(tmp_path / "c")
    refs = [r.save.remote(path, seed=rank) for rank, r in enumerate(ranks)]  # models differ
    for ref in refs:
        differ = "different values on ranks 0 and 1"
        with pytest.raises(ray_ckpt.errors.CheckpointWriteError, match=differ):
            ray.get(ref, timeout=60)
    assert not os.path.exists(os.path.join(path, "ray_ckpt.commit"))


class GatedWriter(ray_ckpt.CheckpointWriter):
    """A real writer that holds every bucket until a gate file exists."""

    def __init__(self, config, gate: str) -> None:
        super().__init__(config)
        self.gate = gate

    def write_bucket(self, storage, layout, arrays, **kwargs):
        open(self.gate + ".reached", "w").close()
        while not os.path.exists(self.gate):
            time.sleep(0.02)
        return super().write_bucket(storage, layout, arrays, **kwargs)


@ray.remote(num_cpus=0)
class GatedRank(_Rank):
    def __init__(self, rank: int, world: int, gate: str) -> None:
        info = ray_ckpt.RankInfo(rank, world)
        self.rank, self.sync = rank, False
        self.ckptr = ray_ckpt.make_async_checkpointer(
            rank_info=info,
            checkpoint_writer_init_fn=GatedWriter,
            checkpoint_writer_init_args={"gate": gate},
        )


def test_a_rank_process_that_dies_fails_the_save_quickly(cluster, tmp_path):
    gate = str(tmp_path / "gate")
    healthy = _ranks(cluster, 2, sync=False, timeout=600.0)[0]
    doomed = GatedRank.remote(1, 2, gate)
    path = str(tmp_path / "c")
    good = healthy.save.remote(path)
    doomed.save.remote(path)  # joins the barrier, then hangs in its writer
    deadline = time.monotonic() + 60
    while not os.path.exists(gate + ".reached") and time.monotonic() < deadline:
        time.sleep(0.05)
    host = ray.get_actor(HOST_NAME, namespace="ray_ckpt")
    key = barrier_name(ray_ckpt.storage.storage.Storage.from_path(path))
    while 1 not in (ray.get(host.status.remote(key)) or {"joined": []})["joined"]:
        time.sleep(0.05)  # rank 1's join is on its way from its process
    ray.kill(doomed)  # its process dies mid-save
    started = time.monotonic()
    # whichever sees it first: the barrier's watch of rank 1, or rank 1's write, whose staged
    # bytes died with their owner
    died = r"rank 1: (its process died|.*the process that staged its bytes died)"
    with pytest.raises(ray_ckpt.errors.CheckpointWriteError, match=died):
        ray.get(good, timeout=60)
    assert time.monotonic() - started < 20  # not the 600 s barrier timeout
    open(gate, "w").close()
    assert not os.path.exists(os.path.join(path, "ray_ckpt.commit"))


@ray.remote(num_cpus=0)
class _Stager:
    def stage(self) -> list:
        return [ray.put(b"x" * (1 << 20))]  # in the object store, owned by this process


@ray.remote(num_cpus=0)
def _write(data: bytes) -> int:
    return len(data)


@pytest.mark.parametrize("where", ["head", "worker"])
def test_a_write_whose_staging_process_died_says_so(cluster, tmp_path, where):
    """A write fails when the process that staged its bytes (their owner) dies first, on this
    process's node or another: the error says that and what to do, not Ray's OwnerDiedError
    text alone."""
    node = cluster.head_node_id if where == "head" else cluster.worker_node_ids[0]
    stager = _Stager.options(**on_node(node)).remote()
    [staged] = ray.get(stager.stage.remote())  # a borrowed ref; the bytes are never fetched here
    ray.kill(stager)
    deadline = time.monotonic() + 60
    while True:  # its process is gone (ray.kill is asynchronous: a call right after may run)
        try:
            ray.get(stager.stage.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            break
        assert time.monotonic() < deadline, "the killed stager kept answering"
        time.sleep(0.1)
    storage = ray_ckpt.storage.storage.Storage.from_path(str(tmp_path / "c"))
    deadline = time.monotonic() + 60
    while True:  # a write sent before Ray has told this process of the owner's death may pass
        try:
            gather_shards([("node-1", "r00000-000000-x.data", _write.remote(staged))], storage,
                          60.0)
        except ray_ckpt.errors.CheckpointWriteError as e:
            message = str(e)
            break
        assert time.monotonic() < deadline, "writes of the dead stager's bytes kept succeeding"
        time.sleep(0.2)
    assert "writer on node node-1 (r00000-000000-x.data): the process that staged its bytes died" \
        in message and "save again from a live one" in message, message

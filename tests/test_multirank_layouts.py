"""Multi-rank checkpoints are the union of the ranks' keys: pipeline stages (keys on some ranks
only), DTensor-style shards split over stages, and loads on another number of ranks.

Every save runs on real rank actors of a simulated multi-node Ray cluster, each rank with its own
``RankInfo``; every load asks only for the keys that rank would hold in the new layout.
"""

from __future__ import annotations

import os
import sys

import pyarrow.ipc as ipc
import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt.format.checks import first_overlap, tiling_problems
from ray_ckpt.format.manifest import Extent, ItemMeta
from ray_ckpt.save.commit import commit_reports
from ray_ckpt.save.protocol import CommitTarget, RankReport
from ray_ckpt.storage.storage import Storage
from ray_ckpt.types import RankInfo

from .conftest import on_node
from .helpers import assert_same, manifest_file

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOCAL = ("rng",)


def _config() -> ray_ckpt.CheckpointerConfig:
    return ray_ckpt.CheckpointerConfig(
        staging_config=ray_ckpt.CheckpointStagerConfig(
            bucket_size_bytes=64 << 10, pack_threshold_bytes=4 << 10, rank_local_keys=LOCAL
        ),
        writer_config=ray_ckpt.CheckpointWriterConfig(barrier_timeout_secs=240),
    )


@ray.remote(num_cpus=0)
class RankActor:
    """One rank of a job: saves its state, loads into a target state."""

    def __init__(self, rank: int, world: int) -> None:
        self.ckptr = ray_ckpt.make_sync_checkpointer(_config(), rank_info=RankInfo(rank, world))

    def save(self, path: str, state: dict) -> None:
        self.ckptr.save(path, state)

    def load(self, path: str, target: dict | None) -> dict:
        return self.ckptr.load(path, state_dict=target, strict=target is not None)


@ray.remote(num_cpus=0)
def load_as(path: str, rank: int, world: int, target: dict | None) -> dict:
    with ray_ckpt.make_sync_checkpointer(_config(), rank_info=RankInfo(rank, world)) as ckptr:
        return ckptr.load(path, state_dict=target, strict=target is not None)


def save_on_ranks(node_ids: list[str], path: str, states: list[dict]) -> list:
    ranks = [
        RankActor.options(**on_node(node_ids[r % len(node_ids)])).remote(r, len(states))
        for r in range(len(states))
    ]
    ray.get([rank.save.remote(path, state) for rank, state in zip(ranks, states)], timeout=600)
    return ranks


def manifest_rows(path: str) -> list[dict]:
    return ipc.open_file(os.path.join(path, manifest_file(path))).read_all().to_pylist()


def split(items: list[int], parts: int) -> list[list[int]]:
    """``items`` in ``parts`` consecutive runs (the first ones one longer), as stages take
    layers."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        end = start + size + (p < extra)
        out.append(items[start:end])
        start = end
    return out


# --- pipeline parallel: each stage its own layers ---------------------------------------------

LAYERS = 4


def layer(i: int) -> torch.Tensor:
    return torch.arange(40, dtype=torch.float32).view(8, 5) * (i + 1)


def embed() -> torch.Tensor:
    return torch.linspace(0, 1, 96).view(12, 8)


def stage_state(layers: list[int], *, rank: int | None = None, zeros: bool = False) -> dict:
    """What a pipeline stage holds: its layers, the (replicated) embedding, the step; with
    ``rank``, its own rng."""
    make = (lambda t: torch.zeros_like(t)) if zeros else (lambda t: t)
    state: dict = {"model": {f"layers.{i}.w": make(layer(i)) for i in layers},
                   "embed": make(embed()), "step": 0 if zeros else 7}
    if rank is not None:
        state["rng"] = torch.full((3,), float(-1 if zeros else rank))
    return state


@pytest.fixture(scope="module")
def pipeline_ckpt(cluster, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("pp") / "step-7")
    stages = split(list(range(LAYERS)), 2)
    save_on_ranks(cluster.node_ids, path, [stage_state(stages[s], rank=s) for s in range(2)])
    return path


def test_pipeline_keys_are_written_once_by_the_stage_that_holds_them(pipeline_ckpt):
    rows = {row["key"]: row for row in manifest_rows(pipeline_ckpt)}
    assert {k: rows[k]["rank"] for k in rows if k.startswith("model.")} == {
        "model.layers.0.w": 0, "model.layers.1.w": 0, "model.layers.2.w": 1, "model.layers.3.w": 1
    }
    embeds = [row for row in manifest_rows(pipeline_ckpt) if row["key"] == "embed"]
    assert len(embeds) == 1 and embeds[0]["replicated"]  # on both stages, written once


@pytest.mark.parametrize("stages", [1, 3, 4])
def test_pipeline_saved_on_two_stages_loads_on_another_number(cluster, pipeline_ckpt, stages):
    plan = split(list(range(LAYERS)), stages)
    targets = [stage_state(plan[s], zeros=True) for s in range(stages)]
    loaded = ray.get([load_as.remote(pipeline_ckpt, s, stages, targets[s]) for s in range(stages)])
    for s in range(stages):
        assert_same(loaded[s], stage_state(plan[s]))


def test_pipeline_checkpoint_loads_whole_in_a_notebook(pipeline_ckpt):
    state = ray_ckpt.CheckpointReader().read(pipeline_ckpt)[0]
    expected = stage_state(list(range(LAYERS)), rank=0)
    assert_same(state, expected)


def test_each_stage_loads_its_own_rank_local_keys(cluster, pipeline_ckpt):
    stages = split(list(range(LAYERS)), 2)
    loaded = ray.get([load_as.remote(pipeline_ckpt, s, 2, None) for s in range(2)])
    for s in range(2):
        assert torch.equal(loaded[s]["rng"], torch.full((3,), float(s)))
        assert set(loaded[s]["model"]) == {f"layers.{i}.w" for i in range(LAYERS)}
        for i in stages[s]:
            assert torch.equal(loaded[s]["model"][f"layers.{i}.w"], layer(i))


# --- mixed: layers sharded (FSDP) inside each pipeline stage -----------------------------------

ROWS = 8


def sharded_layer(
    i: int, shard: int, shards: int, *, zeros: bool = False
) -> ray_ckpt.ShardedTensor:
    rows = ROWS // shards
    full = layer(i)
    local = full[shard * rows:(shard + 1) * rows].clone()
    return ray_ckpt.ShardedTensor(
        torch.zeros_like(local) if zeros else local, tuple(full.shape), (shard * rows, 0)
    )


def mixed_state(layers: list[int], shard: int, shards: int, *, zeros: bool = False) -> dict:
    return {
        "model": {f"layers.{i}.w": sharded_layer(i, shard, shards, zeros=zeros) for i in layers},
        "embed": torch.zeros_like(embed()) if zeros else embed(),
    }


def mixed_states(stages: int, shards: int, *, zeros: bool = False) -> list[dict]:
    """Rank r = stage r // shards, shard r % shards."""
    plan = split(list(range(LAYERS)), stages)
    return [
        mixed_state(plan[r // shards], r % shards, shards, zeros=zeros)
        for r in range(stages * shards)
    ]


def plain(state: dict) -> dict:
    """``state`` with every ShardedTensor replaced by its local tensor (for comparing)."""
    return {
        k: plain(v) if isinstance(v, dict)
        else v.local if isinstance(v, ray_ckpt.ShardedTensor) else v
        for k, v in state.items()
    }


@pytest.fixture(scope="module")
def mixed_ckpt(cluster, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("mixed") / "step-1")
    save_on_ranks(cluster.node_ids, path, mixed_states(2, 2))  # 2 stages x 2 shards
    return path


def test_mixed_layout_stores_every_shard_box_once(mixed_ckpt):
    rows = [row for row in manifest_rows(mixed_ckpt) if row["key"].startswith("model.")]
    boxes = sorted((row["key"], tuple(row["global_offset"])) for row in rows)
    assert boxes == sorted(
        (f"model.layers.{i}.w", (offset, 0)) for i in range(LAYERS) for offset in (0, ROWS // 2)
    )
    # a stage's shards are written by that stage's ranks
    assert {(row["key"], row["rank"] // 2) for row in rows} == {
        (f"model.layers.{i}.w", i // 2) for i in range(LAYERS)
    }


@pytest.mark.parametrize("stages, shards", [(1, 2), (3, 2)], ids=["on-2", "on-6"])
def test_mixed_layout_saved_on_four_loads_on_another_layout(cluster, mixed_ckpt, stages, shards):
    targets = mixed_states(stages, shards, zeros=True)
    loaded = ray.get([
        load_as.remote(mixed_ckpt, r, len(targets), targets[r]) for r in range(len(targets))
    ])
    for got, expected in zip(loaded, mixed_states(stages, shards)):
        assert_same(plain(got), plain(expected))


def test_mixed_layout_loads_whole_in_a_notebook(mixed_ckpt):
    state = ray_ckpt.CheckpointReader().read(mixed_ckpt)[0]
    assert_same(state, {"model": {f"layers.{i}.w": layer(i) for i in range(LAYERS)},
                        "embed": embed()})


# --- what the commit still refuses --------------------------------------------------------------


def test_a_key_on_some_ranks_with_different_values_is_refused(cluster, tmp_path):
    path = str(tmp_path / "c")
    states = [{"shared": torch.full((4,), 1.0)}, {"shared": torch.full((4,), 2.0)},
              {"other": torch.ones(2)}]  # rank 2 does not hold "shared"
    ranks = [RankActor.options(**on_node(cluster.node_ids[r])).remote(r, 3) for r in range(3)]
    refs = [rank.save.remote(path, state) for rank, state in zip(ranks, states)]
    for ref in refs:
        differ = "different values on ranks 0 and 1"
        with pytest.raises(ray_ckpt.errors.CheckpointWriteError, match=differ):
            ray.get(ref, timeout=300)
    assert not os.path.exists(os.path.join(path, "ray_ckpt.commit"))


def _report(rank: int, owner: int, *, written: bool) -> RankReport:
    """A rank holding one replicated 16-byte key ``w`` whose writer is ``owner``; with
    ``written``, its bytes in this rank's file."""
    meta = ItemMeta(0, "w", "tensor", "float32", (4,), "cpu", 16)
    extents = [Extent(0, 0, f"r{rank}.data", 64, 16, 0, rank)] if written else []
    return RankReport(
        rank=rank, save_id="x", items=[meta], extents=extents, tree_json='{"d":[["w",{"T":0}]]}',
        replicas={0: ('["w"]', owner, 7)}, shard_items={}, files=[], writers={},
        stage_secs=0.0,
    )


def test_a_key_no_rank_wrote_is_refused(tmp_path):
    """A rank whose stager disagreed on who writes ``w``: nobody wrote it, nothing commits."""
    storage = Storage.from_path(str(tmp_path / "c"))
    target = CommitTarget(
        storage=storage, checkpoint_id="x", overwrite=False, hook=None, fsync=False,
        started_unix=0.0,
    )
    reports = [_report(r, owner=1, written=False) for r in range(2)]
    with pytest.raises(
        ray_ckpt.errors.CheckpointWriteError, match="key 'w': no rank wrote its bytes"
    ):
        commit_reports(target, reports)
    assert not storage.exists("ray_ckpt.commit")


# --- 64 real ranks over 4 simulated nodes --------------------------------------------------------

WORLD, PER_STAGE = 64, 16  # 4 stages of 16 ranks


def big_job_state(rank: int, stages: int, per_stage: int, *, zeros: bool = False) -> dict:
    """Rank ``rank`` of ``stages`` x ``per_stage``: a replicated embedding (every rank), its
    stage's norm (replicated over the stage), its row shard of its stage's weight (sharded over
    the stage) and its rng (rank-local)."""
    stage, shard = divmod(rank, per_stage)
    rows = 32 // per_stage
    weight = torch.arange(32 * 4, dtype=torch.float32).view(32, 4) + 1000 * stage
    local = weight[shard * rows:(shard + 1) * rows].clone()
    state = {
        "embed": torch.arange(24.0),
        f"stage{stage}": {
            "norm": torch.full((6,), float(stage)),
            "w": ray_ckpt.ShardedTensor(local, (32, 4), (shard * rows, 0)),
        },
        "rng": torch.full((2,), float(rank)),
        "step": 5,
    }
    if zeros:
        state["embed"] = torch.zeros(24)
        state[f"stage{stage}"]["norm"] = torch.zeros(6)
        state[f"stage{stage}"]["w"] = ray_ckpt.ShardedTensor(torch.zeros_like(local), (32, 4),
                                                             (shard * rows, 0))
        state["rng"], state["step"] = torch.zeros(2), 0
    return state


@pytest.mark.slow
def test_64_ranks_on_4_nodes_commit_once_and_load_on_64_and_on_8(tmp_path):
    from .conftest import ensure_cluster

    nodes = ensure_cluster("four_nodes").node_ids
    path = str(tmp_path / "big")
    states = [big_job_state(r, WORLD // PER_STAGE, PER_STAGE) for r in range(WORLD)]
    ranks = [
        RankActor.options(**on_node(nodes[r * len(nodes) // WORLD])).remote(r, WORLD)
        for r in range(WORLD)
    ]
    ray.get([rank.save.remote(path, state) for rank, state in zip(ranks, states)], timeout=1200)

    rows = manifest_rows(path)
    count = {key: sum(row["key"] == key for row in rows) for key in {row["key"] for row in rows}}
    assert count["embed"] == 1 and all(count[f"stage{s}.norm"] == 1 for s in range(4))
    assert all(count[f"stage{s}.w"] == PER_STAGE for s in range(4))  # every box once
    assert count["rng"] == WORLD  # rank-local: one per rank
    assert ray_ckpt.CheckpointReader().open(path).marker.world_size == WORLD

    targets = [big_job_state(r, 4, PER_STAGE, zeros=True) for r in range(WORLD)]
    loaded = ray.get([rank.load.remote(path, t) for rank, t in zip(ranks, targets)], timeout=1200)
    for got, expected in zip(loaded, states):
        assert_same(plain(got), plain(expected))
    for rank in ranks:
        ray.kill(rank)

    targets = [big_job_state(r, 4, 2, zeros=True) for r in range(8)]  # 4 stages x 2 shards
    loaded = ray.get([load_as.remote(path, r, 8, targets[r]) for r in range(8)], timeout=600)
    for r, got in enumerate(loaded):
        assert_same(plain(got), plain(big_job_state(r, 4, 2)))


# --- the pieces, without Ray --------------------------------------------------------------------


def test_replica_owners_are_chosen_among_the_holders_and_balanced():
    from ray_ckpt.save.dedup import assign_replica_owners

    stage0 = [(f'["l{i}"]', 100) for i in range(4)] + [('["embed"]', 1000)]
    stage1 = [(f'["m{i}"]', 100) for i in range(4)] + [('["embed"]', 1000)]
    owners = assign_replica_owners([([0, 1], stage0), ([2, 3], stage1)])
    assert all(o in (0, 1) for o in owners[0][:4]) and all(o in (2, 3) for o in owners[1][:4])
    assert owners[0][4] == owners[1][4] == 0  # shared by all four: largest first, lowest rank
    loads = {r: 0 for r in range(4)}
    for (ranks, keys), outs in zip([([0, 1], stage0), ([2, 3], stage1)], owners):
        for (path, nbytes), owner in zip(keys, outs):
            loads[owner] += nbytes if path != '["embed"]' or ranks == [0, 1] else 0
    assert loads[1] == 400 and loads[2] == loads[3] == 200  # rank 0 has the embedding


def test_overlapping_shards_are_found_along_any_dimension():
    # one sweep serves the save's dedup and the load's tiling check
    columns = [((0, 4 * c), (8, 4)) for c in range(100)]
    assert first_overlap(columns) is None
    clash = [*columns, ((2, 398), (2, 2))]  # rows 2-3 of columns 398-399: inside the last one
    assert first_overlap(clash) is not None
    grid = [((4 * r, 4 * c), (4, 4)) for r in range(10) for c in range(10)]
    assert first_overlap(grid) is None
    assert first_overlap([*grid, ((3, 3), (2, 2))]) is not None
    assert list(tiling_problems(columns, (8, 400), "t")) == []
    (problem,) = tiling_problems(clash, (8, 400), "t")
    assert "[0, 396] and [2, 398] overlap" in problem.message

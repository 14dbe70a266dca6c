"""The memory tier: checkpoints held in the object store by per-node holders, replicated.

Runs on its own simulated cluster (head + 2 workers), which loses and gains nodes, and is shut
down at the end of the module so that no other module sees it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import uuid

import numpy as np
import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.storage.memory
import ray_ckpt.storage.memory_catalog
import ray_ckpt.storage.memory_holder
import ray_ckpt.storage.memory_stream
import ray_ckpt.tiers
import ray_ckpt.tools
from ray_ckpt.catalog import join_path
from ray_ckpt.storage import memory

from . import conftest
from .conftest import MiB, on_node
from .helpers import assert_same, small_config

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

conftest.CLUSTERS.setdefault("memory", {
    "head": {"num_cpus": 2, "object_store_memory": 400 * MiB},
    "workers": [
        {"num_cpus": 1, "object_store_memory": 200 * MiB},
        {"num_cpus": 1, "object_store_memory": 200 * MiB},
    ],
})
_WORKER = {"num_cpus": 1, "object_store_memory": 200 * MiB}


@pytest.fixture(scope="module")
def mcluster():
    running = conftest.ensure_cluster("memory")
    yield running
    conftest._stop()  # nodes were removed: no other module may reuse this cluster


def _root() -> str:
    return f"mem://t-{uuid.uuid4().hex[:8]}"


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"model": {"w": torch.randn(256, 256), "b": torch.randn(256),
                      "tiny": [torch.ones(3) * i for i in range(20)]},
            "step": seed, "note": f"seed {seed}"}


def _copies(path: str) -> list[list[str]]:
    storage = ray_ckpt.storage.storage.Storage.from_path(path)
    cat = memory.catalog()
    names = [n for n in storage.list_files() if n.endswith(".data")]
    return [sorted(ray.get(cat.copies.remote(f"{storage.path}/{n}"))) for n in names]


def _wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the memory tier"
        time.sleep(0.2)


@ray.remote(num_cpus=0)
def _save_on_node(path: str, seed: int, sync: bool = True) -> str:
    with (ray_ckpt.make_sync_checkpointer(config=small_config()) if sync
          else ray_ckpt.make_async_checkpointer(config=small_config())) as ckptr:
        if sync:
            ckptr.save(path, _state(seed))
        else:
            ckptr.save(path, _state(seed))[1].result()
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
def _load_on_node(path: str) -> dict:
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        return ckptr.load(path)


def _spare_worker(mcluster) -> str:
    """A live worker node (added when removals left none)."""
    alive = set(memory.alive_nodes())
    workers = [n for n in mcluster.worker_node_ids if n in alive]
    if len(workers) < 2:
        node = mcluster.cluster.add_node(**_WORKER)
        mcluster.cluster.wait_for_nodes()
        mcluster.worker_node_ids.append(node.node_id)
        workers.append(node.node_id)
    return workers[-1]


def _remove(mcluster, node_id: str) -> None:
    node = next(n for n in mcluster.cluster.worker_nodes if n.node_id == node_id)
    mcluster.cluster.remove_node(node)
    mcluster.worker_node_ids.remove(node_id)
    _wait_until(lambda: node_id not in memory.alive_nodes())


# --- save and load -----------------------------------------------------------------------------


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_save_to_memory_and_load_back_exactly(mcluster, sync):
    path = f"{_root()}/step-1"
    node = ray.get(_save_on_node.options(**on_node(mcluster.head_node_id)).remote(path, 1, sync))
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        assert_same(ckptr.load(path), _state(1))
        target = _state(2)
        ckptr.load(path, target["model"] and {"model": target["model"]}, strict=True)
        assert_same(target["model"], _state(1)["model"])
    copies = _copies(path)
    assert copies and all(len(c) == 2 and node in c for c in copies), copies
    [info] = [i for i in ray_ckpt.tiers.memory_checkpoints() if i.path == path]
    assert info.committed and info.complete and info.copies == 2 and info.tier == "memory"
    [entry] = ray_ckpt.list_checkpoints(path.rsplit("/", 1)[0])
    assert entry.committed and entry.path == path
    assert entry.tier == "memory" and entry.copies == 2 and entry.nodes == sorted(copies[0])


def test_more_replicas_than_nodes_holds_on_every_node_and_warns_once(mcluster, caplog):
    root = f"{_root()}?replicas=7"
    nodes = memory.alive_nodes()
    with ray_ckpt.make_sync_checkpointer() as ckptr, caplog.at_level(logging.WARNING):
        for step in (1, 2):
            ckptr.save(join_path(root, f"step-{step}"), _state(step))
    said = [r.getMessage() for r in caplog.records if "replicas = 8" in r.getMessage()]
    assert len(said) == 1, caplog.text  # once for this cluster size, not for every save
    assert f"only {len(nodes)} node(s)" in said[0] and "losing a node loses them" in said[0]
    for step in (1, 2):
        copies = _copies(join_path(root, f"step-{step}"))
        assert copies and all(sorted(c) == nodes for c in copies), copies


def test_two_ranks_with_dtensors_load_back_exactly(mcluster):
    from .test_sharding import _close, _group

    path = f"{_root()}/step-3"
    ranks = _group(2)
    layout = {"w": "S0", "b": "R", "e": "S1"}
    try:
        ray.get([r.save.remote(path, layout) for r in ranks], timeout=180)
        for result in ray.get([r.load.remote(path, layout) for r in ranks], timeout=180):
            assert all(result["exact"].values()), result
    finally:
        _close(ranks)
    assert all(len(c) == 2 for c in _copies(path))


@ray.remote(num_cpus=0)
class _DataParallelRank:
    """A rank of a data-parallel job: every rank has the whole (replicated) state."""

    def __init__(self, rank: int, capacity_fraction: float) -> None:
        fs = memory.memory_filesystem(replicas=0, keep_last=5,
                                      capacity_fraction=capacity_fraction)
        self.ckptr = ray_ckpt.make_sync_checkpointer(
            filesystem=fs, rank_info=ray_ckpt.RankInfo(rank, 2), config=small_config())

    def save(self, path: str, state: dict) -> None:
        self.ckptr.save(path, state)

    def close(self) -> None:
        self.ckptr.close()


def test_a_ranks_room_is_its_share_of_a_replicated_state_not_the_whole(mcluster):
    """Under DDP each of 2 ranks holds the whole 8 MiB state and writes half of it (replicated
    tensors are written once): the room it asks of its node is 2 x 4 MiB, not 2 x 8 MiB. With
    12 MiB of room on each node, the save fits without evicting anything."""
    _spare_worker(mcluster)
    alive = set(memory.alive_nodes())
    nodes = [n for n in mcluster.worker_node_ids if n in alive][:2]
    cat = memory.catalog()
    held = max(ray.get([cat.held_on.remote(n) for n in nodes]))
    fraction = (held + 12 * MiB) / min(memory.store_capacity(n) for n in nodes)
    torch.manual_seed(0)
    state = {"a": torch.randn(1024, 1024), "b": torch.randn(1024, 1024)}  # 4 MiB each
    before = {i.path for i in ray_ckpt.tiers.memory_checkpoints()}
    path = f"{_root()}/step-1"
    ranks = [_DataParallelRank.options(**on_node(n)).remote(r, fraction)
             for r, n in enumerate(nodes)]
    try:
        ray.get([r.save.remote(path, state) for r in ranks], timeout=180)
    finally:
        ray.get([r.close.remote() for r in ranks])
        for r in ranks:
            ray.kill(r)
    assert {i.path for i in ray_ckpt.tiers.memory_checkpoints()} == before | {path}  # none evicted
    copies = _copies(path)
    # each rank's share held on its own node (replicas=0: one copy of each file)
    assert all(len(c) == 1 for c in copies) and {c[0] for c in copies} == set(nodes), copies
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        assert_same(ckptr.load(path), state)


@ray.remote(num_cpus=0)
def _handles_after_making_a_checkpointer() -> list[str]:
    from ray_ckpt.storage import memory_holder

    with ray_ckpt.make_sync_checkpointer():
        _wait_until(lambda: len(memory_holder._HANDLES) >= 2, timeout=30)
        return sorted(name for _, name in memory_holder._HANDLES)


def test_a_new_checkpointer_looks_up_the_tiers_actors_ahead_of_its_first_load(mcluster):
    ray.get(_save_on_node.options(**on_node(mcluster.head_node_id)).remote(
        f"{_root()}/step-1", 1))  # the head node has a holder now
    fresh = {"env_vars": {"RAY_CKPT_TEST_PROCESS": uuid.uuid4().hex}}  # a new worker process
    names = ray.get(_handles_after_making_a_checkpointer.options(
        **on_node(mcluster.head_node_id), runtime_env=fresh).remote())
    assert names == sorted([ray_ckpt.storage.memory_catalog.CATALOG_NAME,
                            ray_ckpt.storage.memory_holder.holder_name(mcluster.head_node_id)])


def test_holder_survives_the_death_of_the_process_that_saved(mcluster):
    path = f"{_root()}/step-4"

    @ray.remote(num_cpus=0)
    class Trainer:
        def save(self) -> int:
            _save_on_node._function(path, 4)
            import os

            return os.getpid()

    trainer = Trainer.options(**on_node(mcluster.head_node_id)).remote()
    ray.get(trainer.save.remote())
    ray.kill(trainer)
    time.sleep(1.0)  # the saving process is gone
    loaded = ray.get(_load_on_node.options(**on_node(mcluster.head_node_id)).remote(path))
    assert_same(loaded, _state(4))


def _offers(node: str) -> int:
    return ray.get(ray.get_actor(memory.holder_name(node), namespace=memory.NAMESPACE)
                   .offers.remote())


@pytest.mark.parametrize("how", ["direct", "refused", "ray"])
def test_a_load_reads_a_peers_only_copy_directly_or_over_rays_transfer(
    mcluster, caplog, monkeypatch, how
):
    """A load on a node that holds no copy: by default the peer's holder streams the ranges
    over a direct connection; where the connection is refused (a firewall: mocked) or direct
    reads are off, Ray transfers the file. The same bytes either way, and the holder keeps no
    offer (no view of the files) once the load is over."""
    worker = _spare_worker(mcluster)
    root = _root()
    assert ray.get(_save_on_node.options(**on_node(worker)).remote(
        f"{root}/step-6?replicas=0", 6)) == worker
    assert all(c == [worker] for c in _copies(f"{root}/step-6"))  # not on the loading node
    if how == "refused":
        def refuse(self):
            raise ConnectionRefusedError(111, "Connection refused")

        monkeypatch.setattr(ray_ckpt.storage.memory_stream.PeerStream, "_take", refuse)
    fs = memory.memory_filesystem(direct_peer_reads=how != "ray")
    with ray_ckpt.make_sync_checkpointer(filesystem=fs) as ckptr, caplog.at_level(logging.INFO):
        assert_same(ckptr.load(f"{root}/step-6"), _state(6))
    said = caplog.text
    assert (f"from node {worker}'s holder over a direct connection" in said) == (how != "ray")
    assert (f"from node {worker}'s holder over Ray's transfer" in said) == (how == "ray")
    assert ("over Ray's transfer instead" in said) == (how == "refused")
    _wait_until(lambda: _offers(worker) == 0, timeout=10)


@ray.remote(num_cpus=0)
def _save_big(path: str) -> str:
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        ckptr.save(path, _big_state())
    return ray.get_runtime_context().get_node_id()


def _big_state() -> dict:
    """One tensor spanning requests of a peer's stream unevenly (10.3 MiB), beside a small
    one."""
    torch.manual_seed(9)
    return {"big": torch.randn(2_700_001), "small": torch.randn(7)}


@pytest.mark.parametrize("fault", ["none", "flipped", "cut"])
def test_a_peer_read_checks_every_byte_and_survives_a_broken_stream(
    mcluster, caplog, monkeypatch, fault
):
    """A tensor read from a peer's stream in one request, a slice at a time: every byte is
    checked, so one flipped in flight (a fault loopback cannot make: mocked in the reader) fails
    the load with the key named; a stream that breaks within the range goes on over Ray's
    transfer from its last whole slice, and the load is exact."""
    worker = _spare_worker(mcluster)
    path = f"{_root()}/big"
    assert ray.get(_save_big.options(**on_node(worker)).remote(f"{path}?replicas=0")) == worker
    assert all(c == [worker] for c in _copies(path))
    receive = ray_ckpt.storage.memory_stream._receive_into
    at = 3 * MiB + 5  # a byte of the big tensor's fourth slice
    seen = 0  # bytes of the big tensor received so far
    faults: list[int] = []

    def faulty(conn, out):
        nonlocal seen
        if len(out) < 64 << 10 or faults or seen + len(out) <= at:  # replies, headers, small
            seen += len(out) if len(out) >= 64 << 10 else 0
            return receive(conn, out)
        faults.append(seen)
        within = at - seen
        if fault == "cut":
            receive(conn, out[:within])
            conn.close()
            raise ConnectionResetError(104, "Connection reset by peer")
        done = receive(conn, out)
        out[within] ^= 0xFF
        return done

    if fault != "none":
        monkeypatch.setattr(ray_ckpt.storage.memory_stream, "_receive_into", faulty)
    with ray_ckpt.make_sync_checkpointer() as ckptr, caplog.at_level(logging.INFO):
        if fault == "flipped":
            with pytest.raises(ray_ckpt.CorruptCheckpointError, match="key 'big': checksum"):
                ckptr.load(path)
        else:
            assert_same(ckptr.load(path), _big_state())
    assert ("over Ray's transfer instead" in caplog.text) == (fault == "cut")
    assert bool(faults) == (fault != "none")  # the fault happened
    _wait_until(lambda: _offers(worker) == 0, timeout=10)


def _holder(node: str):
    return ray.get_actor(memory.holder_name(node), namespace=memory.NAMESPACE)


def _has_holder(node: str) -> bool:
    """Whether ``node`` has a holder yet (run alone, a test may be the first to save there)."""
    try:
        _holder(node)
        return True
    except ValueError:
        return False


@ray.remote(num_cpus=0)
def _save_with(path: str, seed: int, direct: bool) -> str:
    fs = memory.memory_filesystem(direct_peer_reads=direct)
    with ray_ckpt.make_sync_checkpointer(filesystem=fs, config=small_config()) as ckptr:
        ckptr.save(path, _state(seed))
    return ray.get_runtime_context().get_node_id()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "ray"])
def test_a_saves_replicas_go_holder_to_holder_directly_unless_direct_reads_are_off(
    mcluster, direct
):
    """The saving node's holder takes its copy, then offers it to the peer's holder, which
    reads every byte over the stream (none over Ray's transfer) and keeps no offer open; with
    direct_peer_reads=False the holder sends nothing over a stream (Ray transfers the copy)."""
    _spare_worker(mcluster)
    head = mcluster.head_node_id
    sent = ray.get(_holder(head).sent_bytes.remote()) if _has_holder(head) else 0
    path = f"{_root()}/step-8"
    assert ray.get(_save_with.options(**on_node(head)).remote(path, 8, direct)) == head
    copies = _copies(path)
    assert copies and all(len(c) == 2 and head in c for c in copies), copies
    storage = ray_ckpt.storage.storage.Storage.from_path(path)
    data = sum(i.size for i in storage.fs.get_file_info(
        [f"{storage.path}/{n}" for n in storage.list_files() if n.endswith(".data")]))
    assert ray.get(_holder(head).sent_bytes.remote()) - sent == (data if direct else 0)
    assert _offers(head) == 0
    reader = next(n for n in memory.alive_nodes() if n not in copies[0])  # no copy there
    assert_same(ray.get(_load_on_node.options(**on_node(reader)).remote(path)), _state(8))


def test_a_replica_is_copied_over_rays_transfer_when_the_holder_cannot_connect(
    mcluster, caplog
):
    """A holder offered a copy it cannot connect to (a firewall; here: a port nothing listens
    on) warns and takes it over Ray's transfer: the same bytes."""
    holder = ray_ckpt.storage.memory_holder._Holder.__ray_metadata__.modified_class("here")
    data = np.arange(4096, dtype=np.uint8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = ("127.0.0.1", s.getsockname()[1])
    with caplog.at_level(logging.WARNING):
        got = holder.copy_from("k", [ray.put([data])], (nowhere, bytes(16), data.nbytes))
    assert got == data.nbytes and "copying it over Ray's transfer instead" in caplog.text
    [ref] = holder.ref("k")
    assert np.array_equal(np.concatenate(ray.get(ref)), data)


def test_a_missing_memory_checkpoint_is_not_found(mcluster):
    root = _root()
    with ray_ckpt.make_sync_checkpointer() as ckptr, \
            pytest.raises(ray_ckpt.CheckpointNotFoundError) as raised:
        ckptr.load(f"{root}/step-9")
    said = str(raised.value)  # which cluster was looked in, and how to list what it holds
    assert ray.get_runtime_context().gcs_address in said and f"ray-ckpt ls {root}`" in said


_OWN_LOCAL_RAY = """
import logging, sys, torch, ray_ckpt
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
with ray_ckpt.make_sync_checkpointer() as ckptr:
    ckptr.save("mem://mine/step-1", {"w": torch.ones(4)})
    ckptr.save("mem://mine/step-2", {"w": torch.ones(4)})
    assert torch.equal(ckptr.load("mem://mine/step-1")["w"], torch.ones(4))
    try:
        ckptr.load("mem://theirs/step-1")
    except ray_ckpt.CheckpointNotFoundError as e:
        print("NOT FOUND:", e)
"""


def test_memory_checkpoints_in_a_ray_of_its_own_say_so(tmp_path):
    """A process that made its checkpointer before connecting to a cluster runs on a local Ray
    that ray_ckpt started for it: its memory checkpoints end with it, and it cannot see the
    cluster's. Its first memory save warns (once), and a load that finds nothing says where it
    looked and how to connect."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    done = subprocess.run([sys.executable, "-c", _OWN_LOCAL_RAY], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stdout.splitlines() if "end with this process" in line]
    assert len(warnings) == 1 and "RAY_ADDRESS" in warnings[0], done.stdout  # once a process
    [found] = [line for line in done.stdout.splitlines() if line.startswith("NOT FOUND:")]
    assert "mem://theirs/step-1" in found and "local Ray that ray_ckpt started" in found
    assert "ray.init(address='auto')" in found and "RAY_ADDRESS" in found


# --- Ray Train ----------------------------------------------------------------------------------


def _memory_train_loop(config: dict) -> None:
    """Memory checkpoint every step, a Ray Train checkpoint at step 1 only; rank 1 fails at
    step 5 of the first attempt."""
    import os

    import ray.train

    import ray_ckpt.train

    from .test_train import _batch, _build

    rank = ray.train.get_context().get_world_rank()
    model, optimizer = _build()
    state = {"model": model, "optim": optimizer, "step": -1}
    ray_ckpt.train.load(state, strict=True)
    start = state["step"] + 1
    with open(os.path.join(config["records"], f"start-{start}-rank{rank}"), "w") as f:
        f.write(ray_ckpt.train.memory_root(ray.train.get_context().get_storage()))
    for step in range(start, 8):
        x, y = _batch(step, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 5 and rank == 1 and not os.path.exists(config["marker"]):
            open(config["marker"], "w").close()
            raise RuntimeError("injected crash of rank 1 at step 5")
        state["step"] = step
        ray_ckpt.train.save_to_memory(state, step).result()
        if step == 1:
            ray_ckpt.train.report({"step": step}, state)


def test_ray_train_resumes_from_memory_after_a_worker_failure(mcluster, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .test_train import _fast_polling

    records = tmp_path / "records"
    records.mkdir()
    trainer = TorchTrainer(
        _memory_train_loop,
        train_loop_config={"records": str(records), "marker": str(tmp_path / "crashed")},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="memrun", storage_path=str(tmp_path / "storage"),
                             failure_config=FailureConfig(max_failures=1)),
    )
    with _fast_polling():
        result = trainer.fit()
    assert result.error is None, result.error
    assert (tmp_path / "crashed").exists()
    starts = sorted(p.name for p in records.iterdir())
    # resumed after step 4 (memory), not after step 1 (Ray Train's registered checkpoint)
    assert starts == ["start-0-rank0", "start-0-rank1", "start-5-rank0", "start-5-rank1"], starts
    assert result.checkpoint is not None and "checkpoint" in result.checkpoint.path
    root = (records / "start-5-rank0").read_text()
    steps = [e.step for e in ray_ckpt.list_checkpoints(root)]
    assert steps[-1] == 7


# --- node loss ---------------------------------------------------------------------------------


def test_node_removed_after_a_memory_save_loads_from_the_replica(mcluster, caplog):
    worker = _spare_worker(mcluster)
    path = f"{_root()}/step-5"
    assert ray.get(_save_on_node.options(**on_node(worker)).remote(path, 5)) == worker
    before = _copies(path)
    assert all(worker in c and len(c) == 2 for c in before)
    _remove(mcluster, worker)
    # the copies on the removed node are gone; the replica serves the load
    with ray_ckpt.make_sync_checkpointer() as ckptr, caplog.at_level(logging.INFO):
        loaded, source = ray_ckpt.tiers.load_newest(ckptr, [path.rsplit("/", 1)[0]])
    assert_same(loaded, _state(5))
    assert source.tier == "memory" and source.path == path
    # re-replication restores two copies, on live nodes only
    _wait_until(lambda: all(len(c) == 2 and worker not in c for c in _copies(path)))
    assert_same(ray.get(_load_on_node.options(**on_node(mcluster.head_node_id)).remote(path)),
                _state(5))


def _held_where_listed(path: str) -> bool:
    """Whether the holder of every node the catalog lists for a data file of ``path`` holds
    it, and two do."""
    storage = ray_ckpt.storage.storage.Storage.from_path(path)
    for name in [n for n in storage.list_files() if n.endswith(".data")]:
        key = f"{storage.path}/{name}"
        nodes = ray.get(memory.catalog().copies.remote(key))
        for node in nodes:
            try:
                holder = ray.get_actor(memory.holder_name(node), namespace=memory.NAMESPACE)
            except ValueError:  # no live holder there
                return False
            if not ray.get(holder.ref.remote(key)):
                return False
        if len(nodes) != 2:
            return False
    return True


def test_a_holder_that_dies_on_a_live_node_has_its_copies_made_again(mcluster):
    # Ray's OOM killer or a crash can end a holder's process while its node lives: Ray frees
    # its objects with it. The catalog must not count them (and so let the last copy go
    # unreplicated) until some load happens to miss them.
    worker = _spare_worker(mcluster)
    path = f"{_root()}/step-9"
    ray.get(_save_on_node.options(**on_node(worker)).remote(path, 9))
    assert _held_where_listed(path) and all(worker in c for c in _copies(path))
    ray.kill(ray.get_actor(memory.holder_name(worker), namespace=memory.NAMESPACE))
    _wait_until(lambda: _held_where_listed(path), timeout=30)
    assert_same(ray.get(_load_on_node.options(**on_node(worker)).remote(path)), _state(9))


def _held_bytes(node: str) -> int:
    try:
        holder = ray.get_actor(memory.holder_name(node), namespace=memory.NAMESPACE)
    except ValueError:  # none there yet
        return 0
    return ray.get(holder.held_bytes.remote())


def test_a_catalog_that_dies_restarts_empty_and_its_copies_are_freed(mcluster):
    # The catalog's process dies (Ray's OOM killer, a crash): the memory checkpoints it knew
    # are lost with their manifests, but the tier must go on working, from the handles that
    # processes already keep, and the copies nothing lists any more must not fill the stores.
    worker = _spare_worker(mcluster)
    root = _root()
    before = _held_bytes(worker)
    ray.get(_save_on_node.options(**on_node(worker)).remote(f"{root}/step-10", 10))
    one = _held_bytes(worker) - before  # a checkpoint's copy
    assert one > 0
    cat = memory.catalog()
    pid = ray.get(cat.__ray_call__.remote(lambda self: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    _wait_until(lambda: _alive_pid(cat) not in (None, pid))
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        with pytest.raises(ray_ckpt.errors.CheckpointNotFoundError):
            ckptr.load(f"{root}/step-10")
    # saves and loads go on, in this process (its handle) and in new ones
    ray.get(_save_on_node.options(**on_node(worker)).remote(f"{root}/step-11", 11))
    assert_same(ray.get(_load_on_node.options(**on_node(worker)).remote(f"{root}/step-11")),
                _state(11))
    # a sweep (every 30 s; here at once) frees every copy the restarted catalog does not list
    ray.get(cat.sweep.remote(0.0))
    assert _held_bytes(worker) == one  # step 11's
    assert_same(ray.get(_load_on_node.options(**on_node(worker)).remote(f"{root}/step-11")),
                _state(11))


def _alive_pid(actor) -> int | None:
    try:
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=5)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def test_losing_every_copy_falls_back_to_durable_with_a_warning(mcluster, tmp_path, caplog):
    worker = _spare_worker(mcluster)
    root = f"{_root()}?replicas=0"
    durable = str(tmp_path / "durable")
    base = root.partition("?")[0]
    ray.get(_save_on_node.options(**on_node(worker)).remote(f"{base}/step-000000010?replicas=0",
                                                           10))
    ray_ckpt.tiers.persist(f"{base}/step-000000010", f"{durable}/step-000000010")
    ray.get(_save_on_node.options(**on_node(worker)).remote(f"{base}/step-000000011?replicas=0",
                                                           11))
    assert all(c == [worker] for c in _copies(f"{base}/step-000000011"))
    _remove(mcluster, worker)
    with ray_ckpt.make_sync_checkpointer() as ckptr, caplog.at_level(logging.INFO):
        target = _state(0)
        loaded, source = ray_ckpt.tiers.load_newest(ckptr, [root, durable], target, strict=True)
    assert source.tier == "durable" and source.step == 10
    assert_same(loaded, _state(10))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-000000011" in w and "lost" in w and "11" in w for w in warnings), warnings


# --- persist -----------------------------------------------------------------------------------


def test_persist_every_k_writes_the_on_disk_format(mcluster, tmp_path):
    durable_root = str(tmp_path / "run")
    mem_root = f"{_root()}?keep_last=2"
    with ray_ckpt.make_async_checkpointer(config=small_config()) as ckptr:
        durable = ray_ckpt.CheckpointManager(durable_root, ckptr, keep_last=3)
        manager = ray_ckpt.tiers.TieredCheckpointManager(durable, mem_root, persist_every=2)
        for step in range(7):
            manager.save(step, _state(step), metrics={"loss": 1.0 / (step + 1)})
        manager.wait()
        assert durable.steps() == [2, 4, 6]
        assert {(e.tier, e.copies) for e in ray_ckpt.list_checkpoints(durable_root)} == {
            ("durable", None)}
        assert [e.step for e in ray_ckpt.list_checkpoints(mem_root)] == [5, 6]  # keep_last=2
        loaded, source = manager.load()
        assert source.tier == "memory" and source.step == 6
        assert_same(loaded, _state(6))
        manager.close()
    # a durable checkpoint is a plain one, and verifies
    assert_same(ray_ckpt.CheckpointReader().read(durable.path(4))[0], _state(4))
    assert ray_ckpt.tools.verify(durable.path(4)).ok


def test_persist_goes_from_memory_to_durable_storage_only(mcluster, tmp_path):
    path = f"{_root()}/step-1"
    with ray_ckpt.make_sync_checkpointer(config=small_config()) as ckptr:
        ckptr.save(path, _state(1))
        ckptr.save(str(tmp_path / "disk"), _state(1))
        with pytest.raises(ValueError, match="in the memory tier: memory checkpoints persist"):
            ray_ckpt.tiers.persist(path, f"{_root()}/copy")
        with pytest.raises(ValueError, match="copies a memory checkpoint"):
            ray_ckpt.tiers.persist(str(tmp_path / "disk"), str(tmp_path / "copy"))
        with pytest.raises(ValueError, match="in the memory tier"):
            ray_ckpt.tiers.TieredCheckpointManager(
                ray_ckpt.CheckpointManager(_root(), ckptr), _root(), persist_every=2)
    assert not (tmp_path / "copy").exists()
    assert [i.path for i in ray_ckpt.tiers.memory_checkpoints() if "/copy" in i.path] == []


# --- accounting --------------------------------------------------------------------------------


def test_capacity_evicts_the_oldest_then_refuses(mcluster, caplog):
    # room for what the other tests left on this node plus 3.5 MiB
    head = ray.get_runtime_context().get_node_id()
    held = ray.get(memory.catalog().held_on.remote(head))
    fraction = (held + 3.5 * MiB) / memory.store_capacity(head)
    fs = memory.memory_filesystem(replicas=0, keep_last=5, capacity_fraction=fraction)
    root = _root().removeprefix("mem://")
    state = {"w": torch.randn(256, 1024)}  # 1 MiB: a save needs 2 MiB of room
    with ray_ckpt.make_sync_checkpointer(filesystem=fs) as ckptr, caplog.at_level(logging.INFO):
        ckptr.save(f"{root}/step-1", state)
        ckptr.save(f"{root}/step-2", state)
        ckptr.save(f"{root}/step-3", state)  # needs step-1's room: evicted
        names = [e.name for e in ray_ckpt.list_checkpoints(root, filesystem=fs)]
        assert names == ["step-2", "step-3"], names
        assert any("evicted" in r.getMessage() and "step-1" in r.getMessage()
                   for r in caplog.records)
        with pytest.raises(ray_ckpt.errors.MemoryTierFullError,
                           match=r"needs 8.0 MiB .*twice the 4.0 MiB"):
            ckptr.save(f"{root}/step-4", {"w": torch.randn(1024, 1024)})  # 4 MiB: never fits
        # refused without evicting anything
        assert [e.name for e in ray_ckpt.list_checkpoints(root, filesystem=fs)] == [
            "step-2", "step-3"]
        assert_same(ckptr.load(f"{root}/step-3"), state)


def test_evicting_for_a_save_waits_for_rays_free_after_the_stall_not_in_it(mcluster):
    """On a Ray with its default 1 s free period, evicted bytes still fill the store for up to
    a second. A save whose staged bytes fit beside them does not wait in the stall; only its
    held copies wait for the free (in the writer). One whose staged bytes need that room waits
    before staging."""
    head = ray.get_runtime_context().get_node_id()
    cat = memory.catalog()
    fs = memory.memory_filesystem(replicas=0, keep_last=5)
    state = {"w": torch.randn(256, 1024)}  # 1 MiB
    for case, (saved, capacity_in_files) in {"fits": (2, 3.5), "staging": (3, 3.2)}.items():
        for info in ray_ckpt.tiers.memory_checkpoints():  # nothing else to evict
            fs.delete_dir(info.path.removeprefix("mem://"))
        time.sleep(ray_ckpt.storage.memory_catalog.RAY_FREE_PERIOD_SECS)  # their frees done
        root = _root().removeprefix("mem://")
        held = ray.get(cat.held_on.remote(head))
        with ray_ckpt.make_sync_checkpointer(filesystem=fs) as ckptr:
            for step in range(saved):
                ckptr.save(f"{root}/step-{step}", state)
        per_file = (ray.get(cat.held_on.remote(head)) - held) // saved
        capacity = held + int(capacity_in_files * per_file)
        victims, stall_wait, hold_wait = ray.get(
            cat.make_room.remote(head, per_file, capacity, f"{root}/step-{saved}"))
        if case == "fits":  # step-0 evicted; 1 held + 1 staged + 1 freeing fit in 3.5
            assert victims == [f"{root}/step-0"]
            assert stall_wait == 0 and hold_wait > 0
            assert ray.get(cat.hold_wait.remote(f"{root}/step-{saved}")) > 0
        else:  # steps 0 and 1 evicted; 1 held + 1 staged + 2 freeing do not fit in 3.2
            assert victims == [f"{root}/step-0", f"{root}/step-1"]
            assert stall_wait > 0 and hold_wait > 0
        with ray_ckpt.make_sync_checkpointer(filesystem=fs) as ckptr:
            ckptr.save(f"{root}/step-{saved}", state)  # the writer waits, then holds
            assert_same(ckptr.load(f"{root}/step-{saved}"), state)


def test_dropped_bytes_count_until_rays_periodic_free_has_surely_run():
    period = ray_ckpt.storage.memory_catalog.RAY_FREE_PERIOD_SECS
    freeing = [(10.0, "a", 3 * MiB), (10.5, "a", MiB), (10.2, "b", 5 * MiB)]
    pending = ray_ckpt.storage.memory_catalog.pending_frees
    assert pending(freeing, "a", 10.6) == (4 * MiB, 10.5 + period)
    assert pending(freeing, "a", 10.0 + period + 0.1) == (MiB, 10.5 + period)
    assert pending(freeing, "a", 10.5 + period) == (0, 10.5 + period)
    assert pending(freeing, "c", 10.6) == (0, 10.6)


def test_ls_shows_memory_checkpoints_with_tier_and_copies(mcluster, capsys):
    import json

    from ray_ckpt.cli import main

    root = _root()
    ray.get(_save_on_node.options(**on_node(mcluster.head_node_id)).remote(f"{root}/step-7", 7))
    assert main(["ls", root, "--json"]) == 0
    [doc] = json.loads(capsys.readouterr().out)
    assert doc["tier"] == "memory" and doc["committed"] and doc["step"] == 7
    assert doc["copies"] == 2 and len(doc["nodes"]) == 2 and mcluster.head_node_id in doc["nodes"]
    assert main(["ls", root]) == 0
    table = capsys.readouterr().out
    assert "TIER" in table and "memory" in table and mcluster.head_node_id[:12] in table
    assert main(["ls", "mem://"]) == 0  # the tier's root: its runs, each with its count
    runs = capsys.readouterr().out
    assert any(line.split()[:2] == [root.removeprefix("mem://"), "1"]
               for line in runs.splitlines()), runs


@ray.remote(num_cpus=0)
class _OlderActor:
    """A tier actor of a ray_ckpt from before the protocol check: no ``protocol`` method."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
class _NewerActor:
    def protocol(self) -> int:
        return ray_ckpt.storage.memory_holder.PROTOCOL + 1


@pytest.mark.parametrize("other", ["older", "newer"])
def test_a_tier_started_by_another_ray_ckpt_is_refused_until_it_is_ended(
    mcluster, monkeypatch, other
):
    """The tier's actors are detached: after an upgrade they may still run the old ray_ckpt.
    Its catalog or holder is refused with an error that says which and what to do, before any
    call; end_memory_tier() ends them, and the next use starts actors of this version. (In a
    namespace of its own, so that the cluster's tier is untouched.)"""
    holder_mod, catalog_mod = ray_ckpt.storage.memory_holder, ray_ckpt.storage.memory_catalog
    namespace = f"ray_ckpt_test_{uuid.uuid4().hex[:8]}"
    for module in (holder_mod, catalog_mod, memory):
        monkeypatch.setattr(module, "NAMESPACE", namespace)
    monkeypatch.setattr(holder_mod, "_HANDLES", {})
    monkeypatch.setattr(holder_mod, "_CHECKED", set())
    head = mcluster.head_node_id
    cls = _OlderActor if other == "older" else _NewerActor
    for name in (catalog_mod.CATALOG_NAME, holder_mod.holder_name(head)):
        actor = cls.options(name=name, namespace=namespace, lifetime="detached").remote()
        ray.get(actor.__ray_ready__.remote())
    try:
        for use in (memory.catalog, memory.in_use, lambda: holder_mod.holder_for(head)):
            with pytest.raises(ray_ckpt.errors.StorageError) as raised:
                use()
            said = str(raised.value)
            assert f"was started by {'an older' if other == 'older' else 'a newer'} ray_ckpt" \
                in said and "end_memory_tier()" in said and namespace in said, said
        assert sorted(memory.end_memory_tier()) == sorted(
            [catalog_mod.CATALOG_NAME, holder_mod.holder_name(head)])
        assert not memory.in_use()
        assert ray.get(memory.catalog().protocol.remote()) == holder_mod.PROTOCOL
        assert ray.get(holder_mod.holder_for(head).protocol.remote()) == holder_mod.PROTOCOL
    finally:
        memory.end_memory_tier()
    assert not memory.in_use()

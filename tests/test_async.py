"""AsyncCheckpointer: ObjectRef-backed futures, background staging, errors, close, init hooks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading

import pytest
import ray
import torch

import ray_ckpt
import ray_ckpt.errors
from ray_ckpt.save.encoder import CheckpointWriter
from ray_ckpt.save.stager import DefaultStager

from .helpers import assert_same, small_config, tiny_model, trained

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # writer factories below


@pytest.fixture(scope="module")
def actor(cluster):
    with ray_ckpt.make_async_checkpointer(config=small_config()) as c:
        yield c


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {"w": torch.randn(600, 600), "b": torch.randn(600), "step": seed,
            "many": [torch.randn(10) for _ in range(200)]}


def test_futures_resolve_and_are_object_ref_backed(actor, tmp_path):
    stage, write = actor.save(str(tmp_path / "c"), _state())
    assert isinstance(stage.object_ref, ray.ObjectRef)
    assert isinstance(write.object_ref, ray.ObjectRef)
    stats = stage.result(timeout=60)
    assert stats.nbytes == 600 * 600 * 4 + 600 * 4 + 200 * 40 and stats.items == 202
    ready, _ = ray.wait([write.object_ref], timeout=60)
    assert ready == [write.object_ref]
    result = write.result()
    assert result == ray.get(write.object_ref)
    assert result.nbytes == stats.nbytes and result.items == stats.items
    files = os.listdir(tmp_path / "c")
    data = [f for f in files if f.endswith(f"-{result.checkpoint_id}.data")]
    assert len(data) == sum(result.writers.values()) > 0
    manifest = f"manifest-{result.checkpoint_id}.arrow"
    assert sorted(files) == sorted([*data, manifest, "ray_ckpt.commit"])
    assert result.files == len(files)  # data files, manifest and marker
    assert write.done() and stage.done() and write.exception() is None
    assert_same(_state(), actor.load(str(tmp_path / "c")))


def test_await_from_asyncio(actor, tmp_path):
    async def save_and_wait():
        stage, write = actor.save(str(tmp_path / "c"), _state(1))
        stats = await stage
        result = await write
        return stats, result

    stats, result = asyncio.run(save_and_wait())
    assert result.nbytes == stats.nbytes
    assert actor.load(str(tmp_path / "c"))["step"] == 1


def test_done_callbacks_fire(actor, tmp_path):
    seen = []
    event = threading.Event()
    stage, write = actor.save(str(tmp_path / "c"), _state())
    write.add_done_callback(lambda f: (seen.append(f.result().nbytes), event.set()))
    stage.add_done_callback(lambda f: seen.append("staged"))
    assert event.wait(60)
    assert "staged" in seen and seen[-1] > 0


def test_mutating_after_stage_keeps_saved_values(actor, tmp_path):
    state = _state(2)
    expected = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    expected["many"] = [t.clone() for t in state["many"]]
    stage, write = actor.save(str(tmp_path / "c"), state)
    stage.result()
    state["w"].fill_(-1.0)  # the caller changes and frees its tensors right after staging
    for t in state["many"]:
        t.zero_()
    del state
    write.result()
    assert_same(expected, actor.load(str(tmp_path / "c")))


def test_overlap_staging_with_forward_and_backward(actor, tmp_path):
    """The pattern from the README: save, run forward/backward, wait for staging, then step."""
    model = tiny_model()
    optimizer = trained(model, steps=1)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    stage, write = actor.save(str(tmp_path / "c"), {"model": model.state_dict()})
    loss = model(torch.randn(8, 16)).pow(2).mean()  # overlaps with staging
    loss.backward()
    stage.result()  # before the weights change
    optimizer.step()
    write.result()
    loaded = actor.load(str(tmp_path / "c"))["model"]
    assert all(torch.equal(loaded[k], snapshot[k]) for k in snapshot)
    assert any(not torch.equal(model.state_dict()[k], snapshot[k]) for k in snapshot)


class FailingWriter(CheckpointWriter):
    """A real writer that refuses every bucket."""

    def write_bucket(self, storage, layout, arrays, **kwargs):
        raise OSError(28, "No space left on device (injected)")


def test_writer_error_surfaces_in_write_future_and_next_save(cluster, tmp_path):
    with ray_ckpt.make_async_checkpointer(
        config=small_config(), checkpoint_writer_init_fn=lambda config: FailingWriter(config)
    ) as failing:
        _, write = failing.save(str(tmp_path / "bad"), _state())
        with pytest.raises(ray_ckpt.errors.CheckpointWriteError) as info:
            write.result(timeout=60)
        message = str(info.value)
        assert "No space left on device (injected)" in message and "writer on node" in message
        assert "nothing was committed" in message
        assert not os.path.exists(tmp_path / "bad" / "ray_ckpt.commit")
        assert [f for f in os.listdir(tmp_path / "bad") if f.endswith(".data")] == []  # cleaned

        failing.save(str(tmp_path / "bad2"), _state())
        with pytest.raises(ray_ckpt.errors.CheckpointWriteError, match="injected"):
            failing.save(str(tmp_path / "bad3"), _state())  # raises the previous save's error
        assert not os.path.exists(tmp_path / "bad3")


def _mark_init(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def test_subprocess_init_fn_runs_once_per_writer(cluster, tmp_path):
    marker = str(tmp_path / "init.log")
    with ray_ckpt.make_async_checkpointer(
        config=small_config(), subprocess_init_fn=_mark_init, subprocess_init_args=(marker,)
    ) as c:
        for i in range(3):
            c.save(str(tmp_path / f"c{i}"), _state(i))[1].result()
    pids = open(marker).read().split()
    assert len(pids) == 1  # one writer on the caller's node, initialised once


def test_cancel_before_commit(cluster, tmp_path):
    gate = tmp_path / "gate"

    class SlowWriter(CheckpointWriter):
        def write_bucket(self, storage, layout, arrays, **kwargs):
            import time

            extents = super().write_bucket(storage, layout, arrays, **kwargs)
            while not os.path.exists(gate):  # the data file is on disk when the save is cancelled
                time.sleep(0.01)
            return extents

    with ray_ckpt.make_async_checkpointer(
        config=small_config(), checkpoint_writer_init_fn=lambda config: SlowWriter(config)
    ) as c:
        _, write = c.save(str(tmp_path / "c"), _state())
        assert write.cancel() is True
        gate.touch()
        with pytest.raises(concurrent.futures.CancelledError):
            write.result(timeout=60)
        assert write.cancelled()
        # result() raised only once the writer had deleted what the save wrote
        assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".data")]
    assert not os.path.exists(tmp_path / "c" / "ray_ckpt.commit")
    assert not [f for f in os.listdir(tmp_path / "c") if f.endswith(".data")]


def test_close_drains_the_save_in_flight(cluster, tmp_path):
    c = ray_ckpt.make_async_checkpointer(config=small_config())
    _, write = c.save(str(tmp_path / "c"), _state())
    c.close()
    assert write.done()
    assert os.path.exists(tmp_path / "c" / "ray_ckpt.commit")
    with pytest.raises(ray_ckpt.errors.CheckpointerClosedError):
        c.save(str(tmp_path / "d"), _state())
    c.close()  # idempotent


def test_sync_staging_mode(cluster, tmp_path):
    config = ray_ckpt.CheckpointerConfig(
        staging_config=ray_ckpt.CheckpointStagerConfig(use_async_staging=False)
    )
    with ray_ckpt.make_async_checkpointer(config=config) as c:
        stage, write = c.save(str(tmp_path / "c"), _state())
        assert stage.done()  # staged before save() returned
        write.result()
    assert_same(_state(), ray_ckpt.CheckpointReader().read(str(tmp_path / "c"))[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_stages_through_pinned_memory(cluster, tmp_path):
    state = {"w": torch.randn(1000, 1000, device="cuda"), "small": torch.ones(3, device="cuda")}
    with ray_ckpt.make_async_checkpointer() as c:
        stage, write = c.save(str(tmp_path / "c"), state)
        stage.result()
        expected = {k: v.cpu() for k, v in state.items()}
        state["w"].zero_()
        write.result()
        loaded = c.load(str(tmp_path / "c"))
        assert_same(expected, loaded)
        on_gpu = c.load(str(tmp_path / "c"), default_map_location="cuda")
        assert on_gpu["w"].is_cuda


def test_metrics_reach_rays_prometheus_endpoint(actor, tmp_path):
    import time
    import urllib.request

    _, write = actor.save(str(tmp_path / "c"), _state())
    result = write.result()
    assert write.stats == result and result.stage_secs > 0
    node = next(n for n in ray.nodes() if n["NodeID"] == ray.get_runtime_context().get_node_id())
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        if "ray_ckpt_bytes_written" in text and "ray_ckpt_stall_seconds" in text:
            break
        time.sleep(1)
    written = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        # Ray prefixes application metrics with "ray_"
        if line.startswith(("ray_ckpt_bytes_written", "ray_ray_ckpt_bytes_written"))
    ]
    assert written and max(written) >= result.nbytes, text[-2000:]


def test_async_save_puts_buckets_in_groups_and_a_sync_save_one_at_a_time(
    cluster, tmp_path, monkeypatch
):
    calls: list[list[int]] = []
    stage = DefaultStager.stage

    def recording(self, plan, buckets):
        calls.append(list(buckets))
        return stage(self, plan, buckets)

    monkeypatch.setattr(DefaultStager, "stage", recording)
    state = {f"w{i}": torch.randn(300_000) for i in range(10)}  # 12 MB in 1 MiB buckets
    with ray_ckpt.make_async_checkpointer(config=small_config()) as c:
        c.save(str(tmp_path / "async"), state)[1].result()
    buckets = len(calls[0])
    assert buckets >= 12 and calls == [list(range(buckets))]  # one put: far below 256 MiB
    calls.clear()
    with ray_ckpt.make_sync_checkpointer(config=small_config()) as c:
        c.save(str(tmp_path / "sync"), state)
    assert calls == [[i] for i in range(buckets)]  # each bucket written as soon as it is put
    for name in ("async", "sync"):
        assert_same(state, ray_ckpt.CheckpointReader().read(str(tmp_path / name))[0])


def test_async_save_puts_groups_on_several_threads_within_the_budget(
    cluster, tmp_path, monkeypatch
):
    """With ``put_threads=2`` two groups are copied at the same time (each waits at a barrier
    for the other: one at a time, the barrier breaks and the save fails), and the checkpoint
    is exact."""
    both = threading.Barrier(2, timeout=30)
    threads: set[str] = set()
    stage = DefaultStager.stage

    def concurrent_stage(self, plan, buckets):
        threads.add(threading.current_thread().name)
        if buckets[0] < 2 * len(buckets):  # the first two groups
            both.wait()
        return stage(self, plan, buckets)

    monkeypatch.setattr(DefaultStager, "stage", concurrent_stage)
    state = {f"w{i}": torch.randn(300_000) for i in range(10)}  # 12 MB in 1 MiB buckets
    # groups of budget // 4 = 2 MiB: 6 of them, at most 8 MiB staged and unwritten at once
    config = small_config(memory_budget_bytes=8 << 20, put_threads=2)
    with ray_ckpt.make_async_checkpointer(config=config) as c:
        stage_future, write_future = c.save(str(tmp_path / "c"), state)
        stage_future.result(timeout=60)
        write_future.result(timeout=60)
    assert len(threads) == 2 and all(t.startswith("ray_ckpt-put") for t in threads)
    assert_same(state, ray_ckpt.CheckpointReader().read(str(tmp_path / "c"))[0])


def test_a_failed_put_fails_the_save_and_the_next_save_works(cluster, tmp_path, monkeypatch):
    """A put that fails on a put thread while another group is being copied: both futures
    raise it, nothing is committed or left on disk, and the checkpointer saves again."""
    stage = DefaultStager.stage

    def failing_stage(self, plan, buckets):
        if buckets[0] == 2 * len(buckets):  # the third group
            raise OSError("object store refused the put")
        return stage(self, plan, buckets)

    state = {f"w{i}": torch.randn(300_000) for i in range(10)}
    config = small_config(memory_budget_bytes=8 << 20, put_threads=2)
    with ray_ckpt.make_async_checkpointer(config=config) as c:
        monkeypatch.setattr(DefaultStager, "stage", failing_stage)
        stage_future, write_future = c.save(str(tmp_path / "bad"), state)
        with pytest.raises(OSError, match="refused the put"):
            stage_future.result(timeout=60)
        with pytest.raises(ray_ckpt.CheckpointError, match="refused the put"):
            write_future.result(timeout=60)
        assert not os.path.exists(tmp_path / "bad") or os.listdir(tmp_path / "bad") == []
        monkeypatch.setattr(DefaultStager, "stage", stage)
        c.save(str(tmp_path / "good"), state)[1].result(timeout=60)
    assert_same(state, ray_ckpt.CheckpointReader().read(str(tmp_path / "good"))[0])

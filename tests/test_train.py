"""Ray Train v2 integration: TorchTrainer runs (2 CPU workers, gloo, DDP) that save through
``ray_ckpt.train.report``, resume through ``ray_ckpt.train.load`` after a worker crashed, and
keep checkpoints by Ray Train's own ``CheckpointConfig``.

Every run trains the same tiny model on batches that depend on (step, rank) alone, so a run
that crashed and resumed must end bit for bit where an uninterrupted one ends. The reference
run (async uploads, retention by a score) is in the default suite; the crash runs, which start
the worker group twice, are marked slow.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import ray_ckpt
import ray_ckpt.errors
import ray_ckpt.tools
import ray_ckpt.train
from ray_ckpt.storage.storage import Storage

from .helpers import assert_same

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS = 8
SAVE_STEPS = (1, 3, 5, 7)  # a checkpoint after each of these steps
CRASH_AT = 4  # rank 1 raises here, in the first attempt: after the checkpoint of step 3
SCORES = {1: 0.5, 3: 0.1, 5: 0.9, 7: 0.3}  # not monotonic: retention must pick, not just trim
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 8, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin()


def _build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    )
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def _train_loop(config: dict[str, Any]) -> None:
    """The training function: the three ray_ckpt.train lines, plus what the tests record."""
    import ray.train

    import ray_ckpt.train

    rank = ray.train.get_context().get_world_rank()
    model, optimizer = _build()
    state = {"model": model, "optim": optimizer, "step": -1}

    checkpoint = ray.train.get_checkpoint()
    loaded = ray_ckpt.train.load(state, strict=True)
    start = state["step"] + 1
    _record(config, f"start-{start}-rank{rank}", checkpoint, loaded, model, optimizer)

    for step in range(start, STEPS):
        x, y = _batch(step, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == config["crash_at"] and rank == 1 and not os.path.exists(config["marker"]):
            _wait_until_registered()  # so that the checkpoint of step 3 is the one to resume
            Path(config["marker"]).touch()
            raise RuntimeError(f"injected crash of rank {rank} at step {step}")
        if step in SAVE_STEPS:
            state["step"] = step
            ray_ckpt.train.report(
                {"step": step, "loss": loss.item(), "score": SCORES[step]},
                state,
                checkpoint_upload_mode=config["mode"],
            )

    if config["reload_at_end"]:  # load the last checkpoint into a fresh model and optimizer
        _wait_until_registered()
        _record(config, f"end-rank{rank}", None, None, model, optimizer)
        fresh_model, fresh_optimizer = _build()
        last = ray.train.get_checkpoint()
        loaded = ray_ckpt.train.load({"model": fresh_model, "optim": fresh_optimizer}, strict=True)
        _record(config, f"reloaded-rank{rank}", last, loaded, fresh_model, fresh_optimizer)


def _wait_until_registered() -> None:
    """Block until Ray Train has registered this worker's latest reported checkpoint."""
    import ray.train

    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
    )


def _record(
    config: dict[str, Any], name: str, checkpoint: Any, loaded: Any,
    model: torch.nn.Module, optimizer: torch.optim.Optimizer,
) -> None:
    """A checkpoint this attempt loaded (or None), and the state it holds from then on."""
    torch.save(
        {
            "checkpoint": None if checkpoint is None else checkpoint.path,
            "loaded_none": loaded is None,
            "model": model.state_dict(),
            "optim": optimizer.state_dict(),
        },
        os.path.join(config["record_dir"], f"{name}.pt"),
    )


def _fit(
    root: Path,
    *,
    mode: str,
    crash_at: int | None = None,
    max_failures: int = 0,
    reload_at_end: bool = False,
    checkpoint_config: CheckpointConfig | None = None,
) -> tuple[Result, Path]:
    record_dir = root / "records"
    record_dir.mkdir(parents=True)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "mode": mode,
            "crash_at": crash_at,
            "reload_at_end": reload_at_end,
            "marker": str(root / "crashed-once"),
            "record_dir": str(record_dir),
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name="run",
            storage_path=str(root / "storage"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=checkpoint_config or CheckpointConfig(),
        ),
    )
    with _fast_polling():
        return trainer.fit(), record_dir


@contextlib.contextmanager
def _fast_polling() -> Iterator[None]:
    """Ray Train's controller polls the workers every 2 s by default, and each report waits
    for a poll; Ray Train propagates this variable from the driver to its controller."""
    previous = os.environ.get(POLL_ENV)
    os.environ[POLL_ENV] = "0.2"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[POLL_ENV]
        else:
            os.environ[POLL_ENV] = previous


def _load(path: str, rank: int = 0) -> dict[str, Any]:
    with ray_ckpt.make_sync_checkpointer(rank_info=ray_ckpt.RankInfo(rank, 2)) as ckptr:
        return ckptr.load(path)


def _records(records: Path, name: str) -> dict[str, Any]:
    return torch.load(records / f"{name}.pt", weights_only=False)


def _checkpoint_dirs(result: Result) -> list[str]:
    run = Path(result.path)
    return sorted(str(p) for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> tuple[Result, Path]:
    """An uninterrupted run with async uploads that keeps the 2 best checkpoints by score and
    at the end loads its last checkpoint into a fresh model and optimizer."""
    result, records = _fit(
        tmp_path_factory.mktemp("reference"),
        mode="async",
        reload_at_end=True,
        checkpoint_config=CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute="score", checkpoint_score_order="min"
        ),
    )
    assert result.error is None, result.error
    return result, records


def test_num_to_keep_deletes_ray_ckpt_checkpoints(reference):
    """Ray Train's retention works on ray_ckpt checkpoints: of steps 1, 3, 5, 7 (scores 0.5,
    0.1, 0.9, 0.3, lower is better, 2 kept) it deletes 1 and 5, whole; 3 and 7 stay intact."""
    result, _ = reference
    kept = {cp.path: metrics["step"] for cp, metrics in result.best_checkpoints}
    assert sorted(kept.values()) == [3, 7]
    assert result.checkpoint is not None and kept[result.checkpoint.path] == 7
    assert result.metrics["step"] == 7
    assert _checkpoint_dirs(result) == sorted(kept)  # 1 and 5 are gone, nothing is left over
    entries = ray_ckpt.list_checkpoints(result.path)
    assert sorted(e.path for e in entries) == sorted(kept) and all(e.committed for e in entries)
    for path, step in kept.items():
        assert ray_ckpt.tools.verify(path).ok
        for rank in (0, 1):
            assert _load(path, rank)["step"] == step


def _ddp_names(model_state: dict[str, Any]) -> dict[str, Any]:
    """The names DDP's ``state_dict()`` gives: a DDP-wrapped module is saved under the plain
    model's names (as DCP's get_model_state_dict does) and loads back into the wrapper."""
    return type(model_state)((f"module.{k}", v) for k, v in model_state.items())


def test_load_restores_model_and_optimizer_in_a_fresh_process_state(reference):
    """``load`` into a fresh DDP model and AdamW gives back exactly the state the run had when
    it saved its last checkpoint, on both ranks (async uploads: reported once committed)."""
    result, records = reference
    for rank in (0, 1):
        trained = _records(records, f"end-rank{rank}")
        reloaded = _records(records, f"reloaded-rank{rank}")
        assert reloaded["checkpoint"] == result.checkpoint.path and not reloaded["loaded_none"]
        assert_same(reloaded["model"], trained["model"])
        assert_same(reloaded["optim"], trained["optim"])
        assert reloaded["optim"]["state"], "AdamW's moments were not restored"
        saved = _load(result.checkpoint.path, rank)
        assert_same(reloaded["model"], _ddp_names(saved["model"]))
        fresh = _records(records, f"start-0-rank{rank}")
        assert fresh["checkpoint"] is None and fresh["loaded_none"]  # load() -> None at first


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_worker_crash_resumes_from_last_committed_checkpoint(cluster, tmp_path, reference, mode):
    """Rank 1 raises at step 4 in the first attempt; FailureConfig(max_failures=1) restarts the
    worker group, which resumes from the checkpoint of step 3 with exactly its parameters and
    optimizer state, and ends bit for bit where the uninterrupted reference run ends."""
    result, records = _fit(tmp_path, mode=mode, crash_at=CRASH_AT, max_failures=1)
    assert result.error is None, result.error
    assert (tmp_path / "crashed-once").exists(), "the injected crash did not happen"
    assert sorted(p.name for p in records.iterdir()) == [
        "start-0-rank0.pt", "start-0-rank1.pt", "start-4-rank0.pt", "start-4-rank1.pt"
    ]  # attempt 1 started fresh, attempt 2 after step 3, on both ranks

    steps = {metrics["step"]: cp.path for cp, metrics in result.best_checkpoints}
    assert sorted(steps) == list(SAVE_STEPS)
    assert all(e.committed for e in ray_ckpt.list_checkpoints(result.path))
    for rank in (0, 1):
        fresh = _records(records, f"start-0-rank{rank}")
        assert fresh["checkpoint"] is None and fresh["loaded_none"]
        resumed = _records(records, f"start-4-rank{rank}")
        assert resumed["checkpoint"] == steps[3]
        saved = _load(steps[3], rank)
        assert saved["step"] == 3
        assert_same(resumed["model"], _ddp_names(saved["model"]))
        assert_same(resumed["optim"], saved["optim"])
        assert resumed["optim"]["state"], "AdamW's moments were not restored"

    reference_result, _ = reference
    assert result.checkpoint is not None and result.checkpoint.path == steps[7]
    final, expected = _load(steps[7]), _load(reference_result.checkpoint.path)
    assert_same(final["model"], expected["model"])
    assert_same(final["optim"], expected["optim"])


@pytest.mark.slow
def test_example_fails_once_resumes_and_keeps_the_best(cluster, tmp_path, monkeypatch):
    """examples/ray_train_example.py: rank 1 fails at step 6, the run resumes and finishes;
    Ray Train keeps the best checkpoint by loss (and the latest), and deletes the others."""
    path = Path(__file__).resolve().parents[1] / "examples" / "ray_train_example.py"
    spec = importlib.util.spec_from_file_location("ray_train_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)
    spec.loader.exec_module(example)
    ray.cloudpickle.register_pickle_by_value(example)  # the workers cannot import it by name
    args = example.parse_args([
        "--storage-path", str(tmp_path), "--steps", "12", "--every", "4",
        "--fail-once-at", "6", "--num-to-keep", "1",
    ])
    with _fast_polling():
        result = example.run(args)
    assert result.error is None, result.error
    marker = tmp_path / "ray_ckpt_example.failed-once"
    assert marker.exists()
    assert result.metrics["step"] == 11
    kept = sorted(cp.path for cp, _ in result.best_checkpoints)
    assert result.checkpoint.path in kept and 1 <= len(kept) <= 2
    assert all(ray_ckpt.tools.verify(p).ok for p in kept)
    # Ray Train deleted every checkpoint it registered and did not keep. With async uploads
    # the save of step 3 may still be in flight when rank 1 fails: it is then either cut
    # short (its files discarded, an empty directory left) or committed without Ray Train
    # having registered it; either way it dates from the first attempt, and no more
    assert set(kept) <= set(_checkpoint_dirs(result))
    failed = os.path.getmtime(marker)  # Ray Train names directories by local time, in µs
    failed_at = time.strftime("checkpoint_%Y-%m-%d_%H-%M-%S", time.localtime(failed))
    failed_at += f".{int(failed % 1 * 1e6):06d}"
    extra = set(_checkpoint_dirs(result)) - set(kept)
    assert len(extra) <= 1, extra
    for path in extra:
        assert Path(path).name < failed_at, f"{path} is not from the first attempt"


def test_example_starts_ray_as_users_do(monkeypatch, tmp_path):
    """Without a running Ray the example starts one with its dashboard: Ray Train's
    controller queries it, and without it logs "Failed to query Ray Train Controller actor
    state" every second (a third of the example's log). Only how ray.init is called is
    checked here; the runs above are real."""
    path = Path(__file__).resolve().parents[1] / "examples" / "ray_train_example.py"
    spec = importlib.util.spec_from_file_location("ray_train_example_init", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    calls: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> None:
        calls.append(kwargs)
        raise KeyboardInterrupt  # stop before training

    monkeypatch.setattr(example.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(example.ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(KeyboardInterrupt):
        example.main(["--storage-path", str(tmp_path)])
    assert calls == [{"address": "local"}]


def test_upload_mode_is_sync_or_async():
    assert ray_ckpt.train._upload_mode("async") is ray.train.CheckpointUploadMode.ASYNC
    assert ray_ckpt.train._upload_mode(ray.train.CheckpointUploadMode.SYNC).value == "SYNC"
    for bad in ("no_upload", ray.train.CheckpointUploadMode.NO_UPLOAD, "later"):
        with pytest.raises(ValueError, match=r"sync.*async|SYNC or ASYNC"):
            ray_ckpt.train._upload_mode(bad)


def test_report_outside_ray_train_says_where_it_belongs():
    with pytest.raises(RuntimeError, match="outside of a Ray Train training function"):
        ray_ckpt.train.report({"loss": 1.0}, {"w": torch.zeros(2)})
    with pytest.raises(RuntimeError, match="outside of a Ray Train training function"):
        ray_ckpt.train.load({"w": torch.zeros(2)})


class _CreatedWhileListing:
    """A local filesystem whose first listing fails the way pyarrow's does when another process
    (another rank saving the same checkpoint) creates the directory in the middle of it."""

    type_name = "local"

    def __init__(self) -> None:
        self._fs = pafs.LocalFileSystem()
        self.raced = False

    def get_file_info(self, what: Any) -> Any:
        if isinstance(what, pafs.FileSelector) and not self.raced:
            self.raced = True
            self._fs.create_dir(what.base_dir)
            raise FileNotFoundError(f"Cannot list directory '{what.base_dir}'")
        return self._fs.get_file_info(what)


def test_listing_a_directory_another_rank_creates_meanwhile(tmp_path):
    """Two ranks of a Ray Train save check and create the same directory at once; pyarrow's
    listing of a directory created under it fails with FileNotFoundError, and the storage
    layer lists again instead of failing the save."""
    fs = _CreatedWhileListing()
    storage = Storage(fs, str(tmp_path / "checkpoint_x"))  # type: ignore[arg-type]
    assert storage.list_files() == {}
    assert fs.raced


# --- resuming with another number of DDP workers (issue 13, item 13) -------------------------


def _resize_loop(config: dict[str, Any]) -> None:
    """Resume (default ``ray_ckpt.train.load``, no strict argument) into a model that
    ``prepare_model`` wraps in DDP with 2 workers and leaves unwrapped with 1, train two steps
    and save. Records the state right after the load and right before the save."""
    import copy

    import ray.train
    import ray.train.torch

    import ray_ckpt.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(100 + world_size)  # each run starts from other weights than it saved
    model = ray.train.torch.prepare_model(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    )
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel) == (world_size > 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    state = {"model": model, "optim": optimizer, "step": -1}
    previous = config["resume_from"]  # (Ray Train v2 dropped resume_from_checkpoint)
    ray_ckpt.train.load(state, checkpoint=previous and ray.train.Checkpoint(previous))
    inner = model.module if world_size > 1 else model
    _record_state(config, f"start-rank{rank}", state["step"], inner, optimizer)
    if previous:  # by default a module whose keys the checkpoint lacks fails the load
        bigger = torch.nn.Sequential(*copy.deepcopy(inner), torch.nn.Linear(1, 1))
        try:
            ray_ckpt.train.load({"model": bigger}, checkpoint=ray.train.Checkpoint(previous))
            missing: Any = "loaded"
        except ray_ckpt.errors.MissingKeysError as e:
            missing = e.missing_keys
        Path(config["record_dir"], f"strict-rank{rank}.txt").write_text(repr(missing))
    for step in range(state["step"] + 1, state["step"] + 3):
        x, y = _batch(step, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["step"] = step
    _record_state(config, f"end-rank{rank}", state["step"], inner, optimizer)
    ray_ckpt.train.report({"step": state["step"]}, state)


def _record_state(
    config: dict[str, Any], name: str, step: int, model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    torch.save(
        {"step": step, "model": model.state_dict(), "optim": optimizer.state_dict()},
        os.path.join(config["record_dir"], f"{name}.pt"),
    )


def _fit_resized(
    root: Path, name: str, num_workers: int, resume_from: ray.train.Checkpoint | None
) -> tuple[Result, Path]:
    record_dir = root / name
    record_dir.mkdir(parents=True)
    trainer = TorchTrainer(
        _resize_loop,
        train_loop_config={
            "record_dir": str(record_dir),
            "resume_from": resume_from and resume_from.path,
        },
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(name=name, storage_path=str(root / "storage")),
    )
    with _fast_polling():
        result = trainer.fit()
    assert result.error is None, result.error
    return result, record_dir


def test_resume_with_another_number_of_ddp_workers_loads_every_parameter(cluster, tmp_path):
    """A run with 2 DDP workers saves; a run with 1 worker (prepare_model does not wrap it)
    resumes from it, trains and saves; a run with 2 workers resumes from that. Each resume
    starts with exactly the parameters and optimizer state the previous run saved, although
    the wrapped and the unwrapped model name their parameters differently."""
    two, two_records = _fit_resized(tmp_path, "two-workers", 2, None)
    one, one_records = _fit_resized(tmp_path, "one-worker", 1, two.checkpoint)
    again, again_records = _fit_resized(tmp_path, "two-again", 2, one.checkpoint)

    for before, after, ranks in (
        (two_records, one_records, [0]), (one_records, again_records, [0, 1])
    ):
        end = _records(before, "end-rank0")
        for rank in ranks:
            start = _records(after, f"start-rank{rank}")
            assert start["step"] == end["step"]
            assert_same(start["model"], end["model"])
            assert_same(start["optim"], end["optim"])
    saved = _load(two.checkpoint.path)  # DDP's names are saved unwrapped
    assert saved["step"] == 1 and not any(k.startswith("module.") for k in saved["model"])
    for records, ranks in ((one_records, [0]), (again_records, [0, 1])):
        for rank in ranks:
            missing = (records / f"strict-rank{rank}.txt").read_text()
            assert missing == "['model.3.weight', 'model.3.bias']"
    assert _records(again_records, "end-rank1")["step"] == 5
    assert _load(again.checkpoint.path)["step"] == 5


# --- the tools on a Ray Train run directory (issue 16) -----------------------------------------


def _cli(*argv: str) -> tuple[int, str, str]:
    """The real console entry point in a fresh process (what a user runs)."""
    done = subprocess.run(
        [sys.executable, "-m", "ray_ckpt", *argv], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return done.returncode, done.stdout, done.stderr


def _unregistered_save(run_dir: Path, step: int, stamp: str = "00-00-00.999999") -> str:
    """A committed ray_ckpt checkpoint in the run dir that Ray Train never registered (what a
    save that commits after its run attempt failed leaves), named as Ray Train names them,
    with a timestamp older than the run's: only its saved step may order it."""
    path = str(run_dir / f"checkpoint_2000-01-01_{stamp}")
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        ckptr.save(path, {"model": {"w": torch.ones(4)}, "step": step})
    return path


def test_ls_on_a_run_dir_orders_by_saved_step_and_shows_registration(reference, tmp_path):
    result, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(result.path, run_dir)
    _unregistered_save(run_dir, step=4)
    rc, out, err = _cli("ls", str(run_dir))
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines()[1:4]]
    # steps 3 and 7 are the ones Ray Train kept, 7 the latest; 4 never registered
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("3", "committed", "registered"), ("4", "committed", "no"), ("7", "committed", "latest"),
    ]
    assert rows[2][0] == Path(result.checkpoint.path).name
    assert "1 committed but never registered" in out
    docs = json.loads(_cli("ls", "--json", str(run_dir))[1])
    assert [(d["step"], d["registered"]) for d in docs] == [(3, True), (4, False), (7, True)]
    rc, out, _ = _cli("ls", str(run_dir.parent))  # a root of roots says what it holds
    assert rc == 0 and "holds no checkpoints itself" in out and "run" in out.split()


def test_clean_deletes_unregistered_only_when_asked_and_never_the_newest(reference, tmp_path):
    result, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(result.path, run_dir)
    stray = _unregistered_save(run_dir, step=4)
    incomplete = run_dir / "checkpoint_2000-01-01_00-00-01.000000"
    shutil.copytree(result.checkpoint.path, incomplete)
    (incomplete / "ray_ckpt.commit").unlink()  # a save cut short before its commit
    _unregistered_save(run_dir, step=9, stamp="00-00-02.000000")

    rc, out, err = _cli("clean", str(run_dir), "--min-age", "0")  # dry run, incomplete only
    assert rc == 0 and "dry run" in err and incomplete.exists()
    rc, out, err = _cli("clean", str(run_dir), "--min-age", "0", "--yes")
    assert rc == 0 and not incomplete.exists() and Path(stray).exists()
    rc, out, err = _cli("clean", str(run_dir), "--min-age", "0", "--unregistered", "--yes")
    assert rc == 0 and not Path(stray).exists()
    assert "the newest committed checkpoint" in out  # step 9: unregistered, but the newest
    left = {e.name for e in ray_ckpt.list_checkpoints(str(run_dir))}
    kept = {Path(cp.path).name for cp, _ in result.best_checkpoints}
    assert left == kept | {"checkpoint_2000-01-01_00-00-02.000000"}
    assert (run_dir / "checkpoint_manager_snapshot.json").exists()  # not ray_ckpt's: untouched


def test_errors_on_a_run_dir_point_at_ls_and_never_at_deleting(reference):
    result, _ = reference
    with pytest.raises(ray_ckpt.CheckpointError) as raised:
        _load(result.path)
    message = str(raised.value)
    assert "directory of checkpoints" in message and f"ray-ckpt ls {result.path}" in message
    assert "delet" not in message.lower() and "cleanup" not in message
    for command in ("inspect", "verify"):
        rc, out, err = _cli(command, result.path)
        assert rc == 1 and "ray-ckpt ls" in out + err and "delet" not in (out + err).lower()


def test_a_broken_pipe_ends_quietly(reference):
    """``ray-ckpt diff A B | head -2``: the reader is gone before the diff is printed."""
    result, _ = reference
    a, b = sorted(cp.path for cp, _ in result.best_checkpoints)
    read, write = os.pipe()
    os.close(read)  # every write to stdout now fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ray_ckpt", "diff", a, b], stdout=write,
            stderr=subprocess.PIPE, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    finally:
        os.close(write)
    assert done.returncode == 0 and done.stderr == ""


def test_export_strips_ddps_module_prefix(reference, tmp_path):
    """A checkpoint of a DDP model's ``state_dict()`` (keys ``module.0.weight``, as a plain
    dict holds them) exports with ``--strip-prefix module.`` under the plain model's names,
    which load strictly into the unwrapped model."""
    result, _ = reference
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    path = str(tmp_path / "ddp")
    with ray_ckpt.make_sync_checkpointer() as ckptr:
        ckptr.save(path, {"model": _ddp_names(plain.state_dict()), "step": 1})
    out = tmp_path / "model.pt"
    rc, _, err = _cli("export", path, "--to", "torch", str(out),
                      "--only", "model", "--strip-prefix", "module.")
    assert rc == 0, err
    exported = torch.load(out, weights_only=True)
    assert sorted(exported) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    plain.load_state_dict(exported, strict=True)
    assert_same(_ddp_names(exported), dict(_load(path)["model"]))
    rc, _, err = _cli("export", result.checkpoint.path, "--to", "torch", str(tmp_path / "x.pt"),
                      "--only", "model", "--strip-prefix", "encoder.")
    assert rc == 1 and "no key starts with 'encoder.'" in err

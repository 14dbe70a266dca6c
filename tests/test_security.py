"""Secrets at rest: explicit S3 keys never reach what Ray keeps (GCS), spills or logs, and a
URI's user-info is never shown (issue 13, item 11; docs/SECURITY.md).

Runs on its own cluster: one node with a small object store that spills to a directory of the
test's, so that every object ray_ckpt hands to Ray can be read back from disk. The saves stop in
their ``pre_commit`` hook (the request is still referenced then); the test fills the object
store until Ray has spilled, and only then scans: the spill directory, Ray's session directory
(logs included), the GCS server's memory (where a detached actor's constructor arguments
live), the raylet's memory (it maps the object store: a request in use by its running task was
not spilled in our runs, so the store itself is searched), the checkpoint's objects and the
captured logs. Before the fix, the secret was found in the object store (single rank) and in
the GCS (multi-rank).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray
import torch
from ray._private import ray_constants

import ray_ckpt
from ray_ckpt import cli
from ray_ckpt.builder import LOCAL_RAY_SYSTEM_CONFIG
from ray_ckpt.storage.credentials import redact

from .conftest import CLUSTERS, S3_ACCESS_KEY, S3_BUCKET, S3_REGION, MiB, ensure_cluster

SPILL_DIR = Path(tempfile.gettempdir()) / f"ray_ckpt_test_spill_{os.getpid()}"

CLUSTERS["spill"] = {
    "head": {
        "num_cpus": 2,
        "object_store_memory": 100 * MiB,
        "_system_config": {
            **LOCAL_RAY_SYSTEM_CONFIG,
            "min_spilling_size": 0,
            "object_spilling_config": json.dumps(
                {"type": "filesystem", "params": {"directory_path": str(SPILL_DIR)}}
            ),
        },
    },
    "workers": [],
}

# enough items that a save's request (its item list) is far over Ray's 100 KiB inline limit
ITEMS = 3000
FILL_BYTES = 40 * MiB


@pytest.fixture(scope="module")
def spill_cluster():
    SPILL_DIR.mkdir(exist_ok=True)
    try:
        yield ensure_cluster("spill")
    finally:
        shutil.rmtree(SPILL_DIR, ignore_errors=True)


@pytest.fixture()
def secret() -> str:
    return f"rcsecret{uuid.uuid4().hex}"


class _PauseHook(ray_ckpt.WriterHook):
    """Stops the commit until the test has scanned: writes ``reached``, waits for ``go``."""

    def __init__(self, where: str) -> None:
        self.where = where

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        Path(self.where, "reached").write_text(path)
        deadline = time.monotonic() + 120
        while not Path(self.where, "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def _state() -> dict[str, Any]:
    return {f"layer{i}.weight": torch.full((16,), float(i)) for i in range(ITEMS)}


def _wait_for(path: Path, timeout_secs: float = 120) -> None:
    deadline = time.monotonic() + timeout_secs
    while not path.exists():
        assert time.monotonic() < deadline, f"the save never reached {path.name}"
        time.sleep(0.05)


def _force_spilling() -> list[Any]:
    """Fill the object store until Ray has spilled objects to SPILL_DIR; keep the refs."""
    held = []
    for _ in range(8):
        held.append(ray.put(np.ones(FILL_BYTES, dtype=np.uint8)))
        if any(p.is_file() for p in SPILL_DIR.rglob("*")):
            return held
    raise AssertionError(f"Ray spilled nothing to {SPILL_DIR}")


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(str(path))
        except OSError:  # a socket or a file that went away meanwhile
            continue
    return found


def _memory_holds(process_type: str, needle: bytes) -> bool:
    """Whether the writable memory of the head's ``process_type`` process holds ``needle``:
    the GCS server (it keeps actor specs) or the raylet (it maps the object store)."""
    head = _cluster_nodes()[0]
    pid = head.all_processes[process_type][0].process.pid
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "w" not in fields[1] or end - start > 1 << 30:
                continue
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, ValueError, OverflowError):
                continue
    return False


def _cluster_nodes() -> list[Any]:
    from .conftest import _current

    assert _current is not None
    return [_current.cluster.head_node, *_current.cluster.worker_nodes]


def _scan(secret: str, ckpt_prefix: str, fs: Any, caplog: pytest.LogCaptureFixture) -> dict:
    needle = secret.encode()
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    checkpoint = [
        info.path for info in fs.get_file_info(
            pafs.FileSelector(ckpt_prefix, recursive=True)
        )
        if info.is_file and needle in fs.open_input_stream(info.path).read()
    ]
    return {
        "spilled": _files_holding(SPILL_DIR, needle),
        "session": _files_holding(session, needle),
        "gcs": _memory_holds(ray_constants.PROCESS_TYPE_GCS_SERVER, needle),
        "object store": _memory_holds(ray_constants.PROCESS_TYPE_RAYLET, needle),
        "checkpoint": checkpoint,
        "logs": secret in caplog.text,
    }


def _assert_clean(found: dict) -> None:
    assert found == {
        "spilled": [], "session": [], "gcs": False, "object store": False, "checkpoint": [],
        "logs": False,
    }


def _scan_during_commit(
    pause: Path, secret: str, path: str, fs: Any, caplog: pytest.LogCaptureFixture
) -> dict:
    _wait_for(pause / "reached")
    held = _force_spilling()
    try:
        return _scan(secret, path, fs, caplog)
    finally:
        del held
        (pause / "go").write_text("")


def test_explicit_keys_never_reach_spilled_objects_session_dir_gcs_or_logs(
    spill_cluster, s3_server, tmp_path, secret, caplog
):
    caplog.set_level(logging.DEBUG)
    fs = s3_server.filesystem(secret_key=secret)
    path = f"{S3_BUCKET}/security/{uuid.uuid4().hex}/single"
    with ray_ckpt.make_async_checkpointer(
        filesystem=fs, commit_hook=_PauseHook(str(tmp_path))
    ) as ckptr:
        state = _state()
        stage, write = ckptr.save(path, state)
        stage.result()
        found = _scan_during_commit(tmp_path, secret, path, fs, caplog)
        write.result()
        loaded = ckptr.load(path)
    assert torch.equal(loaded["layer7.weight"], state["layer7.weight"])
    _assert_clean(found)
    _assert_clean(_scan(secret, path, fs, caplog))


def test_multi_rank_save_keeps_explicit_keys_out_of_the_barrier_actor(
    spill_cluster, s3_server, tmp_path, secret, caplog
):
    caplog.set_level(logging.DEBUG)
    path = f"{S3_BUCKET}/security/{uuid.uuid4().hex}/ranks"
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            with ray_ckpt.make_sync_checkpointer(
                filesystem=s3_server.filesystem(secret_key=secret),
                rank_info=ray_ckpt.RankInfo(r, 2),
                commit_hook=_PauseHook(str(tmp_path)),
            ) as ckptr:
                ckptr.save(path, {"model": _state(), "rank": r})
        except BaseException as e:  # noqa: BLE001 - re-raised by the test below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    fs = s3_server.filesystem(secret_key=secret)
    try:
        found = _scan_during_commit(tmp_path, secret, path, fs, caplog)
    finally:
        (tmp_path / "go").write_text("")
        for t in threads:
            t.join(timeout=180)
    assert not errors, errors
    loaded = ray_ckpt.make_sync_checkpointer(filesystem=fs).load(path)
    assert torch.equal(loaded["model"]["layer3.weight"], torch.full((16,), 3.0))
    _assert_clean(found)
    _assert_clean(_scan(secret, path, fs, caplog))


def test_uri_user_info_is_never_shown(spill_cluster, s3_server, tmp_path, secret, capsys):
    run = f"security/{uuid.uuid4().hex}"
    query = f"endpoint_override={s3_server.endpoint}&scheme=http&region={S3_REGION}"
    root = f"s3://{S3_ACCESS_KEY}:{secret}@{S3_BUCKET}/{run}?{query}"
    manager = ray_ckpt.CheckpointManager(root, ray_ckpt.make_sync_checkpointer(), keep_last=1)
    manager.save(1, {"w": torch.ones(3)})
    manager.save(2, {"w": torch.ones(3)})  # retention deletes step 1 through the real path
    entries = ray_ckpt.list_checkpoints(root)
    assert [e.step for e in entries] == [2]
    assert entries[0].path == f"s3://***@{S3_BUCKET}/{run}/step-000000002?{query}"
    assert secret not in repr(entries)

    assert cli.main(["ls", "--json", root]) == 0
    out = capsys.readouterr().out
    assert secret not in out and "***@" in out

    with pytest.raises(ray_ckpt.CheckpointNotFoundError) as missing:
        ray_ckpt.make_sync_checkpointer().load(root.replace(run, f"{run}/absent"))
    assert secret not in str(missing.value)
    with pytest.raises(ValueError) as bad:
        ray_ckpt.make_sync_checkpointer().load(f"s3://{S3_ACCESS_KEY}:{secret}@bucket:x/y")
    assert secret not in str(bad.value) and "***@" in str(bad.value)
    assert cli.main(["inspect", f"s3://{S3_ACCESS_KEY}:{secret}@bucket:x/y"]) != 0
    assert secret not in capsys.readouterr().err


def test_redact_hides_every_uri_user_info():
    text = "s3://AK:S/K@b/x?q=1 'gs://to@k@b/y' s3://b/z /tmp/a@b"
    assert redact(text) == "s3://***@b/x?q=1 'gs://***@b/y' s3://b/z /tmp/a@b"


# --- item 10: torch.load(weights_only=True) is safe only from torch 2.6 on -----------------------


def test_torch_requirement_excludes_unsafe_weights_only_loads():
    import tomllib
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert not torch_req.specifier.contains("2.5.1")
    assert torch_req.specifier.contains("2.6.0")


def test_import_refuses_a_torch_file_under_an_unsafe_torch(tmp_path, monkeypatch):
    from ray_ckpt.tools import import_checkpoint

    src = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, src)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")  # the fault: an old torch
    with pytest.raises(ray_ckpt.CheckpointError, match=r"CVE-2025-32434"):
        import_checkpoint(str(src), str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


# --- the pickled forms, without Ray ---------------------------------------------------------------


def _explicit_filesystems(secret: str) -> dict[str, Any]:
    import datetime

    s3 = pafs.S3FileSystem(
        access_key=S3_ACCESS_KEY, secret_key=secret, session_token=f"tok-{secret}",
        endpoint_override="127.0.0.1:9", scheme="http", region=S3_REGION,
        proxy_options={"scheme": "http", "host": "proxy", "port": 3128,
                       "username": "u", "password": f"pw-{secret}"},
    )
    gcs = pafs.GcsFileSystem(
        access_token=secret,
        credential_token_expiration=datetime.datetime(2100, 1, 1),
    )
    return {"s3": s3, "subtree": pafs.SubTreeFileSystem("bucket/run", s3), "gcs": gcs}


@pytest.mark.parametrize("kind", ["s3", "subtree", "gcs"])
def test_a_storage_pickles_without_secrets_and_rebuilds_from_the_handoff(kind, secret):
    import pickle

    from ray_ckpt.errors import StorageError
    from ray_ckpt.storage import credentials
    from ray_ckpt.storage.storage import Storage

    fs = _explicit_filesystems(secret)[kind]
    storage = Storage(fs, "bucket/run/step-1")
    raw = pickle.dumps(storage)
    assert secret.encode() not in raw
    handoff = pickle.loads(pickle.dumps(storage.handoff()))
    assert secret not in repr(handoff)

    credentials._registry.clear()  # a process that was handed nothing
    credentials._rebuilt.clear()
    with pytest.raises(StorageError, match="were not handed to this process"):
        pickle.loads(raw).fs  # noqa: B018
    credentials.accept(handoff)
    rebuilt = pickle.loads(raw).fs
    assert type(rebuilt) is type(fs)
    assert pickle.dumps(rebuilt) == pickle.dumps(fs)  # every option, secrets included


def test_a_filesystem_without_explicit_keys_pickles_as_before():
    import pickle

    from ray_ckpt.storage.storage import Storage

    fs = pafs.S3FileSystem(endpoint_override="127.0.0.1:9", scheme="http", region=S3_REGION)
    storage = Storage(fs, "bucket/run")
    assert storage.handoff() is None
    assert pickle.dumps(pickle.loads(pickle.dumps(storage)).fs) == pickle.dumps(fs)

"""Storage: resolution, commit strategies, retries, permanent errors, list and delete.

S3 is a real S3 API server (``moto_server``) on 127.0.0.1 (``s3_server`` in conftest.py);
``backend`` runs a test on local disk, S3 and a custom ``pyarrow.fs`` filesystem. Faults are
injected by wrapping the real filesystem (tests/faulty_fs.py); saves that fail under faults are
in test_storage_faults.py.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import pickle
import socket
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import torch

import ray_ckpt
import ray_ckpt.catalog
import ray_ckpt.errors
from ray_ckpt.config import StorageConfig
from ray_ckpt.format.names import MARKER_NAME
from ray_ckpt.storage.atomic import PutCommit, RenameCommit, commit_strategy_for
from ray_ckpt.storage.buffers import Buffers
from ray_ckpt.storage.classify import is_transient
from ray_ckpt.storage.memory_stream import PeerStream, StreamServer
from ray_ckpt.storage.storage import Storage

from .conftest import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET_KEY, start_s3_server
from .faulty_fs import Fault, FaultPlan, faulty
from .helpers import assert_same, small_config

FAST_RETRIES = StorageConfig(
    max_attempts=3, retry_initial_backoff_secs=0.01, retry_max_backoff_secs=0.05
)


def _state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {"w": torch.randn(400, 700), "b": torch.randn(7), "step": seed}


# --- resolution and strategies ------------------------------------------------------------------


def test_commit_strategy_follows_the_filesystem(s3_fs, custom_fs, tmp_path):
    from fsspec.implementations.memory import MemoryFileSystem

    plan = FaultPlan(tmp_path / "faults")
    expected = {
        "local": (pafs.LocalFileSystem(), RenameCommit),
        "s3": (s3_fs, PutCommit),
        "fsspec dir over local": (custom_fs, RenameCommit),
        "fsspec memory": (pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem())), RenameCommit),
        "wrapped s3": (faulty(s3_fs, plan), PutCommit),
        "wrapped local": (faulty(pafs.LocalFileSystem(), plan), RenameCommit),
        "subtree of s3": (pafs.SubTreeFileSystem(f"{S3_BUCKET}/sub", s3_fs), PutCommit),
    }
    for name, (fs, strategy) in expected.items():
        assert isinstance(commit_strategy_for(fs), strategy), name
        assert isinstance(commit_strategy_for(Storage(fs, "x/y").fs), strategy), name
    assert Storage.from_path(str(tmp_path)).is_local


def test_storage_pickles_with_its_filesystem(s3_fs, custom_fs, tmp_path):
    for fs, path in ((s3_fs, f"{S3_BUCKET}/pickled"), (custom_fs, "pickled")):
        storage = Storage(fs, path)
        storage.make_dir()
        storage.write_file("a", [b"hello"], fsync=False)
        clone = pickle.loads(pickle.dumps(storage))
        assert clone.read_file("a") == b"hello"
        assert clone.list_files() == {"a": 5}
        assert clone.display == storage.display


def test_s3_uri_with_endpoint_in_the_query(s3_server, s3_fs, cluster, monkeypatch):
    """A user needs no filesystem object: an ``s3://`` URI with the endpoint in its query and
    the credentials in the environment. The writer actors get the filesystem with the save."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    root = s3_server.uri(f"{S3_BUCKET}/uri-run")
    path = s3_server.uri(f"{S3_BUCKET}/uri-run/step-5")
    state = _state(5)
    with ray_ckpt.make_sync_checkpointer(config=small_config()) as ckptr:
        ckptr.save(path, state)
        assert_same(state, ckptr.load(path))
    # the same checkpoint through an explicit filesystem and a plain bucket/key path
    with ray_ckpt.make_sync_checkpointer(filesystem=s3_fs) as ckptr:
        assert_same(state, ckptr.load(f"{S3_BUCKET}/uri-run/step-5"))
    (entry,) = ray_ckpt.list_checkpoints(root)
    assert entry.committed and entry.step == 5 and entry.path == path
    assert_same(state, ray_ckpt.CheckpointReader().read(entry.path)[0])


# --- commits ------------------------------------------------------------------------------------


def test_s3_commit_is_one_put_of_the_marker_after_every_other_object(s3_server, s3_fs, cluster):
    prefix = f"{S3_BUCKET}/put-commit"
    with ray_ckpt.make_sync_checkpointer(config=small_config(), filesystem=s3_fs) as ckptr:
        ckptr.save(prefix, _state())
    writes = [
        (method, key, query)
        for method, key, query, status in s3_server.requests(prefix + "/")
        if method in ("PUT", "POST") and status == 200
    ]
    marker_key = f"{prefix}/{MARKER_NAME}"
    marker_writes = [w for w in writes if w[1] == marker_key]
    assert marker_writes == [("PUT", marker_key, "")], "the marker is one plain PutObject"
    assert writes[-1][1] == marker_key, "the marker is the last object written"
    assert sum(1 for w in writes if w[1].endswith(".data")) >= 2
    assert not [w for w in writes if ".tmp-" in w[1]], "no temporary marker on object stores"


@pytest.mark.parametrize("kind", ["local", "s3", "custom"])
def test_commit_protocol_order(kind, s3_fs, custom_fs, cluster, tmp_path):
    """Through a journaling wrapper: data files and the manifest, then the marker, last; on S3 a
    direct upload, elsewhere a temporary marker renamed over ray_ckpt.commit."""
    fs, path = {
        "local": (pafs.LocalFileSystem(), str(tmp_path / "c")),
        "s3": (s3_fs, f"{S3_BUCKET}/order-{tmp_path.name}"),
        "custom": (custom_fs, f"order-{tmp_path.name}"),
    }[kind]
    plan = FaultPlan(tmp_path / "journal")
    with ray_ckpt.make_sync_checkpointer(config=small_config(), filesystem=faulty(fs, plan)) as c:
        c.save(path, _state())
    commits = [call for call in plan.journal() if call.op in ("write", "move")]
    names = [(call.op, call.name) for call in commits]
    first_marker = next(i for i, (_, n) in enumerate(names) if n.startswith(MARKER_NAME))
    assert all(n.endswith((".data", ".arrow")) for _, n in names[:first_marker])
    assert sum(1 for _, n in names if n.startswith("manifest-")) == 1
    if kind == "s3":
        assert names[first_marker:] == [("write", MARKER_NAME)]
    else:
        assert names[first_marker][1].startswith(f"{MARKER_NAME}.tmp-")
        assert names[first_marker + 1 :] == [("move", MARKER_NAME)]
    assert MARKER_NAME in Storage(fs, path).list_files()


def test_local_rename_commit_is_exclusive_by_hard_link(tmp_path, monkeypatch):
    storage = Storage.from_path(str(tmp_path))
    linked: list[tuple[str, str]] = []
    real_link = os.link

    def spy(src: str, dst: str) -> None:
        linked.append((os.path.basename(src), os.path.basename(dst)))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", spy)
    RenameCommit().commit(storage, MARKER_NAME, b"first", "tmp-1", exclusive=True)
    assert linked == [("tmp-1", MARKER_NAME)]
    with pytest.raises(ray_ckpt.errors.CheckpointExistsError, match="overwrite=True"):
        RenameCommit().commit(storage, MARKER_NAME, b"second", "tmp-2", exclusive=True)
    assert sorted(os.listdir(tmp_path)) == [MARKER_NAME]  # no temporary left behind
    RenameCommit().commit(storage, MARKER_NAME, b"third", "tmp-3", exclusive=False)
    assert (tmp_path / MARKER_NAME).read_bytes() == b"third"
    assert sorted(os.listdir(tmp_path)) == [MARKER_NAME]


class _Gate(ray_ckpt.WriterHook):
    """Holds a save between its durable data and its marker until the test says go. Runs in
    the writer actor; talks to the test through files (same machine)."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        Path(self.folder, "reached").touch()
        deadline = time.monotonic() + 60
        while not Path(self.folder, "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never opened the gate")
            time.sleep(0.02)

    def post_commit(self, path: str, **kwargs: Any) -> None:
        Path(self.folder, "committed").touch()

    def wait_reached(self) -> None:
        deadline = time.monotonic() + 60
        while not Path(self.folder, "reached").exists():
            assert time.monotonic() < deadline, "the save never reached its commit"
            time.sleep(0.02)

    def open(self) -> None:
        Path(self.folder, "go").touch()


def test_a_save_in_progress_is_never_taken_for_a_checkpoint(backend, tmp_path_factory):
    gate = _Gate(tmp_path_factory.mktemp("gate"))
    path = backend.path("step-7")
    state = _state(7)
    with ray_ckpt.make_async_checkpointer(
        config=small_config(), commit_hook=gate, filesystem=backend.filesystem
    ) as ckptr:
        _, write = ckptr.save(path, state)
        gate.wait_reached()
        # every data file and the manifest are durable now; only the marker is missing
        assert any(f.endswith(".data") for f in backend.files(path))
        assert any(f.startswith("manifest-") for f in backend.files(path))
        with pytest.raises(ray_ckpt.errors.IncompleteCheckpointError, match="no commit marker"):
            backend.ckptr.load(path)
        with pytest.raises(ray_ckpt.errors.IncompleteCheckpointError):
            ray_ckpt.CheckpointReader(filesystem=backend.filesystem).open(path)
        (entry,) = ray_ckpt.list_checkpoints(backend.root, filesystem=backend.filesystem)
        assert (entry.name, entry.committed) == ("step-7", False)
        gate.open()
        write.result(timeout=60)
    assert_same(state, backend.ckptr.load(path))
    (entry,) = ray_ckpt.list_checkpoints(backend.root, filesystem=backend.filesystem)
    assert entry.committed and entry.step == 7


def test_an_overwrite_in_progress_still_reads_as_the_old_checkpoint(backend, tmp_path_factory):
    path = backend.path("c")
    old, new = _state(1), _state(2)
    backend.ckptr.save(path, old)
    gate = _Gate(tmp_path_factory.mktemp("gate"))
    with ray_ckpt.make_async_checkpointer(
        config=small_config(), commit_hook=gate, filesystem=backend.filesystem
    ) as ckptr:
        _, write = ckptr.save(path, new, overwrite=True)
        gate.wait_reached()  # the new files are all there beside the old ones
        assert_same(old, backend.ckptr.load(path))
        gate.open()
        write.result(timeout=60)
    assert_same(new, backend.ckptr.load(path))
    ids = {name.split("-")[-1].split(".")[0] for name in backend.files(path) if name != MARKER_NAME}
    assert len(ids) == 1, "the replaced checkpoint's files were deleted after the commit"


# --- retries and permanent errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        "When uploading part for key 'a' in bucket 'b': AWS Error SLOW_DOWN during UploadPart "
        "operation: Please reduce your request rate.",
        "When reading information for key 'a' in bucket 'b': AWS Error THROTTLING during "
        "HeadObject operation: Rate exceeded",
        "AWS Error SERVICE_UNAVAILABLE during PutObject operation: Service Unavailable",
        "AWS Error INTERNAL_FAILURE during CompleteMultipartUpload operation: We encountered an "
        "internal error. Please try again.",
        "AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 7, Could not "
        "connect to server",
        "AWS Error REQUEST_TIMEOUT during GetObject operation: timeout",
        "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body.",
        "AWS Error UNKNOWN (HTTP status 429) during PutObject operation: No response body.",
    ],
)
def test_transient_errors_are_recognised(message):
    assert is_transient(OSError(message))


@pytest.mark.parametrize(
    "error",
    [
        OSError("When creating bucket 'b': AWS Error ACCESS_DENIED during HeadBucket operation"),
        OSError("AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 operation: The AWS Access "
                "Key Id you provided does not exist in our records. Please try again."),
        OSError("AWS Error NO_SUCH_BUCKET during CreateMultipartUpload operation: The specified "
                "bucket does not exist (service unavailable? no)"),
        OSError("Bucket 'b' not found. To create buckets, enable allow_bucket_creation."),
        PermissionError(errno.EACCES, "Permission denied"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["access-denied", "bad-key", "no-such-bucket", "bucket-not-found", "eacces", "enospc"],
)
def test_permanent_errors_are_recognised(error):
    assert not is_transient(error)


def test_transient_errors_are_retried_per_object_with_the_attempt_logged(tmp_path, caplog):
    plan = FaultPlan(tmp_path / "faults", [
        Fault("write", "obj", times=2, error=OSError(
            "AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."
        )),
    ])
    storage = Storage(faulty(pafs.LocalFileSystem(), plan), str(tmp_path), FAST_RETRIES)
    with caplog.at_level(logging.INFO, logger="ray_ckpt.storage"):
        storage.write_file("obj", [b"a" * 100, b"b" * 100], fsync=False)
    assert (tmp_path / "obj").read_bytes() == b"a" * 100 + b"b" * 100
    assert [c.fault for c in plan.journal("write")] == [0, 0, None]
    messages = [r.getMessage() for r in caplog.records]
    assert any("attempt 1 of 3, retrying" in m and "SLOW_DOWN" in m for m in messages)
    assert any("attempt 2 of 3, retrying" in m for m in messages)
    assert any("succeeded on attempt 3 of 3" in m for m in messages)


def test_transient_errors_give_up_after_max_attempts(tmp_path, caplog):
    plan = FaultPlan(tmp_path / "faults", [
        Fault("read", "obj", times=None, error=TimeoutError("injected: read timed out")),
    ])
    (tmp_path / "obj").write_bytes(b"x")
    storage = Storage(faulty(pafs.LocalFileSystem(), plan), str(tmp_path), FAST_RETRIES)
    with pytest.raises(ray_ckpt.errors.StorageError, match="failed after 3 attempts") as info:
        storage.read_file("obj")
    assert "obj" in str(info.value) and "max_attempts" in str(info.value)
    assert len(plan.journal("read")) == 3
    assert any("attempt 3 of 3, giving up" in r.getMessage() for r in caplog.records)


def test_permanent_errors_fail_at_once(tmp_path, caplog):
    plan = FaultPlan(tmp_path / "faults", [
        Fault("write", "obj", times=None, error=PermissionError(errno.EACCES, "injected")),
    ])
    storage = Storage(faulty(pafs.LocalFileSystem(), plan), str(tmp_path), FAST_RETRIES)
    with pytest.raises(ray_ckpt.errors.StorageError, match="read/write access") as info:
        storage.write_file("obj", [b"x"], fsync=False)
    assert str(tmp_path / "obj") in str(info.value)
    assert len(plan.journal("write")) == 1
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_a_missing_bucket_fails_at_once_naming_the_bucket(s3_server, cluster, caplog):
    fs = s3_server.filesystem()
    started = time.monotonic()
    with ray_ckpt.make_sync_checkpointer(filesystem=fs) as ckptr:
        with pytest.raises(ray_ckpt.errors.StorageError) as saving:
            ckptr.save("no-such-bucket/run/step-1", _state())
        with pytest.raises(ray_ckpt.errors.StorageError) as loading:
            ckptr.load("no-such-bucket/run/step-1")
    with pytest.raises(ray_ckpt.errors.StorageError) as listing:
        ray_ckpt.list_checkpoints("no-such-bucket/run", filesystem=fs)
    for info in (saving, loading, listing):
        assert "bucket 'no-such-bucket' does not exist" in str(info.value)
        assert "create it" in str(info.value)
    assert time.monotonic() - started < 10
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


@pytest.fixture(scope="module")
def locked_s3(tmp_path_factory):
    """A second S3 server that checks credentials (moto with IAM enforcement): every request
    with our made-up key is refused, a real access-denied error."""
    server = start_s3_server(
        tmp_path_factory.mktemp("s3-locked") / "moto.log", INITIAL_NO_AUTH_ACTION_COUNT="0"
    )
    yield server
    server.stop()


def test_access_denied_fails_at_once_naming_the_bucket_and_credentials(locked_s3, cluster, caplog):
    fs = locked_s3.filesystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    with ray_ckpt.make_sync_checkpointer(filesystem=fs) as ckptr:
        with pytest.raises(ray_ckpt.errors.StorageError) as saving:
            ckptr.save("private-bucket/run/step-1", _state())
        with pytest.raises(ray_ckpt.errors.StorageError) as loading:
            ckptr.load("private-bucket/run/step-1")
    for info in (saving, loading):
        message = str(info.value)
        assert "access to bucket 'private-bucket' was denied" in message
        assert "AWS_ACCESS_KEY_ID" in message and "private-bucket/run/step-1" in message
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


def test_an_unreachable_endpoint_is_retried_then_reported(caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="k", secret_key="s",
        region="us-east-1", connect_timeout=0.5,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    storage = Storage(fs, f"{S3_BUCKET}/x", FAST_RETRIES)
    with pytest.raises(ray_ckpt.errors.StorageError, match="failed after 3 attempts") as info:
        storage.list_files()
    assert "reachable" in str(info.value) and f"{S3_BUCKET}/x" in str(info.value)
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


# --- list and delete ----------------------------------------------------------------------------


def test_list_and_delete_touch_only_checkpoints(backend):
    ckptr, fs = backend.ckptr, backend.filesystem
    for step in (1, 2, 10):
        ckptr.save(backend.path(f"step-{step}"), _state(step))
    ckptr.save(backend.path("step-3"), _state(3))
    backend.delete(backend.path("step-3", MARKER_NAME))  # a save that never committed
    backend.write(backend.path("notes", "todo.txt"), b"mine")
    ckptr.save(backend.path("mixed"), _state(4))
    backend.write(backend.path("mixed", "README"), b"keep me")

    entries = ray_ckpt.list_checkpoints(backend.root, filesystem=fs)
    assert [(e.name, e.committed, e.step) for e in entries] == [
        ("step-1", True, 1), ("step-2", True, 2), ("step-3", False, 3), ("step-10", True, 10),
        ("mixed", True, None),
    ]
    assert entries[0].path == backend.path("step-1")
    assert entries[0].nbytes == sum(t.numel() * 4 for t in _state().values() if torch.is_tensor(t))
    assert_same(_state(1), ckptr.load(entries[0].path))

    ray_ckpt.catalog.delete_checkpoint(backend.path("step-1"), filesystem=fs)
    # uncommitted: deletable
    ray_ckpt.catalog.delete_checkpoint(backend.path("step-3"), filesystem=fs)
    assert "step-1" not in backend.listdir(backend.root)
    assert "step-3" not in backend.listdir(backend.root)

    with pytest.raises(ray_ckpt.CheckpointError, match="README"):
        ray_ckpt.catalog.delete_checkpoint(backend.path("mixed"), filesystem=fs)
    with pytest.raises(ray_ckpt.CheckpointError, match=r"todo\.txt"):
        ray_ckpt.catalog.delete_checkpoint(backend.path("notes"), filesystem=fs)
    with pytest.raises(ray_ckpt.CheckpointError, match="not a checkpoint directory"):
        ray_ckpt.catalog.delete_checkpoint(backend.path("notes", "todo.txt"), filesystem=fs)
    with pytest.raises(ray_ckpt.CheckpointNotFoundError):
        ray_ckpt.catalog.delete_checkpoint(backend.path("step-99"), filesystem=fs)
    assert backend.read(backend.path("mixed", "README")) == b"keep me"
    assert backend.read(backend.path("notes", "todo.txt")) == b"mine"
    assert_same(_state(4), ckptr.load(backend.path("mixed")))
    assert [e.name for e in ray_ckpt.list_checkpoints(backend.root, filesystem=fs)] == [
        "step-2", "step-10", "mixed"
    ]
    assert backend.listdir(backend.root) == ["mixed", "notes", "step-10", "step-2"]


@pytest.mark.parametrize("sizes", [[], [0], [5], [3, 0, 0, 7, 1], [0, 4, 0], [1] * 9])
def test_a_file_held_as_buffers_reads_any_range_like_its_bytes(sizes):
    """The memory tier's held files are lists of buffers: every range reads as the same range
    of the joined bytes, one buffer at a time, and ends empty at the end (EOF)."""
    data = bytes(range(sum(sizes)))
    buffers, at = [], 0
    for n in sizes:
        buffers.append(data[at : at + n])
        at += n
    held = Buffers(buffers)
    for start in range(len(data) + 2):
        for want in range(1, len(data) + 2):
            got, offset = b"", start
            while len(got) < want:
                chunk = bytes(held.at(offset, want - len(got)))
                if not chunk:
                    break
                got, offset = got + chunk, offset + len(chunk)
            assert got == data[start : start + want], (start, want)
            assert b"".join(held.ranges(start, want)) == data[start : start + want]
            out = bytearray(want)
            n = held.read_into(start, memoryview(out))
            assert bytes(out[:n]) == data[start : start + n] and (n > 0) == (start < len(data))
    held.close()


def test_a_holders_stream_serves_any_range_of_its_offer_and_nothing_else():
    """The memory tier's direct peer reads (memory_stream): a reader with the offer's token
    reads any range of any offered file as the file's bytes, from several threads at once; a
    wrong token or file index gets nothing; the offer ends when its reader withdraws it."""
    files = [bytes(range(256)) * 41, b"", bytes(7)]
    parts = [[f[:100], f[100:100], f[100:]] for f in files]
    server = StreamServer("127.0.0.1")
    token = server.offer([Buffers(p) for p in parts])
    stream = PeerStream(server.address, token)

    def read(index: int, offset: int, nbytes: int) -> bytes:
        out = bytearray(nbytes)
        n = stream.read_into(index, offset, memoryview(out))
        return bytes(out[:n])

    for index, data in enumerate(files):
        for offset, nbytes in [(0, len(data)), (0, len(data) + 9), (99, 3), (len(data), 4),
                               (len(data) + 5, 4), (1, 0)]:
            assert read(index, offset, nbytes) == data[offset : offset + nbytes]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # one connection a thread
        got = list(pool.map(lambda at: read(0, at, 1000), range(0, len(files[0]), 1000)))
    assert b"".join(got) == files[0]

    intruder = PeerStream(server.address, bytes(16))
    with pytest.raises(ConnectionError):  # closed unanswered
        intruder.read_into(0, 0, memoryview(bytearray(8)))
    with pytest.raises(ConnectionError, match="no file 3"):
        stream.read_into(3, 0, memoryview(bytearray(8)))
    with pytest.raises(ConnectionError, match="failed before"):  # a failed stream stays failed
        read(0, 0, 8)
    assert server.offered() == 1
    stream.close()
    server.withdraw(token)
    deadline = time.monotonic() + 10
    while server.offered():  # the connections' threads see them close
        assert time.monotonic() < deadline, "the withdrawn offer did not end"
        time.sleep(0.05)
    with pytest.raises(ConnectionError):
        PeerStream(server.address, token).read_into(0, 0, memoryview(bytearray(8)))


def test_a_repairs_stream_waits_while_a_load_reads_from_the_same_holder(monkeypatch):
    """Loads come first: a background offer (the repair's, after a node loss) sends nothing
    while an offer to a load is open, goes on as soon as the load withdraws it, and waits at
    most YIELD_MAX_SECS in all, so a load that never ends cannot starve it."""
    import ray_ckpt.storage.memory_stream as memory_stream

    monkeypatch.setattr(memory_stream, "BACKGROUND_SLICE_BYTES", 1 << 16)
    data = bytes(range(256)) * (1 << 12)  # 1 MiB: 16 slices
    server = StreamServer("127.0.0.1")

    def repair() -> concurrent.futures.Future[bytes]:
        token = server.offer([Buffers([data])], background=True)
        pool = concurrent.futures.ThreadPoolExecutor(1)
        got = pool.submit(lambda: bytes(memory_stream.receive_file(server.address, token, 0,
                                                                   len(data))))
        pool.shutdown(wait=False)
        return got

    load = server.offer([Buffers([b"x" * 100])])  # a load's offer, open until withdrawn
    copied = repair()
    time.sleep(1.0)
    assert not copied.done() and server.sent_bytes == 0  # not a byte while the load reads
    server.withdraw(load)
    assert copied.result(timeout=10) == data  # on at once after the load

    monkeypatch.setattr(memory_stream, "YIELD_MAX_SECS", 0.5)
    server.offer([Buffers([b"x"])])  # a load that never withdraws
    started = time.monotonic()
    assert repair().result(timeout=10) == data
    assert 0.4 < time.monotonic() - started < 5


@pytest.mark.parametrize("root, joined", [
    ("/", "/n"), ("/a/", "/a/n"), ("s3://b/run/", "s3://b/run/n"),
    ("s3://b/run?region=x", "s3://b/run/n?region=x"), ("file:///", "file:///n"),
    ("mem://", "mem://n"), ("mem://?replicas=2", "mem://n?replicas=2"), ("mem://run", "mem://run/n"),
])
def test_join_path_keeps_the_scheme_and_the_query(root, joined):
    from ray_ckpt.catalog import join_path

    assert join_path(root, "n") == joined

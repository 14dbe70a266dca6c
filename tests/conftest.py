"""Shared fixtures: one simulated Ray cluster per configuration, reused across test modules.

Starting Ray costs seconds, so the cluster outlives a module: a module asks for a
configuration by name (``default``: head + 2 worker nodes; others for special cases) and the
cluster is only replaced when the next module asks for a different one. Every process started
here is stopped here, by its own handle (``cluster.shutdown()``).

``./dev test`` runs the suite in a network namespace with only ``lo`` up, where Ray binds to
127.0.0.1 by itself; it sets RAY_CKPT_REQUIRE_LOOPBACK=1 and the cluster fixture then refuses
to run on any other address.

Storage backends: tests that take the ``backend`` fixture run once per backend, ``local`` (plain
local paths), ``s3`` (a real S3 API server, ``moto_server``, on 127.0.0.1, started once per
session and stopped by its process handle) and ``custom`` (a ``pyarrow.fs.PyFileSystem``
wrapping fsspec's ``DirFileSystem`` over its local filesystem). A :class:`Backend` gives the
test a fresh root directory, a checkpointer for it, and backend-neutral file surgery (flip,
truncate, delete, list) through ``pyarrow.fs``.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

MiB = 1 << 20

# Set before any cluster starts, so that every Ray worker inherits them. The AWS SDK in pyarrow
# otherwise sends every upload with aws-chunked encoding and a trailing checksum, which the
# Python S3 server decodes at a third of the speed (ray_ckpt checksums every extent itself);
# and it must never wait on EC2 instance metadata, which does not exist here.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

CLUSTERS: dict[str, dict[str, Any]] = {
    # head + 2 workers; the head's store is big enough for the 1 GiB tests
    "default": {
        "head": {"num_cpus": 2, "object_store_memory": 1536 * MiB},
        "workers": [
            {"num_cpus": 1, "object_store_memory": 400 * MiB, "resources": {"worker1": 1}},
            {"num_cpus": 1, "object_store_memory": 400 * MiB, "resources": {"worker2": 1}},
        ],
    },
    # 4 nodes with small stores, for many rank actors (num_cpus=0) with small states
    "four_nodes": {
        "head": {"num_cpus": 2, "object_store_memory": 256 * MiB},
        "workers": [{"num_cpus": 1, "object_store_memory": 128 * MiB} for _ in range(3)],
    },
}


@dataclass
class RunningCluster:
    name: str
    cluster: Cluster
    head_node_id: str = ""
    worker_node_ids: list[str] = field(default_factory=list)

    @property
    def node_ids(self) -> list[str]:
        return [self.head_node_id, *self.worker_node_ids]


_current: RunningCluster | None = None


def _start(name: str) -> RunningCluster:
    spec = CLUSTERS[name]
    cluster = Cluster(initialize_head=True, head_node_args=dict(spec["head"]))
    workers = [cluster.add_node(**dict(w)) for w in spec["workers"]]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="ray_ckpt_tests", log_to_driver=False)
    if os.environ.get("RAY_CKPT_REQUIRE_LOOPBACK") == "1":
        ip = ray.util.get_node_ip_address()
        if ip != "127.0.0.1":
            cluster.shutdown()
            ray.shutdown()
            pytest.exit(f"Ray bound to {ip}, not 127.0.0.1: run the suite through ./dev test")
    running = RunningCluster(name, cluster)
    running.head_node_id = cluster.head_node.node_id
    running.worker_node_ids = [w.node_id for w in workers]
    return running


def _stop() -> None:
    global _current
    if _current is not None:
        ray.shutdown()
        _current.cluster.shutdown()
        _current = None


def ensure_cluster(name: str) -> RunningCluster:
    global _current
    if _current is not None and _current.name == name:
        return _current
    _stop()
    _current = _start(name)
    return _current


@pytest.fixture(scope="session", autouse=True)
def _shutdown_clusters() -> Iterator[None]:
    yield
    _stop()


@pytest.fixture(scope="module")
def cluster() -> RunningCluster:
    """The default cluster: head (2 CPUs) + 2 worker nodes, connected."""
    return ensure_cluster("default")


def on_node(node_id: str) -> dict[str, Any]:
    """Options that run a Ray task or actor on ``node_id`` and nowhere else."""
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


# --- S3: a real S3 API server on loopback ------------------------------------------------------

S3_REGION = "us-east-1"
S3_ACCESS_KEY = "ray-ckpt-test-key"
S3_SECRET_KEY = "ray-ckpt-test-secret"
S3_BUCKET = "ray-ckpt-tests"
_REQUEST_RE = re.compile(r'"(GET|PUT|POST|DELETE|HEAD) (/[^ ?"]*)(\?[^ "]*)? HTTP/[0-9.]+" (\d{3})')
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class S3Server:
    """A ``moto_server`` process serving the S3 API on 127.0.0.1; stop it with :meth:`stop`."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def filesystem(self, **options: Any) -> pafs.S3FileSystem:
        """An ``S3FileSystem`` on this server (``options`` override the defaults)."""
        kwargs: dict[str, Any] = dict(
            endpoint_override=self.endpoint,
            scheme="http",
            access_key=S3_ACCESS_KEY,
            secret_key=S3_SECRET_KEY,
            region=S3_REGION,
            allow_delayed_open=True,
            connect_timeout=2.0,
        )
        kwargs.update(options)
        return pafs.S3FileSystem(**kwargs)

    def uri(self, path: str) -> str:
        """``s3://path`` with this server's endpoint in the query (credentials from the env)."""
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http&region={S3_REGION}"

    def requests(self, key_prefix: str) -> list[tuple[str, str, str, int]]:
        """(method, key, query, status) of every logged request whose key starts with
        ``key_prefix`` (``bucket/dir``), in the order the server finished them."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = _REQUEST_RE.search(_ANSI_RE.sub("", line))
            if match and match.group(2).lstrip("/").startswith(key_prefix):
                method, key, query, status = match.groups()
                out.append((method, key.lstrip("/"), query or "", int(status)))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_s3_server(log_path: Path, **env: str) -> S3Server:
    """Start ``moto_server`` on a free port of 127.0.0.1 and wait until it answers."""
    moto_server = Path(sys.executable).with_name("moto_server")
    if not moto_server.exists():
        pytest.fail(f"{moto_server} is missing: install the test extras (pip install -e '.[test]')")
    last = ""
    for _ in range(3):  # another process may take the free port before moto binds it
        port = _free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )
        server = S3Server(proc, port, log_path)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{server.endpoint}/moto-api/", timeout=1).close()
                return server
            except OSError:
                time.sleep(0.05)
        server.stop()
        last = log_path.read_text(errors="replace")[-2000:]
    pytest.fail(f"moto_server did not start on 127.0.0.1; its log:\n{last}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 API server on loopback for the whole session, with :data:`S3_BUCKET`."""
    server = start_s3_server(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        server.filesystem(allow_bucket_creation=True).create_dir(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_fs(s3_server: S3Server) -> pafs.S3FileSystem:
    """An ``S3FileSystem`` on the session's server; paths are ``ray-ckpt-tests/...``."""
    return s3_server.filesystem()


# --- backends: the same tests on local disk, S3 and a custom pyarrow filesystem ----------------

BACKENDS = ("local", "s3", "custom")


@pytest.fixture(scope="session")
def custom_fs(tmp_path_factory: pytest.TempPathFactory) -> pafs.PyFileSystem:
    """fsspec's ``DirFileSystem`` over its local filesystem, as a ``pyarrow.fs.PyFileSystem``:
    paths are relative to a directory of this session, and it pickles to the writer actors."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path_factory.mktemp("custom-fs")
    return pafs.PyFileSystem(pafs.FSSpecHandler(DirFileSystem(str(root), fs=LocalFileSystem())))


@dataclass
class Backend:
    """One storage backend, seen from a test: a fresh ``root`` directory, the filesystem the
    checkpointers get (None for plain local paths), and file surgery through ``fs``.

    Paths are paths on ``fs`` (absolute local paths, ``bucket/key`` on S3, relative paths on
    the custom filesystem), which is also what the checkpointers take.
    """

    name: str
    fs: pafs.FileSystem
    filesystem: pafs.FileSystem | None
    root: str
    _checkpointers: dict[str, Any]

    def path(self, *names: str) -> str:
        return "/".join([self.root, *names])

    @property
    def ckptr(self) -> Any:
        """This module's checkpointer for this backend (small buckets: many files)."""
        from .helpers import small_config

        if self.name not in self._checkpointers:
            import ray_ckpt

            self._checkpointers[self.name] = ray_ckpt.make_sync_checkpointer(
                config=small_config(), filesystem=self.filesystem
            )
        return self._checkpointers[self.name]

    def checkpointer(self, config: Any = None, **kwargs: Any) -> Any:
        """A new checkpointer on this backend; close it (``with``)."""
        import ray_ckpt

        return ray_ckpt.make_sync_checkpointer(config=config, filesystem=self.filesystem, **kwargs)

    def listdir(self, path: str) -> list[str]:
        """Names of the files and directories directly in ``path`` ([] when it is absent)."""
        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def files(self, path: str, suffix: str = "") -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(
            i.base_name
            for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
        )

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def size(self, path: str) -> int:
        return int(self.fs.get_file_info(path).size)

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return bytes(f.read())

    def write(self, path: str, data: bytes) -> None:
        if "/" in path:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def delete(self, path: str) -> None:
        self.fs.delete_file(path)

    def flip_byte(self, path: str, offset: int) -> None:
        data = bytearray(self.read(path))
        data[offset] ^= 0xFF
        self.write(path, bytes(data))

    def truncate(self, path: str, size: int) -> None:
        self.write(path, self.read(path)[:size])


@pytest.fixture(scope="module")
def _backend_checkpointers() -> Iterator[dict[str, Any]]:
    checkpointers: dict[str, Any] = {}
    yield checkpointers
    for ckptr in checkpointers.values():
        ckptr.close()


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest,
    cluster: RunningCluster,
    tmp_path: Path,
    _backend_checkpointers: dict[str, Any],
) -> Backend:
    """The test once per storage backend (``local``, ``s3``, ``custom``), with a fresh root."""
    kind: str = request.param
    unique = f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', request.node.name)[:60]}-{uuid.uuid4().hex[:8]}"
    if kind == "local":
        return Backend(kind, pafs.LocalFileSystem(), None, str(tmp_path), _backend_checkpointers)
    if kind == "s3":
        fs = request.getfixturevalue("s3_fs")
        return Backend(kind, fs, fs, f"{S3_BUCKET}/{unique}", _backend_checkpointers)
    fs = request.getfixturevalue("custom_fs")
    return Backend(kind, fs, fs, unique, _backend_checkpointers)


# --- reliability figures: what the fault, corruption and fuzz suites counted ----------------------
#
# Fault, corruption and fuzz tests add what they injected, tried and survived to the session's
# ``reliability`` counts. ``--reliability-report=PATH`` writes them to PATH when the session
# ends, as markdown for a ``.md`` path, else JSON (docs/RELIABILITY.md is built from such a run);
# without it nothing is written. Give it with ``=``: pytest takes a bare path argument that
# exists for a place to start collecting from, and would then not load this file.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-report",
        default=None,
        metavar="PATH",
        help="write the fault/corruption/fuzz suites' counts to PATH as JSON "
        "(e.g. benchmarks/results/reliability.json)",
    )


class ReliabilityCounts:
    """Counts by section (``faults``, ``corruptions``, ``fuzz``, ``pressure``), by case, by
    field (``injected``, ``survived``, ``tried``, ``detected``, ...)."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, dict[str, int]]] = {}

    def add(self, section: str, case: str, field: str, n: int = 1) -> None:
        fields = self.counts.setdefault(section, {}).setdefault(case, {})
        fields[field] = fields.get(field, 0) + n

    def most(self, section: str, case: str, field: str, value: int) -> None:
        """Keep the largest ``value`` seen (e.g. saves in a row)."""
        fields = self.counts.setdefault(section, {}).setdefault(case, {})
        fields[field] = max(fields.get(field, 0), value)


@pytest.fixture(scope="session")
def reliability(request: pytest.FixtureRequest) -> Iterator[ReliabilityCounts]:
    counts = ReliabilityCounts()
    yield counts
    path = request.config.getoption("--reliability-report")
    if path:
        import json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        args = list(request.config.invocation_params.args)
        for i in range(len(args) - 1):
            if args[i : i + 2] == ["-m", "slow or not slow"]:  # how ./dev passes --slow
                args[i : i + 2] = ["--slow", ""]
        doc = {
            "command": "./dev test " + shlex.join(a for a in args if a),
            "finished_unix": time.time(),
            "counts": {s: dict(sorted(c.items())) for s, c in sorted(counts.counts.items())},
        }
        if path.endswith(".md"):
            Path(path).write_text(render_reliability(doc))
        else:
            Path(path).write_text(json.dumps(doc, indent=1) + "\n")


_SECTIONS = {
    "faults": "Faults injected",
    "pressure": "Pressure: saves in a row, state larger than the object store",
    "corruptions": "Corruptions tried",
    "hostile": "Hostile checkpoints",
    "bad arguments": "Bad arguments",
    "fuzz": "Fuzzing (hypothesis)",
}


_NOTES = {
    "corruptions": "*harmless, loads exactly*: the damaged bytes are never read as data (the "
    "alignment padding between extents, a marker field that only describes the save) and the "
    "load returned exactly the saved tensors.",
    "fuzz": "Each case must load or be refused with a `CheckpointError` within 30 s and without "
    "growing the peak memory by 64 MiB; anything else fails the test. *loaded*: the mutation, "
    "re-signed with the right checksums as a buggy or hostile writer would, still described "
    "valid data, every byte of which passed its CRC32C.",
}


def render_reliability(doc: dict[str, Any]) -> str:
    """The counts as markdown: one table per section, one row per case, one column per field."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(doc["finished_unix"]))
    lines = [
        "# Reliability figures",
        "",
        "Written by the test suite itself, from what its fault, corruption, hostile-input and fuzz",
        "tests counted in one run. Every count is of an outcome the test asserted: a fault counts",
        "as survived only after the test checked that nothing broken was committed and that the",
        "last good checkpoint still loads bit for bit; a corruption counts as detected only when",
        "load raised a `CheckpointError` naming the file (and `verify` found it without loading).",
        "",
        f"Run of {when}, reproduced with:",
        "",
        "```bash",
        f"{doc['command']}",
        "```",
        "",
    ]
    counts = doc["counts"]
    for section in [*_SECTIONS, *sorted(set(counts) - set(_SECTIONS))]:
        cases = counts.get(section)
        if not cases:
            continue
        fields = sorted({f for c in cases.values() for f in c}, key=_field_order)
        totals = {f: sum(c.get(f, 0) for c in cases.values()) for f in fields}
        lines += [f"## {_SECTIONS.get(section, section)}", ""]
        if section in _NOTES:
            lines += [_NOTES[section], ""]
        lines.append("| case | " + " | ".join(fields) + " |")
        lines.append("| --- |" + " ---: |" * len(fields))
        for case, c in cases.items():
            lines.append(f"| {case} | " + " | ".join(str(c.get(f, "")) for f in fields) + " |")
        lines.append("| **all** | " + " | ".join(f"**{totals[f]}**" for f in fields) + " |")
        lines.append("")
    return "\n".join(lines)


def _field_order(field: str) -> tuple[int, str]:
    first = ("injected", "tried", "cases", "survived", "detected by load", "detected by verify")
    return (first.index(field) if field in first else len(first), field)

"""``ray job submit`` end to end: a real Ray head (``ray start --head --block``, with the dashboard
so the job server runs) bound to 127.0.0.1, examples/train.py submitted twice, checkpoints
checked on disk, and the second run resuming where the first stopped.

Ray 2.60 turns on token authentication for a new cluster; the test makes its own token and
hands it to the head and to every client through ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``,
so nothing is read from or written to ``~/.ray``. The head gets its own temp dir (also as
``RAY_TMPDIR``), so it shares no files with other Ray instances on the machine. It is stopped
by its own process handle: SIGTERM to ``ray start --block`` and to the processes it started,
found from its handle.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

import ray_ckpt
import ray_ckpt.tools

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Head:
    process: subprocess.Popen[bytes]
    address: str  # the job server, http://127.0.0.1:<dashboard port>
    env: dict[str, str]
    log: Path


def _wait_for_job_server(head: Head, timeout_secs: float = 120) -> None:
    deadline = time.monotonic() + timeout_secs
    request = urllib.request.Request(
        f"{head.address}/api/version",
        headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"},
    )
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            pytest.fail(f"ray start exited with {head.process.returncode}:\n{head.log.read_text()}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"the job server at {head.address} did not come up:\n{head.log.read_text()}")


def _stop(head: Head) -> None:
    """SIGTERM to ``ray start --block`` and, at the same time, to the processes it started
    (Ray would stop them one by one, waiting on each); SIGKILL what is left after 10 s (the
    GCS server and ``ray start`` itself can take half a minute to exit on SIGTERM)."""
    processes = [psutil.Process(head.process.pid)]
    processes += processes[0].children(recursive=True)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=10)
    head.process.wait(timeout=10)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    if not RAY.exists():
        pytest.skip(f"no ray executable next to {sys.executable}")
    temp_dir = tempfile.mkdtemp(prefix="rcj", dir="/tmp")  # short: socket paths live in it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_TMPDIR=temp_dir,
        RAY_USAGE_STATS_ENABLED="0",
    )
    dashboard_port = _free_port()
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={_free_port()}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
             f"--ray-client-server-port={_free_port()}", "--num-cpus=2",
             # the agent's HTTP port is fixed (52365) by default: another Ray on this loopback
             # (the suite's shared cluster) may hold it, and then no agent takes jobs
             f"--dashboard-agent-listen-port={_free_port()}",
             f"--dashboard-agent-grpc-port={_free_port()}",
             f"--runtime-env-agent-port={_free_port()}",
             f"--metrics-export-port={_free_port()}",
             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=temp_dir,
        )
    running = Head(process, f"http://127.0.0.1:{dashboard_port}", env, log)
    try:
        _wait_for_job_server(running)
        yield running
    finally:
        try:
            _stop(running)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: Head, *train_args: str) -> str:
    """Submit examples/train.py as a job from the repository root, wait for it, return its
    output (the job's logs, streamed by ``ray job submit``). The job server answers before the
    head's job agent has registered; until then a submission is refused (and not created), so
    it is retried for up to three minutes (on a loaded 2-core machine one minute was not always
    enough)."""
    deadline = time.monotonic() + 180
    while True:
        submission = f"train-{secrets.token_hex(4)}"
        result = subprocess.run(
            [str(RAY), "job", "submit", "--address", head.address, "--submission-id",
             submission, "--working-dir", ".", "--", sys.executable, "examples/train.py",
             *train_args],
            cwd=REPO, env=head.env, capture_output=True, text=True, timeout=400,
        )
        output = result.stdout + result.stderr
        if "No available agent to submit job" not in output or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0, output + _agent_log(head)
    assert f"Job '{submission}' succeeded" in output, output
    return output


def _agent_log(head: Head) -> str:
    """The end of the head's dashboard agent log, to say why a submission was refused."""
    logs = sorted(Path(head.env["RAY_TMPDIR"]).glob("session_*/logs/dashboard_agent*.log"))
    tails = [
        f"\n--- {p} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
        for p in logs
    ]
    return "".join(tails) or "\n(no dashboard agent log)"


def _train_module():
    spec = importlib.util.spec_from_file_location("example_train", REPO / "examples" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # about 90 s: a Ray head, two jobs (each ~25 s of runtime env and start-up)
def test_job_checkpoints_and_resumes_from_the_newest_committed(head, tmp_path):
    root = tmp_path / "run"
    args = ["--ckpt-root", str(root), "--every", "20", "--width", "64", "--log-every", "20"]
    first = _submit(head, *args, "--steps", "50")
    assert f"checkpoints go to {root}" in first
    assert f"no committed checkpoint under {root}: starting from step 0" in first
    entries = ray_ckpt.list_checkpoints(str(root))
    assert [(e.name, e.committed) for e in entries] == [
        ("step-000000020", True), ("step-000000040", True), ("step-000000050", True)
    ]

    second = _submit(head, *args, "--steps", "90")
    assert f"resuming from {root}/step-000000050 at step 50" in second
    assert f"checkpoint committed: {root}/step-000000090" in second
    # --keep-last 3: the manager deleted the older ones once the newer had committed
    assert [e.step for e in ray_ckpt.list_checkpoints(str(root)) if e.committed] == [60, 80, 90]
    for entry in ray_ckpt.list_checkpoints(str(root)):
        assert ray_ckpt.tools.verify(entry.path).ok, entry.path

    _assert_same_as_uninterrupted(root / "step-000000090", steps=90, width=64)


def _assert_same_as_uninterrupted(path: Path, steps: int, width: int) -> None:
    """The resumed run ends where one uninterrupted run ends: model and AdamW state were both
    restored (without the optimizer's moments the weights would differ)."""
    train = _train_module()
    model = train.build_model(width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, steps + 1):
        x, y = train.batch(step, 64)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    saved = ray_ckpt.CheckpointReader().read(str(path))[0]
    assert saved["step"] == steps
    assert int(saved["optim"]["state"][0]["step"]) == steps
    for name, value in model.state_dict().items():
        torch.testing.assert_close(saved["model"][name], value, rtol=1e-4, atol=1e-5)


def test_train_script_resumes_in_process(cluster, tmp_path, caplog):
    """The same script, run twice in this process on the test cluster (no job server): the
    fast check of its checkpoint and resume logic for the default suite."""
    train = _train_module()
    root = tmp_path / "run"
    args = ["--ckpt-root", str(root), "--every", "20", "--width", "64", "--log-every", "20"]
    caplog.set_level("INFO", logger="train")
    assert train.main([*args, "--steps", "30"]) == 0
    assert f"no committed checkpoint under {root}: starting from step 0" in caplog.text
    incomplete = root / "step-000000045"  # newer, but it never committed: not to resume from
    incomplete.mkdir()
    shutil.copy(next((root / "step-000000030").glob("*.data")), incomplete)
    caplog.clear()
    assert train.main([*args, "--steps", "50"]) == 0
    assert f"resuming from {root}/step-000000030 at step 30" in caplog.text
    # --keep-last 3 deleted step 20 once 50 had committed; the incomplete save is left alone
    # (cleanup removes one only after it has been untouched for 10 minutes)
    assert [(e.step, e.committed) for e in ray_ckpt.list_checkpoints(str(root))] == [
        (30, True), (40, True), (45, False), (50, True)
    ]
    _assert_same_as_uninterrupted(root / "step-000000050", steps=50, width=64)

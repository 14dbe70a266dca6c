"""Ray Train node-loss recovery: the memory tier against durable-only checkpoints.

    python -m benchmarks.train_recovery --fail-step 13 --durable-every 5

A real ``TorchTrainer`` (2 workers, gloo, DDP) trains a small decoder-only transformer with
AdamW (``--d-model``, ``--layers``, ``--vocab``: about 60 MiB of model + optimizer state per
rank by default) on a simulated cluster (``ray.cluster_utils.Cluster``), once per variant:

* ``memory``: ``ray_ckpt.train.save_to_memory(state, step)`` every step (the memory tier:
  held in the object store by the node's holder, replicated to one peer) and
  ``ray_ckpt.train.report(...)`` every ``--durable-every`` steps (local disk, Ray Train's
  registered checkpoint), as the README's Ray Train part shows;
* ``durable``: ``ray_ckpt.train.report(...)`` every ``--durable-every`` steps, nothing else.

After step ``--fail-step`` (N) of the first attempt, once its checkpoints are committed, the
workers wait and the driver removes the node of rank ``--remove-rank`` (``remove_node``: every
process of the node, its holder and the copies it held, go). ``FailureConfig(max_failures=1)``
restarts the worker group, which resumes through ``ray_ckpt.train.load``. Measured: seconds from
the removal until the first training step after the restart completes (with the restart of the
workers, the load and the step apart), the step training resumed from, the steps lost
(N - resumed step), and where the load came from, as the library logs it on rank 0. The
checkpoint calls of each step (a save waits for the previous one) are timed apart from the
training step, so the price of saving every step is in the table as well.

The cluster is a head with no CPU (the catalog actor and Ray Train's controller, which need
none, live there and are never removed) and three 1-CPU worker nodes: the two workers run on two
of them (one per node), and the third is the spare that lets the restarted group find two CPUs
at once, as a cluster with spare capacity (or an autoscaler's warm node) would. Adding a
replacement node after the loss instead would add a node's start-up (seconds here, minutes on
a real cluster) to both variants alike and hide what the checkpoints change. A memory
checkpoint's replicas go to the least-held other node, the head included. Each variant runs
on its own fresh cluster with Ray's defaults (no ``_system_config``; Ray Train's health check
every 2 s unless ``--poll-interval-s``).

Results: a markdown table on stdout and ``--out``/train_recovery.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.cluster_utils import Cluster

MiB = 1 << 20
VARIANTS = ("memory", "durable")
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
WAIT_FOR_LOSS_SECS = 300.0  # a worker waiting for its node's removal gives up after this

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --- the training function (runs in the Ray Train workers) --------------------------------------


class TinyLM(torch.nn.Module):
    """A decoder-only transformer: token embedding, pre-norm blocks, untied LM head."""

    def __init__(self, vocab: int, d_model: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        block = torch.nn.TransformerEncoderLayer(
            d_model, max(1, d_model // 64), 4 * d_model, dropout=0.0, batch_first=True,
            norm_first=True,
        )
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.blocks(self.embed(tokens), mask=mask, is_causal=True))


def batch(step: int, rank: int, cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of ``step``: arithmetic token sequences (learnable), a function of
    (step, rank) alone, so a resumed run sees what an uninterrupted one would."""
    generator = torch.Generator().manual_seed(100_000 * step + rank)
    shape = (cfg["batch"], 1)
    start = torch.randint(cfg["vocab"], shape, generator=generator)
    stride = torch.randint(1, 8, shape, generator=generator)
    tokens = (start + stride * torch.arange(cfg["seq"] + 1)) % cfg["vocab"]
    return tokens[:, :-1], tokens[:, 1:]


class _Capture(logging.Handler):
    """Collects what ray_ckpt logs in this process (where a load came from, and why)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def _record(cfg: dict[str, Any], name: str, doc: dict[str, Any]) -> None:
    path = Path(cfg["records"]) / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.rename(path)


def _state_bytes(state: dict[str, Any]) -> int:
    tensors = list(state["model"].state_dict().values())
    for per_param in state["optim"].state_dict()["state"].values():
        tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _load(state: dict[str, Any]) -> dict[str, Any]:
    import ray_ckpt.train

    capture = _Capture()
    lib = logging.getLogger("ray_ckpt")
    level = lib.level
    lib.addHandler(capture)
    lib.setLevel(logging.INFO)
    try:
        started = time.time()
        ray_ckpt.train.load(state, strict=True)
        return {"load_started": started, "loaded": time.time(), "resumed_step": state["step"],
                "log": capture.lines}
    finally:
        lib.removeHandler(capture)
        lib.setLevel(level)


def train_loop(cfg: dict[str, Any]) -> None:
    """Train; save to memory every step (``memory`` variant) and report a durable checkpoint
    every K steps; after step N of the first attempt, wait for the node's removal."""
    import ray.train
    import ray_ckpt.train
    from torch.nn.parallel import DistributedDataParallel

    entered = time.time()
    context = ray.train.get_context()
    rank = context.get_world_rank()
    first_attempt = not os.path.exists(cfg["failing"])
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP expects
    model = DistributedDataParallel(TinyLM(cfg["vocab"], cfg["d_model"], cfg["layers"]))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state: dict[str, Any] = {"model": model, "optim": optim, "step": -1}
    start = {"entered": entered, "first_attempt": first_attempt, **_load(state)}
    step_secs: list[float] = []  # forward, backward, optimizer step
    save_secs: list[float] = []  # the checkpoint calls (a save waits for the previous one)
    write = None
    reported: tuple[int, float] | None = None  # the last durable checkpoint's step, and when
    for step in range(state["step"] + 1, cfg["fail_step"] + 1 + cfg["steps_after"]):
        began = time.perf_counter()
        x, y = batch(step, rank, cfg)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optim.zero_grad()
        loss.backward()
        optim.step()
        step_secs.append(time.perf_counter() - began)
        if len(step_secs) == 1:
            start["first_step_done"] = time.time()
            _record(cfg, f"start-{start['resumed_step'] + 1}-rank{rank}", start)
        state["step"] = step
        saving = time.perf_counter()
        if cfg["variant"] == "memory":
            write = ray_ckpt.train.save_to_memory(state, step)
        if (step + 1) % cfg["durable_every"] == 0:
            ray_ckpt.train.report({"step": step, "loss": loss.item()}, state)
            reported = (step, time.time())
        save_secs.append(time.perf_counter() - saving)
        if step == cfg["fail_step"] and first_attempt:
            if write is not None:
                write.result()  # memory checkpoint N is committed (held on 2 nodes)
            _record(cfg, f"reached-rank{rank}", {
                "node": ray.get_runtime_context().get_node_id(), "step_secs": step_secs,
                "save_secs": save_secs, "reported": reported,
                "state_bytes": _state_bytes(state), "at": time.time()})
            _wait_for_the_loss()
    if write is not None:
        write.result()
    _record(cfg, f"end-rank{rank}", {"loss": loss.item(), "step": state["step"]})


def _wait_for_the_loss() -> None:
    """Block until Ray Train stops this worker (its node, or its peer's, is removed)."""
    deadline = time.monotonic() + WAIT_FOR_LOSS_SECS
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise RuntimeError(f"no node was removed within {WAIT_FOR_LOSS_SECS:.0f} s")


# --- the driver -----------------------------------------------------------------------------------


def _wait_for(paths: list[Path], done: threading.Event, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if done.is_set() or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@dataclass(frozen=True)
class NodeLoss:
    """The node removed, when (wall clock), and how long ``remove_node`` took."""

    node: str
    failed_at: float
    remove_node_s: float


def remove_at_step_n(cluster: Cluster, records: Path, failing: Path, rank: int,
                     done: threading.Event) -> NodeLoss:
    """Once both ranks have reached step N, remove the node of rank ``rank``."""
    reached = [records / f"reached-rank{r}.json" for r in (0, 1)]
    if not _wait_for(reached, done, WAIT_FOR_LOSS_SECS):
        raise RuntimeError("the workers never reached the failure step (see the run's error)")
    node_id = json.loads(reached[rank].read_text())["node"]
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    failing.touch()  # restarted workers know they are not the first attempt
    failed_at = time.time()
    cluster.remove_node(node)
    return NodeLoss(node_id, failed_at, time.time() - failed_at)


def _start_cluster(store_bytes: int) -> Cluster:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": store_bytes})
    for _ in range(3):
        cluster.add_node(num_cpus=1, object_store_memory=store_bytes)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="bench_train_recovery", log_to_driver=False)
    return cluster


def run_variant(variant: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    records, failing = work / variant / "records", work / variant / "failing"
    records.mkdir(parents=True)
    cfg = {"variant": variant, "records": str(records), "failing": str(failing),
           "fail_step": args.fail_step, "durable_every": args.durable_every,
           "steps_after": args.steps_after, "vocab": args.vocab, "d_model": args.d_model,
           "layers": args.layers, "batch": args.batch, "seq": args.seq}
    cluster = _start_cluster(args.store_mib * MiB)
    done = threading.Event()  # the run ended
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        node_loss = pool.submit(remove_at_step_n, cluster, records, failing, args.remove_rank, done)
        try:
            trainer = TorchTrainer(
                train_loop, train_loop_config=cfg,
                scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=f"recovery-{variant}",
                                     storage_path=str(work / variant),
                                     failure_config=FailureConfig(max_failures=1)),
            )
            started = time.time()
            result = trainer.fit()
            wall = time.time() - started
        finally:
            done.set()
            ray.shutdown()
            cluster.shutdown()
    if result.error is not None:
        raise RuntimeError(f"the {variant} run failed: {result.error}") from result.error
    return _summarize(variant, args, records, node_loss.result(), wall)


def _read(records: Path, pattern: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(records.glob(pattern))]


def _summarize(variant: str, args: argparse.Namespace, records: Path, node_loss: NodeLoss,
               wall: float) -> dict[str, Any]:
    reached = _read(records, "reached-rank*.json")
    restarts = [s for s in _read(records, "start-*-rank*.json") if not s["first_attempt"]]
    if len(restarts) != 2:
        raise RuntimeError(f"expected one restart of both ranks, got {len(restarts)} records")
    failed = node_loss.failed_at
    resumed = {s["resumed_step"] for s in restarts}
    if len(resumed) != 1:
        raise RuntimeError(f"the ranks resumed from different steps: {sorted(resumed)}")
    resumed_step = resumed.pop()
    step_secs = statistics.median(t for r in reached for t in r["step_secs"][1:])
    save_secs = max(statistics.mean(r["save_secs"]) for r in reached)
    lost = args.fail_step - resumed_step
    log = next((line for s in restarts for line in s["log"] if "resuming from" in line), "")
    match = re.search(r"resuming from \S+ \(([^)]*)\)", log)
    last_durable = (args.fail_step + 1) // args.durable_every * args.durable_every - 1
    return {
        "variant": variant,
        "fail_step": args.fail_step,
        "durable_every": args.durable_every,
        "last_memory_checkpoint": args.fail_step if variant == "memory" else None,
        "last_durable_checkpoint": last_durable if last_durable >= 0 else None,
        # Ray Train registers a report at its next health check poll (every 2 s by default):
        # one reported shortly before the loss may not be registered, nor resumed from
        "last_report_before_loss_s": (
            failed - max(r["reported"][1] for r in reached) if reached[0]["reported"] else None
        ),
        "removed_node": node_loss.node,
        "removed_rank": args.remove_rank,
        "remove_node_s": node_loss.remove_node_s,
        "state_bytes_per_rank": reached[0]["state_bytes"],
        "step_s": step_secs,
        "checkpoint_s_per_step": save_secs,
        "checkpoint_s_first_attempt": [r["save_secs"] for r in reached],
        "resumed_step": resumed_step,
        "steps_lost": lost,
        "lost_work_s": lost * (step_secs + save_secs),
        "workers_restarted_s": max(s["entered"] for s in restarts) - failed,
        "load_s": max(s["loaded"] - s["load_started"] for s in restarts),
        "recovery_s": max(s["first_step_done"] for s in restarts) - failed,
        "loaded_from": match.group(1) if match else "none (started fresh)",
        "load_log": log,
        "final_loss": [e["loss"] for e in _read(records, "end-rank*.json")],
        "run_wall_s": wall,
    }


def table(results: list[dict[str, Any]]) -> str:
    r0 = results[0]
    lines = [
        f"2 workers (DDP, gloo), {r0['state_bytes_per_rank'] / MiB:.0f} MiB of model + AdamW "
        f"state per rank; the node of rank {r0['removed_rank']} removed after step "
        f"{r0['fail_step']}",
        "",
        "| checkpoints | a step: train + checkpoint calls (s) | last before the loss | resumed "
        "from step | steps lost (s of work) | seconds until training runs again | of which: "
        "workers restarted / load / first step | loaded from |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        what = ("memory every step + durable every "
                if r["variant"] == "memory" else "durable only, every ")
        first = r["recovery_s"] - r["workers_restarted_s"] - r["load_s"]
        lines.append(
            f"| {what}{r['durable_every']} steps | {r['step_s']:.2f} + "
            f"{r['checkpoint_s_per_step']:.2f} | {_last(r)} | {r['resumed_step']} | "
            f"{r['steps_lost']} "
            f"({r['lost_work_s']:.1f}) | {r['recovery_s']:.1f} | "
            f"{r['workers_restarted_s']:.1f} / {r['load_s']:.2f} / {first:.1f} | "
            f"{r['loaded_from']} |"
        )
    return "\n".join(lines)


def _last(r: dict[str, Any]) -> str:
    """The last checkpoints before the loss: memory step, durable step (reported how long before
    the loss)."""
    parts = [] if r["last_memory_checkpoint"] is None else [
        f"memory {r['last_memory_checkpoint']}"]
    if r["last_durable_checkpoint"] is not None:
        parts.append(f"durable {r['last_durable_checkpoint']} "
                     f"({r['last_report_before_loss_s']:.1f} s before)")
    return ", ".join(parts) or "none"


def model_for(nbytes: int) -> tuple[int, int, int]:
    """(d_model, layers, vocab) of a :class:`TinyLM` whose model + AdamW state is about
    ``nbytes`` per rank (12 bytes a parameter: fp32 weights and Adam's two moments): the
    widths of ``benchmarks.state_dicts``, as many layers as fit."""
    d_model, vocab = (1024, 32000) if nbytes >= 512 * MiB else (256, 4096)
    per_layer = 12 * d_model * d_model + 13 * d_model  # attention, MLP, two norms
    layers = round((nbytes / 12 - 2 * vocab * d_model - vocab) / per_layer)
    return d_model, max(1, layers), vocab


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fail-step", type=int, default=13, help="N: the node is lost after it")
    parser.add_argument("--durable-every", type=int, default=5, help="K: durable checkpoints")
    parser.add_argument("--steps-after", type=int, default=3, help="steps after step N")
    parser.add_argument("--remove-rank", type=int, choices=(0, 1), default=0)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--store-mib", type=int, default=768, help="each node's object store")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--poll-interval-s", type=float, default=None,
                        help="Ray Train's health check interval (default: Ray's, 2 s)")
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run each variant of ``args`` on its own fresh cluster: the results document."""
    if args.poll_interval_s is not None:
        os.environ[POLL_ENV] = str(args.poll_interval_s)  # Ray Train passes it to its controller
    load_average = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ray_ckpt_train_recovery_"))
    try:
        results = [run_variant(v, args, work) for v in args.variants.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"settings": vars(args), "load_average_at_start": load_average,
            "cpus": os.cpu_count(), "runs": results}


def main(argv: list[str] | None = None) -> None:
    cli = parser()
    args = cli.parse_args(argv)
    if (not set(args.variants.split(",")) <= set(VARIANTS) or args.fail_step < 0
            or args.durable_every < 1 or args.steps_after < 1):
        cli.error(f"--variants is a subset of {VARIANTS}; --fail-step >= 0, "
                  "--durable-every >= 1, --steps-after >= 1")
    doc = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_recovery.json"), "w") as f:
        json.dump(doc, f, indent=1)
    sys.stdout.write(f"load average at start {doc['load_average_at_start'][0]:.1f} on "
                     f"{doc['cpus']} cpus; " + table(doc["runs"]) + "\n")


if __name__ == "__main__":
    main()

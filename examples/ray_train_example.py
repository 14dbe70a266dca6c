"""Train a small model with Ray Train's TorchTrainer (2 CPU workers, gloo, DDP), checkpoint it
with ray_ckpt, and resume after a worker fails.

    python examples/ray_train_example.py --storage-path /tmp/ray_train_runs --fail-once-at 30

Inside the training function, three lines do the checkpointing (``ray_ckpt.train``):

    state = {"model": model, "optim": optimizer, "step": -1}
    ray_ckpt.train.load(state)                      # resume from Ray Train's latest checkpoint
    ...
    ray_ckpt.train.report({"loss": loss}, state)    # every rank: save through ray_ckpt, report

Every rank saves its state straight into the run's storage (``RunConfig(storage_path)``), the
DDP-replicated tensors once for all ranks, and Ray Train registers the checkpoint once it is
committed. ``--fail-once-at`` makes rank 1 raise at that step, once; ``FailureConfig`` restarts
the workers, which resume from the newest committed checkpoint. ``CheckpointConfig`` keeps the
``--num-to-keep`` best checkpoints by loss; Ray Train deletes the others.

It attaches to the cluster in ``RAY_ADDRESS`` when set, else starts a local Ray. On a real
cluster, ``--storage-path`` must be reachable from every node (``s3://bucket/runs``, NFS).
The data is synthetic and a function of (step, rank), so a resumed run sees the batches an
uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import ray_ckpt.train

logger = logging.getLogger("ray_train_example")


def batch(step: int, rank: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of ``step``: y = sum of sin(x)."""
    generator = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(size, 16, generator=generator)
    return x, torch.sin(x).sum(dim=1, keepdim=True)


def first_time(marker: str) -> bool:
    """True the first time it is called with ``marker`` (a path or URI every node can write)."""
    fs, path = pafs.FileSystem.from_uri(marker)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    with fs.open_output_stream(path):
        pass
    return True


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from torch.nn.parallel import DistributedDataParallel

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP expects
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"])

    state: dict[str, Any] = {"model": model, "optim": optimizer, "step": -1}
    if ray_ckpt.train.load(state) is not None:
        logger.info("rank %d resumes after step %d", rank, state["step"])

    for step in range(state["step"] + 1, config["steps"]):
        x, y = batch(step, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == config["fail_once_at"] and rank == 1 and first_time(config["fail_marker"]):
            raise RuntimeError(f"rank {rank} fails at step {step} (--fail-once-at), once")
        if (step + 1) % config["every"] == 0 or step == config["steps"] - 1:
            state["step"] = step
            ray_ckpt.train.report(
                {"step": step, "loss": loss.item()},
                state,
                checkpoint_upload_mode=config["upload_mode"],
            )


def run(args: argparse.Namespace) -> Result:
    storage = args.storage_path.rstrip("/")
    if "://" not in storage:
        storage = os.path.abspath(storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "steps": args.steps,
            "every": args.every,
            "lr": args.lr,
            "upload_mode": args.upload_mode,
            "fail_once_at": args.fail_once_at,
            "fail_marker": f"{storage}/{args.name}.failed-once",  # beside the run
        },
        scaling_config=ScalingConfig(
            num_workers=args.num_workers, use_gpu=False, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(
            name=args.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=args.num_to_keep,
                checkpoint_score_attribute="loss",
                checkpoint_score_order="min",
            ),
        ),
    )
    return trainer.fit()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--storage-path", required=True,
                        help="RunConfig(storage_path): a shared path or s3://bucket/dir")
    parser.add_argument("--name", default="ray_ckpt_example", help="the run's name")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--upload-mode", choices=("sync", "async"), default="async",
                        help="report once committed (sync) or commit in the background (async)")
    parser.add_argument("--num-to-keep", type=int, default=2,
                        help="checkpoints Ray Train keeps (the best by loss)")
    parser.add_argument("--fail-once-at", type=int, default=None,
                        help="rank 1 raises at this step, the first time only")
    parser.add_argument("--max-failures", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.num_to_keep < 1 or args.num_workers < 1:
        parser.error("--steps, --every, --num-to-keep and --num-workers must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not ray.is_initialized():
        # as users start Ray: the cluster in RAY_ADDRESS, else a new local one (with its
        # dashboard: Ray Train's controller queries it, and logs a warning a second without)
        ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local")
    result = run(args)
    if result.error is not None:
        raise result.error
    logger.info("final metrics: %s", result.metrics)
    for checkpoint, metrics in result.best_checkpoints or []:
        logger.info("kept checkpoint %s (step %d, loss %.4f)", checkpoint.path,
                    metrics["step"], metrics["loss"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train a small model and checkpoint it with ray_ckpt, asynchronously; resume when restarted.

Meant for ``ray job submit`` (it also runs as a plain script, on a local Ray it starts itself):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python examples/train.py --ckpt-root /tmp/ray_ckpt_run --steps 200 --every 50

Every ``--every`` steps (and at the last step) it saves ``{"model", "optim", "step"}`` to
``<ckpt-root>/step-<step:06d>`` with an ``AsyncCheckpointer``: training goes on while the
writer actors write, and waits only for staging (the copy into Ray's object store) before the
next optimizer step changes the weights. Started again with the same root, it resumes from the
newest *committed* checkpoint (an incomplete one, from a save that a crash interrupted, is
never loaded) and continues to ``--steps``. ``--ckpt-root`` may be a local path on a shared
disk or a URI (``s3://bucket/run``, ``gs://bucket/run``) that every node can reach.

The data is synthetic and a function of the step number alone, so a resumed run sees exactly
the batches an uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

import ray_ckpt

logger = logging.getLogger("train")


def build_model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, width), torch.nn.GELU(), torch.nn.Linear(width, width),
        torch.nn.GELU(), torch.nn.Linear(width, 1),
    )


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: y = sum of sin(x), learnable by the MLP."""
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(size, 32, generator=generator)
    return x, torch.sin(x).sum(dim=1, keepdim=True)


def resume(
    ckptr: ray_ckpt.Checkpointer, root: str, model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Load the newest committed checkpoint under ``root``; returns its step (0: none)."""
    committed = [e for e in ray_ckpt.list_checkpoints(root) if e.committed and e.step is not None]
    if not committed:
        logger.info("no committed checkpoint under %s: starting from step 0", root)
        return 0
    latest = committed[-1]
    state = ckptr.load(latest.path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    logger.info("resuming from %s at step %d", latest.path, state["step"])
    return int(state["step"])


def checkpoint_path(root: str, step: int) -> str:
    return f"{root.rstrip('/')}/step-{step:06d}"


def train(args: argparse.Namespace) -> list[ray_ckpt.CheckpointEntry]:
    model = build_model(args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    with ray_ckpt.make_async_checkpointer() as ckptr:
        start = resume(ckptr, args.ckpt_root, model, optimizer)
        pending: tuple[str, Any] | None = None
        for step in range(start + 1, args.steps + 1):
            x, y = batch(step, args.batch_size)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.log_every == 0:
                logger.info("step %d loss %.4f", step, loss.item())
            if step % args.every == 0 or step == args.steps:
                pending = save(ckptr, args.ckpt_root, step, model, optimizer, pending)
        if pending is not None:
            pending[1].result()  # raises if the last save failed
            logger.info("checkpoint committed: %s", pending[0])
    entries = ray_ckpt.list_checkpoints(args.ckpt_root)
    for entry in entries:
        logger.info(
            "checkpoint %s step %s %s, %.1f MiB", entry.path, entry.step,
            "committed" if entry.committed else "INCOMPLETE", entry.nbytes / 2**20,
        )
    return entries


def save(
    ckptr: ray_ckpt.AsyncCheckpointer, root: str, step: int, model: torch.nn.Module,
    optimizer: torch.optim.Optimizer, previous: tuple[str, Any] | None,
) -> tuple[str, Any]:
    """Start an async save of this step; log the previous one's commit (``save`` has waited
    for it). Returns ``(path, write_future)``."""
    path = checkpoint_path(root, step)
    started = time.perf_counter()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}
    stage_future, write_future = ckptr.save(path, state)
    if previous is not None:
        logger.info("checkpoint committed: %s", previous[0])
    stage_future.result()  # the tensors are in the object store: training may change them
    logger.info("checkpoint %s staged in %.3fs, writing in the background", path,
                time.perf_counter() - started)
    return path, write_future


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-root", required=True,
                        help="where checkpoints go: a shared path, s3://bucket/dir, gs://...")
    parser.add_argument("--steps", type=int, default=200, help="train up to this step")
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=25, help="log the loss every N steps")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.log_every < 1:
        parser.error("--steps, --every and --log-every must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    logger.info("checkpoints go to %s", args.ckpt_root)
    entries = train(args)
    committed = [e for e in entries if e.committed]
    logger.info("done: %d committed checkpoints under %s, newest %s", len(committed),
                args.ckpt_root, committed[-1].path if committed else "none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train a small model and checkpoint it with ray_ckpt, asynchronously; resume when restarted.

Meant for ``ray job submit`` (it also runs as a plain script, on a local Ray it starts itself):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python examples/train.py --ckpt-root /tmp/ray_ckpt_run --steps 200 --every 50

Checkpoints go through a :class:`ray_ckpt.CheckpointManager` over an ``AsyncCheckpointer``:
every ``--every`` steps (and at the last step) it saves ``{"model", "optim", "step"}`` (with the
loss as a metric) to ``<ckpt-root>/step-<step:09d>``; training goes on while the writer actors
write, and waits only for staging (the copy into Ray's object store) before the next optimizer
step changes the weights. Once a save has committed, the manager deletes all but the newest
``--keep-last`` committed checkpoints. Started again with the same root, it resumes from the
newest *committed* checkpoint (an incomplete one, from a save that a crash interrupted, is
never loaded; ``cleanup`` removes such leftovers once they are old) and continues to
``--steps``. ``--ckpt-root`` may be a local path on a shared disk or a URI
(``s3://bucket/run``, ``gs://bucket/run``) that every node can reach.

The data is synthetic and a function of the step number alone, so a resumed run sees exactly
the batches an uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import ray_ckpt
import ray_ckpt.catalog

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
    manager: ray_ckpt.CheckpointManager, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> int:
    """Load the newest committed checkpoint; returns its step (0: none)."""
    removed = manager.cleanup()  # leftovers of saves that crashed long enough ago
    if removed:
        logger.info("removed incomplete checkpoints %s", removed)
    step = manager.latest()
    if step is None:
        logger.info("no committed checkpoint under %s: starting from step 0", manager.root)
        return 0
    state = manager.load(step)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    logger.info("resuming from %s at step %d", manager.path(step), state["step"])
    return int(state["step"])


def train(args: argparse.Namespace) -> list[ray_ckpt.catalog.CheckpointEntry]:
    model = build_model(args.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    with ray_ckpt.make_async_checkpointer() as ckptr:
        manager = ray_ckpt.CheckpointManager(args.ckpt_root, ckptr, keep_last=args.keep_last)
        start = resume(manager, model, optimizer)
        pending: str | None = None
        for step in range(start + 1, args.steps + 1):
            x, y = batch(step, args.batch_size)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % args.log_every == 0:
                logger.info("step %d loss %.4f", step, loss.item())
            if step % args.every == 0 or step == args.steps:
                pending = save(manager, step, model, optimizer, loss.item(), pending)
        if pending is not None:
            manager.wait()  # raises if the last save failed; then applies retention
            logger.info("checkpoint committed: %s", pending)
    entries = ray_ckpt.list_checkpoints(args.ckpt_root)
    for entry in entries:
        logger.info(
            "checkpoint %s step %s %s, %.1f MiB", entry.path, entry.step,
            "committed" if entry.committed else "INCOMPLETE", entry.nbytes / 2**20,
        )
    return entries


def save(
    manager: ray_ckpt.CheckpointManager, step: int, model: torch.nn.Module,
    optimizer: torch.optim.Optimizer, loss: float, previous: str | None,
) -> str:
    """Start an async save of this step; log the previous one's commit (``manager.save`` has
    waited for it and applied retention). Returns the new checkpoint's path."""
    started = time.perf_counter()
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}
    stage_future, _ = manager.save(step, state, metrics={"loss": loss})
    if previous is not None:
        logger.info("checkpoint committed: %s", previous)
    stage_future.result()  # the tensors are in the object store: training may change them
    path = manager.path(step)
    logger.info("checkpoint %s staged in %.3fs, writing in the background", path,
                time.perf_counter() - started)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-root", required=True,
                        help="where checkpoints go: a shared path, s3://bucket/dir, gs://...")
    parser.add_argument("--steps", type=int, default=200, help="train up to this step")
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--keep-last", type=int, default=3,
                        help="keep the newest N committed checkpoints (default 3)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=25, help="log the loss every N steps")
    args = parser.parse_args(argv)
    if min(args.steps, args.every, args.log_every, args.keep_last) < 1:
        parser.error("--steps, --every, --log-every and --keep-last must be positive")
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

"""``ray-ckpt demo``: save a realistic model-plus-optimizer state, load it back, verify it.

Starts an embedded local Ray when none is running, trains a small transformer for a few steps
with AdamW, then saves synchronously and asynchronously, loads the checkpoint whole and in
place, checks every tensor bit for bit, and prints what it did with sizes and throughput.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from .builder import make_async_checkpointer, make_sync_checkpointer


def build_model(d_model: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(
        d_model=d_model, nhead=8, dim_feedforward=4 * d_model, batch_first=True
    )
    return torch.nn.Sequential(
        torch.nn.Embedding(8192, d_model),
        torch.nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False),
        torch.nn.Linear(d_model, 8192),
    )


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        torch.manual_seed(step)
        tokens = torch.randint(0, 8192, (4, 32))
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _nbytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_nbytes(v) for v in state)
    return 0


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def run(directory: str | None = None, d_model: int = 512, layers: int = 6, steps: int = 2) -> int:
    """Run the demo; returns a process exit status."""
    mib = 2**20
    root = directory or tempfile.mkdtemp(prefix="ray_ckpt_demo_")
    print(f"ray_ckpt demo: checkpoints go to {root}")
    model = build_model(d_model, layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_steps(model, optimizer, steps)
    state: dict[str, Any] = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": steps
    }
    nbytes = _nbytes(state)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: transformer, {layers} layers, d_model {d_model}, {params / 1e6:.1f}M parameters;"
          f" state with AdamW moments: {nbytes / mib:.0f} MiB in "
          f"{len(state['model']) + 2 * len(state['optimizer']['state'])} tensors")

    try:
        with make_sync_checkpointer() as ckptr:
            warm = os.path.join(root, "warm-up")
            ckptr.save(warm, {"x": torch.ones(1)})  # starts this node's writer actor
            shutil.rmtree(warm)

            path = os.path.join(root, "step-2-sync")
            start = time.perf_counter()
            ckptr.save(path, state)
            save_secs = time.perf_counter() - start
            print(f"sync save   {nbytes / mib:8.0f} MiB in {save_secs:6.3f}s  "
                  f"{nbytes / save_secs / 1e9:6.2f} GB/s  -> {path}")

            start = time.perf_counter()
            loaded = ckptr.load(path)
            load_secs = time.perf_counter() - start
            print(f"full load   {nbytes / mib:8.0f} MiB in {load_secs:6.3f}s  "
                  f"{nbytes / load_secs / 1e9:6.2f} GB/s  (checksums verified)")
            if not _same(state, loaded):
                print("FAILED: the loaded state differs from the saved one")
                return 1

            fresh = build_model(d_model, layers)
            with torch.no_grad():
                for p in fresh.parameters():
                    p.zero_()
            target = {"model": fresh.state_dict()}
            start = time.perf_counter()
            ckptr.load(path, target, strict=True)
            inplace_secs = time.perf_counter() - start
            model_bytes = _nbytes(target)
            print(f"in place    {model_bytes / mib:8.0f} MiB in {inplace_secs:6.3f}s  "
                  f"{model_bytes / inplace_secs / 1e9:6.2f} GB/s  (model weights only)")
            if not _same(model.state_dict(), fresh.state_dict()):
                print("FAILED: the model loaded in place differs")
                return 1

        expected = copy.deepcopy(state)
        with make_async_checkpointer() as actor:
            path = os.path.join(root, "step-2-async")
            start = time.perf_counter()
            stage, write = actor.save(path, state)
            stage.result()
            stall = time.perf_counter() - start
            train_steps(model, optimizer, 1)  # changes the tensors while the write runs
            result = write.result()
            total = time.perf_counter() - start
            print(f"async save  {nbytes / mib:8.0f} MiB: stall {stall:6.3f}s, committed after "
                  f"{total:6.3f}s while training went on ({result.files} files)")
            if not _same(expected, actor.load(path)):
                print("FAILED: the async checkpoint does not hold the values at save() time")
                return 1
        print("verified: every tensor loaded back bit for bit")
        return 0
    finally:
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)

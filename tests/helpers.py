"""Helpers shared by the tests: state dicts, comparisons, and file surgery on checkpoints."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

import ray_ckpt
from ray_ckpt.format.names import MARKER_NAME


def small_config(**staging: Any) -> ray_ckpt.CheckpointerConfig:
    """A config with small buckets so that tests exercise packing, chunking and many files."""
    staging.setdefault("bucket_size_bytes", 1 << 20)
    staging.setdefault("pack_threshold_bytes", 64 << 10)
    return ray_ckpt.CheckpointerConfig(
        staging_config=ray_ckpt.CheckpointStagerConfig(**staging),
    )


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )


def trained(model: torch.nn.Module, steps: int = 3) -> torch.optim.Optimizer:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(steps):
        torch.manual_seed(100 + i)
        loss = model(torch.randn(8, 16)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-for-bit equality of two state dicts, container types included."""
    assert type(a) is type(b) or (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    ), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        same_layout = a.dtype == b.dtype and a.shape == b.shape
        assert same_layout, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.device.type == b.device.type or b.device.type == "cpu"
        assert torch.equal(
            a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
            b.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
        ), f"{path}: bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def data_files(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.endswith(".data"))


def manifest_file(path: str) -> str:
    return next(f for f in os.listdir(path) if f.startswith("manifest-"))


def flip_byte(file: str, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def marker(path: str) -> str:
    return os.path.join(path, MARKER_NAME)


def nested_state() -> dict[str, Any]:
    return {
        "a": torch.arange(10, dtype=torch.float32),
        "nested": {"list": [torch.ones(2, 2), 3, "x", None, (1.5, torch.zeros(0))]},
        "od": OrderedDict([("z", 1), ("y", torch.tensor(7))]),
        "scalars": {"int": -(2**70), "float": 0.1, "nan": float("nan"), "inf": float("-inf"),
                    "bool": True, "none": None, "str": "ünïcødé", "bytes": b"\x00\xff"},
        3: {"int key": torch.tensor([1, 2, 3])},
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "np": np.arange(6, dtype=np.int16).reshape(2, 3),
    }

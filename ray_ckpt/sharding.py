"""Sharded tensors: save the local shard of a global tensor, load any region of it back.

A *sharded* leaf is one piece (a box: ``global_offset`` and the local shape) of a larger tensor
(``global_shape``). It comes from a ``DTensor`` (FSDP2, tensor parallelism), whose placements
say which box this rank holds and which ranks hold the same box (``Replicate`` mesh
dimensions), or from a plain tensor wrapped in :class:`ShardedTensor`.

Saving writes each distinct box once: of the ranks holding a box, one writes it (picked by a
hash of the key, so that the writing spreads over the replicas). Loading reads, for each target
box (a DTensor's local shard in another mesh or layout, a full tensor, or nothing: the whole
tensor), only the byte ranges of the stored boxes that overlap it. In C order, the overlap of
two boxes is a set of *runs*: contiguous byte ranges, one per index of the leading dimensions
that the overlap does not span whole.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UnsupportedValueError

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, shape)


@dataclass(frozen=True)
class ShardedTensor:
    """A plain tensor that is the box ``global_offset`` + ``local.shape`` of a tensor of
    ``global_shape``: saved as a shard of that tensor, and loaded into in place."""

    local: torch.Tensor
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]

    def __post_init__(self) -> None:
        check_box(tuple(self.global_offset), tuple(self.local.shape), tuple(self.global_shape),
                  where="ShardedTensor")


@dataclass(frozen=True)
class ShardInfo:
    """Where a saved shard sits in its global tensor, and who else holds the same box."""

    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    holders: tuple[int, ...] = ()  # global ranks holding this very box; () = only this rank

    def owner(self, path_id: str, rank: int) -> int:
        """The rank that writes this box: one of its holders, spread by a hash of the key."""
        if not self.holders:
            return rank
        digest = zlib.crc32(f"{path_id}@{self.global_offset}".encode())
        return self.holders[digest % len(self.holders)]


def check_box(offset: tuple[int, ...], shape: tuple[int, ...], global_shape: tuple[int, ...],
              *, where: str) -> None:
    if not (len(offset) == len(shape) == len(global_shape)):
        raise UnsupportedValueError(
            f"{where}: offset {list(offset)}, shape {list(shape)} and global shape "
            f"{list(global_shape)} must have the same number of dimensions"
        )
    for o, s, g in zip(offset, shape, global_shape):
        if o < 0 or s < 0 or o + s > g:
            raise UnsupportedValueError(
                f"{where}: the box at {list(offset)} of shape {list(shape)} does not fit in "
                f"the global shape {list(global_shape)}"
            )


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(value: Any) -> bool:
    kind = type(value)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return False
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(value, dtensor)


def dtensor_box(tensor: Any, *, key: str) -> tuple[torch.Tensor, ShardInfo]:
    """The local shard of a DTensor and where it sits; refuses ``Partial`` placements."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = tensor.device_mesh, tensor.placements
    if any(isinstance(p, Partial) for p in placements):
        raise UnsupportedValueError(
            f"key {key!r}: a DTensor with Partial placements holds unreduced values; "
            "redistribute it to Shard or Replicate before saving"
        )
    _, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    local = tensor.to_local()
    coordinate = mesh.get_coordinate()
    ranks = mesh.mesh
    index: list[Any] = []
    for dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            index.append(coordinate[dim])
        elif isinstance(placement, Replicate):
            index.append(slice(None))
        else:
            raise UnsupportedValueError(f"key {key!r}: unsupported placement {placement!r}")
    holders = tuple(sorted(int(r) for r in ranks[tuple(index)].reshape(-1).tolist()))
    return local, ShardInfo(tuple(tensor.shape), tuple(offset), holders)


def target_box(target: Any) -> tuple[torch.Tensor, Box, tuple[int, ...]]:
    """For a load target: the tensor to fill, its box, and the global shape it expects."""
    if isinstance(target, ShardedTensor):
        shape = tuple(target.local.shape)
        return target.local, (tuple(target.global_offset), shape), tuple(target.global_shape)
    if is_dtensor(target):
        local, info = dtensor_box(target, key="target")
        return local, (info.global_offset, tuple(local.shape)), info.global_shape
    shape = tuple(target.shape)
    return target, ((0,) * len(shape), shape), shape


def overlap(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes, or None when it is empty."""
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(min(x + s, y + t) for x, s, y, t in zip(a[0], a[1], b[0], b[1]))
    if any(h <= low for low, h in zip(lo, hi)) and lo:
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


def runs(shape: tuple[int, ...], box: Box) -> Iterator[tuple[int, int]]:
    """The contiguous element runs ``(start, count)`` of ``box`` (in coordinates of a C-order
    tensor of ``shape``), in C order of the box."""
    offset, size = box
    n = len(shape)
    if n == 0:
        yield 0, 1
        return
    if any(s == 0 for s in size):
        return
    strides = [1] * n
    for d in range(n - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    k = n - 1  # the runs span dims k.. whole (k's extent within the box)
    while k > 0 and offset[k] == 0 and size[k] == shape[k]:
        k -= 1
    count = size[k] * strides[k]
    base = sum(o * st for o, st in zip(offset, strides))
    lead = size[:k]
    index = [0] * k
    while True:
        yield base + sum(i * strides[d] for d, i in enumerate(index)), count
        d = k - 1
        while d >= 0:
            index[d] += 1
            if index[d] < lead[d]:
                break
            index[d] = 0
            d -= 1
        if d < 0:
            return


def slices(box: Box, origin: tuple[int, ...]) -> tuple[slice, ...]:
    """Index of ``box`` in a tensor whose element 0 sits at global ``origin``."""
    return tuple(slice(o - g, o - g + s) for o, s, g in zip(box[0], box[1], origin))

"""Opening a checkpoint for a tool: marker, validated manifest and the tree one rank saved.

The validator :meth:`ray_ckpt.CheckpointReader.open` runs
(:func:`~ray_ckpt.load.validate.open_checkpoint`), without the reader:
opening needs no torch and no Ray, so ``ray-ckpt inspect``, built on this alone, answers
without importing either. The tools that read tensor data go on from here (:mod:`._source`).
"""

from __future__ import annotations

from typing import Any

from ..config import StorageConfig
from ..errors import CheckpointError
from ..load import validate as load_validate
from ..load.validate import CheckpointInfo
from ..storage.storage import Storage

KIND_OF_TAG = {"T": "tensor", "N": "ndarray", "P": "pickle"}


def open_checkpoint(
    path: str, filesystem: Any, storage_config: StorageConfig | None, rank: int = 0
) -> CheckpointInfo:
    """The committed checkpoint at ``path``, validated (data files included) and with the tree
    rank ``rank`` saved (rank-local keys differ between the ranks of a multi-rank save); raises
    the first problem."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    info = load_validate.open_checkpoint(Storage.from_path(path, filesystem, storage_config), rank)
    if rank >= info.marker.world_size:
        raise CheckpointError(
            f"checkpoint {info.storage.display} was saved by {info.marker.world_size} rank(s); "
            f"rank {rank} is not one of them (use 0..{info.marker.world_size - 1})"
        )
    return info

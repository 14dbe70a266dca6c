"""Opening a checkpoint for a tool: marker, validated manifest and the tree one rank saved.

The same validator, in the same order, as :meth:`ray_ckpt.CheckpointReader.open`
(:func:`~ray_ckpt.load.validate.read_manifest`, then
:func:`~ray_ckpt.load.validate.checkpoint_problems` for the rank's tree), without the reader:
opening needs no torch and no Ray, so ``ray-ckpt inspect``, built on this alone, answers
without importing either. The tools that read tensor data go on from here (:mod:`._source`).
"""

from __future__ import annotations

from typing import Any

from ..config import StorageConfig
from ..errors import CheckpointError
from ..format.checks import raise_first
from ..load.validate import CheckpointInfo, checkpoint_problems, read_manifest
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
    storage = Storage.from_path(path, filesystem, storage_config)
    files, marker, manifest = read_manifest(storage)
    trees: dict[int, Any] = {}
    raise_first(checkpoint_problems(
        storage.display, marker, manifest, files, [rank], trees=trees
    ))
    if rank >= marker.world_size:
        raise CheckpointError(
            f"checkpoint {storage.display} was saved by {marker.world_size} rank(s); "
            f"rank {rank} is not one of them (use 0..{marker.world_size - 1})"
        )
    return CheckpointInfo(storage, marker, manifest, trees[rank], files)

"""validate: moved from ray_ckpt.load.reader (issue 14). TODO: docstring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ..errors import CheckpointNotFoundError, IncompleteCheckpointError
from ..format.manifest import Manifest
from ..format.marker import Marker
from ..format.names import MARKER_NAME, is_own_file
from ..storage.storage import Storage


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, opened and validated: what :meth:`CheckpointReader.open` returns."""

    storage: Storage
    marker: Marker
    manifest: Manifest
    tree: Any
    file_sizes: dict[str, int]

    @property
    def table(self) -> pa.Table:
        """The manifest as an Arrow table (one row per extent)."""
        return self.manifest.table

    @property
    def nbytes(self) -> int:
        return self.marker.total_nbytes


def _raise_not_a_checkpoint(storage: Storage, files: dict[str, int]) -> None:
    holds = checkpoints_below(storage)
    if holds:
        shown = ", ".join(holds[:3]) + (", ..." if len(holds) > 3 else "")
        raise CheckpointNotFoundError(
            f"{storage.display} is not a checkpoint but a directory of checkpoints (a run "
            f"root): it holds {len(holds)}{'+' if len(holds) >= _ROOT_PROBE else ''} committed "
            f"checkpoint(s) ({shown}). Pass one of them; `ray-ckpt ls {storage.display}` lists "
            "them by step."
        )
    if any(is_own_file(name) for name in files):
        raise IncompleteCheckpointError(
            f"{storage.display} is an incomplete checkpoint: it has no commit marker "
            f"({MARKER_NAME}), so the save that wrote it never finished. Load an earlier "
            "checkpoint; `ray-ckpt clean` on the directory above it (or "
            "CheckpointManager.cleanup() for a manager's root) removes it."
        )
    if files or storage.list_dirs():
        raise IncompleteCheckpointError(
            f"{storage.display} is not a checkpoint: it holds no ray_ckpt files and no commit "
            f"marker ({MARKER_NAME}). `ray-ckpt ls {storage.display}` shows whether any "
            "directory under it is one."
        )
    if storage.is_file():
        raise CheckpointNotFoundError(
            f"{storage.display} is a file, not a checkpoint directory"
        )
    if storage.exists():
        raise IncompleteCheckpointError(
            f"{storage.display} is an empty directory, not a checkpoint (no {MARKER_NAME})"
        )
    raise CheckpointNotFoundError(f"no checkpoint at {storage.display}: the path does not exist")


_ROOT_PROBE = 20  # subdirectories looked at to tell a run root from a broken checkpoint


def checkpoints_below(storage: Storage) -> list[str]:
    """Names of the committed checkpoints directly under ``storage`` (among its first
    ``_ROOT_PROBE`` subdirectories): non-empty when ``storage`` is a root of checkpoints."""
    return [
        name for name in sorted(storage.list_dirs())[:_ROOT_PROBE]
        if storage.child(name).exists(MARKER_NAME)
    ]

"""What a root of checkpoints holds, and cleaning it: ``ray-ckpt ls`` and ``ray-ckpt clean``.

A root is a directory whose subdirectories are checkpoints: a :class:`~ray_ckpt.CheckpointManager`
root (``step-000000100``), or a Ray Train run directory (``<storage_path>/<name>``, holding
``checkpoint_<timestamp>`` directories that ``ray_ckpt.train.report`` wrote). For each checkpoint
the listing gives its step, its commit time, whether it committed and, on a Ray Train run,
whether Ray Train registered it.

- **Step**: the value of the top-level ``step`` key of the saved state (read from the
  manifest's tree, no tensor data), else the step in a ``step-N``/``checkpoint_N`` directory
  name; never digits of a timestamp. Checkpoints without one are ordered by commit time.
- **Registered**: Ray Train v2 keeps its checkpoint manager's state on storage, in
  ``<run dir>/checkpoint_manager_snapshot.json`` (``checkpoint_results``: the checkpoints it
  tracks, after ``CheckpointConfig(num_to_keep)`` deleted the others). A checkpoint directory
  missing from it was never registered (a save that committed after its run attempt failed)
  or was dropped by retention but not deleted. The snapshot is written after every
  registration, so a checkpoint committed in the last moments of a run that is still going
  may be registered a moment later. Without the snapshot nothing is known of registration
  (``registered`` is ``None``).

This module imports neither torch nor Ray: listing a root stays fast.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .catalog import CheckpointEntry, delete_storage, join_path, list_checkpoints
from .config import StorageConfig
from .errors import CheckpointError, CorruptCheckpointError
from .format.manifest import META_TREE
from .format.marker import Marker
from .format.names import MARKER_NAME, is_own_file
from .storage.storage import Storage

RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's manager state
DEFAULT_MIN_AGE_SECS = 600.0  # an incomplete save younger than this may still be writing


@dataclass(frozen=True)
class RunCheckpoint:
    """One checkpoint directory of a root, with what the listing found out about it."""

    entry: CheckpointEntry
    saved_step: int | None  # the state's top-level ``step``, when it saved one
    registered: bool | None  # Ray Train registered it; None when that cannot be known

    @property
    def step(self) -> int | None:
        return self.saved_step if self.saved_step is not None else self.entry.step


@dataclass(frozen=True)
class RunListing:
    """The checkpoints of ``root`` in order (by step, then commit time), oldest first."""

    root: str
    checkpoints: list[RunCheckpoint]
    ray_train: bool  # the root holds Ray Train's checkpoint manager snapshot
    ray_train_latest: str | None = None  # the checkpoint Ray Train would resume from
    roots: list[tuple[str, int]] = field(default_factory=list)  # (subdir, checkpoints) below

    @property
    def newest_committed(self) -> RunCheckpoint | None:
        committed = [c for c in self.checkpoints if c.entry.committed]
        return committed[-1] if committed else None


def list_run(
    root: str, *, filesystem: Any = None, storage_config: StorageConfig | None = None
) -> RunListing:
    """Every checkpoint directly under ``root``, ordered by step (see the module docstring);
    when there is none, the subdirectories that are roots themselves (``roots``)."""
    base = Storage.from_path(root, filesystem, storage_config)
    entries = list_checkpoints(root, filesystem=filesystem, storage_config=storage_config)
    snapshot = _ray_train_snapshot(base)
    registered = None if snapshot is None else _registered_names(snapshot)
    checkpoints = [
        RunCheckpoint(
            entry=e,
            saved_step=_saved_step(base.child(e.name)) if e.committed else None,
            registered=None if registered is None else e.name in registered,
        )
        for e in entries
    ]
    checkpoints.sort(key=_order)
    return RunListing(
        root=root,
        checkpoints=checkpoints,
        ray_train=snapshot is not None,
        ray_train_latest=_latest_name(snapshot),
        roots=[] if entries else _roots_below(base, root, filesystem, storage_config),
    )


def _order(c: RunCheckpoint) -> tuple[Any, ...]:
    when = c.entry.created_unix or c.entry.modified_unix
    return (c.step is None, c.step or 0, when, c.entry.name)


def _saved_step(storage: Storage) -> int | None:
    """The top-level ``step`` value of the checkpoint's state (rank 0's tree), from its
    manifest; None when it saved none or the checkpoint cannot be read."""
    try:
        marker = Marker.from_bytes(storage.read_file(MARKER_NAME), where=storage.display)
        with pa.ipc.open_file(pa.py_buffer(storage.read_file(marker.manifest))) as f:
            meta = f.schema.metadata or {}
        tree = json.loads(meta.get(META_TREE, b"{}"))
    except (OSError, CorruptCheckpointError, pa.ArrowInvalid, ValueError):
        return None
    pairs = tree.get("d") if isinstance(tree, dict) else None
    for pair in pairs if isinstance(pairs, list) else []:
        if isinstance(pair, list) and len(pair) == 2 and pair[0] == "step":
            value = pair[1]
            return value if isinstance(value, int) and not isinstance(value, bool) else None
    return None


def _ray_train_snapshot(base: Storage) -> dict[str, Any] | None:
    if not base.exists(RAY_TRAIN_SNAPSHOT):
        return None
    try:
        doc = json.loads(base.read_file(RAY_TRAIN_SNAPSHOT))
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{base.show(base.path)}/{RAY_TRAIN_SNAPSHOT} (Ray Train's record of its "
            f"checkpoints) is unreadable: {e}. Without it, registration cannot be known."
        ) from None
    return doc if isinstance(doc, dict) else None


def _names(results: Any) -> set[str]:
    return {
        r["checkpoint_dir_name"] for r in results if isinstance(r, dict)
        and isinstance(r.get("checkpoint_dir_name"), str)
    } if isinstance(results, list) else set()


def _registered_names(snapshot: dict[str, Any]) -> set[str]:
    latest = snapshot.get("latest_checkpoint_result")
    return _names(snapshot.get("checkpoint_results")) | _names([latest])


def _latest_name(snapshot: dict[str, Any] | None) -> str | None:
    names = _names([snapshot.get("latest_checkpoint_result")]) if snapshot else set()
    return next(iter(names), None)


def _roots_below(
    base: Storage, root: str, filesystem: Any, storage_config: StorageConfig | None
) -> list[tuple[str, int]]:
    roots = []
    for name in sorted(base.list_dirs()):
        below = list_checkpoints(
            join_path(root, name), filesystem=filesystem, storage_config=storage_config
        )
        if below:
            roots.append((name, len(below)))
    return roots


# --- clean ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanDecision:
    checkpoint: RunCheckpoint
    delete: bool
    reason: str


def plan_clean(
    listing: RunListing, *, unregistered: bool = False,
    min_age_secs: float = DEFAULT_MIN_AGE_SECS, now: float | None = None,
) -> list[CleanDecision]:
    """What :func:`clean` would do with each checkpoint of ``listing``, and why.

    Deleted: incomplete saves untouched for ``min_age_secs``; with ``unregistered``, committed
    checkpoints of a Ray Train run that Ray Train has not registered, also untouched for
    ``min_age_secs`` (so that one being registered right now stays). Never deleted: the newest
    committed checkpoint, Ray Train's latest, and (found when deleting) a directory holding
    anything ray_ckpt did not write."""
    now = time.time() if now is None else now
    newest = listing.newest_committed
    return [_decide(c, listing, newest, unregistered, min_age_secs, now)
            for c in listing.checkpoints]


def _decide(
    c: RunCheckpoint, listing: RunListing, newest: RunCheckpoint | None,
    unregistered: bool, min_age_secs: float, now: float,
) -> CleanDecision:
    # a committed checkpoint's age is its commit time's (the marker's, not its files' mtimes,
    # which a copy resets); an incomplete one's is its newest file's
    age = now - (c.entry.created_unix or c.entry.modified_unix)
    young = age < min_age_secs
    if not c.entry.committed:
        if young:
            return CleanDecision(c, False, f"incomplete, but written {age:.0f} s ago: may be "
                                 "a save in progress")
        return CleanDecision(c, True, "incomplete: a save that never committed")
    if c is newest:
        return CleanDecision(c, False, "the newest committed checkpoint")
    if c.entry.name == listing.ray_train_latest:
        return CleanDecision(c, False, "Ray Train's latest checkpoint")
    if c.registered is None or c.registered:
        return CleanDecision(c, False, "registered with Ray Train" if c.registered else
                             "committed")
    if not unregistered:
        return CleanDecision(c, False, "committed, never registered with Ray Train "
                             "(--unregistered deletes it)")
    if young:
        return CleanDecision(c, False, f"never registered, but committed {age:.0f} s ago: "
                             "Ray Train may still register it")
    return CleanDecision(c, True, "committed, never registered with Ray Train")


def clean(
    root: str, *, unregistered: bool = False, dry_run: bool = True,
    min_age_secs: float = DEFAULT_MIN_AGE_SECS, filesystem: Any = None,
    storage_config: StorageConfig | None = None,
) -> list[CleanDecision]:
    """Delete what :func:`plan_clean` decides (unless ``dry_run``); returns the decisions,
    with a checkpoint that could not be deleted (it holds foreign files) marked kept."""
    listing = list_run(root, filesystem=filesystem, storage_config=storage_config)
    decisions = plan_clean(listing, unregistered=unregistered, min_age_secs=min_age_secs)
    base = Storage.from_path(root, filesystem, storage_config)
    done = []
    for d in decisions:
        storage = base.child(d.checkpoint.entry.name)
        foreign = sorted(n for n in storage.list_files() if not is_own_file(n))
        foreign += storage.list_dirs()
        if d.delete and foreign:
            d = CleanDecision(d.checkpoint, False, "holds files ray_ckpt did not write "
                              f"({', '.join(foreign[:3])})")
        elif d.delete and not dry_run:
            delete_storage(storage)
        done.append(d)
    return done

"""Checkpoints under a root: list them, delete one. Used by the manager and the CLI.

Both work on any storage (local paths, URIs, or paths on an explicit ``filesystem``) and name
entries with the path the caller would pass back: ``root`` joined with the directory name, in
the caller's own form (a local path, a URI with its query kept, or a path on ``filesystem``).

Only ray_ckpt's own files are ever deleted: a directory that holds anything ray_ckpt did not
write (see :func:`ray_ckpt.format.names.is_own_file`), subdirectories included, is refused whole.
Deletion removes the commit marker first, so from the first byte deleted on, a reader sees an
incomplete checkpoint and refuses it, never a checkpoint with files missing; it then deletes the
files it listed, by name, and removes the directory only once it is empty, so a file that
appears meanwhile survives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from .config import StorageConfig
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from .format.checks import marker_listing_problems, raise_first
from .format.marker import Marker
from .format.names import MARKER_NAME, is_own_file
from .storage.credentials import redact
from .storage.storage import Storage

_STEP_RE = re.compile(r"^[^\d]*?(\d+)$")


def read_marker(storage: Storage, files: dict[str, int]) -> Marker:
    """The commit marker of ``storage`` (listed in ``files``), its size checked before it is
    read."""
    raise_first(marker_listing_problems(files, MARKER_NAME, storage.display))
    return Marker.from_bytes(storage.read_file(MARKER_NAME), where=storage.display)


@dataclass(frozen=True)
class CheckpointEntry:
    """One checkpoint directory under a root, committed or not."""

    name: str
    path: str  # root joined with name, in the form the caller gave root, user-info redacted
    committed: bool
    step: int | None
    nbytes: int
    created_unix: float | None
    checkpoint_id: str | None
    metadata: dict[str, Any] = field(default_factory=dict)  # saved with save(metadata=...)
    modified_unix: float = 0.0  # newest modification time of its files
    problem: str | None = None  # why its commit marker cannot be read (then not committed)
    tier: str = "durable"  # "memory": a mem:// checkpoint, held in the object store
    copies: int | None = None  # memory tier: the fewest live copies any of its data files has
    nodes: list[str] = field(default_factory=list)  # memory tier: the live nodes holding copies


def step_of(name: str) -> int | None:
    """The step number in a directory name that ends in its only run of digits (``step-000100``
    -> 100, ``checkpoint_000003`` -> 3); None for any other name, so that a timestamp
    (``checkpoint_2026-12-01_04-27-16.045096``) is never read as a step."""
    match = _STEP_RE.search(name)
    return int(match.group(1)) if match else None


def list_checkpoints(
    root: str, *, filesystem: Any = None, storage_config: StorageConfig | None = None
) -> list[CheckpointEntry]:
    """Every directory directly under ``root`` that holds ray_ckpt files, sorted by step then
    name. Directories without a commit marker are listed with ``committed=False``."""
    base = Storage.from_path(root, filesystem, storage_config)
    entries = []
    for name in base.list_dirs():
        entry = describe(base.child(name), path=redact(join_path(root, name)))
        if entry is not None:
            entries.append(entry)
    # the memory tier's filesystem says where each checkpoint's copies are
    copies_under = getattr(getattr(base.fs, "handler", None), "copies_under", None)
    if copies_under is not None:
        held = copies_under(base.path)
        for i, e in enumerate(entries):
            copies, nodes = held.get(e.name, (0, []))
            entries[i] = replace(e, tier="memory", copies=copies, nodes=nodes)
    return sorted(entries, key=lambda e: (e.step is None, e.step or 0, e.name))


def join_path(root: str, name: str) -> str:
    """``root``/``name``, keeping a URI's query (``s3://b/run?region=x`` -> ``s3://b/run/n?region=x``)."""
    base, sep, query = root.partition("?") if "://" in root else (root, "", "")
    scheme, colon, rest = base.rpartition("://")
    joined = f"{rest.rstrip('/')}/{name}" if rest or not colon else name  # mem:// -> mem://n
    return f"{scheme}{colon}{joined}{sep}{query}"


def describe(storage: Storage, *, path: str | None = None) -> CheckpointEntry | None:
    """What ``storage`` holds: a checkpoint entry, or None when it holds no ray_ckpt file.
    ``path`` is how the entry names it (default: ``storage.display``)."""
    files = storage.list_files()
    own = {n: size for n, size in files.items() if is_own_file(n)}
    if not own:
        return None
    name = storage.path.rstrip("/").rsplit("/", 1)[-1]
    marker = None
    problem = None
    if MARKER_NAME in own:
        try:
            marker = read_marker(storage, files)
        except CorruptCheckpointError as e:
            problem = str(e)
    return CheckpointEntry(
        name=name,
        path=path or storage.display,
        committed=marker is not None,
        step=step_of(name),
        nbytes=marker.total_nbytes if marker else sum(own.values()),
        created_unix=marker.created_unix if marker else None,
        checkpoint_id=marker.checkpoint_id if marker else None,
        metadata=marker.metadata if marker else {},
        modified_unix=max(
            (t for n, t in storage.list_mtimes().items() if n in own), default=0.0
        ),
        problem=problem,
    )


def delete_checkpoint(
    path: str, *, filesystem: Any = None, storage_config: StorageConfig | None = None
) -> None:
    """Delete the checkpoint (committed or not) at ``path``: marker first, then its files,
    then the directory. Refuses a directory holding anything ray_ckpt did not write; raises
    :class:`~ray_ckpt.errors.CheckpointNotFoundError` when ``path`` does not exist."""
    storage = Storage.from_path(path, filesystem, storage_config)
    delete_storage(storage)


def delete_storage(storage: Storage) -> None:
    if storage.is_file():
        raise CheckpointError(
            f"refusing to delete {storage.display}: it is a file, not a checkpoint directory"
        )
    files = storage.list_files()
    if not files and not storage.exists():
        raise CheckpointNotFoundError(
            f"nothing to delete at {storage.display}: the path does not exist"
        )
    foreign = sorted(n for n in files if not is_own_file(n)) + storage.list_dirs()
    if foreign:
        raise CheckpointError(
            f"refusing to delete {storage.display}: it holds files ray_ckpt did not write "
            f"({', '.join(foreign[:5])}). Delete them yourself if they are not needed."
        )
    if MARKER_NAME in files:
        storage.delete_files([MARKER_NAME])
        storage.sync_dir()
    storage.delete_files(sorted(n for n in files if n != MARKER_NAME))
    if not storage.remove_empty_dir():
        raise CheckpointError(
            f"deleted the checkpoint files of {storage.display}, but the directory is not empty: "
            "something wrote into it meanwhile and was left alone. Delete it yourself if it is "
            "not needed."
        )

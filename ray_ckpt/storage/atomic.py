"""Commit atomicity: how the commit marker is made visible all at once. ``RenameCommit`` on
filesystems (write a temporary sibling, fsync, rename or link), ``PutCommit`` on object stores
(one PUT is atomic; they cannot rename); ``commit_strategy_for`` picks one for a filesystem."""

from __future__ import annotations

import abc
import os
from typing import Any

from ..errors import CheckpointExistsError
from .classify import is_object_store
from .storage import Storage


def commit_strategy_for(fs: Any) -> CommitStrategy:
    """:class:`PutCommit` on object stores, :class:`RenameCommit` everywhere else (see the
    module docstring for why an unknown filesystem gets the rename)."""
    return PutCommit() if is_object_store(fs) else RenameCommit()


class CommitStrategy(abc.ABC):
    """How the commit marker makes a checkpoint exist. Called once, after every data file and
    the manifest are durable. With ``exclusive``, an existing marker is never replaced: the
    commit fails with :class:`~ray_ckpt.errors.CheckpointExistsError` instead, so of two saves
    racing to one path exactly one wins."""

    @abc.abstractmethod
    def commit(
        self, storage: Storage, marker_name: str, marker: bytes, temp_name: str, *, exclusive: bool
    ) -> None:
        ...


def _exists_error(storage: Storage) -> CheckpointExistsError:
    return CheckpointExistsError(
        f"another save committed a checkpoint at {storage.display} first; nothing of this save "
        "was committed. Pass overwrite=True to replace it, or save to a new path."
    )


class RenameCommit(CommitStrategy):
    """Filesystems with atomic rename: write the marker to ``temp_name`` and fsync it, then
    rename it over ``marker_name`` (an atomic replace) or, when ``exclusive``, hard-link it there
    (an atomic create that fails if the marker exists); then fsync the directory."""

    def commit(
        self, storage: Storage, marker_name: str, marker: bytes, temp_name: str, *, exclusive: bool
    ) -> None:
        storage.sync_dir()
        storage.write_file(temp_name, [marker], fsync=True)
        src, dst = storage._join(temp_name), storage._join(marker_name)
        try:
            if storage.is_local and exclusive:
                try:
                    storage.call("link", src, lambda: os.link(src, dst))
                except FileExistsError:
                    raise _exists_error(storage) from None
                storage.delete_files([temp_name])
            elif storage.is_local:
                storage.call("rename", src, lambda: os.replace(src, dst))
            else:
                if exclusive and storage.exists(marker_name):
                    raise _exists_error(storage)
                storage.call("rename", src, lambda: storage.fs.move(src, dst))
        except BaseException:
            storage.delete_files([temp_name])
            raise
        storage.sync_dir()


class PutCommit(CommitStrategy):
    """Object stores: the marker is uploaded last, in one PUT, which is atomic. (``exclusive``
    checks for an existing marker first; object stores offer no atomic create through
    ``pyarrow.fs``, so two saves racing within that window both succeed and the last wins.)"""

    def commit(
        self, storage: Storage, marker_name: str, marker: bytes, temp_name: str, *, exclusive: bool
    ) -> None:
        if exclusive and storage.exists(marker_name):
            raise _exists_error(storage)
        storage.write_file(marker_name, [marker], fsync=False)

"""``CheckpointManager``: step-numbered checkpoints under a root, and which of them to keep.

For jobs without Ray Train (a script under ``ray job submit``, a notebook)::

    manager = CheckpointManager("s3://bucket/run", ckptr, keep_last=3, keep_every=1000)
    manager.save(step, state, metrics={"loss": loss})
    step = manager.latest()                    # newest committed step, or None
    manager.load(state_dict=target)            # the latest, in place

State lives on storage only: checkpoints are ``<root>/step-<step:09d>`` directories, and the
metrics of each are kept in its commit marker (``save(metadata=...)``), so a new manager on the
same root, in another process or after a restart, sees exactly the same steps and metrics.

Retention, applied after each save has committed and never before: a committed checkpoint is
kept when any rule keeps it (``keep_last`` newest, every ``keep_every``-th step, the
``keep_best`` best by ``metric`` in ``mode``); with no rule, all are kept. The newest committed
checkpoint is always kept, and a save in flight is never touched. Directories of saves that
crashed before their commit are deleted by :meth:`cleanup` once no file in them has changed for
``incomplete_grace_secs`` (another process may still be writing a younger one).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from .catalog import CheckpointEntry, delete_checkpoint, join_path, list_checkpoints
from .catalog import step_of as _step_of_dir_name
from .checkpointer import AsyncCheckpointer, Checkpointer
from .errors import CheckpointError, CheckpointNotFoundError
from .storage.credentials import redact
from .storage.storage import Storage

logger = logging.getLogger(__name__)

_METRICS_KEY = "metrics"


class CheckpointManager:
    """Saves step-numbered checkpoints under ``root`` and applies retention rules.

    Args:
        root: directory (local path or URI) that holds one directory per step.
        checkpointer: a sync or async checkpointer; with an async one, :meth:`save` returns
            its futures and retention runs once the save has committed.
        keep_last: keep the newest N committed checkpoints.
        keep_every: keep every checkpoint whose step is a multiple of K.
        keep_best: keep the best N checkpoints by ``metric``.
        metric: name of the metric (in ``save(metrics=...)``) that ``keep_best`` and
            :meth:`best` rank by.
        mode: ``"min"`` or ``"max"``: whether a smaller or a larger metric is better.
        filesystem: a ``pyarrow.fs.FileSystem`` for ``root`` (else resolved from it).
        incomplete_grace_secs: how long an uncommitted directory must have been left alone
            before :meth:`cleanup` deletes it.
    """

    def __init__(
        self,
        root: str,
        checkpointer: Checkpointer,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: int | None = None,
        metric: str | None = None,
        mode: str = "min",
        filesystem: Any = None,
        incomplete_grace_secs: float = 600.0,
    ) -> None:
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every),
                            ("keep_best", keep_best)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if keep_best is not None and metric is None:
            raise ValueError("keep_best needs metric=<name of the metric to rank by>")
        self.root = root
        self._ckptr = checkpointer
        self._keep_last = keep_last
        self._keep_every = keep_every
        self._keep_best = keep_best
        self._metric = metric
        self._mode = mode
        self._filesystem = filesystem
        self._grace = incomplete_grace_secs
        self._in_flight: str | None = None

    # --- paths --------------------------------------------------------------------------------

    @staticmethod
    def dir_name(step: int) -> str:
        return f"step-{step:09d}"

    def path(self, step: int) -> str:
        """Where the checkpoint of ``step`` lives."""
        return join_path(self.root, self.dir_name(step))

    # --- saving -------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state_dict: dict[Any, Any],
        metrics: dict[str, Any] | None = None,
        **save_kwargs: Any,
    ) -> Any:
        """Save ``state_dict`` as step ``step``; apply retention once it has committed.

        Returns what the checkpointer's ``save`` returns: None (sync) or the
        ``(stage_future, write_future)`` pair (async)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.wait()  # the previous save has committed (or raised) and retention ran
        path = self.path(step)
        metadata = {_METRICS_KEY: dict(metrics or {}), "step": step}
        self._in_flight = path
        try:
            result = self._ckptr.save(path, state_dict, metadata=metadata, **save_kwargs)
        except BaseException:
            self._in_flight = None
            raise
        if not isinstance(self._ckptr, AsyncCheckpointer):
            self._in_flight = None
            self.apply_retention()
        return result

    def wait(self) -> None:
        """Wait for an async save in flight, then apply retention. Raises the save's error."""
        if self._in_flight is None:
            return
        try:
            if isinstance(self._ckptr, AsyncCheckpointer):
                self._ckptr.wait()
        finally:
            self._in_flight = None
        self.apply_retention()

    # --- what is there ------------------------------------------------------------------------

    def entries(self) -> list[CheckpointEntry]:
        """Every step directory under the root, committed or not, oldest step first."""
        return [
            e for e in list_checkpoints(self.root, filesystem=self._filesystem)
            if e.step is not None and e.name == self.dir_name(e.step)
        ]

    def steps(self) -> list[int]:
        """The committed steps, oldest first."""
        return [e.step for e in self.entries() if e.committed and e.step is not None]

    def latest(self) -> int | None:
        """The newest committed step, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def metrics(self, step: int) -> dict[str, Any]:
        """The metrics saved with ``step``."""
        for entry in self.entries():
            if entry.step == step and entry.committed:
                return dict(entry.metadata.get(_METRICS_KEY, {}))
        raise CheckpointNotFoundError(
            f"no committed checkpoint of step {step} under {redact(self.root)}"
        )

    def best(self) -> int | None:
        """The committed step with the best ``metric`` (None when none has it)."""
        if self._metric is None:
            raise CheckpointError("best() needs CheckpointManager(metric=..., mode=...)")
        ranked = self._ranked([e for e in self.entries() if e.committed])
        return ranked[0].step if ranked else None

    def load(self, step: int | None = None, state_dict: Any = None, **load_kwargs: Any) -> Any:
        """Load step ``step`` (default: the latest committed) like ``Checkpointer.load``."""
        if step is None:
            step = self.latest()
            if step is None:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint under {redact(self.root)}"
                )
        return self._ckptr.load(self.path(step), state_dict, **load_kwargs)

    # --- retention ----------------------------------------------------------------------------

    def apply_retention(self) -> list[int]:
        """Delete the committed checkpoints no rule keeps; returns their steps."""
        committed = [e for e in self.entries() if e.committed]
        if not committed or not (self._keep_last or self._keep_every or self._keep_best):
            return []
        keep = {committed[-1].step}  # the newest committed checkpoint, always
        if self._keep_last:
            keep.update(e.step for e in committed[-self._keep_last:])
        if self._keep_every:
            keep.update(
                e.step for e in committed if e.step is not None and e.step % self._keep_every == 0
            )
        if self._keep_best:
            keep.update(e.step for e in self._ranked(committed)[: self._keep_best])
        deleted = []
        for entry in committed:
            path = self._path_of(entry)
            if entry.step not in keep and path != self._in_flight:
                delete_checkpoint(path, filesystem=self._filesystem)
                deleted.append(entry.step)
        if deleted:
            logger.info("retention deleted steps %s under %s", deleted, redact(self.root))
        return [s for s in deleted if s is not None]

    def cleanup(self) -> list[str]:
        """Delete directories of saves that never committed and have been left alone for
        ``incomplete_grace_secs``; returns their paths."""
        now = time.time()
        removed = []
        for entry in self.entries():
            path = self._path_of(entry)
            if entry.committed or path == self._in_flight:
                continue
            if now - entry.modified_unix < self._grace:
                continue
            delete_checkpoint(path, filesystem=self._filesystem)
            removed.append(entry.path)
        removed += self._remove_empty_step_dirs(now)
        if removed:
            logger.info(
                "removed %d incomplete checkpoint(s) under %s", len(removed), redact(self.root)
            )
        return removed

    def _remove_empty_step_dirs(self, now: float) -> list[str]:
        """Step directories left empty (a save that failed and deleted its files, or died
        before writing any), untouched for ``incomplete_grace_secs``."""
        base = Storage.from_path(self.root, self._filesystem)
        removed = []
        for name in base.list_dirs():
            step = _step_of_dir_name(name)
            path = join_path(self.root, name)
            if step is None or name != self.dir_name(step) or path == self._in_flight:
                continue
            storage = base.child(name)
            mtime = storage.fs.get_file_info(storage.path).mtime
            if mtime is not None and now - mtime.timestamp() < self._grace:
                continue
            if not storage.list_files() and not storage.list_dirs() and storage.remove_empty_dir():
                removed.append(redact(path))
        return removed

    def _path_of(self, entry: CheckpointEntry) -> str:
        """Where ``entry`` lives, as a path to pass on (``entry.path`` is for display: it has
        a URI's user-info redacted)."""
        return join_path(self.root, entry.name)

    def _ranked(self, entries: list[CheckpointEntry]) -> list[CheckpointEntry]:
        assert self._metric is not None
        scored = []
        for entry in entries:
            value = entry.metadata.get(_METRICS_KEY, {}).get(self._metric)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if is_number and math.isfinite(value):
                scored.append((value if self._mode == "min" else -value, -(entry.step or 0), entry))
        return [entry for *_, entry in sorted(scored, key=lambda t: t[:2])]

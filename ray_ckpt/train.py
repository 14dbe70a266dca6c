"""Ray Train (v2) integration: every rank saves through ray_ckpt into the run's storage, and the
checkpoint is reported to Ray Train; a restarted run resumes from Ray Train's latest one.

Inside ``train_loop_per_worker``::

    import ray_ckpt.train

    state = {"model": model, "optim": optimizer, "step": -1}
    ray_ckpt.train.load(state)           # in place, from Ray Train's latest checkpoint, if any
    for step in range(state["step"] + 1, num_steps):
        ...                              # train
        state["step"] = step
        ray_ckpt.train.report({"loss": loss.item()}, state)    # on every rank

A report, on every rank (all ranks call it, as they call ``ray.train.report``)::

    (all ranks) name    broadcast_from_rank_zero(a fresh checkpoint dir name): every rank saves
                        into <experiment dir>/<name> on the storage of RunConfig(storage_path,
                        storage_filesystem), as Ray Train's StorageContext resolves it
    (all ranks) stage   AsyncCheckpointer.save(dest, state) with this rank's RankInfo from Ray
                        Train's context; returns once the state is in the object store, so the
                        caller may step its optimizer at once
    (writers)   write   the writer actors write the data files straight into dest; the
                        checkpoint's coordinator commits once every rank's data is durable
    (all ranks) report  ray.train.report(metrics, Checkpoint(dest), checkpoint_dir_name=name,
                        checkpoint_upload_mode=SYNC or ASYNC, checkpoint_upload_fn=<wait for the
                        commit>, delete_local_checkpoint_after_upload=False)

No byte is copied twice: the data is already where Ray Train keeps checkpoints, so the "upload"
Ray Train runs (on the caller's thread for SYNC, on its upload thread for ASYNC) waits for the
commit and returns the persisted ``ray.train.Checkpoint``. Ray Train therefore registers a
checkpoint only once it is committed; a save that fails on any rank fails the upload on every
rank, which fails the run attempt (and ``FailureConfig`` decides whether to restart it).

Ray Train owns the checkpoints from then on: ``CheckpointConfig(num_to_keep,
checkpoint_score_attribute)`` deletes a checkpoint by deleting its directory, which holds nothing
but ray_ckpt's files. A save that a crash interrupts is never registered; it leaves at most a
directory without a commit marker (emptied when the writer actors discard its files), which
ray_ckpt refuses to load.

Loading reads ``ray.train.get_checkpoint()`` (Ray Train hands the latest registered checkpoint
to every worker it restarts) on each rank with its own ``RankInfo``, so rank *r* gets rank *r*'s
state back (rank-local keys, see ``CheckpointStagerConfig.rank_local_keys``).

Values that have ``state_dict()`` and ``load_state_dict()`` (modules, optimizers, LR schedulers:
PyTorch DCP's ``Stateful``) are saved as their ``state_dict()`` and restored through
``load_state_dict()``, as by any ray_ckpt save and load (:mod:`ray_ckpt._stateful`). A module
wrapped in ``DistributedDataParallel`` is saved under its unwrapped names, so a run saved with N
DDP workers resumes with 1 (where ``prepare_model`` does not wrap) and back. ``load`` is strict
for these objects by default: a checkpoint that lacks their keys fails the load instead of
letting training go on from fresh weights.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

import pyarrow.fs as pafs
import ray.train
from ray.train import CheckpointUploadMode, collective

from ._stateful import is_stateful
from .builder import make_async_checkpointer
from .catalog import describe
from .checkpointer import AsyncCheckpointer, missing_keys_error
from .config import CheckpointerConfig
from .errors import CheckpointError
from .futures import CheckpointFuture
from .save.protocol import SaveResult
from .storage.memory import SCHEME
from .storage.storage import Storage
from .tiers import DURABLE, MEMORY, Source, candidates, choose
from .types import STATE_DICT, RankInfo

logger = logging.getLogger(__name__)

UploadMode = CheckpointUploadMode | str


class TrainCheckpointer:
    """Saves and restores a Ray Train worker's state through ray_ckpt (see the module docstring).

    One per training process; :func:`report` and :func:`load` use a default one per config.

    Args:
        config: the ray_ckpt configuration (e.g. ``rank_local_keys`` for per-rank state).
        checkpoint_upload_mode: ``"sync"`` (``report`` returns once the checkpoint is committed
            and reported) or ``"async"`` (``report`` returns once the state is staged; the
            commit and the report to Ray Train follow in the background). Ray Train's
            ``CheckpointUploadMode.SYNC`` / ``ASYNC`` are accepted too.
    """

    def __init__(
        self,
        config: CheckpointerConfig | None = None,
        *,
        checkpoint_upload_mode: UploadMode = CheckpointUploadMode.SYNC,
    ) -> None:
        self._config = config or CheckpointerConfig()
        self._mode = _upload_mode(checkpoint_upload_mode)
        self._checkpointers: list[tuple[pafs.FileSystem, AsyncCheckpointer]] = []
        self._lock = threading.Lock()

    def report(
        self,
        metrics: Mapping[str, Any],
        state_dict: Mapping[str, Any],
        *,
        checkpoint_upload_mode: UploadMode | None = None,
        checkpoint_dir_name: str | None = None,
        allow_pickle: bool = False,
    ) -> CheckpointFuture[SaveResult]:
        """Save this rank's ``state_dict`` as a checkpoint of the run and report it with
        ``metrics`` (rank 0's metrics are the ones Ray Train keeps). Every rank must call it.

        Returns the save's write future: done already in ``"sync"`` mode; in ``"async"`` mode it
        resolves once the checkpoint is committed (Ray Train reports it right after).
        """
        mode = self._mode if checkpoint_upload_mode is None else _upload_mode(
            checkpoint_upload_mode
        )
        storage = _run_storage()
        name = collective.broadcast_from_rank_zero(
            checkpoint_dir_name or storage.make_default_checkpoint_dir_name()
        )
        path = storage.build_checkpoint_path_from_name(name)
        filesystem = storage.storage_filesystem
        ckptr = self._checkpointer(filesystem)
        stage, write = ckptr.save(path, _to_state_dicts(state_dict), allow_pickle=allow_pickle)
        stage.result()  # the caller may change its tensors from here on
        ray.train.report(
            dict(metrics),
            checkpoint=ray.train.Checkpoint(path, filesystem),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=False,  # it is the checkpoint itself
            checkpoint_upload_fn=_AwaitCommit(write, name, path, filesystem),
        )
        return write

    def save_to_memory(
        self, state_dict: Mapping[str, Any], step: int, *, allow_pickle: bool = False
    ) -> CheckpointFuture[SaveResult]:
        """Save this rank's ``state_dict`` as memory checkpoint ``step`` of the run (see
        :mod:`ray_ckpt.storage.memory`); not reported to Ray Train. Every rank must call it. Returns
        once the state is staged; the write future resolves once it is held and replicated."""
        path = f"{memory_root(_run_storage())}/step-{step:09d}"
        ckptr = self._checkpointer(_run_storage().storage_filesystem)
        stage, write = ckptr.save(
            path, _to_state_dicts(state_dict), allow_pickle=allow_pickle,
            metadata={"step": step},
        )
        stage.result()
        return write

    def load(
        self,
        state_dict: Mapping[str, Any] | None = None,
        *,
        checkpoint: ray.train.Checkpoint | None = None,
        strict: bool | None = None,
        default_map_location: Any = None,
        allow_pickle: bool = False,
    ) -> STATE_DICT | None:
        """Load Ray Train's latest checkpoint (or ``checkpoint``) on this rank; ``None`` when
        the run has none yet.

        With ``state_dict``, only its keys, in place, as :meth:`ray_ckpt.Checkpointer.load`:
        tensors are filled, other values replaced in ``state_dict`` itself (``{"step": -1}``
        becomes the saved step), and modules, optimizers and other objects with
        ``load_state_dict`` get their state through it. ``strict=None`` (the default) raises
        :class:`~ray_ckpt.errors.MissingKeysError` when the checkpoint lacks a key of such an object
        (or the object itself), so that training never goes on from untrained weights; plain
        values the checkpoint lacks keep theirs. ``strict=True`` raises for any missing key,
        ``strict=False`` for none (a dict none of whose keys match still raises). Returns the
        loaded state dict.
        """
        path, filesystem = _newest(checkpoint)
        if path is None:
            return None
        target = None if state_dict is None else _load_target(state_dict)
        ckptr = self._checkpointer(filesystem)
        loaded, missing = ckptr._load_and_missing(
            path,
            target,
            default_map_location=default_map_location,
            allow_pickle=allow_pickle,
        )
        if target is not None and target is not state_dict and isinstance(
            state_dict, MutableMapping
        ):
            state_dict.update(target)
        required = missing if strict else _of_stateful(missing, target) if strict is None else []
        if required:
            raise missing_keys_error(path, required)
        return loaded

    def close(self) -> None:
        """Wait for a save in flight and release the checkpointers. Idempotent."""
        with self._lock:
            checkpointers, self._checkpointers = self._checkpointers, []
        for _, ckptr in checkpointers:
            ckptr.close()

    def _checkpointer(self, filesystem: pafs.FileSystem) -> AsyncCheckpointer:
        with self._lock:
            for fs, ckptr in self._checkpointers:
                if fs is filesystem or fs.equals(filesystem):
                    return ckptr
            ckptr = make_async_checkpointer(
                config=self._config, rank_info=_rank_info(), filesystem=filesystem
            )
            self._checkpointers.append((filesystem, ckptr))
            return ckptr

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AwaitCommit:
    """The ``checkpoint_upload_fn`` Ray Train runs: the files are in place already, so the
    upload is the commit. Waiting again (Ray Train retries an upload that failed) raises the same
    error again."""

    def __init__(
        self,
        write: CheckpointFuture[SaveResult],
        name: str,
        path: str,
        filesystem: pafs.FileSystem,
    ) -> None:
        self._write = write
        self._name = name
        self._path = path
        self._filesystem = filesystem

    def __call__(
        self, checkpoint: ray.train.Checkpoint, checkpoint_dir_name: str
    ) -> ray.train.Checkpoint:
        if checkpoint_dir_name != self._name:
            raise CheckpointError(
                f"Ray Train reports checkpoint {checkpoint_dir_name!r}, but this rank saved to "
                f"{self._path}: pass the same checkpoint_dir_name on every rank (or none)"
            )
        self._write.result()
        return ray.train.Checkpoint(self._path, self._filesystem)


def _upload_mode(mode: UploadMode) -> CheckpointUploadMode:
    if isinstance(mode, str):
        try:
            mode = CheckpointUploadMode(mode.upper())
        except ValueError:
            raise ValueError(
                f"checkpoint_upload_mode must be 'sync' or 'async', got {mode!r}"
            ) from None
    if mode not in (CheckpointUploadMode.SYNC, CheckpointUploadMode.ASYNC):
        raise ValueError(
            f"checkpoint_upload_mode must be SYNC or ASYNC, got {mode}: ray_ckpt writes the "
            "checkpoint into the run's storage itself, so there is always a commit to wait for"
        )
    return mode


def _run_storage() -> Any:
    """The run's StorageContext (filesystem, experiment path, checkpoint names)."""
    context = ray.train.get_context()
    try:
        return context.get_storage()
    except NotImplementedError as e:
        raise CheckpointError(
            "ray_ckpt.train.report needs the run's storage, which Ray Train's local mode does "
            "not have: run the trainer with ScalingConfig(num_workers >= 1), or save with "
            "ray_ckpt.make_sync_checkpointer() outside Ray Train"
        ) from e


def memory_root(storage: Any) -> str:
    """The run's memory checkpoints: ``mem://<experiment>-<hash of its storage path>``."""
    experiment = str(storage.experiment_fs_path).rstrip("/")
    digest = hashlib.sha1(experiment.encode()).hexdigest()[:10]
    return f"{SCHEME}{experiment.rsplit('/', 1)[-1]}-{digest}"


def _newest(checkpoint: ray.train.Checkpoint | None) -> tuple[str | None, Any]:
    """What to load: ``checkpoint`` when given; else the newer (by commit time) of Ray Train's
    latest checkpoint and the run's newest memory checkpoint that is held whole. Rank 0
    decides, for every rank."""
    if checkpoint is not None:
        return checkpoint.path, checkpoint.filesystem
    registered = ray.train.get_checkpoint()
    choice: tuple[str | None, Any] = (None, None)
    if ray.train.get_context().get_world_rank() == 0:
        choice = _choose(registered)
    path = collective.broadcast_from_rank_zero(choice[0])
    if registered is not None and path == registered.path:
        return path, registered.filesystem
    return path, _run_storage().storage_filesystem  # (a mem:// path ignores it)


def _choose(registered: ray.train.Checkpoint | None) -> tuple[str | None, Any]:
    sources = []
    if registered is not None:
        entry = describe(Storage.from_path(registered.path, registered.filesystem))
        if entry is not None and entry.committed:
            sources.append(Source(registered.path, DURABLE, None, entry.created_unix or 0.0))
    try:
        sources += candidates([memory_root(_run_storage())])
    except CheckpointError as e:  # no memory tier: Ray Train's checkpoint it is
        logger.info("no memory checkpoint of this run: %s", e)
    sources.sort(key=lambda s: (s.created_unix, s.tier == MEMORY), reverse=True)
    if not sources:
        return None, None
    source, where, _ = choose(sources)
    logger.info(
        "resuming from %s (%s): the newest committed checkpoint of the run%s", source.path,
        where, "" if registered is None else f" (Ray Train's latest: {registered.path})",
    )
    return source.path, None


def _rank_info() -> RankInfo:
    context = ray.train.get_context()
    return RankInfo(context.get_world_rank(), context.get_world_size())


def _to_state_dicts(state_dict: Mapping[str, Any]) -> STATE_DICT:
    """``state_dict`` as a dict; its modules, optimizers, ... are saved as their state dicts
    (a DDP-wrapped module under its unwrapped names) by the save itself."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a dict (of tensors, state dicts, modules, optimizers, ...), "
            f"got {type(state_dict).__qualname__}"
        )
    return dict(state_dict)


def _load_target(state_dict: Mapping[str, Any]) -> STATE_DICT:
    """The dict to load into: ``state_dict`` itself when it is a dict."""
    if isinstance(state_dict, dict):
        return state_dict
    return _to_state_dicts(state_dict)


def _of_stateful(missing: list[str], target: STATE_DICT | None) -> list[str]:
    """The missing keys that belong to a top-level module, optimizer or other stateful object."""
    prefixes = [str(k) for k, v in (target or {}).items() if is_stateful(v)]
    return [m for m in missing if any(m == p or m.startswith(p + ".") for p in prefixes)]


_defaults: dict[CheckpointerConfig, TrainCheckpointer] = {}
_defaults_lock = threading.Lock()


def _default(config: CheckpointerConfig | None) -> TrainCheckpointer:
    """This process's checkpointer for ``config`` (a Ray Train worker runs one run)."""
    config = config or CheckpointerConfig()
    with _defaults_lock:
        if config not in _defaults:
            _defaults[config] = TrainCheckpointer(config)
        return _defaults[config]


def report(
    metrics: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    *,
    checkpoint_upload_mode: UploadMode = CheckpointUploadMode.SYNC,
    checkpoint_dir_name: str | None = None,
    allow_pickle: bool = False,
    config: CheckpointerConfig | None = None,
) -> CheckpointFuture[SaveResult]:
    """Save this rank's state into the run's storage and report it to Ray Train with
    ``metrics``; see :meth:`TrainCheckpointer.report`. Call it on every rank."""
    return _default(config).report(
        metrics,
        state_dict,
        checkpoint_upload_mode=checkpoint_upload_mode,
        checkpoint_dir_name=checkpoint_dir_name,
        allow_pickle=allow_pickle,
    )


def save_to_memory(
    state_dict: Mapping[str, Any],
    step: int,
    *,
    allow_pickle: bool = False,
    config: CheckpointerConfig | None = None,
) -> CheckpointFuture[SaveResult]:
    """Save this rank's state as memory checkpoint ``step`` of the run; see
    :meth:`TrainCheckpointer.save_to_memory`. Call it on every rank."""
    return _default(config).save_to_memory(state_dict, step, allow_pickle=allow_pickle)


def load(
    state_dict: Mapping[str, Any] | None = None,
    *,
    checkpoint: ray.train.Checkpoint | None = None,
    strict: bool | None = None,
    default_map_location: Any = None,
    allow_pickle: bool = False,
    config: CheckpointerConfig | None = None,
) -> STATE_DICT | None:
    """Load Ray Train's latest checkpoint into ``state_dict`` on this rank (``None`` when there
    is none); see :meth:`TrainCheckpointer.load`."""
    return _default(config).load(
        state_dict,
        checkpoint=checkpoint,
        strict=strict,
        default_map_location=default_map_location,
        allow_pickle=allow_pickle,
    )


__all__ = ["TrainCheckpointer", "load", "memory_root", "report", "save_to_memory"]

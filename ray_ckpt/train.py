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

Top-level values that have ``state_dict()`` and ``load_state_dict()`` (modules, optimizers, LR
schedulers: PyTorch DCP's ``Stateful``) are saved as their ``state_dict()`` and restored through
``load_state_dict()``. A module (or any other such object) is loaded in place into its own
``state_dict()`` tensors; an optimizer's state is read whole, because a fresh optimizer's
``state_dict()`` has no state tensors yet to load into, and ``load_state_dict`` moves it to the
parameters' devices.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

import pyarrow.fs as pafs
import ray.train
import torch
from ray.train import CheckpointUploadMode, collective

from .builder import make_async_checkpointer
from .checkpointer import AsyncCheckpointer
from .config import CheckpointerConfig
from .coordinator import SaveResult
from .errors import CheckpointError
from .futures import CheckpointFuture
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

    def load(
        self,
        state_dict: Mapping[str, Any] | None = None,
        *,
        checkpoint: ray.train.Checkpoint | None = None,
        strict: bool = False,
        default_map_location: Any = None,
        allow_pickle: bool = False,
    ) -> STATE_DICT | None:
        """Load Ray Train's latest checkpoint (or ``checkpoint``) on this rank; ``None`` when
        the run has none yet.

        With ``state_dict``, only its keys, in place, as :meth:`ray_ckpt.Checkpointer.load`
        (``strict=True`` raises :class:`~ray_ckpt.errors.MissingKeysError` naming missing keys):
        tensors are filled, other values replaced in ``state_dict`` itself (``{"step": -1}``
        becomes the saved step), and objects with ``load_state_dict`` get their state through
        it. Returns the loaded state dict (an object's entry holds the state dict it was given).
        """
        if checkpoint is None:
            checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        target, stateful = _load_targets(state_dict)
        ckptr = self._checkpointer(checkpoint.filesystem)
        loaded = ckptr.load(
            checkpoint.path,
            target,
            strict=strict,
            default_map_location=default_map_location,
            allow_pickle=allow_pickle,
        )
        for key, value in state_dict.items() if state_dict is not None else ():
            if key in stateful:
                if loaded.get(key) is not None:  # None: not in the checkpoint (strict=False)
                    value.load_state_dict(loaded[key])
            elif isinstance(state_dict, MutableMapping):
                state_dict[key] = loaded[key]
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


def _rank_info() -> RankInfo:
    context = ray.train.get_context()
    return RankInfo(context.get_world_rank(), context.get_world_size())


def _is_stateful(value: Any) -> bool:
    return callable(getattr(value, "state_dict", None)) and callable(
        getattr(value, "load_state_dict", None)
    )


def _to_state_dicts(state_dict: Mapping[str, Any]) -> STATE_DICT:
    """``state_dict`` with every top-level stateful object replaced by its ``state_dict()``."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a dict (of tensors, state dicts, modules, optimizers, ...), "
            f"got {type(state_dict).__qualname__}"
        )
    return {k: v.state_dict() if _is_stateful(v) else v for k, v in state_dict.items()}


def _load_targets(
    state_dict: Mapping[str, Any] | None,
) -> tuple[STATE_DICT | None, dict[str, Any]]:
    """The target to load into, and the stateful objects to hand their state afterwards."""
    if state_dict is None:
        return None, {}
    stateful = {k: v for k, v in state_dict.items() if _is_stateful(v)}
    target = {k: _load_target(v) if k in stateful else v for k, v in state_dict.items()}
    return target, stateful


def _load_target(obj: Any) -> Any:
    """An optimizer's state is read whole (None); anything else in place into its state dict."""
    return None if isinstance(obj, torch.optim.Optimizer) else obj.state_dict()


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


def load(
    state_dict: Mapping[str, Any] | None = None,
    *,
    checkpoint: ray.train.Checkpoint | None = None,
    strict: bool = False,
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


__all__ = ["TrainCheckpointer", "load", "report"]

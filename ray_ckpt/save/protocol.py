"""The messages that cross between a save's processes, and the handles they cross through.

A leaf of the save path: it imports nothing else of ``save/``, so the caller's pipeline, the
writer actor, the commit and the barrier all type their calls with it. In the order a save
sends them: the pipeline sends a :class:`SaveRequest` to the writer actor of its node
(``run_save``), each write returns a :class:`ShardResult`, the pipeline ends staging with a
:class:`StagingOutcome` (``end_staging``; a :class:`StageStats` is the stage future's result);
a multi-rank save's writer sends a :class:`RankReport` to the checkpoint's barrier actor; the
commit writes a :class:`CommitTarget` and answers a :class:`SaveResult`. :class:`WriterHook`
runs around the commit; the handles (:class:`WriterHandle`, :class:`BarrierHandle`) name the
actor methods callers use.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray

from ..errors import CheckpointError, CheckpointWriteError
from ..format.manifest import Extent, ItemMeta
from ..storage.storage import Storage
from ..types import RankInfo


class RemoteMethod(Protocol):
    """A method of a Ray actor handle: ``.remote(...)`` runs it in the actor, returns its ref."""

    def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef: ...

    def options(self, **options: Any) -> RemoteMethod: ...


class BarrierHandle(Protocol):
    """A checkpoint's multi-rank barrier (:class:`ray_ckpt.save.barrier.Barrier`): the calls
    its ranks make, each returning the call's ``ObjectRef``."""

    def join(self, rank: int, alive: list[ray.ObjectRef]) -> ray.ObjectRef: ...
    def assign(self, rank: int, keys: list[tuple[str, int]]) -> ray.ObjectRef: ...
    def arrive(self, handoff: Any, report: RankReport) -> ray.ObjectRef: ...
    def fail(self, rank: int, error: BaseException) -> ray.ObjectRef: ...
    def status(self) -> ray.ObjectRef: ...


class WriterHandle(Protocol):
    """The handle (a ``ray.actor.ActorHandle``) of a node's writer actor
    (:mod:`ray_ckpt.save.writer`): the methods the caller and the pool call on it."""

    @property
    def _actor_id(self) -> ray.ActorID: ...
    @property
    def node_id(self) -> RemoteMethod: ...
    @property
    def write_bucket(self) -> RemoteMethod: ...
    @property
    def run_save(self) -> RemoteMethod: ...
    @property
    def wait_staged(self) -> RemoteMethod: ...
    @property
    def end_staging(self) -> RemoteMethod: ...
    @property
    def cancel(self) -> RemoteMethod: ...


@dataclass(frozen=True)
class StageStats:
    """What staging did: the result of a stage future."""

    nbytes: int
    items: int
    buckets: int
    stage_secs: float


@dataclass(frozen=True)
class SaveResult:
    """What a committed save did: the result of a write future."""

    path: str
    checkpoint_id: str
    nbytes: int
    items: int
    files: int
    stage_secs: float
    total_secs: float
    writers: dict[str, int] = field(default_factory=dict)  # node id -> data files written

    @property
    def throughput_bytes_per_sec(self) -> float:
        return self.nbytes / self.total_secs if self.total_secs > 0 else float("inf")


@dataclass(frozen=True)
class CommitTarget:
    """What the commit of a checkpoint reads (:func:`ray_ckpt.save.commit.commit_merged`): where
    it goes and under which id, how it is written, and when its save started."""

    storage: Storage
    checkpoint_id: str
    overwrite: bool
    hook: WriterHook | None
    fsync: bool
    started_unix: float


@dataclass(frozen=True)
class SaveRequest:
    """Everything the session needs to commit, sent when the save starts."""

    storage: Storage
    checkpoint_id: str
    rank_info: RankInfo
    items: list[ItemMeta]
    tree_json: str
    overwrite: bool
    hook: WriterHook | None
    fsync: bool
    barrier_timeout_secs: float
    started_unix: float
    barrier: BarrierHandle | None = None  # the checkpoint's barrier actor, multi-rank saves
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON, kept in the commit marker

    def commit_target(self) -> CommitTarget:
        """What a single-rank commit of this save needs."""
        return CommitTarget(
            storage=self.storage,
            checkpoint_id=self.checkpoint_id,
            overwrite=self.overwrite,
            hook=self.hook,
            fsync=self.fsync,
            started_unix=self.started_unix,
        )


@dataclass
class StagingOutcome:
    """Delivered by the caller when staging ends: the write of every bucket, or the error."""

    shards: list[tuple[str, str, ray.ObjectRef]] = field(default_factory=list)  # node, file, ref
    error: BaseException | None = None
    stats: StageStats | None = None
    replicas: dict[int, tuple[str, int, int | None]] = field(default_factory=dict)
    shard_items: dict[int, tuple[str, int]] = field(default_factory=dict)  # item -> path, owner


def portable_error(error: BaseException) -> BaseException:
    """``error`` as it can travel to the writer actor: ray_ckpt's errors pickle; others are
    described in a :class:`CheckpointWriteError`."""
    if isinstance(error, CheckpointError):
        return error
    return CheckpointWriteError(
        f"staging failed, so nothing was committed: {type(error).__name__}: {error}"
    )


@dataclass(frozen=True)
class ShardResult:
    """What one writer wrote for one bucket: its data file and the extents in it."""

    file: str
    file_nbytes: int
    extents: list[Extent]  # PackedRows: cheap to send
    node_id: str
    write_secs: float


@dataclass(frozen=True)
class RankReport:
    """What one rank's save wrote, with item indices local to that rank."""

    rank: int
    save_id: str
    items: list[ItemMeta]
    extents: list[Extent]
    tree_json: str
    replicas: dict[int, tuple[str, int, int | None]]  # item -> (path id, owner rank, crc32c)
    shard_items: dict[int, tuple[str, int]]  # item -> (path id, owner rank)
    files: list[str]
    writers: dict[str, int]
    stage_secs: float
    metadata: dict[str, Any] = field(default_factory=dict)


class WriterHook(abc.ABC):
    """Actions around the commit of a checkpoint.

    Both run once per checkpoint, in the writer actor that commits it (the one on the node of
    the saving process, or the checkpoint's barrier for multi-rank saves), so a hook must pickle.
    ``pre_commit`` runs after every data file and the manifest are durable and before the
    marker is written; an exception there fails the save with nothing committed.
    ``post_commit`` runs after the marker is durable.
    """

    @abc.abstractmethod
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Called before the commit marker is written."""

    @abc.abstractmethod
    def post_commit(self, path: str, **kwargs: Any) -> None:
        """Called after the commit marker is written."""


class _Abandoned:
    """Checkpoint ids whose save failed in this process after its files were discarded (or
    while they were): a write of one that ends later deletes its own file, so that a save cut
    short leaves no data behind once its writer knows. Remembers the last ``limit`` ids."""

    def __init__(self, limit: int = 4096) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, None] = {}
        self._limit = limit

    def add(self, checkpoint_id: str) -> None:
        with self._lock:
            self._ids[checkpoint_id] = None
            while len(self._ids) > self._limit:
                del self._ids[next(iter(self._ids))]

    def __contains__(self, checkpoint_id: str) -> bool:
        with self._lock:
            return checkpoint_id in self._ids


ABANDONED = _Abandoned()  # per writer process; commit.discard_files adds to it

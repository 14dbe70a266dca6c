"""The barrier of a multi-rank checkpoint, kept by one long-lived actor for all checkpoints.

The barriers live in one detached async actor per namespace, ``ray_ckpt.barriers`` (on the
head node, started by the first multi-rank save and kept: starting a Ray actor takes seconds,
which a barrier per checkpoint would add to every multi-rank save). A checkpoint's barrier is
keyed by its path (``ray_ckpt.checkpoint.<hash of the path>``), created by whichever rank gets
there first; every rank talks to it through a :class:`Barrier` three times::

    (each rank, at save())      assign(rank, replicated keys)     once every rank has asked: which
                                                                  rank writes each key (the union
                                                                  of the ranks' keys, each key
                                                                  written once by a holder)
    (each rank, at save())      join(rank, [pending write ref])   the ref is owned by the rank's
                                                                  process: if that process dies,
                                                                  the ref fails, so does the save
    (each rank's writer session) arrive(report)                   after the rank's data is durable;
                                                                  returns once the save is decided
    (a failing rank's session)   fail(rank, error)

Each report is merged as it arrives (:class:`ray_ckpt.save.dedup.Merger`: the barrier keeps
the checkpoint's items once, not every rank's copy of them); it commits (manifest, then marker:
:func:`ray_ckpt.save.commit.commit_merged`) once every one of the ``world_size`` ranks has arrived,
and answers every ``arrive`` with the same :class:`~ray_ckpt.SaveResult`. It fails the save on
every rank, committing nothing, as soon as one rank fails, a joined rank's process dies, or
``barrier_timeout_secs`` pass after the first rank joined; the error names the ranks that
failed or never arrived. Having answered everyone, it is dropped, so a later save to the same
path gets a fresh barrier.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import BarrierTimeoutError, CheckpointWriteError
from ..format.names import new_checkpoint_id
from ..storage.credentials import Handoff, accept
from ..storage.storage import Storage
from .commit import commit_merged
from .dedup import Merger, assign_replica_owners
from .protocol import BarrierHandle, CommitTarget, RankReport, SaveResult, WriterHook

logger = logging.getLogger(__name__)

_WATCH_INTERVAL_SECS = 0.5
_LINGER_SECS = 2.0


class _SaveBarrier:
    """One checkpoint's barrier (see the module docstring), in :class:`_BarrierHost`'s event
    loop: every ``arrive`` waits on one event. ``on_done`` drops it once all are answered."""

    def __init__(
        self,
        storage: Storage,
        world_size: int,
        overwrite: bool,
        hook: WriterHook | None,
        fsync: bool,
        barrier_timeout_secs: float,
        on_done: Callable[[], None],
    ) -> None:
        self._on_done = on_done
        self.opened: set[int] = set()  # the ranks that opened it (see _BarrierHost.open)

        self._world_size = world_size
        self._timeout = barrier_timeout_secs
        self._target = CommitTarget(
            storage=storage,
            checkpoint_id=new_checkpoint_id(),
            overwrite=overwrite,
            hook=hook,
            fsync=fsync,
            started_unix=time.time(),
        )
        self._handoff: Handoff | None = None
        self._joined: dict[int, ray.ObjectRef] = {}
        self._arrived: set[int] = set()
        self._merger: Merger | None = None
        self._key_sets: dict[tuple[tuple[str, int], ...], list[int]] = {}  # keys -> ranks
        self._assigned: dict[int, tuple[tuple[str, int], ...]] = {}
        self._owners: dict[tuple[tuple[str, int], ...], list[int]] | None = None
        self._assignment: asyncio.Event | None = None
        self._failures: dict[int, str] = {}
        self._decided: asyncio.Event | None = None
        self._outcome: SaveResult | BaseException | None = None  # the decision
        self._answered = 0
        self._watchdog: asyncio.Task[None] | None = None
        self._first_join = time.monotonic()

    @property
    def decided(self) -> bool:
        return self._outcome is not None

    def _start(self) -> None:
        if self._decided is None:
            self._decided = asyncio.Event()
            self._assignment = asyncio.Event()
            self._first_join = time.monotonic()
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def join(self, rank: int, alive: list[ray.ObjectRef]) -> None:
        self._start()
        self._joined[rank] = alive[0]

    async def assign(self, rank: int, keys: list[tuple[str, int]]) -> list[int]:
        """The writing rank of each of ``keys`` (this rank's replicated tensors, as path id and
        bytes), once every rank has sent its own: see
        :func:`ray_ckpt.save.dedup.assign_replica_owners`. Equal key lists are kept once."""
        self._start()
        assert self._assignment is not None and self._decided is not None
        key_set = tuple(keys)
        if rank not in self._assigned:
            self._assigned[rank] = key_set
            self._key_sets.setdefault(key_set, []).append(rank)
        if len(self._assigned) == self._world_size and self._owners is None:

            sets = list(self._key_sets.items())
            owners = assign_replica_owners([(ranks, list(k)) for k, ranks in sets])
            self._owners = {k: o for (k, _), o in zip(sets, owners)}
            self._assigned = {r: () for r in self._assigned}  # the key sets stay once
            self._assignment.set()
        waiter = asyncio.ensure_future(self._assignment.wait())
        decided = asyncio.ensure_future(self._decided.wait())
        await asyncio.wait([waiter, decided], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        decided.cancel()
        if self._owners is None:
            assert isinstance(self._outcome, BaseException)
            raise self._outcome
        return self._owners[key_set]

    async def status(self) -> dict[str, object]:
        """Which ranks have joined and arrived, and the failures so far (for operators)."""
        return {
            "world_size": self._world_size,
            "joined": sorted(self._joined),
            "assigned": sorted(self._assigned),
            "arrived": sorted(self._arrived),
            "failures": dict(self._failures),
            "decided": self._outcome is not None,
        }

    async def arrive(self, handoff: Handoff | None, report: RankReport) -> SaveResult:
        self._start()
        self._adopt(handoff)
        assert self._decided is not None
        if report.rank in self._arrived or not 0 <= report.rank < self._world_size:
            self._failures[report.rank] = "arrived twice, or with a rank outside the world"
        else:
            self._arrived.add(report.rank)
            self._merge(report)
        await self._maybe_decide()
        await self._decided.wait()
        return self._answer()

    def _adopt(self, handoff: Handoff | None) -> None:
        """Use the secrets a rank's writer handed over for this checkpoint's storage (the
        constructor's storage has none: a detached actor's arguments stay in the GCS)."""
        if handoff is None or self._handoff is not None:
            return
        accept(handoff)
        self._handoff = handoff
        storage = copy.copy(self._target.storage)
        storage.adopt(handoff)
        self._target = dataclasses.replace(self._target, storage=storage)

    def _merge(self, report: RankReport) -> None:
        """Fold ``report`` into the checkpoint's items as it arrives, so that the barrier
        holds each replicated item once, never every rank's copy of it."""

        if self._merger is None:
            self._merger = Merger(self._target.storage)
        try:
            self._merger.add(report)
        except Exception as e:
            logger.exception("could not merge the report of rank %s", report.rank)
            self._failures[report.rank] = f"its report could not be merged: {e!r}"

    async def fail(self, rank: int, error: BaseException) -> None:
        self._start()
        self._failures[rank] = f"{type(error).__name__}: {error}"
        await self._maybe_decide()

    async def _maybe_decide(self) -> None:
        assert self._decided is not None
        if self._decided.is_set():
            return
        if self._failures:
            failed = "; ".join(f"rank {r}: {why}" for r, why in sorted(self._failures.items()))
            self._decide(CheckpointWriteError(
                f"multi-rank save to {self._target.storage.display} failed on every rank; "
                f"nothing was committed. {failed}"
            ))
        elif len(self._arrived) == self._world_size:
            assert self._merger is not None  # every rank arrived, none failed: all merged
            try:
                result = await asyncio.to_thread(
                    commit_merged, self._target, self._merger
                )
            except Exception as e:  # noqa: BLE001 - every rank gets this error
                self._decide(e)
            else:
                self._decide(result)

    def _decide(self, outcome: SaveResult | BaseException) -> None:
        """Decide the save once: committed (its result) or failed (the error every rank gets)."""
        assert self._decided is not None
        if not self._decided.is_set():
            self._outcome = outcome
            self._decided.set()
            if isinstance(outcome, BaseException):
                logger.warning("%s", outcome)

    def _answer(self) -> SaveResult:
        assert self._outcome is not None
        self._answered += 1
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    async def _watch(self) -> None:
        """Fail the save when a joined rank's process dies or the barrier times out; exit once
        everyone has been answered."""
        try:
            await self._watch_ranks()
        except Exception as e:  # a broken watchdog must fail the save, not hang it
            logger.exception("the barrier's watchdog failed")
            self._decide(CheckpointWriteError(
                f"multi-rank save to {self._target.storage.display} failed: the barrier's "
                f"watchdog broke ({type(e).__name__}: {e}); nothing was committed"
            ))
        await self._linger_and_exit()

    async def _watch_ranks(self) -> None:
        assert self._decided is not None
        while not self._decided.is_set():
            await asyncio.sleep(_WATCH_INTERVAL_SECS)
            waiting = {r: ref for r, ref in self._joined.items() if r not in self._arrived}
            if waiting:
                ready, _ = ray.wait(list(waiting.values()), num_returns=len(waiting), timeout=0,
                                    fetch_local=False)
                gone = sorted(r for r, ref in waiting.items() if ref in ready)
                for rank in gone:
                    self._failures.setdefault(
                        rank, "its process died (or its save ended) before reaching the barrier"
                    )
                if gone:
                    await self._maybe_decide()
            if time.monotonic() - self._first_join > self._timeout and not self._decided.is_set():
                reached = self._arrived if self._owners is not None else self._assigned
                absent = [r for r in range(self._world_size) if r not in reached]
                self._decide(BarrierTimeoutError(
                    f"multi-rank save to {self._target.storage.display} failed on every rank; "
                    f"nothing was committed: ranks {absent} did not reach the barrier within "
                    f"{self._timeout:.0f}s (barrier_timeout_secs). Check those ranks' logs."
                ))

    async def _linger_and_exit(self) -> None:
        deadline = time.monotonic() + self._timeout
        while self._answered < len(self._arrived) and time.monotonic() < deadline:
            await asyncio.sleep(_WATCH_INTERVAL_SECS)
        await asyncio.sleep(_LINGER_SECS)
        self._on_done()


# What a barrier is created with: storage, world_size, overwrite, hook, fsync, timeout.
_Spec = tuple[Storage, int, bool, "WriterHook | None", bool, float]


class _BarrierHost:
    """The barriers of every multi-rank checkpoint in progress, by key (see the module
    docstring). An async actor: the barriers share its event loop. Each barrier has a
    generation: a rank's calls go to the barrier it opened, never to a later one for the same
    path (a retry after a failure gets a fresh barrier, as a late call of the failed save must
    not reach it)."""

    def __init__(self) -> None:
        self._barriers: dict[str, tuple[int, _SaveBarrier]] = {}
        self._generations = 0

    def open(self, key: str, spec: _Spec, rank: int) -> int:
        """The generation of ``key``'s barrier for ``rank``, created now if there is none, or
        if it has decided and ``rank`` opened it before: a save to the same path after it (a
        retry) gets a fresh barrier, while a rank that opens a barrier another rank's failure
        already decided is that save's rank, and gets the failure."""
        found = self._barriers.get(key)
        if found is None or (found[1].decided and rank in found[1].opened):
            self._generations += 1
            generation = self._generations
            found = self._barriers[key] = (generation, _SaveBarrier(
                *spec, on_done=lambda: self._drop(key, generation)))
        found[1].opened.add(rank)
        return found[0]

    def _drop(self, key: str, generation: int) -> None:
        if self._barriers.get(key, (None,))[0] == generation:
            del self._barriers[key]

    def _get(self, key: str, generation: int) -> _SaveBarrier | None:
        found = self._barriers.get(key)
        return found[1] if found is not None and found[0] == generation else None

    def _opened(self, key: str, generation: int, where: str) -> _SaveBarrier:
        barrier = self._get(key, generation)
        if barrier is None:
            raise CheckpointWriteError(
                f"multi-rank save to {where} was already decided without this rank "
                "(another rank failed, or the barrier timed out); nothing was committed by it"
            )
        return barrier

    async def join(self, key: str, generation: int, where: str, rank: int,
                   alive: list[ray.ObjectRef]) -> None:
        await self._opened(key, generation, where).join(rank, alive)

    async def assign(self, key: str, generation: int, where: str, rank: int,
                     keys: list[tuple[str, int]]) -> list[int]:
        return await self._opened(key, generation, where).assign(rank, keys)

    async def arrive(self, handoff: Handoff | None, key: str, generation: int, where: str,
                     report: RankReport) -> SaveResult:
        return await self._opened(key, generation, where).arrive(handoff, report)

    async def fail(self, key: str, generation: int, rank: int, error: BaseException) -> None:
        barrier = self._get(key, generation)
        if barrier is not None:  # else already decided: nothing to fail
            await barrier.fail(rank, error)

    async def status(self, key: str) -> dict[str, object] | None:
        found = self._barriers.get(key)
        return None if found is None else await found[1].status()


HOST_NAME = "ray_ckpt.barriers"


@dataclasses.dataclass(frozen=True)
class Barrier:
    """The barrier of one multi-rank checkpoint (a :class:`BarrierHandle`): each method sends
    the call to the host actor and returns its ``ObjectRef``. Picklable: save requests carry it
    to the writers."""

    host: Any
    key: str
    generation: int
    where: str  # the checkpoint, as errors name it (the spec went to the host once, at open)

    def join(self, rank: int, alive: list[ray.ObjectRef]) -> ray.ObjectRef:
        return self.host.join.remote(  # type: ignore[no-any-return]
            self.key, self.generation, self.where, rank, alive)

    def assign(self, rank: int, keys: list[tuple[str, int]]) -> ray.ObjectRef:
        return self.host.assign.remote(  # type: ignore[no-any-return]
            self.key, self.generation, self.where, rank, keys)

    def arrive(self, handoff: Handoff | None, report: RankReport) -> ray.ObjectRef:
        # the secrets first: inlined in the call's RPC, never with the (large) report
        return self.host.arrive.remote(  # type: ignore[no-any-return]
            handoff, self.key, self.generation, self.where, report)

    def fail(self, rank: int, error: BaseException) -> ray.ObjectRef:
        return self.host.fail.remote(  # type: ignore[no-any-return]
            self.key, self.generation, rank, error)

    def status(self) -> ray.ObjectRef:
        """Which ranks have joined and arrived, and the failures so far (None: no barrier)."""
        return self.host.status.remote(self.key)  # type: ignore[no-any-return]


def barrier_name(storage: Storage) -> str:
    digest = hashlib.sha1(storage.display.encode()).hexdigest()[:24]
    return f"ray_ckpt.checkpoint.{digest}"


def barrier_host(namespace: str) -> Any:
    """The namespace's barrier host actor, created (detached, on the head node) on first use."""
    try:
        return ray.get_actor(HOST_NAME, namespace=namespace)
    except ValueError:
        pass
    head = next(
        (n["NodeID"] for n in ray.nodes()
         if n["Alive"] and "node:__internal_head__" in n["Resources"]),
        None,
    )
    options: dict[str, Any] = {} if head is None else {
        "scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=True)}
    return ray.remote(_BarrierHost).options(  # type: ignore[attr-defined]
        name=HOST_NAME,
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=1000,
        **options,
    ).remote()


def barrier_for(
    storage: Storage,
    *,
    rank: int,
    namespace: str,
    world_size: int,
    overwrite: bool,
    hook: WriterHook | None,
    fsync: bool,
    barrier_timeout_secs: float,
) -> BarrierHandle:
    """The barrier of the checkpoint at ``storage`` (created by the first rank to open it)."""
    spec: _Spec = (storage, world_size, overwrite, hook, fsync, barrier_timeout_secs)
    host, key = barrier_host(namespace), barrier_name(storage)
    return Barrier(host, key, ray.get(host.open.remote(key, spec, rank)), storage.display)

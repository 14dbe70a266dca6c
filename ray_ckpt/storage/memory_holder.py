"""The memory tier's holders: one detached actor per node that owns the held copies there.

An object in Ray lives as long as the process that put it, so the bytes of a memory
checkpoint are put by the holder of their node (``ray_ckpt_holder_<node id>``, namespace
``ray_ckpt``), never by the training process that made them: a memory checkpoint outlives the
process that saved it and a worker restart. The holder keeps one ``ObjectRef`` per held file;
dropping it (retention, eviction, delete) releases the object, and the raylet frees it at its
next periodic free (``free_objects_period_milliseconds``: 1 s on a Ray started with its
defaults; Ray 2.60 has no call that frees an object at once). A put that needs that room
meanwhile waits for it in Ray's create queue; it is not spilled.

Readers never receive bytes through an actor call's return value. A reader on this node gets the
``ObjectRef`` (:meth:`_Holder.ref`, in a list, so Ray does not resolve it) and ``ray.get``s it: a
zero-copy view of this node's shared memory. A reader on another node is offered the files
over a direct connection to this holder's stream server (:meth:`_Holder.serve`,
:mod:`.memory_stream`), with the refs for reading over Ray's transfer if it cannot connect. A
holder taking a replica reads it the same way (:meth:`_Holder.push`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import StorageError
from .buffers import Buffers
from .memory_stream import StreamServer, receive_file

NAMESPACE = "ray_ckpt"
# The calls between ray_ckpt and the memory tier's actors (holders, catalog). Those are
# detached: they outlive the processes that started them, and so may run an older or a newer
# ray_ckpt than the process calling them. Raised whenever one of those calls changes; the actors
# of a ray_ckpt from before it have no ``protocol`` method (0).
PROTOCOL = 4
logger = logging.getLogger(__name__)


_HANDLES: dict[tuple[str, str], Any] = {}  # (Ray session, actor name) -> handle
_CHECKED: set[tuple[str, str]] = set()  # (Ray session, actor name): speaks PROTOCOL


def named_actor(name: str) -> Any:
    """The handle of the memory tier's actor ``name`` (ValueError: there is none), looked up in
    the GCS once per cluster and process: a load opens many files, each asking the catalog and
    a holder, and every lookup is a GCS round trip. :func:`lookup` explains the check."""
    key = (ray.get_runtime_context().get_session_name(), name)
    handle = _HANDLES.get(key)
    if handle is None:
        handle = _HANDLES[key] = lookup(name)
    return handle


def lookup(name: str) -> Any:
    """The handle of the memory tier's actor ``name`` (ValueError: there is none), checked once
    per process to speak this ray_ckpt's :data:`PROTOCOL`: one started by another version
    raises :class:`~ray_ckpt.errors.StorageError` saying what to do, rather than failing a call
    with a ``TypeError`` or doing something else than asked."""
    handle = ray.get_actor(name, namespace=NAMESPACE)
    key = (ray.get_runtime_context().get_session_name(), name)
    if key not in _CHECKED:
        theirs = ray.get(handle.protocol.remote()) if hasattr(handle, "protocol") else 0
        if theirs != PROTOCOL:
            raise StorageError(
                f"the memory tier's actor {name!r} (Ray namespace {NAMESPACE!r}) was started by "
                f"{'an older' if theirs < PROTOCOL else 'a newer'} ray_ckpt than this one "
                f"(memory tier protocol {theirs}; this ray_ckpt's: {PROTOCOL}): the two cannot "
                "work together. Use the ray_ckpt that started it (it can still load and persist "
                "the memory checkpoints it holds), or end the memory tier on this cluster, "
                "dropping those checkpoints: ray_ckpt.storage.memory.end_memory_tier() (or "
                "restart the Ray cluster)."
            )
        _CHECKED.add(key)
    return handle


def forget_actor(name: str) -> None:
    """Look ``name`` up again next time (its actor failed a call: its node may be gone, or it
    was ended)."""
    key = (ray.get_runtime_context().get_session_name(), name)
    _HANDLES.pop(key, None)
    _CHECKED.discard(key)


def holder_name(node_id: str) -> str:
    return f"ray_ckpt_holder_{node_id}"


# (Ray's typing overloads of ``ray.remote`` omit ``max_concurrency``, a documented option.)
@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=16)  # type: ignore[call-overload]
class _Holder:
    """Owns the held copies of one node: every object here was put by this actor."""

    def __init__(self, node_id: str) -> None:
        self._node_id = node_id
        self._objects: dict[str, ray.ObjectRef] = {}
        self._nbytes: dict[str, int] = {}
        self._taken: dict[str, float] = {}  # key -> when its copy was put (time.monotonic())
        self._server: StreamServer | None = None
        self._server_lock = threading.Lock()

    def node_id(self) -> str:
        return self._node_id

    def protocol(self) -> int:
        return PROTOCOL

    def watch(self, secs: float) -> None:
        """Return after ``secs``. The catalog keeps one such call pending on each holder in use:
        it fails as soon as this holder's process dies (:meth:`_Catalog.repair`)."""
        time.sleep(secs)

    def adopt(self, key: str, buffers: list[np.ndarray]) -> int:
        """Put ``buffers`` (the file's bytes in order; an argument, owned by the caller:
        zero-copy views of it in this node's shared memory) as this holder's own copy, one
        object: one copy, store to store."""
        nbytes = sum(int(b.nbytes) for b in buffers)
        self._replace(key, ray.put(buffers), nbytes)
        return nbytes

    def copy_from(
        self, key: str, refs: list[ray.ObjectRef],
        offer: tuple[tuple[str, int], bytes, int] | None = None,
    ) -> int:
        """Take a copy of another holder's file ``key``: read straight from its stream server
        when it made an ``offer`` (address, token, bytes: the file is the offer's only one),
        else, or when that fails, over Ray's transfer of ``refs[0]``; then put our own."""
        if offer is not None:
            address, token, nbytes = offer
            try:
                return self.adopt(key, [receive_file(address, token, 0, nbytes)])
            except OSError as e:
                logger.warning("memory tier: copying %s from the holder at %s failed (%s): "
                               "copying it over Ray's transfer instead", key, address, e)
        return self.adopt(key, ray.get(refs[0]))

    def push(self, key: str, peer: Any, direct: bool = True, background: bool = False) -> int:
        """Have ``peer`` take a copy of ``key``: offered on our stream server when ``direct``
        (between two simulated nodes here the stream moves 3.5-3.9 GB/s, Ray's transfer 0.6),
        over Ray's transfer otherwise. A ``background`` copy (the repair's) yields to loads
        reading from this holder (:mod:`.memory_stream`)."""
        if not direct:
            return int(ray.get(peer.copy_from.remote(key, [self._objects[key]])))
        address, token, [refs] = self.serve([key], background)
        try:
            return int(ray.get(peer.copy_from.remote(key, refs, (address, token,
                                                                 self._nbytes[key]))))
        finally:
            self.withdraw(token)

    def ref(self, key: str) -> list[ray.ObjectRef]:
        """``[ref]`` of our copy of ``key`` (a list, so Ray does not resolve it), or ``[]``."""
        ref = self._objects.get(key)
        return [] if ref is None else [ref]

    def refs(self, keys: list[str]) -> list[list[ray.ObjectRef]]:
        """:meth:`ref` of each of ``keys``, in one call."""
        return [self.ref(key) for key in keys]

    def serve(
        self, keys: list[str], background: bool = False
    ) -> tuple[tuple[str, int], bytes, list[list[ray.ObjectRef]]]:
        """Offer our copies of ``keys`` to one reader on another node: the stream server's
        address, the offer's token (file ``i`` of the offer is ``keys[i]``; one not held here
        reads as empty), and :meth:`refs` of the keys, for reading over Ray's transfer
        instead. A ``background`` reader yields to the others."""
        with self._server_lock:
            if self._server is None:
                self._server = StreamServer(ray.util.get_node_ip_address())
        refs = self.refs(keys)
        # one get for every file: a get each cost a load of 18 files 16 ms here
        held = iter(ray.get([r[0] for r in refs if r]))
        token = self._server.offer([Buffers(next(held) if r else []) for r in refs], background)
        return self._server.address, token, refs

    def withdraw(self, token: bytes) -> None:
        """The reader of offer ``token`` is done (see :mod:`.memory_stream`)."""
        if self._server is not None:
            self._server.withdraw(token)

    def offers(self) -> int:
        """Stream offers not yet ended (each keeps views of the files it offers)."""
        return 0 if self._server is None else self._server.offered()

    def sent_bytes(self) -> int:
        """The bytes our stream server has sent (0: it never started)."""
        return 0 if self._server is None else self._server.sent_bytes

    def drop(self, keys: list[str]) -> None:
        """Forget ``keys``: their objects are freed once no reader holds a view of them."""
        for key in keys:
            self._pop(key)

    def drop_unlisted(self, listed: list[str], grace_secs: float) -> list[str]:
        """Drop the copies that the catalog does not list on this node (``listed``), taken
        more than ``grace_secs`` ago (a save lists a copy as soon as it is taken): those of a
        save whose process died in between, or of a catalog that died. Returns their keys."""
        keep = set(listed)
        now = time.monotonic()
        unlisted = [key for key, taken in list(self._taken.items())
                    if key not in keep and now - taken > grace_secs]
        for key in unlisted:
            self._pop(key)
        return unlisted

    def held_bytes(self) -> int:
        return sum(self._nbytes.values())

    def write_to(self, key: str, storage: Any, name: str, fsync: bool) -> int:
        """Write our copy of ``key`` as file ``name`` of ``storage`` (persisting)."""
        buffers = ray.get(self._objects[key])
        storage.write_file(name, [memoryview(b) for b in buffers], fsync=fsync)
        return sum(int(b.nbytes) for b in buffers)

    def _pop(self, key: str) -> ray.ObjectRef | None:
        self._nbytes.pop(key, None)
        self._taken.pop(key, None)
        return self._objects.pop(key, None)

    def _replace(self, key: str, ref: ray.ObjectRef, nbytes: int) -> None:
        self._objects[key] = ref
        self._nbytes[key] = nbytes
        self._taken[key] = time.monotonic()


def holder_for(node_id: str) -> Any:
    """The holder of ``node_id`` (:func:`lookup`), created there (detached) on first use."""
    try:
        return lookup(holder_name(node_id))
    except ValueError:
        pass
    return _Holder.options(  # type: ignore[attr-defined]
        name=holder_name(node_id),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(node_id)


def alive_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def store_capacity(node_id: str) -> int:
    for n in ray.nodes():
        if n["NodeID"] == node_id:
            return int(n["Resources"].get("object_store_memory", 0))
    return 0

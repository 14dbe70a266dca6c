"""The writer pool: finds (or creates) the writer actor of a node for the pipeline.

One :class:`WriterPool` per checkpointer. The pipeline asks it for this node's writer (the
session of a save) and, with ``spread_across_nodes``, for every node's; a cached handle is
checked before use once its writer may have retired (idle timeout), and dropped when its actor
died. Actors are named per pool and node (:mod:`ray_ckpt.save.writer` says why).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .._util import LOADS
from ..config import CheckpointWriterConfig
from ..errors import CheckpointWriteError
from .encoder import CheckpointWriter, default_writer_init_fn
from .protocol import WriterHandle
from .writer import WriterActor, default_subprocess_init_fn, logger

# The writer is long-lived, so its heap must not creep. Measured over 70 saves of a 16 MB state
# dict with 2,000 tensors: Arrow's default jemalloc pool kept what each manifest build used
# (+210 MiB before it levelled off), and glibc's per-thread malloc arenas fragmented across the
# actor's threads (+6 MiB a save). Arrow's system pool and two arenas keep it within 15 MiB.
_WRITER_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system"}}
PRESTART_AFTER_LOADS_SECS = 1.0  # see WriterPool.prestart


class WriterPool:
    """Finds (or creates) the writer actor of a node. One per checkpointer; cheap to keep."""

    def __init__(
        self,
        config: CheckpointWriterConfig,
        namespace: str,
        *,
        writer_init_fn: Callable[..., CheckpointWriter] = default_writer_init_fn,
        writer_init_args: dict[str, Any] | None = None,
        subprocess_init_fn: Callable[..., None] = default_subprocess_init_fn,
        subprocess_init_args: tuple[Any, ...] = (),
    ) -> None:
        self._config = config
        self._namespace = namespace
        writer_args = writer_init_args or {}
        self._init = (writer_init_fn, writer_args, subprocess_init_fn, subprocess_init_args)
        self._custom = not (
            writer_init_fn is default_writer_init_fn
            and subprocess_init_fn is default_subprocess_init_fn
            and not writer_init_args
        )
        self._pool = _pool_name(self._custom, config)
        self._handles: dict[str, WriterHandle] = {}
        self._used: dict[str, float] = {}  # when each cached handle was last used (monotonic)
        self._died: set[str] = set()  # nodes whose writer died: wait for its successor
        self._lock = threading.Lock()
        self._closed = False  # the checkpointer was closed: a prestart still waiting does nothing

    def local_node_id(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    def actor_name(self, node_id: str) -> str:
        return f"ray_ckpt.writer.{self._pool}.{node_id}"

    def for_node(self, node_id: str) -> WriterHandle:
        with self._lock:
            handle = self._handles.get(node_id)
            if handle is not None and not self._still_there(node_id, handle):
                handle = None
            self._used[node_id] = time.monotonic()
            if handle is None:
                handle = self._create(node_id)
                if node_id in self._died:
                    _wait_until_alive(handle, self.actor_name(node_id))
                    self._died.discard(node_id)
                self._handles[node_id] = handle
            return handle

    def local(self) -> WriterHandle:
        return self.for_node(self.local_node_id())

    def prestart(self) -> None:
        """Start this node's shared writer from a thread, so that the first save finds it
        running (its start, a new process, is most of a first save's cost) and the caller does
        not wait for its class to be exported. It starts once this process has not loaded a
        checkpoint for ``PRESTART_AFTER_LOADS_SECS``: a process restarted after a failure
        makes its checkpointer and restores at once, and the restore comes first. Measured on 2
        cores, the first load of a new process, 1 GiB from a peer's holder after a node loss,
        6 by turns: median 0.418 s (0.31-0.48), against 0.527 s (0.43-0.62) with the writer
        starting beside it (its process took 0.3-0.5 s of CPU meanwhile). Writers of a custom
        pool start on first use: ``close()`` kills them, and must not race a start."""
        if self._custom:
            return

        def start() -> None:
            LOADS.wait_idle(PRESTART_AFTER_LOADS_SECS)
            if self._closed or not ray.is_initialized():
                return  # too late: a call now would start (or attach to) a Ray on its own
            try:
                self.local()
            except Exception as e:  # noqa: BLE001 - the first save starts it, and reports why
                logger.info("ray_ckpt: starting this node's writer ahead of the first save "
                            "failed (%s); the first save starts it", e)

        threading.Thread(target=start, daemon=True, name="ray_ckpt-writer-prestart").start()

    def _still_there(self, node_id: str, handle: WriterHandle) -> bool:
        """Whether a cached writer may be used: certainly when this pool used it within half
        its idle timeout (it cannot have retired since); else ask it (the ping counts as use,
        so it will not retire before the save's calls reach it)."""
        timeout = self._config.idle_timeout_secs
        if timeout is None or time.monotonic() - self._used.get(node_id, 0.0) < timeout / 2:
            return True
        try:
            ray.get(handle.node_id.remote(), timeout=_RESTART_TIMEOUT_SECS)
            return True
        except RayActorError:
            logger.info("writer on node %s has exited (idle); starting it again", node_id)
            del self._handles[node_id]
            return False

    def forget(self, node_id: str) -> None:
        """Drop a cached handle (its actor died for good); the next call finds or creates anew."""
        with self._lock:
            self._handles.pop(node_id, None)

    def forget_dead(self, error: BaseException) -> None:
        """Drop the cached handle of the writer that ``error`` (a ``RayActorError``) reports
        dead, so that the next save finds it restarted, or creates it anew, instead of calling
        a handle whose actor is gone for good."""
        actor_id = getattr(error, "actor_id", None)
        if not isinstance(error, RayActorError) or not actor_id:
            return
        with self._lock:
            for node_id, handle in list(self._handles.items()):
                if handle._actor_id.hex() == actor_id:
                    del self._handles[node_id]
                    self._died.add(node_id)

    def close(self) -> None:
        """Kill the writers of a custom pool (shared default writers stay for other users)."""
        with self._lock:
            self._closed = True
            handles, self._handles = list(self._handles.values()), {}
        if self._custom:
            for handle in handles:
                ray.kill(cast("ActorHandle", handle), no_restart=True)  # it is one

    def _create(self, node_id: str) -> WriterHandle:
        writer_init_fn, writer_init_args, subprocess_init_fn, subprocess_init_args = self._init
        return WriterActor.options(  # type: ignore[attr-defined]
            name=self.actor_name(node_id),
            namespace=self._namespace,
            get_if_exists=True,
            lifetime=None if self._custom else "detached",
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            runtime_env=_WRITER_ENV,
        ).remote(
            node_id,
            self._config,
            writer_init_fn,
            writer_init_args,
            subprocess_init_fn,
            subprocess_init_args,
        )


_RESTART_TIMEOUT_SECS = 300.0


def _wait_until_alive(handle: WriterHandle, name: str) -> None:
    """Wait until the writer behind ``handle`` answers: one that is restarting after its
    process died (a call to it would fail at once with ActorUnavailableError), or one just
    created in place of a writer killed for good. The ping is retried across restarts."""
    try:
        ray.get(
            handle.node_id.options(max_task_retries=-1).remote(), timeout=_RESTART_TIMEOUT_SECS
        )
    except (RayActorError, ray.exceptions.GetTimeoutError) as e:
        raise CheckpointWriteError(
            f"the writer actor {name} died and did not come back within "
            f"{_RESTART_TIMEOUT_SECS:.0f}s ({type(e).__name__}: {e}); check that its node is alive"
        ) from None


def _pool_name(custom: bool, config: CheckpointWriterConfig) -> str:
    """The default writers are shared by every process of the cluster; writers built by custom
    init functions belong to one checkpointer and get a name of their own."""
    if custom:
        return f"custom-{uuid.uuid4().hex[:12]}"
    idle = config.idle_timeout_secs
    default_idle = CheckpointWriterConfig.idle_timeout_secs
    return f"default-io{config.io_threads}" + ("" if idle == default_idle else f"-idle{idle}")

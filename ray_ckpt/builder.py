"""Builders: checkpointers with sensible defaults, as in PyTorch's ``_experimental.builder``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import ray

from ._attach import attach
from ._util import note_local_ray
from .checkpointer import AsyncCheckpointer, SyncCheckpointer
from .config import CheckpointerConfig
from .load.reader import CheckpointReader
from .save.encoder import CheckpointWriter, default_writer_init_fn
from .save.pipeline import Coordinator
from .save.pool import WriterPool
from .save.protocol import WriterHook
from .save.stager import DefaultStager
from .save.writer import default_subprocess_init_fn
from .storage import memory
from .types import RankInfo

logger = logging.getLogger(__name__)


def default_rank_info() -> RankInfo:
    """This process's rank: from Ray Train inside a Ray Train worker, from ``torch.distributed``
    when a process group is initialised, else a single rank."""
    try:
        import ray.train

        context = ray.train.get_context()
        world_size = context.get_world_size()
        if world_size > 1:
            return RankInfo(context.get_world_rank(), world_size)
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker
        pass
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return RankInfo(dist.get_rank(), dist.get_world_size())
    return RankInfo(0, 1)


# Ray's raylet frees objects that went out of scope in batches, every
# ``free_objects_period_milliseconds`` (1000 by default): a written bucket would then hold its
# object-store memory for up to a second after its write, beyond the staging budget, and the
# next save's puts would land in fresh (cold) pages. The local Ray that ray_ckpt starts frees
# every 10 ms; on a cluster, set RAY_free_objects_period_milliseconds=10 on every node.
LOCAL_RAY_SYSTEM_CONFIG = {"free_objects_period_milliseconds": 10}


def ensure_ray(config: CheckpointerConfig) -> None:
    """Connect to Ray unless this process already is.

    Attaches to ``config.ray_address`` or ``RAY_ADDRESS`` when one is given; otherwise starts a
    local Ray (``address="local"``), never attaching to a stray cluster through a file under
    /tmp/ray.
    """
    if ray.is_initialized():
        return
    address, source = config.ray_address, "CheckpointerConfig(ray_address=...)"
    if not address:
        address, source = os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS"
    if address:
        logger.info("ray_ckpt: connecting to the Ray cluster at %s", address)
        attach(address, source)
    else:
        logger.info("ray_ckpt: starting a local Ray instance")
        ray.init(
            address="local", include_dashboard=False, _system_config=LOCAL_RAY_SYSTEM_CONFIG
        )
        note_local_ray(ray.get_runtime_context().gcs_address)


def _parts(
    config: CheckpointerConfig,
    rank_info: RankInfo | None,
    filesystem: Any,
    commit_hook: WriterHook | None,
    pool: WriterPool,
) -> tuple[Coordinator, CheckpointReader]:
    rank_info = rank_info or default_rank_info()
    reader = CheckpointReader(
        rank_info,
        config.reader_config,
        storage_config=config.storage_config,
        filesystem=filesystem,
    )
    coordinator = Coordinator(
        config=config,
        rank_info=rank_info,
        stager=DefaultStager(config.staging_config),
        pool=pool,
        filesystem=filesystem,
        commit_hook=commit_hook,
    )
    return coordinator, reader


def make_sync_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
    *,
    filesystem: Any = None,
) -> SyncCheckpointer:
    """A :class:`SyncCheckpointer` with default components.

    Args:
        config: component configurations (:class:`CheckpointerConfig`).
        rank_info: this process's rank; detected when ``None`` (:func:`default_rank_info`).
        commit_hook: a :class:`WriterHook` run around each commit.
        filesystem: a ``pyarrow.fs.FileSystem``; paths are then paths on it.
    """
    config = config or CheckpointerConfig()
    ensure_ray(config)
    pool = WriterPool(config.writer_config, config.namespace)
    pool.prestart()
    memory.warm_up()
    coordinator, reader = _parts(config, rank_info, filesystem, commit_hook, pool)
    return SyncCheckpointer(coordinator, reader, pool)


def make_async_checkpointer(
    config: CheckpointerConfig | None = None,
    rank_info: RankInfo | None = None,
    subprocess_init_fn: Callable[..., None] = default_subprocess_init_fn,
    subprocess_init_args: tuple[Any, ...] = (),
    checkpoint_writer_init_fn: Callable[..., CheckpointWriter] = default_writer_init_fn,
    checkpoint_writer_init_args: dict[str, Any] | None = None,
    *,
    commit_hook: WriterHook | None = None,
    filesystem: Any = None,
) -> AsyncCheckpointer:
    """An :class:`AsyncCheckpointer` with default components.

    Args:
        config: component configurations (:class:`CheckpointerConfig`).
        rank_info: this process's rank; detected when ``None``.
        subprocess_init_fn: run once, with ``subprocess_init_args``, in every writer actor
            when it starts (PyTorch runs it in its checkpoint subprocess).
        checkpoint_writer_init_fn: builds the :class:`CheckpointWriter` each writer actor
            hosts, called as ``fn(writer_config, **checkpoint_writer_init_args)``.
        commit_hook: a :class:`WriterHook` run around each commit.
        filesystem: a ``pyarrow.fs.FileSystem``; paths are then paths on it.

    Custom init functions get writer actors of their own, released by ``close()``.
    """
    config = config or CheckpointerConfig()
    ensure_ray(config)
    pool = WriterPool(
        config.writer_config,
        config.namespace,
        writer_init_fn=checkpoint_writer_init_fn,
        writer_init_args=checkpoint_writer_init_args,
        subprocess_init_fn=subprocess_init_fn,
        subprocess_init_args=subprocess_init_args,
    )
    pool.prestart()
    memory.warm_up()
    coordinator, reader = _parts(config, rank_info, filesystem, commit_hook, pool)
    return AsyncCheckpointer(
        coordinator,
        reader,
        pool,
        use_async_staging=config.staging_config.use_async_staging,
        write_during_staging=config.staging_config.async_write_during_staging,
    )

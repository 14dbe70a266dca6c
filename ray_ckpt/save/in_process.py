"""A single-rank save run in the calling process, without Ray: the same steps and code as a
save through the writer actors, minus the object store between them.

    (caller)  check the destination   pipeline.check_destination
    (caller)  plan                    stager.DefaultStager.plan
    (caller)  encode, bucket by bucket  stager.DefaultStager.payload (views of the caller's
                                      tensors, no ray.put), then encoder.CheckpointWriter
    (caller)  commit                  commit.rank_report + commit.commit_reports: manifest,
                                      marker last, with the storage's commit strategy
    (caller)  clean up on failure     commit.discard_files; a directory this save created and
                                      left empty is removed

The bytes on storage are those of a save through a checkpointer (same data files, manifest,
checksums and marker). It is meant for a filesystem the calling process can write itself (a
local path): ``ray-ckpt import`` uses it, so that importing a file needs no Ray. A save to an
object store, to ``mem://`` or from several ranks goes through a checkpointer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow.fs as pafs

from ..config import CheckpointerConfig
from ..format.names import new_checkpoint_id
from ..storage.classify import MEMORY_SCHEME, resolve
from ..storage.storage import Storage
from ..types import RankInfo
from .commit import commit_reports, discard_files, rank_report
from .encoder import CheckpointWriter
from .pipeline import check_destination, json_metadata
from .protocol import SaveRequest, SaveResult, ShardResult, StagingOutcome
from .stager import DefaultStager, StagingPlan, record_staged

logger = logging.getLogger(__name__)

NODE = "in-process"  # the "node" a save without Ray reports its data files written by


def is_local(path: str, filesystem: pafs.FileSystem | None = None) -> bool:
    """Whether ``path`` (on ``filesystem``, if given) is on the local filesystem: a plain path
    or a ``file://`` URI, which this process can write without a writer actor."""
    path = str(path)
    if path.startswith(MEMORY_SCHEME):
        return False
    if filesystem is None and "://" in path and not path.startswith("file://"):
        return False  # a remote URI: not resolved here (an object store's may ask the network)
    fs, _ = resolve(path, filesystem)
    return isinstance(fs, pafs.LocalFileSystem)


def save_in_process(
    path: str,
    state_dict: dict[Any, Any],
    *,
    config: CheckpointerConfig | None = None,
    filesystem: pafs.FileSystem | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    metadata: dict[str, Any] | None = None,
) -> SaveResult:
    """Save ``state_dict`` as the checkpoint ``path`` from this process alone (see the module
    docstring); committed on return. ``config`` gives the bucket sizes, checksums, fsync and
    storage retries, as for a checkpointer."""
    config = config or CheckpointerConfig()
    started, started_unix = time.perf_counter(), time.time()
    metadata = json_metadata(metadata)
    storage = Storage.from_path(path, filesystem, config.storage_config)
    created = check_destination(storage, overwrite=overwrite)
    stager = DefaultStager(config.staging_config)
    checkpoint_id = new_checkpoint_id()
    try:
        plan = stager.plan(state_dict, checkpoint_id=checkpoint_id, allow_pickle=allow_pickle)
    except BaseException:
        if created:  # refused before anything was written: leave no directory behind
            storage.remove_empty_dir()
        raise
    request = _request(storage, plan, config, overwrite, metadata, started_unix)
    try:
        shards = _write_buckets(stager, plan, storage, config)
        outcome = StagingOutcome()
        record_staged(plan, outcome, config.staging_config.verify_replicas,
                      time.perf_counter() - started)
        return commit_reports(request.commit_target(), [rank_report(request, outcome, shards)])
    except BaseException:
        discard_files(storage, checkpoint_id)
        if created:
            storage.remove_empty_dir()
        raise
    finally:
        plan.host_bytes.clear()  # drop references to the caller's tensors
        stager.close()


def _request(
    storage: Storage, plan: StagingPlan, config: CheckpointerConfig, overwrite: bool,
    metadata: dict[str, Any], started_unix: float,
) -> SaveRequest:
    return SaveRequest(
        storage=storage,
        checkpoint_id=plan.checkpoint_id,
        rank_info=RankInfo(0, 1),
        items=plan.items,
        tree_json=plan.tree_json,
        overwrite=overwrite,
        hook=None,
        fsync=config.writer_config.fsync,
        barrier_timeout_secs=config.writer_config.barrier_timeout_secs,
        started_unix=started_unix,
        metadata=metadata,
    )


def _write_buckets(
    stager: DefaultStager, plan: StagingPlan, storage: Storage, config: CheckpointerConfig
) -> list[ShardResult]:
    """Every bucket of ``plan``, one data file each, encoded from the caller's memory."""
    writer = CheckpointWriter(config.writer_config)
    shards = []
    for index, layout in enumerate(plan.buckets):
        start = time.perf_counter()
        (arrays,) = stager.payload(plan, [index])
        extents = writer.write_bucket(
            storage, layout, arrays, rank=plan.rank, checkpoint_id=plan.checkpoint_id,
            checksum=config.writer_config.checksum, fsync=config.writer_config.fsync,
        )
        del arrays
        shards.append(ShardResult(layout.file, layout.file_nbytes, extents, NODE,
                                  time.perf_counter() - start))
    logger.debug("wrote %d data files of %s in this process", len(shards), storage.display)
    return shards

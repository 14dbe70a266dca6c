"""Reading checkpoints back: whole, or only the keys a target state dict asks for, in place.

Loading needs no Ray: the caller reads the files itself, straight into the destination tensors
(``preadv`` into their memory on local disks), ``io_threads`` extents at a time, verifying the
CRC32C of every extent as it lands. Before a byte of tensor data is read, :meth:`open` checks
the commit marker, the manifest's checksum, every row of the manifest and the size of every data
file, so a damaged or hostile checkpoint is refused before anything is allocated for it.

Reading goes in three passes: *plan* (one walk of the target against the stored tree: which
items, into which tensors; shape and dtype mismatches, missing keys and targets that match
nothing are found here, before anything is read or assigned), *read* (parallel), *assign* (run
the plan's steps: put the values read fresh into the result, hand modules and optimizers their
state through ``load_state_dict``).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import metrics
from .._util import LOADS, without_gc
from ..config import CheckpointReaderConfig, StorageConfig
from ..errors import UnsupportedValueError
from ..sharding import runs
from ..storage.files import open_files
from ..storage.storage import Storage
from ..types import RankInfo
from .extents import (
    _COALESCE_MAX_BYTES,
    ExtentReader,
    ReadStats,
    _add_pieces,
    _balance,
    _coalesce,
    _perform,
    _Piece,
    _Read,
)
from .map_location import resolve_map_location
from .match import _assign, _check_pickles, _Copy, _finish, _item_shape, _Plan, _Walker
from .validate import CheckpointInfo, open_checkpoint

logger = logging.getLogger(__name__)


class CheckpointReader:
    """Reads checkpoints written by ray_ckpt; see the module docstring."""

    def __init__(
        self,
        rank_info: RankInfo | None = None,
        config: CheckpointReaderConfig | None = None,
        *,
        storage_config: StorageConfig | None = None,
        filesystem: Any = None,
    ) -> None:
        self._rank_info = rank_info or RankInfo(0, 1)
        self._config = config or CheckpointReaderConfig()
        self._storage_config = storage_config
        self._filesystem = filesystem
        self.last_stats = ReadStats()

    # --- open ---------------------------------------------------------------------------------

    def open(self, path: str, *, check_files: bool = True) -> CheckpointInfo:
        """Validate the checkpoint at ``path`` (marker, manifest, file sizes, this rank's tree:
        :mod:`ray_ckpt.load.validate`) without reading tensor data, raising the first problem.
        ``check_files=False`` skips the data files (missing or short ones are then no error
        here)."""
        storage = Storage.from_path(path, self._filesystem, self._storage_config)
        return open_checkpoint(storage, self._rank_info.global_rank, check_files=check_files)

    # --- read ---------------------------------------------------------------------------------

    @without_gc
    def read(
        self,
        path: str,
        state_dict: dict[Any, Any] | None = None,
        *,
        map_location: Any = None,
        allow_pickle: bool = False,
    ) -> tuple[dict[Any, Any], list[str]]:
        """Read the checkpoint at ``path``.

        Without ``state_dict``: the whole state dict, tensors on the CPU (or where
        ``map_location`` says); a sharded tensor comes back whole. With it: only its keys, into
        its own tensors where they match (a DTensor or :class:`~ray_ckpt.ShardedTensor` gets
        its own shard, whatever sharding the checkpoint was saved with); anything else is
        replaced. Returns the result with the keys the checkpoint lacks.
        """
        if state_dict is not None and not isinstance(state_dict, dict):
            raise UnsupportedValueError(
                f"state_dict must be a dict to load into, got {type(state_dict).__qualname__}"
            )
        started = time.perf_counter()
        relocate = resolve_map_location(map_location)
        with LOADS.running():  # background work waits: the load comes first
            info = self.open(path)
            plan = _Plan()
            if state_dict is None:
                result = _Walker(info, plan, allow_pickle).fresh_value(info.tree)
            else:
                _Walker(info, plan, allow_pickle).walk(state_dict)
            _check_pickles(plan, info, allow_pickle)
            self.last_stats = self._run(info, plan.copies)
            values = {key: _finish(value, info, key, relocate) for key, value in plan.fresh.items()}
            if state_dict is None:
                result = _assign(result, values)
            else:
                for step in plan.steps:
                    step(values)
                result = state_dict
        secs = time.perf_counter() - started
        nbytes = plan.nbytes
        logger.info(
            "loaded %s: %d copies, %.1f MiB in %.3fs (%.2f GB/s)",
            info.storage.display, len(plan.copies), nbytes / 2**20, secs,
            nbytes / secs / 1e9 if secs > 0 else 0.0,
        )
        if plan.missing:
            logger.warning(
                "loaded %s without %d key(s) of the state_dict that it does not hold: %s%s "
                "(pass strict=True to make this an error)",
                info.storage.display, len(plan.missing), plan.missing[:10],
                " ..." if len(plan.missing) > 10 else "",
            )
        metrics.record_load(nbytes, secs)
        return result, plan.missing

    def _run(self, info: CheckpointInfo, copies: list[_Copy]) -> ReadStats:
        """Read every copy's byte ranges, verifying whole extents, and finish the copies that
        went through a staging tensor (non-contiguous or off-CPU destinations)."""
        pieces: list[_Piece] = []
        finishers: list[Callable[[], None]] = []
        extents = info.manifest.extents
        for copy in copies:
            meta = info.manifest.items[copy.item]
            dest_tensor = copy.dest
            direct = dest_tensor.is_cpu and dest_tensor.is_contiguous()
            stage = (
                dest_tensor.detach()
                if direct
                else torch.empty(dest_tensor.shape, dtype=dest_tensor.dtype)
            )
            dest = _bytes_of(stage).data
            shape = _item_shape(meta)
            if copy.box[1] == shape:  # the whole item: one run
                _add_pieces(pieces, extents[copy.item], 0, len(dest), dest, meta)
            else:
                itemsize = stage.element_size()
                position = 0
                for start, count in runs(shape, copy.box):
                    length = count * itemsize
                    _add_pieces(pieces, extents[copy.item], start * itemsize, length,
                                dest[position : position + length], meta)
                    position += length
            if not direct:
                finishers.append(functools.partial(_copy_back, dest_tensor, stage))
        stats = ReadStats()
        self._execute(info, _coalesce(pieces), stats)
        for finish in finishers:
            finish()
        return stats

    def _execute(self, info: CheckpointInfo, reads: list[_Read], stats: ReadStats) -> None:
        """Run the reads on ``io_threads`` threads, each with its own share of the bytes."""
        verify = self._config.verify_checksums
        with open_files(info.storage) as files:
            reader = ExtentReader(files, info.storage.display)
            headers = sorted({read.file for read in reads})
            shares = _balance(reads, min(self._config.io_threads, max(1, len(reads))))

            def work(share: list[_Read]) -> ReadStats:
                done = ReadStats()
                scratch = memoryview(bytearray(_COALESCE_MAX_BYTES))
                for read in share:
                    _perform(reader, read, verify, done, scratch)
                return done

            if len(shares) == 1:
                for file in headers:
                    reader.check_header(file)
                results = [work(shares[0])]
            else:
                with concurrent.futures.ThreadPoolExecutor(len(shares)) as pool:
                    # every header first (a damaged one fails the load before a byte lands in
                    # a tensor), at once: each is a round trip to storage
                    list(pool.map(reader.check_header, headers))
                    results = list(pool.map(work, shares))
            for result in results:
                stats.nbytes_read += result.nbytes_read
                stats.nbytes_unverified += result.nbytes_unverified


def _copy_back(dest: torch.Tensor, stage: torch.Tensor) -> None:
    dest.detach().copy_(stage)


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()



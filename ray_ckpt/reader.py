"""Reading checkpoints back: whole, or only the keys a target state dict asks for, in place.

Loading needs no Ray: the caller reads the files itself, straight into the destination tensors
(``preadv`` into their memory on local disks), ``io_threads`` extents at a time, verifying the
CRC32C of every extent as it lands. Before a byte of tensor data is read, :meth:`open` checks
the commit marker, the manifest's checksum, every row of the manifest and the size of every data
file, so a damaged or hostile checkpoint is refused before anything is allocated for it.

Reading goes in three passes over the target: *plan* (which items, into which tensors; shape
and dtype mismatches and missing keys are found here), *read* (parallel), *assign* (put the
loaded values into the result).
"""

from __future__ import annotations

import concurrent.futures
import logging
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import metrics
from ._checksum import crc32c
from ._tree import ItemRef, decode, item_refs, key_string, materialize
from .config import CheckpointReaderConfig, StorageConfig
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    PickleNotAllowedError,
    StateDictMismatchError,
    UnsupportedValueError,
)
from .format import (
    HEADER_SIZE,
    KIND_PICKLE,
    MARKER_NAME,
    Extent,
    ItemMeta,
    Manifest,
    Marker,
    check_header,
    dtype_from_name,
    manifest_from_bytes,
    parse_manifest,
)
from .storage import FileReader, Storage
from .types import RankInfo

logger = logging.getLogger(__name__)

MapLocation = Callable[[torch.Tensor, str | None], torch.Tensor]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, opened and validated: what :meth:`CheckpointReader.open` returns."""

    storage: Storage
    marker: Marker
    manifest: Manifest
    tree: Any
    file_sizes: dict[str, int]

    @property
    def table(self) -> pa.Table:
        """The manifest as an Arrow table (one row per extent)."""
        return self.manifest.table

    @property
    def nbytes(self) -> int:
        return self.marker.total_nbytes


@dataclass
class _Plan:
    fresh: set[int] = field(default_factory=set)
    into: list[tuple[int, torch.Tensor, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


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

    # --- open ---------------------------------------------------------------------------------

    def open(self, path: str) -> CheckpointInfo:
        """Validate the checkpoint at ``path`` (marker, manifest, file sizes) without reading
        tensor data."""
        storage = Storage.from_path(path, self._filesystem, self._storage_config)
        files = storage.list_files()
        if MARKER_NAME not in files:
            _raise_not_a_checkpoint(storage, files)
        marker = Marker.from_bytes(storage.read_file(MARKER_NAME), where=storage.display)
        if marker.manifest not in files:
            raise CorruptCheckpointError(
                f"checkpoint {storage.display} is damaged: its manifest {marker.manifest} is "
                "missing. Restore the file or use another checkpoint."
            )
        raw = storage.read_file(marker.manifest)
        if len(raw) != marker.manifest_nbytes or crc32c(raw) != marker.manifest_crc32c:
            raise CorruptCheckpointError(
                f"checkpoint {storage.display} is damaged: manifest {marker.manifest} does not "
                f"match the checksum and size in the commit marker ({len(raw)} bytes, expected "
                f"{marker.manifest_nbytes}). Restore the file or use another checkpoint."
            )
        where = f"{storage.display}/{marker.manifest}"
        manifest = parse_manifest(manifest_from_bytes(raw, where=where), where=where, marker=marker)
        _check_file_sizes(storage, manifest, files)
        tree_json = manifest.tree_for(self._rank_info.global_rank)
        tree = decode(tree_json, n_items=max(manifest.items, default=-1) + 1, where=where)
        _check_tree(tree, manifest, where)
        return CheckpointInfo(storage, marker, manifest, tree, files)

    # --- read ---------------------------------------------------------------------------------

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
        ``map_location`` says). With it: only its keys, into its own tensors where they match
        (anything else is replaced); returns it with the keys the checkpoint lacks.
        """
        started = time.perf_counter()
        relocate = resolve_map_location(map_location)
        info = self.open(path)
        plan = _Plan()
        if state_dict is None:
            plan.fresh = {ref.index for ref in item_refs(info.tree)}
        else:
            if not isinstance(state_dict, dict):
                raise UnsupportedValueError(
                    f"state_dict must be a dict to load into, got {type(state_dict).__qualname__}"
                )
            _walk(state_dict, info.tree, (), plan, info.manifest, None)
        _check_pickles(plan, info, allow_pickle)
        loaded = self._read_items(info, plan, relocate)
        if state_dict is None:
            result = materialize(info.tree, lambda ref: _finish(loaded[ref.index], ref))
        else:
            result = _walk(state_dict, info.tree, (), None, info.manifest, loaded)
        secs = time.perf_counter() - started
        nbytes = sum(info.manifest.items[i].nbytes for i in plan.fresh) + sum(
            info.manifest.items[i].nbytes for i, _, _ in plan.into
        )
        logger.info(
            "loaded %s: %d items, %.1f MiB in %.3fs (%.2f GB/s)%s",
            info.storage.display, len(plan.fresh) + len(plan.into), nbytes / 2**20, secs,
            nbytes / secs / 1e9 if secs > 0 else 0.0,
            f", {len(plan.missing)} keys missing" if plan.missing else "",
        )
        metrics.record_load(nbytes, secs)
        return result, plan.missing

    def _read_items(
        self, info: CheckpointInfo, plan: _Plan, relocate: MapLocation
    ) -> dict[int, Any]:
        manifest = info.manifest
        loaded: dict[int, Any] = {}
        jobs: list[tuple[Extent, np.ndarray | memoryview, ItemMeta]] = []
        finishers: list[Callable[[], None]] = []
        for index in sorted(plan.fresh):
            meta = manifest.items[index]
            if meta.kind == KIND_PICKLE:
                buf = bytearray(meta.nbytes)
                loaded[index] = buf
                jobs += [(e, _slice(memoryview(buf), e), meta) for e in manifest.extents[index]]
                continue
            tensor = torch.empty(meta.shape or (), dtype=dtype_from_name(meta.dtype or "", where=meta.key))
            loaded[index] = tensor
            dest = _bytes_of(tensor)
            jobs += [(e, _slice(dest, e), meta) for e in manifest.extents[index]]
        for index, target, key in plan.into:
            meta = manifest.items[index]
            direct = target.device.type == "cpu" and target.is_contiguous()
            stage = target.detach() if direct else torch.empty(target.shape, dtype=target.dtype)
            dest = _bytes_of(stage)
            jobs += [(e, _slice(dest, e), meta) for e in manifest.extents[index]]
            if not direct:
                finishers.append(lambda t=target, s=stage: t.detach().copy_(s))
        self._run(info, jobs)
        for finish in finishers:
            finish()
        for index in plan.fresh:
            meta = manifest.items[index]
            if meta.kind == KIND_PICKLE:
                loaded[index] = pickle.loads(bytes(loaded[index]))  # allow_pickle was checked
            else:
                loaded[index] = relocate(loaded[index], meta.device)
        return loaded

    def _run(self, info: CheckpointInfo, jobs: list[tuple[Extent, Any, ItemMeta]]) -> None:
        verify = self._config.verify_checksums
        checked: set[str] = set()
        lock = threading.Lock()
        with info.storage.reader() as files:

            def header(file: str) -> None:
                with lock:
                    if file in checked:
                        return
                    checked.add(file)
                raw = bytearray(HEADER_SIZE)
                files.read_into(file, 0, memoryview(raw))
                check_header(bytes(raw), file=f"{info.storage.display}/{file}")

            def job(extent: Extent, dest: Any, meta: ItemMeta) -> None:
                header(extent.file)
                if extent.length:
                    try:
                        files.read_into(extent.file, extent.offset, memoryview(dest))
                    except EOFError as e:
                        raise CorruptCheckpointError(
                            f"key {meta.key!r}: data file {info.storage.display}/{extent.file} is "
                            f"truncated ({e}). Restore the file or use another checkpoint."
                        ) from None
                if verify and extent.checksum is not None and crc32c(dest) != extent.checksum:
                    raise CorruptCheckpointError(
                        f"key {meta.key!r}: checksum mismatch in {info.storage.display}/"
                        f"{extent.file} (bytes {extent.offset}..{extent.offset + extent.length}): "
                        "the file is damaged. Restore it or use another checkpoint."
                    )

            threads = min(self._config.io_threads, max(1, len(jobs)))
            if threads == 1:
                for args in jobs:
                    job(*args)
                return
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                futures = [pool.submit(job, *args) for args in jobs]
                for future in futures:
                    future.result()


def _raise_not_a_checkpoint(storage: Storage, files: dict[str, int]) -> None:
    if files or storage.list_dirs():
        raise IncompleteCheckpointError(
            f"{storage.display} is an incomplete checkpoint: it has no commit marker "
            f"({MARKER_NAME}), so the save that wrote it never finished. Load an earlier "
            "checkpoint; CheckpointManager.cleanup() (or deleting the directory) removes it."
        )
    if storage.is_file():
        raise CheckpointNotFoundError(
            f"{storage.display} is a file, not a checkpoint directory"
        )
    if storage.exists():
        raise IncompleteCheckpointError(
            f"{storage.display} is an empty directory, not a checkpoint (no {MARKER_NAME})"
        )
    raise CheckpointNotFoundError(f"no checkpoint at {storage.display}: the path does not exist")


def _check_file_sizes(storage: Storage, manifest: Manifest, files: dict[str, int]) -> None:
    needed: dict[str, tuple[int, str]] = {}
    for index, exts in manifest.extents.items():
        for e in exts:
            end = e.offset + e.length
            if end > needed.get(e.file, (0, ""))[0]:
                needed[e.file] = (end, manifest.items[index].key)
    for file, (end, key) in needed.items():
        size = files.get(file)
        if size is None:
            raise CorruptCheckpointError(
                f"checkpoint {storage.display} is damaged: data file {file} (key {key!r}) is "
                "missing. Restore it or use another checkpoint."
            )
        if size < end:
            raise CorruptCheckpointError(
                f"checkpoint {storage.display} is damaged: data file {file} is truncated to "
                f"{size} bytes but key {key!r} needs {end}. Restore it or use another checkpoint."
            )


def _check_tree(tree: Any, manifest: Manifest, where: str) -> None:
    for ref in item_refs(tree):
        meta = manifest.items.get(ref.index)
        if meta is None or (ref.tag == "P") != (meta.kind == KIND_PICKLE):
            raise CorruptCheckpointError(
                f"{where}: the tree refers to item {ref.index} as {ref.tag!r}, which the "
                "manifest does not hold"
            )


def _check_pickles(plan: _Plan, info: CheckpointInfo, allow_pickle: bool) -> None:
    if allow_pickle:
        return
    keys = [
        info.manifest.items[i].key
        for i in sorted(plan.fresh)
        if info.manifest.items[i].kind == KIND_PICKLE
    ]
    if keys:
        raise PickleNotAllowedError(
            f"checkpoint {info.storage.display} stores {len(keys)} pickled object(s) (keys "
            f"{keys[:10]}); loading them runs code from the file. Pass allow_pickle=True only "
            "if you trust who wrote it, or load a state_dict without those keys."
        )


def _walk(
    target: Any,
    stored: Any,
    path: tuple[Any, ...],
    plan: _Plan | None,
    manifest: Manifest,
    loaded: dict[int, Any] | None,
) -> Any:
    """Match ``target`` against the stored tree. With ``plan``: record what to read. With
    ``loaded``: put the read values into ``target`` and return it."""
    key = key_string(path)
    if isinstance(stored, ItemRef):
        meta = manifest.items[stored.index]
        if isinstance(target, torch.Tensor) and stored.tag != "P":
            if plan is not None:
                _check_match(target, meta, key)
                plan.into.append((stored.index, target, key))
            return target
        if isinstance(target, torch.Tensor):
            raise StateDictMismatchError(
                f"key {key!r}: the target is a tensor but the checkpoint holds a pickled object"
            )
        if plan is not None:
            plan.fresh.add(stored.index)
            return None
        assert loaded is not None
        return _finish(loaded[stored.index], stored)
    if isinstance(target, torch.Tensor):
        raise StateDictMismatchError(
            f"key {key!r}: the target is a tensor but the checkpoint holds a "
            f"{type(stored).__qualname__}"
        )
    if isinstance(target, dict):
        if not isinstance(stored, dict):
            raise StateDictMismatchError(
                f"key {key!r}: the target is a dict but the checkpoint holds a "
                f"{type(stored).__qualname__}"
            )
        for k in list(target):
            if k in stored:
                value = _walk(target[k], stored[k], (*path, k), plan, manifest, loaded)
                if loaded is not None:
                    target[k] = value
            elif plan is not None:
                plan.missing.append(key_string((*path, k)))
        return target
    if isinstance(target, (list, tuple)) and not isinstance(target, torch.Size):
        if not isinstance(stored, (list, tuple)):
            raise StateDictMismatchError(
                f"key {key!r}: the target is a {type(target).__name__} but the checkpoint holds "
                f"a {type(stored).__qualname__}"
            )
        values = []
        for i in range(max(len(target), len(stored))):
            current = target[i] if i < len(target) else None
            if i < len(stored):
                values.append(_walk(current, stored[i], (*path, i), plan, manifest, loaded))
            else:
                if plan is not None:
                    plan.missing.append(key_string((*path, i)))
                values.append(current)
        if loaded is None:
            return target
        if isinstance(target, list):
            target[:] = values
            return target
        return tuple(values)
    if plan is not None:
        plan.fresh.update(ref.index for ref in item_refs(stored))
        return None
    assert loaded is not None
    return materialize(stored, lambda ref: _finish(loaded[ref.index], ref))


def _check_match(target: torch.Tensor, meta: ItemMeta, key: str) -> None:
    dtype = dtype_from_name(meta.dtype or "", where=key)
    if tuple(target.shape) != meta.shape or target.dtype != dtype:
        raise StateDictMismatchError(
            f"key {key!r}: the checkpoint holds {meta.dtype} {list(meta.shape or ())} but the "
            f"target tensor is {str(target.dtype).removeprefix('torch.')} {list(target.shape)}. "
            "Load into a tensor of that shape and dtype, or leave the key out of state_dict."
        )


def _finish(value: Any, ref: ItemRef) -> Any:
    if ref.tag == "N" and isinstance(value, torch.Tensor):
        return value.cpu().numpy()
    return value


def _bytes_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _slice(dest: Any, extent: Extent) -> Any:
    return dest[extent.chunk_offset : extent.chunk_offset + extent.length]


def resolve_map_location(map_location: Any) -> MapLocation:
    """Turn ``default_map_location`` into a function ``(cpu_tensor, saved_device) -> tensor``.

    ``None`` keeps tensors on the CPU; a device or device string moves every tensor there; a
    dict maps saved device strings to devices (others stay on the CPU); a callable is called as
    ``fn(tensor, saved_device)``.
    """
    if map_location is None:
        return lambda t, _: t
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        return lambda t, saved: map_location(t, saved)
    if isinstance(map_location, dict):
        mapping = {str(k): _device(v) for k, v in map_location.items()}
        return lambda t, saved: t.to(mapping[saved]) if saved in mapping else t
    device = _device(map_location)
    if device.type == "cpu":
        return lambda t, _: t
    return lambda t, _: t.to(device)


def _device(value: Any) -> torch.device:
    if not isinstance(value, (str, torch.device)):
        raise UnsupportedValueError(
            f"default_map_location must be None, a device, a device string, a dict or a "
            f"callable, got {type(value).__qualname__}"
        )
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as e:
        raise UnsupportedValueError(f"default_map_location {value!r} is not a device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedValueError(
            f"default_map_location {value!r} asks for CUDA, which this process does not have; "
            "use 'cpu' or load on a GPU machine"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UnsupportedValueError(
            f"default_map_location {value!r}: this process sees {torch.cuda.device_count()} GPUs"
        )
    return device

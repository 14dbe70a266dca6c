"""``import``: a ``torch.save`` file, a safetensors file or a Hugging Face safetensors directory,
saved as a ray_ckpt checkpoint.

The source is read without copying it into memory, then saved as an ordinary committed
checkpoint (checksums, manifest, marker). To a local path, this process writes it itself
(:mod:`ray_ckpt.save.in_process`: the stager's plan, the encoder and the commit of every save,
no Ray started, even when one is running: it is faster and writes the same bytes); anywhere
else (an object store, ``mem://``, a ``filesystem`` other than the local one) or through a
given checkpointer, a real checkpointer saves it, starting Ray if needed:

* **safetensors** (one file, or a directory with ``model.safetensors.index.json`` and its
  shards): the header is validated by the ``safetensors`` library (``safe_open``), then every
  tensor becomes a view of the file, memory-mapped copy-on-write (``torch.frombuffer``). The
  encoder writes those pages straight to the data files (or the stager copies them into Ray's
  object store bucket by bucket, within its memory budget), so the importing process holds no
  second copy of the model; only tensors under ``pack_threshold_bytes`` are copied, a bucket's
  pack at a time. The state dict is flat, keyed
  by the tensor names (``model.layers.0.weight``), as ``transformers`` and
  ``load_state_dict`` expect; ``under="model"`` puts it under one key instead.
* **torch.save files**: ``torch.load(mmap=True, weights_only=True)``: tensors are views of the
  mapped file, and only tensors, containers and plain values are unpickled. A file that holds
  anything else is refused (nothing in it is run); a file in torch's legacy (pre-1.6,
  non-zip) format cannot be mapped and is read whole, with a warning.

Where a tensor's bytes start at an offset that is not a multiple of its element size (possible
in safetensors files), the view is unaligned; the stager only ever copies its bytes, never
computes with it.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import torch

from ..builder import make_sync_checkpointer
from ..checkpointer import AsyncCheckpointer, Checkpointer
from ..config import CheckpointerConfig
from ..errors import CheckpointError, CheckpointNotFoundError, UnsupportedValueError
from ..save.in_process import is_local, save_in_process
from ..storage.credentials import redact
from ..types import RankInfo
from ._safetensors import DTYPES, INDEX, SINGLE

logger = logging.getLogger(__name__)

FORMATS = ("torch", "safetensors")
_DTYPE_OF_NAME = {name: dtype for dtype, name in DTYPES.items()}


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_checkpoint` read and wrote."""

    path: str  # the checkpoint written (a URI's user-info redacted)
    source: str  # the file or directory read
    format: str  # "torch" or "safetensors"
    files: list[str]  # the source files read
    tensors: int
    nbytes: int


def import_checkpoint(
    src: str,
    dest: str,
    *,
    under: str | None = None,
    checkpointer: Checkpointer | None = None,
    config: CheckpointerConfig | None = None,
    filesystem: Any = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> ImportResult:
    """Save the state dict in ``src`` as the ray_ckpt checkpoint ``dest``.

    ``src`` (a local path) is a ``torch.save`` file, a ``.safetensors`` file, or a directory
    holding ``model.safetensors`` or ``model.safetensors.index.json`` and its shards (the
    Hugging Face layout; the index file itself may be named too). The format is recognised
    from the content, not the name. A safetensors source gives a flat dict of its tensor
    names; ``under="model"`` nests the state under that key (needed for a torch file whose
    content is not a dict).

    The save goes through ``checkpointer`` (any sync or async checkpointer; an async save is
    waited for). Without one, a local ``dest`` (a path or ``file://`` URI, on no other
    ``filesystem`` than the local one) is written by this process itself, without Ray
    (:func:`ray_ckpt.save.in_process.save_in_process`, with ``config``'s bucket sizes,
    checksums and fsync); any other goes through a single-rank sync checkpointer made from
    ``config`` and ``filesystem`` and closed afterwards (Ray is started if needed).
    ``overwrite`` and ``allow_pickle`` are passed to ``save``: a torch file may hold values
    that ray_ckpt keeps only as pickle (a weights-only load allows a few, e.g.
    ``collections.Counter``).
    """
    source = _local_source(src)
    files, fmt, index = _source_files(source)
    if fmt == "safetensors":
        state: Any = _safetensors_state(files, index)
    else:
        state = _torch_state(files[0])
    if under is not None:
        state = {under: state}
    elif not isinstance(state, dict):
        raise CheckpointError(
            f"{source} holds a {type(state).__qualname__}, not a dict; a checkpoint is a state "
            "dict. Import it under a key: under='model' (ray-ckpt import --under model)."
        )
    tensors, nbytes = _count_tensors(state)
    metadata = {"imported_from": {"source": source, "format": fmt}}
    _save(dest, state, checkpointer, config, filesystem, overwrite, allow_pickle, metadata)
    del state  # the mapped files are released with the last tensor that views them
    logger.info(
        "imported %s (%s, %d file(s)): %d tensors, %.1f MiB into %s",
        source, fmt, len(files), tensors, nbytes / 2**20, redact(dest),
    )
    return ImportResult(redact(dest), source, fmt, files, tensors, nbytes)


def _save(
    dest: str, state: dict[Any, Any], checkpointer: Checkpointer | None,
    config: CheckpointerConfig | None, filesystem: Any, overwrite: bool, allow_pickle: bool,
    metadata: dict[str, Any],
) -> None:
    if checkpointer is None and is_local(dest, filesystem):
        # this process writes the checkpoint itself: no Ray to start (seconds) and no copy
        # through the object store; the bytes are those of a checkpointer's save
        save_in_process(dest, state, config=config, filesystem=filesystem, overwrite=overwrite,
                        allow_pickle=allow_pickle, metadata=metadata)
        return
    if checkpointer is None:
        with make_sync_checkpointer(config, RankInfo(0, 1), filesystem=filesystem) as ckptr:
            ckptr.save(dest, state, overwrite=overwrite, allow_pickle=allow_pickle,
                       metadata=metadata)
        return
    if isinstance(checkpointer, AsyncCheckpointer):
        _, write = checkpointer.save(
            dest, state, overwrite=overwrite, allow_pickle=allow_pickle, metadata=metadata
        )
        write.result()  # committed, and the mapped files are no longer needed
    else:
        checkpointer.save(
            dest, state, overwrite=overwrite, allow_pickle=allow_pickle, metadata=metadata
        )


# --- finding the source ---------------------------------------------------------------------


def _local_source(src: str) -> str:
    if "://" in src and not src.startswith("file://"):
        raise ValueError(
            f"import reads a local path, not {src!r}: copy the files to a local disk first"
        )
    return os.path.abspath(src.removeprefix("file://"))


def _source_files(source: str) -> tuple[list[str], str, str | None]:
    """The files to read, in order, their format, and the index that names them (if any)."""
    if os.path.isdir(source):
        index = os.path.join(source, INDEX)
        if os.path.isfile(index):
            return _index_files(index), "safetensors", index
        if os.path.isfile(os.path.join(source, SINGLE)):
            return [os.path.join(source, SINGLE)], "safetensors", None
        raise CheckpointNotFoundError(
            f"{source} is a directory without {INDEX} or {SINGLE}: name the file to import "
            "(a torch.save or .safetensors file), or a Hugging Face model directory"
        )
    if not os.path.isfile(source):
        raise CheckpointNotFoundError(f"nothing to import at {source}: no such file or directory")
    if source.endswith(".index.json"):
        return _index_files(source), "safetensors", source
    return [source], "safetensors" if _is_safetensors(source) else "torch", None


def _is_safetensors(file: str) -> bool:
    """8 bytes of header length, then a JSON object (a torch file starts with a zip or pickle
    signature instead)."""
    with open(file, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length <= os.path.getsize(file) - 8


def _index_files(index: str) -> list[str]:
    """The shard files an index names (in name order), each checked to exist beside it."""
    weight_map = _weight_map(index)
    directory = os.path.dirname(index)
    files = []
    for name in sorted(set(weight_map.values())):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            key = next(k for k, v in weight_map.items() if v == name)
            raise CheckpointNotFoundError(
                f"{index} maps tensor {key!r} to {name}, which is not in {directory}: copy the "
                "whole model directory"
            )
        files.append(path)
    return files


def _weight_map(index: str) -> dict[str, str]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index} is not a safetensors index (JSON with a 'weight_map'): {e!r}"
        ) from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v == os.path.basename(v)
        and not v.startswith(".") for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index}: 'weight_map' must map tensor names to file names in the same directory"
        )
    return weight_map


# --- safetensors ------------------------------------------------------------------------------


def _safetensors_state(files: list[str], index: str | None) -> dict[str, torch.Tensor]:
    """Every tensor of ``files``, as views of the mapped files, in file order and, within a
    file, in the order of their bytes; checked against the ``index`` that names the files."""
    state: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for file in files:
        for name, tensor in _safetensors_file(file):
            if name in state:
                raise CheckpointError(
                    f"tensor {name!r} is in both {where[name]} and {file}: a model's shards "
                    "hold each tensor once"
                )
            state[name], where[name] = tensor, file
    if index is not None:
        _check_weight_map(index, _weight_map(index), where)
    return state


def _check_weight_map(index: str, weight_map: dict[str, str], where: dict[str, str]) -> None:
    for name, file in weight_map.items():
        if os.path.basename(where.get(name, "")) != file:
            raise CheckpointError(
                f"{index} maps tensor {name!r} to {file}, but "
                f"{'it is in ' + where[name] if name in where else 'no shard holds it'}: the "
                "index and the shards do not belong together"
            )
    unlisted = sorted(set(where) - set(weight_map))
    if unlisted:
        raise CheckpointError(
            f"tensors {unlisted[:10]} are in the shards but not in {index}: the index and the "
            "shards do not belong together"
        )


def _safetensors_file(file: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt"):  # validates the header against the file
            pass
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a valid safetensors file: {e}") from None
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    data_start = 8 + length
    entries = sorted(
        ((name, spec) for name, spec in header.items() if name != "__metadata__"),
        key=lambda entry: entry[1]["data_offsets"][0],
    )
    mapped: mmap.mmap | None = None
    tensors = []
    for name, spec in entries:
        dtype = _DTYPE_OF_NAME.get(spec["dtype"])
        if dtype is None:
            raise UnsupportedValueError(
                f"{file}: tensor {name!r} has safetensors dtype {spec['dtype']}, which ray_ckpt "
                f"cannot import (it knows {sorted(_DTYPE_OF_NAME)})"
            )
        shape = tuple(int(d) for d in spec["shape"])
        begin, end = spec["data_offsets"]
        numel = math.prod(shape)
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{file}: tensor {name!r} has {end - begin} bytes for {shape}")
        if numel == 0:
            tensors.append((name, torch.empty(shape, dtype=dtype)))
            continue
        if mapped is None:
            with open(file, "rb") as f:  # the mapping keeps its own descriptor
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        view = torch.frombuffer(mapped, dtype=dtype, count=numel, offset=data_start + begin)
        tensors.append((name, view.view(shape)))
    return tensors


# --- torch.save files -------------------------------------------------------------------------


# torch.load(weights_only=True) can be made to run code before torch 2.6 (CVE-2025-32434)
_SAFE_TORCH_LOAD = (2, 6)


def _require_safe_torch_load(file: str) -> None:
    """Refuse to open a torch file with a torch whose ``weights_only`` load is unsafe."""
    if _torch_version() < _SAFE_TORCH_LOAD:
        raise CheckpointError(
            f"refusing to read {file}: torch {torch.__version__} is older than 2.6, whose "
            "torch.load(weights_only=True) a crafted file can make run code (CVE-2025-32434). "
            "Upgrade torch to 2.6 or later (ray_ckpt requires it)."
        )


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+", 1)[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _torch_state(file: str) -> Any:
    _require_safe_torch_load(file)
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise _unreadable(file, e) from e
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise _unreadable(file, e) from e
    logger.warning(
        "%s is in torch's legacy (non-zip) format, which cannot be memory-mapped: reading it "
        "into memory whole", file,
    )
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise _unreadable(file, e) from e


def _unreadable(file: str, error: Exception) -> CheckpointError:
    message = str(error)
    if "Weights only load failed" in message:
        reason = message.split("WeightsUnpickler error:", 1)[-1].strip().split(". ")[0]
        return CheckpointError(
            f"{file} holds more than tensors, containers and plain values ({reason}), and "
            "ray_ckpt never unpickles arbitrary objects: nothing in it was run. Save the "
            "tensors alone (torch.save(model.state_dict(), path)) and import that; or, only if "
            "you trust the file, torch.load it yourself and save what it holds with a "
            "checkpointer."
        )
    return CheckpointError(f"cannot read {file} as a torch.save file: {message.splitlines()[0]}")


def _count_tensors(state: Any) -> tuple[int, int]:
    """Tensors in ``state`` (each object once) and their bytes."""
    seen: dict[int, int] = {}

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            seen[id(value)] = value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(state)
    return len(seen), sum(seen.values())

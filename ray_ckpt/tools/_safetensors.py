"""Writing safetensors shards straight from a checkpoint's extents.

safetensors is a small, fully specified format: 8 bytes of little-endian header length, a JSON
header mapping each tensor name to its dtype, shape and ``[begin, end)`` byte range, padded with
spaces to a multiple of 8, then the raw little-endian bytes. The header is computed from the
manifest alone, so each shard is written front to back, one window of each tensor at a time
(:meth:`Source.chunks`: at most :data:`DEFAULT_WINDOW_BYTES` in memory). A sharded tensor is
consolidated on the way: its windows are filled from the shards they overlap, so the file holds
the one full tensor in C order. The header holds no checkpoint id, so the same tensors always
export to the same bytes. The result is checked against the ``safetensors`` library in the
tests.

Sharding follows ``transformers``: one file ``model.safetensors`` when everything fits in
``max_shard_bytes``; otherwise ``model-00001-of-0000N.safetensors`` ... and
``model.safetensors.index.json`` = ``{"metadata": {"total_size": N}, "weight_map": {name:
file}}``.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointExistsError, UnsupportedValueError
from ..format.refs import key_string
from ..format.tree import leaves
from ._files import discard, publish, temp_name
from ._source import Progress, Source, TensorLeaf, byte_view, is_tensor_ref

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
RESERVED = "__metadata__"  # the header's own entry: no tensor may have this name

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}

Shard = list[tuple[str, TensorLeaf]]  # (tensor name, tensor), in file order


def write_safetensors(
    source: Source, tree: Any, out: str, *, max_shard_bytes: int, overwrite: bool,
    progress: Progress,
) -> tuple[list[str], int, int, list[str]]:
    """Write the tensors of ``tree`` into directory ``out``; returns ``(files, tensors, bytes,
    skipped keys)``."""
    tensors, skipped = _split_leaves(source, tree)
    _check_tensors(source, tensors)
    shards = _plan_shards(tensors, max_shard_bytes)
    names = _shard_names(len(shards))
    targets = names + ([INDEX] if len(shards) > 1 else [])
    os.makedirs(out, exist_ok=True)
    previous = _previous_export(out)
    if previous and not overwrite:
        raise CheckpointExistsError(
            f"{out} already holds an export ({', '.join(previous[:4])}); pass --overwrite "
            "(overwrite=True) to replace it, or export into another directory"
        )
    total = sum(tensor.nbytes for _, tensor in tensors)
    progress.start(total, "export")
    temps: list[str] = []
    try:
        for name, shard in zip(names, shards, strict=True):
            temps.append(temp_name(out, name))
            _write_shard(source, shard, temps[-1], progress)
        if len(shards) > 1:
            temps.append(temp_name(out, INDEX))
            _write_index(temps[-1], names, shards, total)
        publish(out, temps, targets, stale=previous)
    except BaseException:
        discard(temps)
        raise
    return [os.path.join(out, t) for t in targets], len(tensors), total, skipped


def _split_leaves(source: Source, tree: Any) -> tuple[Shard, list[str]]:
    tensors: Shard = []
    skipped: list[str] = []
    for path, leaf in leaves(tree):
        if is_tensor_ref(leaf):
            tensors.append((key_string(path), source.tensor(leaf)))
        else:
            skipped.append(key_string(path))
    return tensors, skipped


def _check_tensors(source: Source, tensors: Shard) -> None:
    seen: set[str] = set()
    for name, tensor in tensors:
        if name in seen:
            raise CheckpointError(
                f"checkpoint {source.info.storage.display}: two tensors are both named {name!r} "
                "as dotted keys; safetensors needs unique names. Export with --to torch."
            )
        seen.add(name)
        if name == RESERVED:
            raise UnsupportedValueError(
                f"checkpoint {source.info.storage.display}: a tensor is named {name!r}, which "
                "safetensors reserves for its metadata (the file could not be read back). "
                "Export with --to torch, or export a subtree without it with --only."
            )
        if tensor.dtype not in DTYPES:
            raise UnsupportedValueError(
                f"key {name!r} is {tensor.dtype}, which safetensors cannot hold (it holds "
                f"{sorted(str(d).removeprefix('torch.') for d in DTYPES)}). Export with "
                "--to torch, or export a subtree without it with --only."
            )


def _plan_shards(tensors: Shard, max_shard_bytes: int) -> list[Shard]:
    """Tensors in order, cut into shards of at most ``max_shard_bytes`` of data (a larger
    tensor gets a shard of its own); always at least one shard."""
    shards: list[Shard] = [[]]
    size = 0
    for name, tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += tensor.nbytes
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def _previous_export(out: str) -> list[str]:
    return sorted(
        n for n in os.listdir(out)
        if n == INDEX or (n.startswith("model") and n.endswith(".safetensors"))
    )


def _header(shard: Shard) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in shard:
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def _write_shard(source: Source, shard: Shard, file: str, progress: Progress) -> None:
    header = _header(shard)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for _, tensor in shard:
            for chunk in source.chunks(tensor):
                f.write(byte_view(chunk))
                progress.advance(chunk.numel() * chunk.element_size())
        f.flush()
        os.fsync(f.fileno())


def _write_index(file: str, names: list[str], shards: list[Shard], total: int) -> None:
    weight_map = {
        tensor: name for name, shard in zip(names, shards, strict=True) for tensor, _ in shard
    }
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(file, "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())

"""Writing a ``torch.save`` file straight from a checkpoint's extents, with bounded memory.

``torch.save`` wants every tensor in memory. Instead:

1. The state dict's *skeleton* is built: its containers and plain values, numpy arrays and
   (with ``allow_pickle``) unpickled objects read for real (they live in the pickle anyway),
   and a FakeTensor (shape and dtype, no memory) for every tensor, one per stored item so
   that tied tensors stay tied; a sharded tensor gets one FakeTensor of its global shape.
2. ``torch.serialization.skip_data(materialize_fake_tensors=True)`` saves it: a regular torch
   zip archive with the pickle and a record of the right size, still empty, per storage.
3. Which record belongs to which item: the file is loaded back with ``torch.load(mmap=True)``
   (pages never touched, so nothing is read) and walked side by side with the tree; each
   tensor's storage address minus the mapping's base is its record's offset in the file. The
   base is derived from the zip directory and every tensor is checked to land exactly on a
   record of its size, so no assumption about how ``torch.save`` numbers storages is needed,
   and a change in ``torch.load`` is caught rather than written out wrong.
4. Each tensor is read in windows (:meth:`Source.chunks`, CRC32C verified; a sharded tensor
   consolidated from its shards), one at a time, and written with ``pwrite`` at its place in
   the record, while the record's zip CRC-32 is computed on the way. That
   CRC, left at 0 by ``skip_data``, is then written into the record's data descriptor and its
   central directory entry (zip APPNOTE 4.3.9, 4.3.12), so the file is a valid zip archive for
   any tool, not only for ``torch.load`` (which does not check it).

Memory: one window at a time (:data:`DEFAULT_WINDOW_BYTES`), plus the skeleton's arrays and
objects. Needs torch>=2.6 (``skip_data`` with ``materialize_fake_tensors``).
"""

from __future__ import annotations

import inspect
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import CheckpointError, CheckpointExistsError, PickleNotAllowedError
from ..format.refs import ItemRef, ShardedRef
from ..format.tree import materialize
from ._files import discard, publish, temp_name
from ._source import Progress, Source, StoredRef, TensorLeaf, byte_view, ref_ident, stored_refs

Ident = int | tuple[int, ...]  # an item, or the items of a sharded tensor's shards


def write_torch(
    source: Source, tree: Any, out: str, *, allow_pickle: bool, overwrite: bool,
    progress: Progress,
) -> tuple[list[str], int, int, list[str]]:
    """Write ``tree`` as the torch file ``out``; returns ``(files, tensors, bytes, [])``."""
    _require_skip_data()
    directory, name = os.path.split(out)
    if os.path.isdir(out):
        raise CheckpointExistsError(f"{out} is a directory; name the torch file to write")
    if os.path.exists(out) and not overwrite:
        raise CheckpointExistsError(
            f"{out} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot write {out}: directory {directory} does not exist")
    refs = {ref_ident(ref): ref for ref in stored_refs(tree)}
    _check_pickles(source, refs, allow_pickle)
    tensors = {i: source.tensor(ref) for i, ref in refs.items() if _is_tensor(ref)}
    total = sum(t.nbytes for t in tensors.values()) + sum(  # + arrays and objects
        source.manifest.items[ref.index].nbytes for ref in refs.values()
        if isinstance(ref, ItemRef) and not _is_tensor(ref)
    )
    progress.start(total, "export")
    temp = temp_name(directory, name)
    try:
        skeleton = _skeleton(source, tree, tensors, progress)
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(skeleton, temp)
        del skeleton
        _fill(source, tree, tensors, temp, progress)
        publish(directory, [temp], [name], stale=[])
    except BaseException:
        discard([temp])
        raise
    count = sum(1 for ref in refs.values() if not (isinstance(ref, ItemRef) and ref.tag == "P"))
    return [out], count, total, []


def _is_tensor(ref: StoredRef) -> bool:
    """Written into a record of its own (numpy arrays live in the pickle, as the skeleton's)."""
    return isinstance(ref, ShardedRef) or ref.tag == "T"


def _require_skip_data() -> None:
    skip = getattr(torch.serialization, "skip_data", None)
    if skip is None or "materialize_fake_tensors" not in inspect.signature(skip).parameters:
        raise CheckpointError(
            "exporting to a torch file needs torch>=2.6 (torch.serialization.skip_data with "
            f"FakeTensors); this is torch {torch.__version__}. Upgrade torch, or export to "
            "safetensors."
        )


def _check_pickles(source: Source, refs: dict[Ident, StoredRef], allow_pickle: bool) -> None:
    pickled = [
        source.manifest.items[ref.index].key for ref in refs.values()
        if isinstance(ref, ItemRef) and ref.tag == "P"
    ]
    if pickled and not allow_pickle:
        raise PickleNotAllowedError(
            f"checkpoint {source.info.storage.display} stores {len(pickled)} pickled object(s) "
            f"(keys {pickled[:10]}); exporting them unpickles them, which runs code from the "
            "file. Pass --allow-pickle only if you trust who wrote it, or export a subtree "
            "without them with --only."
        )


def _skeleton(
    source: Source, tree: Any, tensors: dict[Ident, TensorLeaf], progress: Progress
) -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fakes: dict[Ident, torch.Tensor] = {}
    with FakeTensorMode():
        for ident, tensor in tensors.items():
            fakes[ident] = torch.empty(tensor.shape, dtype=tensor.dtype)

    def resolve(ref: StoredRef) -> Any:
        if _is_tensor(ref):
            return fakes[ref_ident(ref)]
        assert isinstance(ref, ItemRef)
        value = source.read_item(ref.index, progress)
        if ref.tag == "P":
            assert isinstance(value, bytes)
            return pickle.loads(value)  # the caller passed allow_pickle
        assert isinstance(value, torch.Tensor)
        return value.numpy()

    return materialize(tree, resolve)


def _fill(
    source: Source, tree: Any, tensors: dict[Ident, TensorLeaf], file: str, progress: Progress
) -> None:
    records = _records(file)
    places = _places(tree, tensors, file, records)
    crcs: dict[str, int] = {}
    fd = os.open(file, os.O_WRONLY)
    try:
        for ident, name in places.items():
            crcs[name] = _write_tensor(source, tensors[ident], fd, records[name][0], progress)
        os.fsync(fd)
    finally:
        os.close(fd)
    _write_crcs(file, crcs)


def _records(file: str) -> dict[str, tuple[int, int]]:
    """``{record name: (offset of its data, size)}`` for every record of the zip ``file``."""
    records = {}
    with zipfile.ZipFile(file) as archive, open(file, "rb") as f:
        for info in archive.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            start = info.header_offset + 30 + name_len + extra_len
            records[info.filename] = (start, info.file_size)
    return records


def _places(
    tree: Any, tensors: dict[Ident, TensorLeaf], file: str, records: dict[str, tuple[int, int]]
) -> dict[Ident, str]:
    """``{tensor: name of the zip record that holds its bytes}``."""
    loaded = torch.load(file, mmap=True, weights_only=False, map_location="cpu")
    # Our own file, just written from the skeleton; it may hold arrays (and, with
    # allow_pickle, objects) that the weights-only loader refuses. No data page is touched.
    addresses: dict[Ident, int] = {}
    for ref, tensor in _pair_items(tree, loaded):
        ident = ref_ident(ref)
        if ident in tensors and tensors[ident].nbytes:
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"internal error: {file} holds no tensor for {ref}")
            addresses[ident] = tensor.untyped_storage().data_ptr()
    del loaded
    if not addresses:
        return {}
    data = {
        start: name for name, (start, size) in records.items() if size and "/data/" in name
    }
    # The tensor at the lowest address sits in one of the records: find the base that puts
    # every tensor exactly on a record of its size.
    lowest = min(addresses.values())
    for start in sorted(data):
        places = _placed(tensors, addresses, data, records, lowest - start)
        if places is not None:
            return places
    raise CheckpointError(
        f"internal error: cannot place the tensors in {file}; this torch ({torch.__version__}) "
        "maps files differently. Export to safetensors instead."
    )


def _placed(
    tensors: dict[Ident, TensorLeaf],
    addresses: dict[Ident, int],
    data: dict[int, str],
    records: dict[str, tuple[int, int]],
    base: int,
) -> dict[Ident, str] | None:
    places = {}
    for ident, address in addresses.items():
        name = data.get(address - base)
        if name is None or records[name][1] != tensors[ident].nbytes:
            return None
        places[ident] = name
    return places


def _write_tensor(
    source: Source, tensor: TensorLeaf, fd: int, start: int, progress: Progress
) -> int:
    """Write ``tensor`` at ``start``, one window at a time; returns its zip CRC-32."""
    crc = 0
    position = start
    for chunk in source.chunks(tensor):
        buffer = byte_view(chunk)
        written = 0
        while written < len(buffer):
            written += os.pwrite(fd, buffer[written:], position + written)
        crc = zlib.crc32(buffer, crc)
        position += len(buffer)
        progress.advance(len(buffer))
    return crc


def _pair_items(tree: Any, loaded: Any) -> Iterator[tuple[StoredRef, Any]]:
    """Each stored leaf of ``tree`` with the value at the same place in ``loaded``. Only the
    tree's structure is walked (an unpickled object may itself be a dict)."""
    if isinstance(tree, (ItemRef, ShardedRef)):
        yield tree, loaded
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _pair_items(value, loaded[key])
    elif isinstance(tree, (list, tuple)) and not isinstance(tree, torch.Size):
        for value, other in zip(tree, loaded, strict=True):
            yield from _pair_items(value, other)


def _write_crcs(file: str, crcs: dict[str, int]) -> None:
    """Put each record's CRC-32 where zip readers look: the data descriptor that follows the
    data (``skip_data`` records have one) and the central directory entry."""
    with zipfile.ZipFile(file) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        central_directory = archive.start_dir  # type: ignore[attr-defined]
    records = _records(file)
    with open(file, "rb+") as f:
        for name, crc in crcs.items():
            info = infos[name]
            if not info.flag_bits & 0x08:
                raise CheckpointError(f"internal error: record {name} of {file} has no descriptor")
            end = records[name][0] + info.compress_size
            f.seek(end)
            signature = f.read(4) == b"PK\x07\x08"
            f.seek(end + (4 if signature else 0))
            f.write(struct.pack("<I", crc))
        _patch_central_directory(f, central_directory, len(infos), crcs)
        f.flush()
        os.fsync(f.fileno())


def _patch_central_directory(f: Any, position: int, count: int, crcs: dict[str, int]) -> None:
    for _ in range(count):
        f.seek(position)
        entry = f.read(46)
        if entry[:4] != b"PK\x01\x02":
            raise CheckpointError(f"internal error: unexpected zip layout in {f.name}")
        name_len, extra_len, comment_len = struct.unpack("<HHH", entry[28:34])
        name = f.read(name_len).decode("utf-8")
        if name in crcs:
            f.seek(position + 16)
            f.write(struct.pack("<I", crcs[name]))
        position += 46 + name_len + extra_len + comment_len

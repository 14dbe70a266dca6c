"""The format's names: version, alignment, the kinds of items, dtype names, and the names of
the files of a checkpoint directory (data files, manifest, commit marker).

The dtype names and their element sizes are a table here (:data:`ITEMSIZES`), not read from
torch: parsing and checking a manifest (``ray-ckpt ls``, ``ray-ckpt inspect``) imports no torch.
torch is imported only when a dtype itself is first looked up (:func:`dtypes`), by a load or a
tool that reads tensor data. tests/test_format.py checks the table against torch's dtypes."""

from __future__ import annotations

import functools
import re
import secrets
from typing import TYPE_CHECKING

from ..errors import CheckpointError, CorruptCheckpointError

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "ray_ckpt"


FORMAT_VERSION = 1


ALIGNMENT = 64


MARKER_NAME = "ray_ckpt.commit"


CHECKSUM_ALGORITHM = "crc32c"


KIND_TENSOR = "tensor"


KIND_PICKLE = "pickle"


_ID_RE = re.compile(r"^[0-9a-f]{16}$")


_DATA_RE = re.compile(r"^r(\d{5})-(\d{6})-([0-9a-f]{16})\.data$")


_MANIFEST_RE = re.compile(r"^manifest-([0-9a-f]{16})\.arrow$")


_OWN_FILE_RE = re.compile(
    r"^(r\d{5}-\d{6}-[0-9a-f]{16}\.data|manifest-[0-9a-f]{16}\.arrow|"
    r"ray_ckpt\.commit(\.tmp-[0-9a-f]{16})?)$"
)


# The dtype names the format writes (torch's names without ``torch.``) and the bytes of one
# element: every torch dtype with a fixed element size. Quantized dtypes are absent on purpose:
# their bytes need scales and zero points the format does not carry. torch reports one byte for
# the sub-byte int1..int7 and uint1..uint7.
ITEMSIZES: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 4, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
    **{f"int{n}": 1 for n in range(1, 8)},
    **{f"uint{n}": 1 for n in range(1, 8)},
}

# The dtypes whose tensors convert to numpy arrays: what an ``N`` leaf (a saved numpy array) may
# hold.
NUMPY_DTYPES: frozenset[str] = frozenset({
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
})


def itemsize(name: str | None, *, where: str) -> int:
    """The bytes of one element of dtype ``name``; an unknown name is a corrupt manifest."""
    size = ITEMSIZES.get(name or "")
    if size is None:
        raise CorruptCheckpointError(
            f"{where}: unknown dtype {name!r}; this reader knows {sorted(ITEMSIZES)}"
        )
    return size


@functools.cache
def dtypes() -> dict[str, torch.dtype]:
    """The torch dtype of every name of :data:`ITEMSIZES` that this torch has. Built on first
    use: it imports torch."""
    import torch

    found = {name: getattr(torch, name, None) for name in ITEMSIZES}
    return {name: d for name, d in found.items() if isinstance(d, torch.dtype)}


@functools.cache
def _dtype_names() -> dict[torch.dtype, str]:
    return {d: name for name, d in dtypes().items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _dtype_names().get(dtype) or str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, *, where: str) -> torch.dtype:
    itemsize(name, where=where)  # an unknown name: the manifest is corrupt
    try:
        return dtypes()[name]
    except KeyError:
        import torch

        raise CheckpointError(
            f"{where}: dtype {name!r} is unknown to this torch ({torch.__version__}); "
            "upgrade torch to read it"
        ) from None


def align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def new_checkpoint_id() -> str:

    return secrets.token_hex(8)


def data_file_name(rank: int, seq: int, checkpoint_id: str) -> str:
    return f"r{rank:05d}-{seq:06d}-{checkpoint_id}.data"


def manifest_file_name(checkpoint_id: str) -> str:
    return f"manifest-{checkpoint_id}.arrow"


def is_own_file(name: str) -> bool:
    """True for every file name ray_ckpt writes into a checkpoint directory."""
    return _OWN_FILE_RE.match(name) is not None


def marker_temp_name(checkpoint_id: str) -> str:
    return f"{MARKER_NAME}.tmp-{checkpoint_id}"

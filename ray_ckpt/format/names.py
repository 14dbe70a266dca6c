"""The format's names: version, alignment, the kinds of items, dtype names, and the names of
the files of a checkpoint directory (data files, manifest, commit marker). torch is imported
only when a dtype is first looked up, so that reading markers (``ray-ckpt ls``) stays quick."""

from __future__ import annotations

import functools
import re
import secrets
from typing import TYPE_CHECKING

from ..errors import CorruptCheckpointError

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


@functools.cache
def dtypes() -> dict[str, torch.dtype]:
    """Every torch dtype with a fixed element size, by the name the manifest uses. Quantized
    dtypes are absent on purpose: their bytes need scales and zero points the format does not
    carry. Built on first use, so that reading markers and manifests (``ray-ckpt ls``) does
    not import torch."""
    import torch

    return {
        str(d).removeprefix("torch."): d
        for d in vars(torch).values()
        if isinstance(d, torch.dtype) and not str(d).startswith(("torch.qint", "torch.quint"))
    }


@functools.cache
def _dtype_names() -> dict[torch.dtype, str]:
    return {d: name for name, d in dtypes().items()}


def dtype_name(dtype: torch.dtype) -> str:
    return _dtype_names().get(dtype) or str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, *, where: str) -> torch.dtype:
    try:
        return dtypes()[name]
    except KeyError:
        raise CorruptCheckpointError(
            f"{where}: unknown dtype {name!r}; this reader knows {sorted(dtypes())}"
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

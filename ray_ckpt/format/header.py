"""The 64-byte header at the start of every data file (docs/FORMAT.md, "Data files").

``magic (8) | format version (u32) | rank (u32) | seq (u32) | checkpoint id (16 ASCII) | 24 zero
bytes | CRC32C of the 60 bytes before (u32)``, little-endian. The header repeats what the file's
name ``r<rank>-<seq>-<checkpoint id>.data`` says, so a data file copied over another, or mixed
in from another checkpoint, is refused by :func:`check_header` before any of its bytes are used.
Pure: bytes in, bytes or an error out; every reader calls it through
:class:`~ray_ckpt.load.extents.ExtentReader`.
"""

from __future__ import annotations

import struct

from .._checksum import crc32c
from ..errors import CorruptCheckpointError, FormatVersionError
from .names import _DATA_RE, FORMAT_VERSION

HEADER_SIZE = 64


HEADER_MAGIC = b"RAYCKPT\x00"


_HEADER = struct.Struct("<8sIII16s24x")


def encode_header(rank: int, seq: int, checkpoint_id: str) -> bytes:

    body = _HEADER.pack(HEADER_MAGIC, FORMAT_VERSION, rank, seq, checkpoint_id.encode("ascii"))
    return body + struct.pack("<I", crc32c(body))


def check_header(raw: bytes, *, file: str) -> None:
    """Check a data file's header against its name ``r<rank>-<seq>-<save id>.data``: a file
    copied over another, or from another checkpoint, is refused."""

    match = _DATA_RE.match(file.rsplit("/", 1)[-1])
    if match is None:
        raise CorruptCheckpointError(f"{file!r} is not a ray_ckpt data file name")
    if len(raw) < HEADER_SIZE:
        raise CorruptCheckpointError(
            f"data file {file} is truncated: {len(raw)} bytes, shorter than its "
            f"{HEADER_SIZE}-byte header"
        )
    body, (crc,) = raw[:60], struct.unpack("<I", raw[60:64])
    magic, version, rank, seq, file_id = _HEADER.unpack(body)
    if magic != HEADER_MAGIC or crc != crc32c(body):
        raise CorruptCheckpointError(
            f"data file {file} has a damaged header (bad magic or header checksum)"
        )
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"data file {file} is format version {version}; this ray_ckpt reads version "
            f"{FORMAT_VERSION}. Upgrade ray_ckpt to read it."
        )
    expected = (int(match.group(1)), int(match.group(2)), match.group(3))
    found = (rank, seq, file_id.decode("ascii", "replace"))
    if found != expected:
        raise CorruptCheckpointError(
            f"data file {file} holds the data of r{found[0]:05d}-{found[1]:06d}-{found[2]}.data: "
            "files were copied over each other or mixed between checkpoints"
        )

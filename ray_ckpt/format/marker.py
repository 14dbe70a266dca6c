"""The commit marker (``ray_ckpt.commit``): the file whose presence makes a checkpoint committed.

Written last, atomically, it names the manifest and pins its size and CRC32C, so a reader that
trusts the marker can trust the manifest, and through the manifest's per-extent CRC32Cs every
data byte. It also carries what ``ls`` shows without opening the manifest (creation time, world
size, total bytes, the caller's metadata). :meth:`Marker.from_bytes` parses with bounded JSON
depth and checks every number (:func:`~ray_ckpt.format.checks.marker_problems`); a marker of a
newer format version is a :class:`~ray_ckpt.errors.FormatVersionError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptCheckpointError, FormatVersionError
from .checks import load_json, marker_problems, raise_first
from .names import _ID_RE, FORMAT_NAME, FORMAT_VERSION, manifest_file_name


@dataclass(frozen=True)
class Marker:
    """The commit marker: names the manifest and pins its bytes."""

    checkpoint_id: str
    manifest: str
    manifest_nbytes: int
    manifest_crc32c: int
    created_unix: float
    world_size: int
    total_nbytes: int
    metadata: dict[str, Any] = field(default_factory=dict)  # the caller's, e.g. metrics

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "checkpoint_id": self.checkpoint_id,
            "manifest": self.manifest,
            "manifest_nbytes": self.manifest_nbytes,
            "manifest_crc32c": self.manifest_crc32c,
            "created_unix": self.created_unix,
            "world_size": self.world_size,
            "total_nbytes": self.total_nbytes,
            "metadata": self.metadata,
        }
        return (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str) -> Marker:
        doc = load_json(raw, what=f"commit marker {where}")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(f"commit marker {where} is not a ray_ckpt marker")
        version = doc.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise CorruptCheckpointError(
                f"commit marker {where} is malformed: format_version is {version!r}, not an integer"
            )
        if version != FORMAT_VERSION:
            raise FormatVersionError(
                f"commit marker {where}: the checkpoint is format version {version!r}; this "
                f"ray_ckpt reads version {FORMAT_VERSION}. Upgrade ray_ckpt to read it."
            )
        try:
            marker = cls(
                checkpoint_id=str(doc["checkpoint_id"]),
                manifest=str(doc["manifest"]),
                manifest_nbytes=_nonneg_int(doc["manifest_nbytes"]),
                manifest_crc32c=_nonneg_int(doc["manifest_crc32c"]),
                created_unix=_number(doc["created_unix"]),
                world_size=_nonneg_int(doc["world_size"]),
                total_nbytes=_nonneg_int(doc["total_nbytes"]),
                metadata=_metadata(doc.get("metadata", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"commit marker {where} is malformed: {e!r}") from None
        if not _ID_RE.match(marker.checkpoint_id) or marker.manifest != manifest_file_name(
            marker.checkpoint_id
        ):
            raise CorruptCheckpointError(
                f"commit marker {where} names an invalid manifest {marker.manifest!r}"
            )
        raise_first(marker_problems(marker, where))
        return marker


def _metadata(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(value).__name__}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float
        raise ValueError(f"created_unix {value} is out of range") from None


def _nonneg_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value

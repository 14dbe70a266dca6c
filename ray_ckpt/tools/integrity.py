"""``verify``: check every byte of a checkpoint against its checksums, streaming.

Every extent goes through one reusable buffer of ``chunk_bytes`` and its CRC32C is computed as
the chunks go by, so memory stays at one buffer whatever the checkpoint's size; no tensor is
ever built. Unlike a load, verification does not stop at the first problem: it runs the load's
own validator (:mod:`ray_ckpt.load.validate`) in collect mode, over every rank's tree, so every
missing or truncated data file is named, and every other file is still read through the load's
extent reader (:class:`~ray_ckpt.load.extents.ExtentReader`), so one run reports every bad file
and key in the texts a load would raise. It raises only when the storage itself fails
(:class:`~ray_ckpt.errors.StorageError`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .._checksum import crc32c
from ..catalog import read_marker
from ..config import StorageConfig
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from ..format.checks import Problem
from ..format.manifest import Extent, Manifest
from ..format.names import MARKER_NAME
from ..load.extents import ExtentReader
from ..load.validate import checkpoint_problems, read_manifest, tree_ranks
from ..storage.files import open_files
from ..storage.storage import Storage
from ._source import DEFAULT_CHUNK_BYTES, NoProgress, Progress


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``problems`` is empty when the checkpoint is intact."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    extents_checked: int = 0
    bytes_checked: int = 0
    extents_without_checksum: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        return doc


def verify(
    path: str,
    *,
    filesystem: Any = None,
    storage_config: StorageConfig | None = None,
    progress: Progress | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> VerifyReport:
    """Check the checkpoint at ``path`` completely: the commit marker, the manifest (its size
    and CRC32C, every row), every data file (present, long enough, intact header) and the
    CRC32C of every extent, streamed through one buffer of ``chunk_bytes``.

    Returns a :class:`VerifyReport`; ``report.problems`` names every bad file and key (empty
    when the checkpoint is intact). Raises only when the storage itself fails.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    storage = Storage.from_path(path, filesystem, storage_config)
    report = VerifyReport(storage.display)
    manifest = _open_for_verify(storage, report)
    if manifest is None:
        return report
    progress = progress or NoProgress()
    bad_files = {p.file for p in report.problems if p.file}
    by_file: dict[str, list[tuple[Extent, str]]] = {}
    for index, extents in manifest.extents.items():
        for extent in extents:
            by_file.setdefault(extent.file, []).append((extent, manifest.items[index].key))
    progress.start(
        sum(e.length for f, runs in by_file.items() if f not in bad_files for e, _ in runs),
        "verify",
    )
    buffer = memoryview(bytearray(min(chunk_bytes, _largest_extent(by_file)) or 1))
    try:
        with open_files(storage) as files:
            reader = ExtentReader(files, storage.display)
            for file in sorted(set(by_file) - bad_files):
                _verify_file(reader, file, by_file[file], buffer, report, progress)
    finally:
        progress.finish()
    return report


def _largest_extent(by_file: dict[str, list[tuple[Extent, str]]]) -> int:
    return max((e.length for runs in by_file.values() for e, _ in runs), default=0)


def _open_for_verify(storage: Storage, report: VerifyReport) -> Manifest | None:
    """The validated manifest, recording every problem of the opened checkpoint
    (:func:`~ray_ckpt.load.validate.checkpoint_problems`: missing or short data files, every
    rank's tree); ``None`` when the checkpoint cannot be read any further (no marker, bad
    marker, bad manifest)."""
    try:
        files, marker, manifest = read_manifest(storage)
    except CheckpointNotFoundError as e:
        report.problems.append(Problem("not-found", str(e)))
        return None
    except IncompleteCheckpointError as e:
        report.problems.append(Problem("incomplete", str(e), file=MARKER_NAME))
        return None
    except CorruptCheckpointError as e:
        report.problems.append(_marker_or_manifest_problem(storage, e))
        return None
    report.problems.extend(
        checkpoint_problems(storage.display, marker, manifest, files, tree_ranks(manifest))
    )
    return manifest


def _marker_or_manifest_problem(storage: Storage, error: CorruptCheckpointError) -> Problem:
    """``read_manifest`` refused the marker or the manifest: which one, by reading the marker
    again."""
    try:
        marker = read_marker(storage, storage.list_files())
    except CorruptCheckpointError:
        return Problem("marker", str(error), file=MARKER_NAME)
    return Problem("manifest", str(error), file=marker.manifest)


def _verify_file(
    reader: ExtentReader,
    file: str,
    runs: list[tuple[Extent, str]],
    buffer: memoryview,
    report: VerifyReport,
    progress: Progress,
) -> None:
    """Check the header of ``file`` and the CRC32C of each of its extents, recording every
    problem (the texts a load raises: :class:`ExtentReader`'s)."""
    try:
        reader.check_header(file)
    except CorruptCheckpointError as e:
        report.problems.append(Problem("header", str(e), file=file))
    report.files_checked += 1
    for extent, key in sorted(runs, key=lambda run: run[0].offset):
        try:
            crc = _stream_crc(reader, extent, key, buffer, progress)
        except CorruptCheckpointError as e:
            report.problems.append(Problem("truncated", str(e), file=file, key=key))
            continue
        report.extents_checked += 1
        report.bytes_checked += extent.length
        if extent.checksum is None:
            report.extents_without_checksum += 1
        problem = reader.checksum(crc, extent, key)
        if problem is not None:
            report.problems.append(problem)


def _stream_crc(
    reader: ExtentReader, extent: Extent, key: str, buffer: memoryview, progress: Progress
) -> int:
    crc = 0
    done = 0
    while done < extent.length:
        n = min(len(buffer), extent.length - done)
        reader.read(extent.file, extent.offset + done, buffer[:n], key)
        crc = crc32c(buffer[:n], crc)
        done += n
        progress.advance(n)
    return crc

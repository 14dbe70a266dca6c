"""Tools over committed checkpoints: inspect, verify, diff, export and import (the CLI is built on
them).

Every tool starts from :meth:`ray_ckpt.CheckpointReader.open` (marker, validated manifest,
decoded tree) and reads tensor bytes through the storage's ``FileReader``; none parses the
format itself. They share one rule: **memory stays bounded**, whatever the checkpoint's size.

========================  ==================================================================
:func:`inspect_checkpoint` every leaf (key, kind, dtype, shape, bytes, files; a sharded
                           tensor as one leaf with its global shape and shards) and the totals,
                           from the manifest alone
:func:`verify`             every extent's CRC32C, streamed through one buffer; returns every
                           problem (missing marker, manifest or data file, truncation, bad
                           header, checksum) instead of stopping at the first
:func:`diff_checkpoints`   keys added, removed and changed, with the largest absolute
                           difference per changed tensor, sharded tensors by their global
                           value; one window per side in memory
:func:`export_checkpoint`  a ``torch.load``-able file, or Hugging Face safetensors shards with
                           their index, written window by window; sharded tensors consolidated
:func:`import_checkpoint`  a ``torch.save`` file, a safetensors file or a Hugging Face
                           directory saved as a checkpoint, from memory-mapped tensors
========================  ==================================================================

Long operations report to a :class:`Progress` (the CLI draws a bar with it); nothing here
prints.
"""

from ._source import Progress
from .compare import Change, DiffReport, diff_checkpoints
from .export import ExportResult, export_checkpoint
from .importer import ImportResult, import_checkpoint
from .integrity import Problem, VerifyReport, verify
from .summary import CheckpointSummary, LeafSummary, ShardSummary, inspect_checkpoint

__all__ = [
    "Change",
    "CheckpointSummary",
    "DiffReport",
    "ExportResult",
    "ImportResult",
    "LeafSummary",
    "Problem",
    "Progress",
    "ShardSummary",
    "VerifyReport",
    "diff_checkpoints",
    "export_checkpoint",
    "import_checkpoint",
    "inspect_checkpoint",
    "verify",
]

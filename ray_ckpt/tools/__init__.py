"""Tools over committed checkpoints: inspect, verify, diff, export and import (the CLI is built on
them).

Every tool starts from ``_open.open_checkpoint``, the validator of
:meth:`ray_ckpt.CheckpointReader.open` without torch (marker, validated manifest, decoded tree),
and reads tensor bytes through the storage's ``FileReader``; none parses the format itself.
They share one rule: **memory stays bounded**, whatever the checkpoint's size.

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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # at run time each name loads its module on first use (see __getattr__)
    from ._source import Progress
    from .compare import Change, DiffReport, diff_checkpoints
    from .export import ExportResult, export_checkpoint
    from .importer import ImportResult, import_checkpoint
    from .integrity import Problem, VerifyReport, verify
    from .summary import CheckpointSummary, LeafSummary, ShardSummary, inspect_checkpoint

_EXPORTS: dict[str, str] = {  # public name -> the module that defines it
    "Progress": "_source",
    "Change": "compare",
    "DiffReport": "compare",
    "diff_checkpoints": "compare",
    "ExportResult": "export",
    "export_checkpoint": "export",
    "ImportResult": "importer",
    "import_checkpoint": "importer",
    "Problem": "integrity",
    "VerifyReport": "integrity",
    "verify": "integrity",
    "CheckpointSummary": "summary",
    "LeafSummary": "summary",
    "ShardSummary": "summary",
    "inspect_checkpoint": "summary",
}


def __getattr__(name: str) -> Any:
    """Import a tool's module on first use: the CLI's ``--help`` and ``ls`` need none of them,
    and most of them import torch."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


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

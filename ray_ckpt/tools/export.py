"""``export``: a checkpoint as a plain PyTorch file or as Hugging Face safetensors.

Both writers keep memory bounded whatever the checkpoint's size; neither materialises the state
dict (see :mod:`._safetensors` and :mod:`._torchfile` for how). Output goes to temporary names
beside the target and is renamed into place once complete, so a failed export never leaves a
half-written file under the name a user would load.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from ..config import StorageConfig
from ..errors import CheckpointError
from ._safetensors import write_safetensors
from ._source import NoProgress, Progress, opened, subtree
from ._torchfile import write_torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the transformers default ("5GB")
FORMATS = ("torch", "safetensors")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    out: str
    format: str
    files: list[str]
    tensors: int  # tensors and arrays written
    nbytes: int  # their bytes
    skipped: list[str]  # keys of values not exported (safetensors holds tensors only)


def export_checkpoint(
    path: str,
    out: str,
    *,
    to: str = "safetensors",
    only: str | None = None,
    strip_prefix: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_pickle: bool = False,
    overwrite: bool = False,
    rank: int = 0,
    filesystem: Any = None,
    storage_config: StorageConfig | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Export the committed checkpoint at ``path`` to the local path ``out``.

    ``to="torch"``: ``out`` is a file for ``torch.load`` with the checkpoint's structure,
    tensors, numpy arrays and plain values (pickled objects only with ``allow_pickle=True``,
    since exporting them means unpickling them). Loading it needs ``weights_only=False`` only
    when it holds arrays or pickled objects.

    ``to="safetensors"``: ``out`` is a directory that receives ``model.safetensors``, or, when
    the tensors exceed ``max_shard_bytes``, shards ``model-00001-of-0000N.safetensors`` and a
    ``model.safetensors.index.json`` (the ``transformers`` convention). Tensors (and arrays) are
    named by their dotted keys; other values are skipped and listed in the result.

    ``only="model"`` exports just the subtree under that dotted key, with the prefix stripped
    (``model.0.weight`` becomes ``0.weight``). ``strip_prefix="module."`` then removes that
    prefix from the keys of the exported dict that have it (a DDP model's state dict has
    ``module.0.weight``: it exports as ``0.weight``). Existing output is replaced only with
    ``overwrite=True``. A multi-rank checkpoint is exported as rank ``rank`` saved it.
    """
    if to not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {to!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    target = local_output(out)
    progress = progress or NoProgress()
    with opened(path, filesystem, storage_config, rank) as source:
        tree = subtree(source.info.tree, only, source.info.storage.display)
        if strip_prefix:
            tree = without_prefix(tree, strip_prefix, source.info.storage.display)
        try:
            if to == "torch":

                files, tensors, nbytes, skipped = write_torch(
                    source, tree, target, allow_pickle=allow_pickle, overwrite=overwrite,
                    progress=progress,
                )
            else:

                files, tensors, nbytes, skipped = write_safetensors(
                    source, tree, target, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                    progress=progress,
                )
        finally:
            progress.finish()
        logger.info(
            "exported %s to %s (%s): %d tensors, %.1f MiB in %d file(s)",
            source.info.storage.display, target, to, tensors, nbytes / 2**20, len(files),
        )
    return ExportResult(target, to, files, tensors, nbytes, skipped)


def without_prefix(tree: dict[Any, Any], prefix: str, where: str) -> dict[Any, Any]:
    """``tree`` with ``prefix`` removed from the front of its keys that start with it."""
    renamed: dict[Any, Any] = {}
    for key, value in tree.items():
        name = key.removeprefix(prefix) if isinstance(key, str) else key
        if name in renamed:
            raise CheckpointError(
                f"checkpoint {where}: stripping {prefix!r} makes two keys {name!r}; export "
                "without --strip-prefix, or pick the subtree with --only first"
            )
        renamed[name] = value
    if not any(isinstance(k, str) and k.startswith(prefix) for k in tree):
        shown = [str(k) for k in list(tree)[:5]]
        raise CheckpointError(
            f"checkpoint {where}: no key starts with {prefix!r} (keys: {shown}); use --only "
            "to pick the dict whose keys have it (e.g. --only model)"
        )
    return renamed


def local_output(out: str) -> str:
    if "://" in out and not out.startswith("file://"):
        raise ValueError(
            f"export writes to a local path, not {out!r}: export locally, then copy the files"
        )
    return os.path.abspath(out.removeprefix("file://"))



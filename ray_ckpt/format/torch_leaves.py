"""The leaves of a tree that are torch objects: ``S`` (``torch.Size``), ``dt`` (``torch.dtype``)
and ``dv`` (``torch.device``).

They are the only part of decoding a tree that needs torch. :func:`ray_ckpt.format.tree.decode`
imports this module when a tree holds one of them, so that reading a checkpoint's structure
(``ray-ckpt inspect``) imports torch only for a tree that holds a torch object.
"""

from __future__ import annotations

from typing import Any

import torch

from .names import dtype_from_name


def decode_torch_leaf(tag: str, body: Any) -> Any:
    """The torch object a ``S``, ``dt`` or ``dv`` node stands for. Raises ValueError (a bad
    size), RuntimeError (an unknown device) or OverflowError (a size beyond int64), which
    :func:`~ray_ckpt.format.tree.decode` reports as a malformed tree, and
    :class:`~ray_ckpt.errors.CorruptCheckpointError` for an unknown dtype name."""
    if tag == "S":
        return torch.Size([int(d) for d in body])
    if tag == "dt":
        return dtype_from_name(str(body), where="tree")
    if tag == "dv":
        return torch.device(body)
    raise ValueError(f"unknown tag {tag!r}")

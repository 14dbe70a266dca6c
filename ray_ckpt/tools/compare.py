"""``diff``: two checkpoints compared key by key.

Keys are the leaves of the two trees (stored items and plain values). For a tensor present on
both sides with the same dtype and shape, both items are read (one per side at a time, checked
against their CRC32Cs) and compared bit for bit; for the elements that differ, the largest
absolute difference is computed in float64 (complex128 for complex tensors), a few million
elements at a time so temporaries stay small. Pickled items are compared as bytes, never
unpickled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .._tree import ItemRef, key_string
from ..config import StorageConfig
from ..format import KIND_PICKLE
from ._source import KIND_OF_TAG, NoProgress, Progress, Source, leaves, opened


@dataclass(frozen=True)
class Change:
    """A key whose value differs between two checkpoints.

    ``what``: ``values`` (same dtype and shape, different contents), ``dtype``, ``shape``,
    ``kind`` (a tensor on one side, something else on the other), ``value`` (plain values) or
    ``pickle`` (pickled bytes differ). For ``values``: how many elements differ and the largest
    absolute difference among them (``nan`` when a NaN is involved).
    """

    key: str
    what: str
    detail: str
    numel_changed: int | None = None
    max_abs_diff: float | None = None


@dataclass
class DiffReport:
    """What :func:`diff_checkpoints` found."""

    a: str
    b: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[Change] = field(default_factory=list)
    unchanged: int = 0

    @property
    def same(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["same"] = self.same
        for change in doc["changed"]:
            value = change["max_abs_diff"]
            if value is not None and not math.isfinite(value):
                change["max_abs_diff"] = str(value)  # JSON has no nan/inf
        return doc


def diff_checkpoints(
    a: str,
    b: str,
    *,
    rank: int = 0,
    filesystem: Any = None,
    storage_config: StorageConfig | None = None,
    progress: Progress | None = None,
    chunk_numel: int = 1 << 20,
) -> DiffReport:
    """Compare checkpoint ``b`` with checkpoint ``a`` key by key: keys only in ``b`` (added),
    only in ``a`` (removed), and changed, with the number of changed elements and the largest
    absolute difference of each changed tensor. Reads one item per side at a time. Multi-rank
    checkpoints are compared as rank ``rank`` saved them."""
    progress = progress or NoProgress()
    with (
        opened(a, filesystem, storage_config, rank) as left,
        opened(b, filesystem, storage_config, rank) as right,
    ):
        report = DiffReport(left.info.storage.display, right.info.storage.display)
        old = dict(leaves(left.info.tree))
        new = dict(leaves(right.info.tree))
        report.removed = [key_string(p) for p in old if p not in new]
        report.added = [key_string(p) for p in new if p not in old]
        common = [p for p in old if p in new]
        progress.start(sum(_compare_nbytes(left, right, old[p], new[p]) for p in common), "diff")
        try:
            for leaf_path in common:
                change = _diff_leaf(
                    key_string(leaf_path), left, right, old[leaf_path], new[leaf_path],
                    progress, chunk_numel,
                )
                if change is None:
                    report.unchanged += 1
                else:
                    report.changed.append(change)
        finally:
            progress.finish()
    return report


def _compare_nbytes(left: Source, right: Source, x: Any, y: Any) -> int:
    if not (isinstance(x, ItemRef) and isinstance(y, ItemRef)):
        return 0
    mx, my = left.manifest.items[x.index], right.manifest.items[y.index]
    if (mx.kind, mx.dtype, mx.shape) != (my.kind, my.dtype, my.shape):
        return 0
    return mx.nbytes + my.nbytes


def _diff_leaf(
    key: str, left: Source, right: Source, x: Any, y: Any, progress: Progress, chunk_numel: int
) -> Change | None:
    if isinstance(x, ItemRef) != isinstance(y, ItemRef) or (
        isinstance(x, ItemRef) and (x.tag == "P") != (y.tag == "P")
    ):
        return Change(key, "kind", f"{_describe(left, x)} -> {_describe(right, y)}")
    if not isinstance(x, ItemRef):
        if _same_value(x, y):
            return None
        return Change(key, "value", f"{_short(repr(x))} -> {_short(repr(y))}")
    mx, my = left.manifest.items[x.index], right.manifest.items[y.index]
    if mx.dtype != my.dtype:
        return Change(key, "dtype", f"{mx.dtype} -> {my.dtype}")
    if mx.shape != my.shape:
        return Change(key, "shape", f"{list(mx.shape or ())} -> {list(my.shape or ())}")
    tx, ty = left.read_item(x.index, progress), right.read_item(y.index, progress)
    if isinstance(tx, bytes) or isinstance(ty, bytes):
        return None if tx == ty else Change(key, "pickle", "pickled bytes differ")
    numel, max_diff = _tensor_difference(tx, ty, chunk_numel)
    if numel == 0:
        return None
    return Change(
        key, "values", f"{numel} of {tx.numel()} elements differ, max |a-b| = {max_diff:.6g}",
        numel_changed=numel, max_abs_diff=max_diff,
    )


def _describe(source: Source, leaf: Any) -> str:
    if isinstance(leaf, ItemRef):
        meta = source.manifest.items[leaf.index]
        if meta.kind == KIND_PICKLE:
            return "pickled object"
        return f"{KIND_OF_TAG[leaf.tag]} {meta.dtype} {list(meta.shape or ())}"
    return f"{type(leaf).__name__} {_short(repr(leaf))}"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _same_value(x: Any, y: Any) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, float) and math.isnan(x):
        return math.isnan(y)
    return bool(x == y)


def _tensor_difference(x: torch.Tensor, y: torch.Tensor, chunk_numel: int) -> tuple[int, float]:
    """How many elements differ bit for bit, and the largest absolute difference among them;
    computed ``chunk_numel`` elements at a time so the temporaries stay small."""
    flat_x, flat_y = x.reshape(-1), y.reshape(-1)
    size = x.element_size()
    changed = 0
    max_diff = 0.0
    for start in range(0, flat_x.numel(), chunk_numel):
        cx, cy = flat_x[start : start + chunk_numel], flat_y[start : start + chunk_numel]
        if size:
            bx, by = cx.view(torch.uint8).view(-1, size), cy.view(torch.uint8).view(-1, size)
            differs = (bx != by).any(1)
        else:
            differs = torch.zeros(cx.numel(), dtype=torch.bool)
        count = int(differs.sum())
        if not count:
            continue
        changed += count
        worst = _abs_difference(cx[differs], cy[differs]).max().item()
        max_diff = worst if math.isnan(worst) or math.isnan(max_diff) else max(max_diff, worst)
    return changed, max_diff


def _abs_difference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bool:
        return (x != y).to(torch.float64)
    if x.is_complex():
        return (x.to(torch.complex128) - y.to(torch.complex128)).abs()
    return (x.to(torch.float64) - y.to(torch.float64)).abs()

"""``diff``: two checkpoints compared key by key.

Keys are the leaves of the two trees (stored items and plain values). Tensors are compared by
their global value: a sharded tensor (saved from several ranks) is read back whole in C order,
so a checkpoint saved sharded and one saved on a single rank compare as equal when their
values are. For a tensor present on both sides with the same dtype and shape, both sides are
streamed in step, one window of :data:`~._source.DEFAULT_WINDOW_BYTES` per side at a time
(checked against their CRC32Cs), and compared bit for bit; for the elements that differ, the
largest absolute difference is computed in float64 (complex128 for complex tensors), a few
million elements at a time so temporaries stay small. Pickled items are compared as bytes,
never unpickled.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import StorageConfig
from ..format.names import KIND_PICKLE
from ..format.refs import ItemRef, ShardedRef, key_string
from ..format.tree import leaves
from ._source import (
    DEFAULT_WINDOW_BYTES,
    KIND_OF_TAG,
    NoProgress,
    Progress,
    Source,
    is_tensor_ref,
    opened,
)


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
    if is_tensor_ref(x) and is_tensor_ref(y):
        tx, ty = left.tensor(x), right.tensor(y)
        return tx.nbytes + ty.nbytes if (tx.dtype, tx.shape) == (ty.dtype, ty.shape) else 0
    if isinstance(x, ItemRef) and isinstance(y, ItemRef) and x.tag == y.tag == "P":
        return left.manifest.items[x.index].nbytes + right.manifest.items[y.index].nbytes
    return 0


def _diff_leaf(
    key: str, left: Source, right: Source, x: Any, y: Any, progress: Progress, chunk_numel: int
) -> Change | None:
    if is_tensor_ref(x) and is_tensor_ref(y):
        return _diff_tensors(key, left, right, x, y, progress, chunk_numel)
    stored_x, stored_y = isinstance(x, (ItemRef, ShardedRef)), isinstance(y, (ItemRef, ShardedRef))
    if stored_x or stored_y:
        if not (isinstance(x, ItemRef) and isinstance(y, ItemRef) and x.tag == y.tag == "P"):
            return Change(key, "kind", f"{_describe(left, x)} -> {_describe(right, y)}")
        px, py = left.read_item(x.index, progress), right.read_item(y.index, progress)
        return None if px == py else Change(key, "pickle", "pickled bytes differ")
    if _same_value(x, y):
        return None
    return Change(key, "value", f"{_short(repr(x))} -> {_short(repr(y))}")


def _diff_tensors(
    key: str, left: Source, right: Source, x: Any, y: Any, progress: Progress, chunk_numel: int
) -> Change | None:
    """Two tensors (either may be sharded), compared by value, one window per side at a time."""
    tx, ty = left.tensor(x), right.tensor(y)
    if tx.dtype != ty.dtype:
        return Change(key, "dtype", f"{_dtype(tx.dtype)} -> {_dtype(ty.dtype)}")
    if tx.shape != ty.shape:
        return Change(key, "shape", f"{list(tx.shape)} -> {list(ty.shape)}")
    numel, max_diff = 0, 0.0
    pairs = zip(
        left.chunks(tx, DEFAULT_WINDOW_BYTES), right.chunks(ty, DEFAULT_WINDOW_BYTES), strict=True
    )
    for cx, cy in pairs:
        progress.advance(2 * cx.numel() * cx.element_size())
        if torch.equal(cx.view(torch.uint8), cy.view(torch.uint8)):  # no temporaries
            continue
        n, worst = _tensor_difference(cx, cy, chunk_numel)
        numel += n
        if n:
            max_diff = worst if math.isnan(worst) or math.isnan(max_diff) else max(max_diff, worst)
    if numel == 0:
        return None
    if not _has_arithmetic(tx.dtype):  # bits8/16/...: raw bits, compared as such
        return Change(key, "values", f"{numel} of {tx.numel} elements differ (raw bits)",
                      numel_changed=numel)
    return Change(
        key, "values", f"{numel} of {tx.numel} elements differ, max |a-b| = {max_diff:.6g}",
        numel_changed=numel, max_abs_diff=max_diff,
    )


def _has_arithmetic(dtype: torch.dtype) -> bool:
    """Whether values of ``dtype`` can be subtracted (the ``bits`` dtypes are raw bits)."""
    return not _dtype(dtype).startswith("bits")


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe(source: Source, leaf: Any) -> str:
    if isinstance(leaf, ShardedRef):
        tensor = source.tensor(leaf)
        return f"sharded tensor {_dtype(tensor.dtype)} {list(tensor.shape)}"
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
        if not _has_arithmetic(x.dtype):
            continue
        worst = _abs_difference(cx[differs], cy[differs]).max().item()
        max_diff = worst if math.isnan(worst) or math.isnan(max_diff) else max(max_diff, worst)
    return changed, max_diff


def _abs_difference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bool:
        return (x != y).to(torch.float64)
    if x.is_complex():
        return (x.to(torch.complex128) - y.to(torch.complex128)).abs()
    return (x.to(torch.float64) - y.to(torch.float64)).abs()

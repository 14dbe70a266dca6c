"""Matching a target state dict against the stored tree: the *plan* pass of a load.

One walk (:class:`_Walker`, depth first with an explicit stack) pairs each key of the target
with what the checkpoint stores and records, in a :class:`_Plan`, what the load will do: the
copies of stored bytes into the target's own tensors (or into new ones), the values read fresh,
the keys the checkpoint lacks, and the steps that put fresh values in place after the read
(modules and optimizers through ``load_state_dict``). Shape and dtype mismatches, missing keys
and a target that matches nothing are found here, before a byte is read; a sharded target
(DTensor, :class:`~ray_ckpt.ShardedTensor`) gets the overlap of its box with each stored shard.
Without a target, the walk plans the whole stored tree. No I/O: the reader runs the copies.
"""

from __future__ import annotations

import difflib
import logging
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._stateful import is_stateful, load_state_of, state_dict_of
from ..errors import (
    CorruptCheckpointError,
    MissingKeysError,
    PickleNotAllowedError,
    StateDictMismatchError,
)
from ..format.manifest import ItemMeta
from ..format.names import KIND_PICKLE, dtype_from_name
from ..format.refs import ItemRef, ShardedRef, key_string
from ..format.tree import leaves, materialize
from ..sharding import Box, ShardedTensor, is_dtensor, overlap, slices, target_box
from .map_location import MapLocation
from .validate import CheckpointInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Copy:
    """Copy the region ``box`` (in the item's own coordinates) of stored item ``item`` into
    ``dest`` (a tensor of the region's shape: a new tensor, a target, or a view of either)."""

    item: int
    box: Box
    dest: torch.Tensor


Step = Callable[[dict[Any, Any]], None]  # runs after the read, with the values read fresh


@dataclass
class _Plan:
    copies: list[_Copy] = field(default_factory=list)
    fresh: dict[Any, Any] = field(default_factory=dict)  # ref key -> value being read
    missing: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)  # run in order once the values are read
    pickled: list[str] = field(default_factory=list)  # keys of pickled items to read

    @property
    def nbytes(self) -> int:
        return sum(c.dest.numel() * c.dest.element_size() for c in self.copies)


def _check_pickles(plan: _Plan, info: CheckpointInfo, allow_pickle: bool) -> None:
    if plan.pickled and not allow_pickle:
        raise PickleNotAllowedError(
            f"checkpoint {info.storage.display} stores {len(plan.pickled)} pickled object(s) "
            f"(keys {plan.pickled[:10]}); loading them runs code from the file. Pass "
            "allow_pickle=True only if you trust who wrote it, or load a state_dict without "
            "those keys."
        )


class _Missing:
    """A key of the target that the checkpoint lacks, in the walk's order."""

    def __init__(self, key: str) -> None:
        self.key = key


_WRAPPER_PREFIX = "module."  # what DistributedDataParallel and DataParallel put before names


class _Walker:
    """Matches a target state dict against the stored tree, depth first with an explicit stack
    (a state dict may nest ``MAX_DEPTH`` levels), and plans the load: the copies into the
    target's own tensors, the values to read fresh, the keys the checkpoint lacks, and the
    steps that put the fresh values into the target once they are read (children first, so
    that a module's ``load_state_dict`` or a rebuilt tuple sees its loaded children).

    Keys match by equality; where none of a dict's keys do, its keys are matched with DDP's
    ``module.`` prefix added (or removed) if that is unambiguous, and otherwise the load fails
    (:class:`~ray_ckpt.errors.MissingKeysError`, whatever ``strict`` says): a target that matches
    nothing is a mistake, never a no-op. Modules, optimizers and other objects with
    ``load_state_dict`` are loaded through it."""

    def __init__(self, info: CheckpointInfo, plan: _Plan, allow_pickle: bool) -> None:
        self.info = info
        self.plan = plan
        self.allow_pickle = allow_pickle

    def walk(self, state_dict: dict[Any, Any]) -> None:
        stack: list[Any] = [(state_dict, self.info.tree, (), None)]
        while stack:
            entry = stack.pop()
            if isinstance(entry, _Missing):
                self.plan.missing.append(entry.key)
            elif callable(entry):  # a container's last step, once its children's are planned
                self.plan.steps.append(entry)
            else:
                target, stored, path, put = entry
                self._visit(target, stored, path, put, stack)

    def _visit(
        self,
        target: Any,
        stored: Any,
        path: tuple[Any, ...],
        put: Callable[[Any], None] | None,
        stack: list[Any],
    ) -> None:
        key = key_string(path)
        if _is_tensor_target(target):
            if not isinstance(stored, (ItemRef, ShardedRef)):
                raise StateDictMismatchError(
                    f"key {key!r}: the target is a tensor but the checkpoint holds a "
                    f"{type(stored).__qualname__}"
                )
            if isinstance(stored, ItemRef) and stored.tag == "P":
                raise StateDictMismatchError(
                    f"key {key!r}: the target is a tensor but the checkpoint holds a pickled object"
                )
            self._plan_into(target, stored, key)
        elif isinstance(target, torch.optim.Optimizer):
            # a fresh optimizer has no state tensors to fill: its state is read whole, and
            # load_state_dict moves it to the parameters' devices
            self._expect(dict, stored, target, key)
            self.fresh_value(stored)
            self.plan.steps.append(lambda values: load_state_of(target, _assign(stored, values)))
        elif is_stateful(target):  # a module, a scheduler: in place into its state dict
            state = state_dict_of(target)
            self._expect(dict, stored, target, key)
            stack.append(lambda values: load_state_of(target, state))
            self._children(state, stored, path, stack)
        elif isinstance(target, dict) and not isinstance(stored, (ItemRef, ShardedRef)):
            self._expect(dict, stored, target, key)
            self._children(target, stored, path, stack)
        elif isinstance(target, (list, tuple)) and not isinstance(target, torch.Size):
            self._sequence(target, stored, path, put, stack)
        else:
            self.fresh_value(stored)
            if put is not None:
                self.plan.steps.append(lambda values: put(_assign(stored, values)))

    def _expect(self, kind: type, stored: Any, target: Any, key: str) -> None:
        if not isinstance(stored, kind):
            raise StateDictMismatchError(
                f"key {key!r}: the target is a {type(target).__qualname__} but the checkpoint "
                f"holds a {type(stored).__qualname__}"
            )

    def _children(
        self, target: dict[Any, Any], stored: dict[Any, Any], path: tuple[Any, ...],
        stack: list[Any],
    ) -> None:
        """Push the target's entries, in reverse so that they are walked in order."""
        matches = self._match_keys(target, stored, path)
        for k, found in reversed(matches):
            if found is _NOT_FOUND:
                stack.append(_Missing(key_string((*path, k))))
            else:
                stack.append((target[k], stored[found], (*path, k), _setter(target, k)))

    def _match_keys(
        self, target: dict[Any, Any], stored: dict[Any, Any], path: tuple[Any, ...]
    ) -> list[tuple[Any, Any]]:
        """Each target key with the stored key it loads from (or ``_NOT_FOUND``)."""
        if not target or any(k in stored for k in target):
            return [(k, k if k in stored else _NOT_FOUND) for k in target]
        renamed = _prefix_renaming(target, stored)
        if renamed is not None:
            logger.info(
                "key %r: the target's keys match the checkpoint's with DDP's %r prefix %s",
                key_string(path) or "(root)", _WRAPPER_PREFIX,
                "added" if next(iter(renamed.values())).startswith(_WRAPPER_PREFIX)
                else "removed",
            )
            return [(k, renamed[k] if renamed[k] in stored else _NOT_FOUND) for k in target]
        raise _nothing_matches(self.info, target, stored, path)

    def _sequence(
        self, target: Any, stored: Any, path: tuple[Any, ...],
        put: Callable[[Any], None] | None, stack: list[Any],
    ) -> None:
        if not isinstance(stored, (list, tuple)):
            raise StateDictMismatchError(
                f"key {key_string(path)!r}: the target is a {type(target).__name__} but the "
                f"checkpoint holds a {type(stored).__qualname__}"
            )
        values = list(target) + [None] * (len(stored) - len(target))
        if isinstance(target, list):
            stack.append(lambda _: target.__setitem__(slice(None), values))
        elif put is not None:
            stack.append(lambda _: put(tuple(values)))
        for i in reversed(range(len(values))):
            if i < len(stored):
                stack.append((values[i], stored[i], (*path, i), _setter(values, i)))
            else:
                stack.append(_Missing(key_string((*path, i))))

    def fresh_value(self, stored: Any) -> Any:
        """Allocate what ``stored`` needs and return it with placeholders."""
        for _, leaf in leaves(stored):
            if isinstance(leaf, (ItemRef, ShardedRef)):
                self._allocate(leaf)
        return stored

    def _allocate(self, stored: ItemRef | ShardedRef) -> None:
        if isinstance(stored, ItemRef):
            if stored.index in self.plan.fresh:
                return
            meta = self.info.manifest.items[stored.index]
            if meta.kind == KIND_PICKLE:
                self.plan.pickled.append(meta.key)
                dtype = torch.uint8
            else:
                dtype = dtype_from_name(meta.dtype or "", where=meta.key)
            shape = _item_shape(meta)
            tensor = torch.empty(shape, dtype=dtype)
            self.plan.fresh[stored.index] = tensor
            self.plan.copies.append(_Copy(stored.index, _whole(shape), tensor))
        else:
            if stored.indices in self.plan.fresh:
                return
            first = self.info.manifest.items[stored.indices[0]]
            dtype = dtype_from_name(first.dtype or "", where=first.key)
            tensor = torch.empty(stored.global_shape, dtype=dtype)
            self.plan.fresh[stored.indices] = tensor
            self._plan_region(tensor, _whole(stored.global_shape), stored, first.key)

    def _plan_into(self, target: Any, stored: ItemRef | ShardedRef, key: str) -> None:
        local, box, global_shape = target_box(target)
        if isinstance(stored, ItemRef):
            meta = self.info.manifest.items[stored.index]
            if not _is_sharded_target(target):
                _check_match(local, meta, key)
                self.plan.copies.append(_Copy(stored.index, _whole(meta.shape or ()), local))
                return
            stored = ShardedRef((stored.index,), meta.shape or ())
        first = self.info.manifest.items[stored.indices[0]]
        dtype = dtype_from_name(first.dtype or "", where=key)
        if tuple(global_shape) != stored.global_shape or local.dtype != dtype:
            raise StateDictMismatchError(
                f"key {key!r}: the checkpoint holds {first.dtype} {list(stored.global_shape)} "
                f"(as {len(stored.indices)} shard(s)) but the target is "
                f"{str(local.dtype).removeprefix('torch.')} {list(global_shape)}"
                + (f" (its shard at {list(box[0])})" if _is_sharded_target(target) else "")
                + ". Load into a tensor of the same global shape and dtype."
            )
        self._plan_region(local, box, stored, key)

    def _plan_region(self, dest: torch.Tensor, box: Box, stored: ShardedRef, key: str) -> None:
        """Copies that fill ``dest`` (the region ``box`` of the global tensor) from every stored
        shard that overlaps it; a region no shard covers is an error naming both layouts."""
        covered = 0
        layout = []
        for index in stored.indices:
            meta = self.info.manifest.items[index]
            shard_box = (meta.global_offset or (0,) * len(meta.shape or ()), meta.shape or ())
            layout.append(shard_box)
            common = overlap(box, shard_box)
            if common is None:
                continue
            covered += math.prod(common[1])
            within_shard = (tuple(o - s for o, s in zip(common[0], shard_box[0])), common[1])
            view = dest[slices(common, box[0])] if dest.dim() else dest
            self.plan.copies.append(_Copy(index, within_shard, view))
        if covered != math.prod(box[1]):
            raise CorruptCheckpointError(
                f"key {key!r}: the stored shards {[list(b[0]) for b in layout]} (shapes "
                f"{[list(b[1]) for b in layout]}) cover {covered} of the {math.prod(box[1])} "
                f"elements of the region at {list(box[0])} of shape {list(box[1])}: a shard is "
                "missing"
            )


_NOT_FOUND = object()


def _setter(container: Any, key: Any) -> Callable[[Any], None]:
    def put(value: Any) -> None:
        container[key] = value

    return put


def _prefix_renaming(target: dict[Any, Any], stored: dict[Any, Any]) -> dict[str, str] | None:
    """The target's keys renamed to the stored ones by adding or removing DDP's ``module.``
    prefix, where that is unambiguous: every key on one side has it, none on the other, and
    some renamed key exists. ``None`` otherwise."""
    if not all(isinstance(k, str) for k in (*target, *stored)):
        return None
    prefix = _WRAPPER_PREFIX
    if all(k.startswith(prefix) for k in stored) and not any(k.startswith(prefix) for k in target):
        renamed = {k: prefix + k for k in target}
    elif all(k.startswith(prefix) for k in target) and not any(
        k.startswith(prefix) for k in stored
    ):
        renamed = {k: k[len(prefix) :] for k in target}
    else:
        return None
    return renamed if any(v in stored for v in renamed.values()) else None


def _nothing_matches(
    info: CheckpointInfo, target: dict[Any, Any], stored: dict[Any, Any], path: tuple[Any, ...]
) -> MissingKeysError:
    """The error for a target dict none of whose keys the checkpoint holds (under ``path``)."""
    where = f"under {key_string(path)!r}" if path else "at the root"
    wanted = [str(k) for k in target]
    held = [str(k) for k in stored]
    close = []
    for k in wanted[:3]:
        match = difflib.get_close_matches(k, held, n=1, cutoff=0.5)
        if match:
            close.append(f"{k!r} -> {match[0]!r}")
    hint = (
        f"the closest keys it holds: {', '.join(close)}" if close
        else f"it holds {held[:5]}{' ...' if len(held) > 5 else ''}"
    )
    error = MissingKeysError(
        f"checkpoint {info.storage.display} holds none of the {len(wanted)} key(s) the "
        f"state_dict asks for {where} ({wanted[:5]}{' ...' if len(wanted) > 5 else ''}); "
        f"{hint}. Nothing would be loaded there, so the load fails even with strict=False: "
        "fix the keys (load without a state_dict to see what the checkpoint holds), or leave "
        "that entry out of the state_dict."
    )
    error.missing_keys = [key_string((*path, k)) for k in target]
    return error


def _assign(tree: Any, values: dict[Any, Any]) -> Any:
    def resolve(ref: Any) -> Any:
        if isinstance(ref, ShardedRef):
            return values[ref.indices]
        value = values[ref.index]
        return value.cpu().numpy() if ref.tag == "N" and isinstance(value, torch.Tensor) else value

    return materialize(tree, resolve)


def _finish(value: torch.Tensor, info: CheckpointInfo, key: Any, relocate: MapLocation) -> Any:
    """A value read fresh, made what the caller gets: unpickled, or moved by map_location."""
    index = key[0] if isinstance(key, tuple) else key
    meta = info.manifest.items[index]
    if meta.kind == KIND_PICKLE:
        return pickle.loads(value.numpy().tobytes())  # allow_pickle was checked when planned
    return relocate(value, meta.device)


def _item_shape(meta: ItemMeta) -> tuple[int, ...]:
    """A tensor item's shape; a pickled item is a vector of its bytes."""
    return (meta.nbytes,) if meta.kind == KIND_PICKLE else meta.shape or ()


def _whole(shape: tuple[int, ...]) -> Box:
    return (0,) * len(shape), tuple(shape)


def _is_sharded_target(target: Any) -> bool:
    return isinstance(target, ShardedTensor) or is_dtensor(target)


def _is_tensor_target(target: Any) -> bool:
    return isinstance(target, torch.Tensor) or isinstance(target, ShardedTensor)


def _check_match(target: torch.Tensor, meta: ItemMeta, key: str) -> None:
    dtype = dtype_from_name(meta.dtype or "", where=key)
    if tuple(target.shape) != meta.shape or target.dtype != dtype:
        raise StateDictMismatchError(
            f"key {key!r}: the checkpoint holds {meta.dtype} {list(meta.shape or ())} but the "
            f"target tensor is {str(target.dtype).removeprefix('torch.')} {list(target.shape)}. "
            "Load into a tensor of that shape and dtype, or leave the key out of state_dict."
        )

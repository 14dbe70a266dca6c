"""Flatten a state dict into stored leaves plus a tree, and read the tree back.

The tree is tagged JSON. Plain JSON values stand for themselves (``null``, booleans, integers,
finite floats, strings); everything else is a one-key object whose key is the tag:

====== ====================================================================================
tag    meaning
====== ====================================================================================
``T``  a tensor: the item index of its bytes in the manifest
``D``  a sharded tensor: ``{"i": [item indices of every shard], "g": global shape}``
``N``  a numpy array: stored like a tensor, loaded as ``numpy.ndarray``
``P``  a pickled object (only with ``allow_pickle=True``): its item index
``d``  ``dict``: a list of ``[key, value]`` pairs, in insertion order
``o``  ``collections.OrderedDict``: as ``d``
``l``  ``list``          ``t``  ``tuple``        ``S``  ``torch.Size`` (list of ints)
``f``  a non-finite float: ``"nan"``, ``"inf"`` or ``"-inf"``
``b``  ``bytes``: base64    ``dt`` a ``torch.dtype`` by name   ``dv`` a ``torch.device``
====== ====================================================================================

Keys of dicts are encoded with the same scheme, limited to ``None``, ``bool``, ``int``,
``float``, ``str`` and tuples of them. Decoding builds containers and numbers only; nothing in
a tree can name a class, a function or a file.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import CorruptCheckpointError, PickleNotAllowedError, UnsupportedValueError
from .sharding import ShardedTensor, ShardInfo, dtensor_box, is_dtensor

MAX_DEPTH = 512


@dataclass
class Leaf:
    """A value whose bytes go to a data file: a tensor, or an object to pickle."""

    index: int
    key: str
    value: Any
    kind: str  # "tensor" or "pickle"
    path: tuple[Any, ...]  # the keys leading to it
    shard: ShardInfo | None = None  # set for the local shard of a DTensor or ShardedTensor

    @functools.cached_property
    def path_id(self) -> str:
        """The key path as canonical JSON: unique, unlike the dotted ``key``."""
        return path_id(self.path)


@dataclass(frozen=True)
class ShardedRef:
    """A placeholder in a decoded tree for a tensor stored as shards (several items)."""

    indices: tuple[int, ...]
    global_shape: tuple[int, ...]


@dataclass(frozen=True)
class ItemRef:
    """A placeholder in a decoded tree for a stored item."""

    index: int
    tag: str  # "T", "N" or "P"


def key_string(path: Iterable[Any]) -> str:
    """The readable, dotted form of a key path, as shown in the manifest and in errors."""
    return ".".join(map(str, path))


class _Flattener:
    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.leaves: list[Leaf] = []
        self._tensor_items: dict[int, int] = {}  # id(tensor) -> item index, for tied tensors
        self._stack: set[int] = set()

    def encode(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, torch.Tensor):  # the common leaf first
            if is_dtensor(value):
                return self._sharded(value, path)
            return {"T": self._tensor(value, path)}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"f": repr(float(value))}
        if isinstance(value, ShardedTensor):
            return self._sharded(value, path)
        if isinstance(value, np.ndarray):
            return {"N": self._tensor(_numpy_as_tensor(value, path), path)}
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return self.encode(value.item(), path)
        if isinstance(value, torch.dtype):
            return {"dt": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"dv": str(value)}
        if isinstance(value, (bytes, bytearray)):
            return {"b": base64.b64encode(bytes(value)).decode("ascii")}
        if type(value) in (dict, OrderedDict, list, tuple, torch.Size):
            return self._container(value, path)
        return self._pickled(value, path)

    def _container(self, value: Any, path: tuple[Any, ...]) -> Any:
        if id(value) in self._stack:
            raise UnsupportedValueError(
                f"key {key_string(path)!r}: the state dict contains itself (a reference cycle)"
            )
        if len(path) >= MAX_DEPTH:
            raise UnsupportedValueError(
                f"key {key_string(path)[:200]!r}: nesting deeper than {MAX_DEPTH} levels"
            )
        self._stack.add(id(value))
        try:
            if type(value) is torch.Size:
                return {"S": [int(d) for d in value]}
            if isinstance(value, dict):
                tag = "o" if type(value) is OrderedDict else "d"
                return {
                    tag: [
                        [_encode_key(k, path), self.encode(v, (*path, k))]
                        for k, v in value.items()
                    ]
                }
            tag = "l" if type(value) is list else "t"
            return {tag: [self.encode(v, (*path, i)) for i, v in enumerate(value)]}
        finally:
            self._stack.discard(id(value))

    def _tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> int:
        _check_tensor(tensor, path)
        known = self._tensor_items.get(id(tensor))
        if known is not None:
            return known
        index = len(self.leaves)
        self.leaves.append(Leaf(index, key_string(path), tensor, "tensor", path))
        self._tensor_items[id(tensor)] = index
        return index

    def _sharded(self, value: Any, path: tuple[Any, ...]) -> Any:
        key = key_string(path)
        if isinstance(value, ShardedTensor):
            local = value.local
            info = ShardInfo(tuple(value.global_shape), tuple(value.global_offset))
        else:
            local, info = dtensor_box(value, key=key)
        _check_tensor(local, path)
        index = len(self.leaves)
        self.leaves.append(Leaf(index, key, local, "tensor", path, info))
        return {"D": {"i": [index], "g": list(info.global_shape)}}

    def _pickled(self, value: Any, path: tuple[Any, ...]) -> Any:
        if not self.allow_pickle:
            raise PickleNotAllowedError(
                f"key {key_string(path)!r} holds a {type(value).__qualname__}, which ray_ckpt "
                "stores only as pickle. Pass allow_pickle=True to save (and again to load), or "
                "convert it to tensors, numbers, strings, bytes, lists, tuples and dicts."
            )
        index = len(self.leaves)
        self.leaves.append(Leaf(index, key_string(path), value, "pickle", path))
        return {"P": index}


def path_id(path: tuple[Any, ...]) -> str:
    """The canonical JSON of a key path: equal on every rank for the same key."""
    return json.dumps([_encode_key(k, ()) for k in path], separators=(",", ":"))


def remap(
    tree_json: str, mapping: dict[int, int], shards: dict[int, list[int]] | None = None
) -> str:
    """``tree_json`` with every item index ``i`` replaced by ``mapping[i]``; a sharded tensor
    lists ``shards[mapping[i]]``: every shard of it, from every rank."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if len(node) == 1:
                ((tag, body),) = node.items()
                if tag in ("T", "N", "P"):
                    return {tag: mapping[body]}
                if tag == "D":
                    (local,) = body["i"]
                    index = mapping[local]
                    return {"D": {"i": (shards or {}).get(index, [index]), "g": body["g"]}}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return json.dumps(walk(json.loads(tree_json)), separators=(",", ":"), allow_nan=False)


def _encode_key(key: Any, path: tuple[Any, ...]) -> Any:
    if key is None or isinstance(key, (bool, str)):
        return key
    if isinstance(key, int):
        return int(key)
    if isinstance(key, float):
        return float(key) if math.isfinite(key) else {"f": repr(float(key))}
    if type(key) is tuple:
        return {"t": [_encode_key(k, path) for k in key]}
    raise UnsupportedValueError(
        f"key {key_string((*path, key))!r}: dict keys must be str, int, float, bool, None or "
        f"tuples of them, not {type(key).__qualname__}"
    )


def _check_tensor(tensor: torch.Tensor, path: tuple[Any, ...]) -> None:
    kind = type(tensor)
    if (
        (kind is torch.Tensor or kind is torch.nn.Parameter)
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and not tensor.is_nested
        and not tensor.is_meta
    ):
        return  # the common case, checked without building the key string
    key = key_string(path)
    if tensor.layout != torch.strided:
        raise UnsupportedValueError(
            f"key {key!r}: {tensor.layout} tensors cannot be saved; convert with .to_dense()"
        )
    if tensor.is_quantized:
        raise UnsupportedValueError(
            f"key {key!r}: quantized tensors cannot be saved; save .dequantize() and the "
            "quantization parameters instead"
        )
    if tensor.is_nested:
        raise UnsupportedValueError(f"key {key!r}: nested tensors cannot be saved; unbind them")
    if tensor.device.type == "meta":
        raise UnsupportedValueError(
            f"key {key!r}: a meta tensor has no data to save; materialise it first "
            "(module.to_empty(device=...) and initialise the parameters)"
        )
    if type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
        raise UnsupportedValueError(
            f"key {key!r}: tensor subclass {type(tensor).__qualname__} is not supported; "
            "save a plain tensor (for DTensor, its full or local tensor)"
        )


def _numpy_as_tensor(array: np.ndarray, path: tuple[Any, ...]) -> torch.Tensor:
    try:
        # ascontiguousarray makes a 0-d array 1-d: keep the shape
        return torch.from_numpy(np.ascontiguousarray(array).reshape(array.shape))
    except TypeError:
        raise UnsupportedValueError(
            f"key {key_string(path)!r}: numpy dtype {array.dtype} has no torch equivalent"
        ) from None


def flatten(state_dict: Any, *, allow_pickle: bool = False) -> tuple[str, list[Leaf]]:
    """Split ``state_dict`` into its tree (tagged JSON) and the leaves whose bytes are stored."""
    if not isinstance(state_dict, dict):
        raise UnsupportedValueError(
            f"a state dict must be a dict (or OrderedDict), got {type(state_dict).__qualname__}"
        )
    flattener = _Flattener(allow_pickle)
    tree = flattener.encode(state_dict, ())
    return json.dumps(tree, separators=(",", ":"), allow_nan=False), flattener.leaves


def decode(tree_json: str, *, n_items: int, where: str) -> Any:
    """Parse a tree into Python values with :class:`ItemRef` placeholders for stored items."""
    try:
        raw = json.loads(tree_json)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(f"{where}: the tree is not valid JSON ({e})") from None
    try:
        value = _decode(raw, n_items, 0)
    # RuntimeError: torch.device("nowhere"); OverflowError: torch.Size([1e400])
    except (ValueError, TypeError, KeyError, RecursionError, RuntimeError, OverflowError) as e:
        raise CorruptCheckpointError(f"{where}: the tree is malformed ({e})") from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{where}: the tree's root is not a dict")
    return value


def _decode(raw: Any, n_items: int, depth: int) -> Any:
    if raw is None or isinstance(raw, (bool, int, float, str)):
        return raw
    if depth > MAX_DEPTH + 2:
        raise ValueError("nesting too deep")
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ValueError(f"unexpected JSON value {str(raw)[:80]}")
    ((tag, body),) = raw.items()
    if tag in ("T", "N", "P"):
        return ItemRef(_index(body, n_items), tag)
    if tag == "D":
        if not isinstance(body, dict) or set(body) != {"i", "g"}:
            raise ValueError("a sharded tensor needs exactly 'i' and 'g'")
        indices = tuple(_index(i, n_items) for i in _as_list(body["i"]))
        shape = tuple(_index(d, 2**62) for d in _as_list(body["g"]))
        if not indices or len(shape) > 64:
            raise ValueError("a sharded tensor needs shards and at most 64 dimensions")
        return ShardedRef(indices, shape)
    if tag in ("d", "o"):
        pairs = [(_decode_key(k, n_items, depth), _decode(v, n_items, depth + 1)) for k, v in body]
        return OrderedDict(pairs) if tag == "o" else dict(pairs)
    if tag in ("l", "t"):
        items = [_decode(v, n_items, depth + 1) for v in _as_list(body)]
        return items if tag == "l" else tuple(items)
    if tag == "S":
        return torch.Size([int(d) for d in _as_list(body)])
    if tag == "f" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "b" and isinstance(body, str):
        return base64.b64decode(body, validate=True)
    if tag == "dt":
        from .format import dtype_from_name

        return dtype_from_name(str(body), where="tree")
    if tag == "dv" and isinstance(body, str):
        return torch.device(body)
    raise ValueError(f"unknown tag {tag!r}")


def _index(value: Any, bound: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
        raise ValueError(f"index {value!r} out of range")
    return value


def _decode_key(raw: Any, n_items: int, depth: int) -> Any:
    key = _decode(raw, 0, depth + 1)
    if isinstance(key, (list, dict)):
        raise ValueError(f"unhashable key {str(raw)[:80]}")
    return key


def _as_list(body: Any) -> list[Any]:
    if not isinstance(body, list):
        raise ValueError(f"expected a list, got {type(body).__name__}")
    return body


def item_refs(tree: Any) -> Iterable[ItemRef]:
    """Every :class:`ItemRef` in a decoded tree."""
    if isinstance(tree, ItemRef):
        yield tree
    elif isinstance(tree, ShardedRef):
        for index in tree.indices:
            yield ItemRef(index, "S")
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from item_refs(v)
    elif isinstance(tree, (list, tuple)) and not isinstance(tree, torch.Size):
        for v in tree:
            yield from item_refs(v)


def materialize(tree: Any, resolve: Callable[[Any], Any]) -> Any:
    """Replace every :class:`ItemRef` and :class:`ShardedRef` in ``tree`` by ``resolve(ref)``."""
    if isinstance(tree, (ItemRef, ShardedRef)):
        return resolve(tree)
    if isinstance(tree, dict):
        return type(tree)((k, materialize(v, resolve)) for k, v in tree.items())
    if isinstance(tree, list):
        return [materialize(v, resolve) for v in tree]
    if isinstance(tree, tuple) and not isinstance(tree, torch.Size):
        return tuple(materialize(v, resolve) for v in tree)
    return tree


def union_trees(trees: list[str], shards: dict[int, list[int]]) -> tuple[str, list[str]]:
    """The tree of a multi-rank checkpoint, the union of the ranks' ``trees`` (each already
    numbered in the checkpoint's index space, given lowest rank first): dicts are merged key by
    key; any other node is the first tree's that has it. A sharded tensor lists ``shards[i]``,
    every shard of it. Also returns, for each of ``trees``, that tree laid over the union (its
    own values first: what its ranks load)."""
    nodes = [_expand(json.loads(tree), shards) for tree in trees]
    union: Any = None
    for node in nodes:
        union = node if union is None else _union(union, node)
    dump = functools.partial(json.dumps, separators=(",", ":"), allow_nan=False)
    return dump(union), [dump(_union(node, union)) for node in nodes]


def _expand(node: Any, shards: dict[int, list[int]]) -> Any:
    if isinstance(node, dict):
        if len(node) == 1 and "D" in node:
            (index,) = node["D"]["i"]
            return {"D": {"i": shards.get(index, [index]), "g": node["D"]["g"]}}
        return {k: _expand(v, shards) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, shards) for v in node]
    return node


def _union(first: Any, other: Any) -> Any:
    """``first`` with the dict keys of ``other`` that it lacks, recursively."""
    if not (isinstance(first, dict) and isinstance(other, dict) and len(first) == len(other) == 1):
        return first
    ((tag, body),) = first.items()
    if tag not in ("d", "o") or tag not in other:
        return first
    pairs = [[key, value] for key, value in body]
    where = {json.dumps(key, sort_keys=True): i for i, (key, _) in enumerate(pairs)}
    for key, value in other[tag]:
        i = where.get(json.dumps(key, sort_keys=True))
        if i is None:
            where[json.dumps(key, sort_keys=True)] = len(pairs)
            pairs.append([key, value])
        else:
            pairs[i][1] = _union(pairs[i][1], value)
    return {tag: pairs}

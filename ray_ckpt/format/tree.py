"""The tree of a checkpoint: read it back (:func:`decode`), walk it, rewrite its item indices.

Pure: no torch. Making a tree from a state dict is :mod:`ray_ckpt.format.flatten`'s job (it
imports torch); decoding imports torch only for the leaves that are torch objects (``S``, ``dt``,
``dv``: :mod:`ray_ckpt.format.torch_leaves`), so a tool that reads a checkpoint's structure
(``ray-ckpt inspect``) pays for torch only when the tree holds one.

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
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CorruptCheckpointError, UnsupportedValueError
from .refs import MAX_DEPTH, MAX_KEY_DEPTH, ItemRef, ShardedRef, dumps, key_string, loads

if TYPE_CHECKING:
    from ..sharding import ShardInfo

TORCH_TAGS = ("S", "dt", "dv")  # leaves that decode to torch objects (see torch_leaves)


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


# --- walking trees without recursion -------------------------------------------------------
# A state dict may nest MAX_DEPTH containers; a recursive walk needs one or more Python frames
# per level (and json's C code one recursion count per JSON level), which Python's default
# limit of 1000 does not allow. Every walk of a tree is therefore a loop over an explicit stack.


@dataclass(frozen=True)
class Branch:
    """What a :func:`fold` visitor returns for a container: its ``(key, child)`` pairs, and
    how to build the container's value from its children's values (in the same order)."""

    children: Iterable[tuple[Any, Any]]
    build: Callable[[list[Any]], Any]


def fold(root: Any, visit: Callable[[Any, tuple[Any, ...]], Any]) -> Any:
    """Rebuild ``root`` bottom-up without recursion. ``visit(node, path)`` returns a node's
    value, or a :class:`Branch` for a container. Nodes are visited depth first, in order (so a
    visitor with side effects sees them as a recursive walk would); ``path`` is the node's keys."""
    top = visit(root, ())
    if type(top) is not Branch:
        return top
    stack: list[tuple[Branch, Iterator[tuple[Any, Any]], list[Any], tuple[Any, ...]]] = [
        (top, iter(top.children), [], ())
    ]
    while True:
        branch, children, values, path = stack[-1]
        for key, child in children:
            child_path = (*path, key)
            out = visit(child, child_path)
            if type(out) is Branch:
                stack.append((out, iter(out.children), [], child_path))
                break
            values.append(out)
        else:  # every child is done
            stack.pop()
            value = branch.build(values)
            if not stack:
                return value
            stack[-1][2].append(value)


def _is_sequence(node: Any) -> bool:
    """A list or tuple to walk into; a ``torch.Size`` (a tuple) is a leaf. No ``torch.Size``
    exists before torch is imported, so torch is looked up, never imported, here."""
    if not isinstance(node, (list, tuple)):
        return False
    torch = sys.modules.get("torch")
    return torch is None or not isinstance(node, torch.Size)


def leaves(tree: Any) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every leaf of a decoded tree with its key path, depth first: stored items
    (:class:`ItemRef`, :class:`ShardedRef`) and plain values. Empty containers count as values,
    so that they show up in a diff."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict) and node:
            stack.extend(((*path, k), v) for k, v in reversed(node.items()))
        elif _is_sequence(node) and node:
            stack.extend(((*path, i), node[i]) for i in reversed(range(len(node))))
        else:
            yield path, node


def path_id(path: tuple[Any, ...]) -> str:
    """The canonical JSON of a key path: equal on every rank for the same key."""
    return json.dumps([encode_key(k, ()) for k in path], separators=(",", ":"))


def remap(
    tree_json: str, mapping: dict[int, int], shards: dict[int, list[int]] | None = None
) -> str:
    """``tree_json`` with every item index ``i`` replaced by ``mapping[i]``; a sharded tensor
    lists ``shards[mapping[i]]``: every shard of it, from every rank."""

    def visit(node: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(node, dict):
            if len(node) == 1:
                ((tag, body),) = node.items()
                if tag in ("T", "N", "P"):
                    return {tag: mapping[body]}
                if tag == "D":
                    (local,) = body["i"]
                    index = mapping[local]
                    return {"D": {"i": (shards or {}).get(index, [index]), "g": body["g"]}}
            keys = list(node)
            return Branch(node.items(), lambda values: dict(zip(keys, values)))
        if isinstance(node, list):
            return Branch(enumerate(node), list)
        return node

    return dumps(fold(loads(tree_json, where="tree"), visit))


def encode_key(key: Any, path: tuple[Any, ...], depth: int = 0) -> Any:
    """A dict key as the tree stores it (see the module docstring)."""
    if key is None or isinstance(key, (bool, str)):
        return key
    if isinstance(key, int):
        return int(key)
    if isinstance(key, float):
        return float(key) if math.isfinite(key) else {"f": repr(float(key))}
    if type(key) is tuple:
        if depth >= MAX_KEY_DEPTH:
            raise UnsupportedValueError(
                f"key {key_string(path)[:200]!r}: a tuple key nested deeper than {MAX_KEY_DEPTH}"
            )
        return {"t": [encode_key(k, path, depth + 1) for k in key]}
    raise UnsupportedValueError(
        f"key {key_string((*path, key))!r}: dict keys must be str, int, float, bool, None or "
        f"tuples of them, not {type(key).__qualname__}"
    )


def decode(tree_json: str, *, n_items: int, where: str) -> Any:
    """Parse a tree into Python values with :class:`ItemRef` placeholders for stored items."""
    try:
        raw = loads(tree_json, where=where)
    except ValueError as e:  # json.JSONDecodeError is one
        raise CorruptCheckpointError(f"{where}: the tree is not valid JSON ({e})") from None
    path: tuple[Any, ...] = ()

    def visit(node: Any, at: tuple[Any, ...]) -> Any:
        nonlocal path
        path = at
        return _decode(node, n_items, len(at))

    try:
        value = fold(raw, visit)
    # RuntimeError: torch.device("nowhere"); OverflowError: torch.Size([1e400])
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError) as e:
        at = f" at key {key_string(path)[:200]!r}" if path else ""
        raise CorruptCheckpointError(f"{where}: the tree is malformed{at} ({e})") from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{where}: the tree's root is not a dict")
    return value


def _decode(raw: Any, n_items: int, depth: int) -> Any:
    """One node of a tree: its value, or a :class:`Branch` for a container."""
    if raw is None or isinstance(raw, (bool, int, float, str)):
        return raw
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
    if tag in ("d", "o", "l", "t") and depth >= MAX_DEPTH:
        raise ValueError(f"nesting deeper than {MAX_DEPTH} levels")
    if tag in ("d", "o"):
        pairs = [_pair(pair) for pair in _as_list(body)]
        keys = [_decode_key(k, 0) for k, _ in pairs]
        build = OrderedDict if tag == "o" else dict
        return Branch(zip(keys, (v for _, v in pairs)), lambda values: build(zip(keys, values)))
    if tag in ("l", "t"):
        return Branch(enumerate(_as_list(body)), list if tag == "l" else tuple)
    if tag in TORCH_TAGS:
        return _torch_leaf(tag, body)
    if tag == "f" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "b" and isinstance(body, str):
        return base64.b64decode(body, validate=True)
    raise ValueError(f"unknown tag {tag!r}")


def _torch_leaf(tag: str, body: Any) -> Any:
    """A ``S``, ``dt`` or ``dv`` leaf: its body is checked here, its torch object built by
    :mod:`.torch_leaves`, imported on first use (the one part of decoding that needs torch)."""
    if tag == "S":
        body = _as_list(body)
    elif tag == "dv" and not isinstance(body, str):
        raise ValueError(f"unknown tag {tag!r}")
    from .torch_leaves import decode_torch_leaf

    return decode_torch_leaf(tag, body)


def _pair(raw: Any) -> tuple[Any, Any]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise ValueError(f"a dict entry must be [key, value], got {str(raw)[:80]}")
    return raw[0], raw[1]


def _index(value: Any, bound: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
        raise ValueError(f"index {value!r} out of range")
    return value


def _decode_key(raw: Any, depth: int) -> Any:
    """A dict key: None, bool, int, float, str, a non-finite float or a tuple of keys."""
    if raw is None or isinstance(raw, (bool, int, float, str)):
        return raw
    if isinstance(raw, dict) and len(raw) == 1:
        ((tag, body),) = raw.items()
        if tag == "f" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "t" and depth < MAX_KEY_DEPTH:
            return tuple(_decode_key(k, depth + 1) for k in _as_list(body))
    raise ValueError(f"not a valid key: {str(raw)[:80]}")


def _as_list(body: Any) -> list[Any]:
    if not isinstance(body, list):
        raise ValueError(f"expected a list, got {type(body).__name__}")
    return body


def item_refs(tree: Any) -> Iterable[ItemRef]:
    """Every :class:`ItemRef` in a decoded tree (a sharded tensor's shards tagged ``"S"``)."""
    for _, leaf in leaves(tree):
        if isinstance(leaf, ItemRef):
            yield leaf
        elif isinstance(leaf, ShardedRef):
            for index in leaf.indices:
                yield ItemRef(index, "S")


def materialize(tree: Any, resolve: Callable[[Any], Any]) -> Any:
    """Replace every :class:`ItemRef` and :class:`ShardedRef` in ``tree`` by ``resolve(ref)``."""

    def visit(node: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(node, (ItemRef, ShardedRef)):
            return resolve(node)
        if isinstance(node, dict):
            keys = list(node)
            kind = type(node)
            return Branch(node.items(), lambda values: kind(zip(keys, values)))
        if _is_sequence(node):
            return Branch(enumerate(node), list if isinstance(node, list) else tuple)
        return node

    return fold(tree, visit)



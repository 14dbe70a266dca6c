"""Tree references and the tree's JSON, kept apart from torch so that ``ls`` stays quick.

A stored tree is JSON in which every stored value is a reference to manifest items. Decoded,
those references are :class:`ItemRef` (one item: a tensor ``T``, a numpy array ``N`` or a
pickled object ``P``) and :class:`ShardedRef` (a tensor stored as several shard items). This
module holds those placeholders, the depth limits of a tree, JSON that survives trees deeper
than the C parser's recursion (:func:`dumps`, :func:`loads`) and :func:`union_trees`, which
merges the trees of the ranks of a multi-rank save. Turning a tree into values (tensors,
tuples, ``torch.Size``) is :mod:`ray_ckpt.format.tree`'s job.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

MAX_DEPTH = 512  # containers nested in a state dict, the root included


MAX_KEY_DEPTH = 32  # tuples nested in a dict key


# JSON nesting of a tree: a dict level is three (``{"d": [[key, value]]}``), a leaf two more
MAX_JSON_DEPTH = 3 * MAX_DEPTH + MAX_KEY_DEPTH + 8


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


def dumps(tree: Any) -> str:
    """Compact JSON of a tree; trees too deep for json's C encoder are written by a loop."""
    try:
        return json.dumps(tree, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        return _dumps_deep(tree)


def loads(text: str, *, where: str) -> Any:
    """Parse JSON nested at most MAX_JSON_DEPTH deep; deeper JSON raises ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        return _loads_deep(text, MAX_JSON_DEPTH, where)


class _Token(str):
    """Literal JSON text on :func:`_dumps_deep`'s stack (not a string value to encode)."""


def _dumps_deep(tree: Any) -> str:
    out: list[str] = []
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if type(node) is _Token:
            out.append(node)
        elif isinstance(node, dict):
            stack.append(_Token("}"))
            for i, (key, value) in enumerate(reversed(node.items())):
                stack.extend((value, _Token(json.dumps(str(key)) + ":")))
                if i < len(node) - 1:
                    stack.append(_Token(","))
            out.append("{")
        elif isinstance(node, (list, tuple)):
            stack.append(_Token("]"))
            for i, value in enumerate(reversed(node)):
                stack.append(value)
                if i < len(node) - 1:
                    stack.append(_Token(","))
            out.append("[")
        else:
            out.append(json.dumps(node, allow_nan=False))
    return "".join(out)


_WHITESPACE = re.compile(r"[ \t\n\r]*")


_NUMBER = re.compile(r"(-?(?:0|[1-9]\d*))(\.\d+)?([eE][-+]?\d+)?")


_CONSTANTS = {
    "null": None, "true": True, "false": False,
    "NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf,
}


def _loads_deep(text: str, max_depth: int, where: str) -> Any:
    """A JSON parser that keeps its open containers in a list, not on the call stack."""
    skip = cast(Callable[[str, int], re.Match[str]], _WHITESPACE.match)  # matches everywhere
    pos = skip(text, 0).end()
    open_: list[list[Any]] = []  # [container, its current key (dicts)]

    def key_at(pos: int) -> tuple[str, int]:
        if text[pos : pos + 1] != '"':
            raise ValueError(f"{where}: expected a key at character {pos}")
        key, pos = json.decoder.scanstring(text, pos + 1)  # type: ignore[attr-defined]
        pos = skip(text, pos).end()
        if text[pos : pos + 1] != ":":
            raise ValueError(f"{where}: expected ':' at character {pos}")
        return key, skip(text, pos + 1).end()

    while True:
        char = text[pos : pos + 1]
        if char in ("{", "["):
            if len(open_) >= max_depth:
                raise ValueError(f"{where}: JSON nested deeper than {max_depth} levels")
            container: Any = {} if char == "{" else []
            pos = skip(text, pos + 1).end()
            if text[pos : pos + 1] != ("}" if char == "{" else "]"):
                open_.append([container, None])
                if char == "{":
                    open_[-1][1], pos = key_at(pos)
                continue
            value, pos = container, pos + 1
        elif char == '"':
            value, pos = json.decoder.scanstring(text, pos + 1)  # type: ignore[attr-defined]
        else:
            value, pos = _scalar(text, pos, where)
        while True:  # put the value into its container; close the containers that end here
            if not open_:
                if skip(text, pos).end() != len(text):
                    raise ValueError(f"{where}: extra data at character {pos}")
                return value
            container, key = open_[-1]
            if isinstance(container, list):
                container.append(value)
            else:
                container[key] = value
            pos = skip(text, pos).end()
            char = text[pos : pos + 1]
            if char == ",":
                pos = skip(text, pos + 1).end()
                if isinstance(container, dict):
                    open_[-1][1], pos = key_at(pos)
                break
            if char != ("]" if isinstance(container, list) else "}"):
                raise ValueError(f"{where}: expected ',' or the container's end at {pos}")
            open_.pop()
            value, pos = container, pos + 1


def _scalar(text: str, pos: int, where: str) -> tuple[Any, int]:
    for name, constant in _CONSTANTS.items():
        if text.startswith(name, pos):
            return constant, pos + len(name)
    number = _NUMBER.match(text, pos)
    if number is None:
        raise ValueError(f"{where}: expected a JSON value at character {pos}")
    integer, fraction, exponent = number.groups()
    if fraction or exponent:
        return float(integer + (fraction or "") + (exponent or "")), number.end()
    return int(integer), number.end()


def union_trees(trees: list[str], shards: dict[int, list[int]]) -> tuple[str, list[str]]:
    """The tree of a multi-rank checkpoint, the union of the ranks' ``trees`` (each already
    numbered in the checkpoint's index space, given lowest rank first): dicts are merged key by
    key; any other node is the first tree's that has it. A sharded tensor lists ``shards[i]``,
    every shard of it. Also returns, for each of ``trees``, that tree laid over the union (its
    own values first: what its ranks load). Trees are walked by loops, not recursion, so a
    state dict nested MAX_DEPTH deep merges as it saves on one rank."""
    nodes = [_expand(loads(tree, where="the tree of a rank"), shards) for tree in trees]
    union: Any = None
    for node in nodes:
        union = node if union is None else _union(union, node)
    return dumps(union), [dumps(_union(node, union)) for node in nodes]


def _is_sharded(node: Any) -> bool:
    return isinstance(node, dict) and len(node) == 1 and "D" in node


def _expand(root: Any, shards: dict[int, list[int]]) -> Any:
    """``root`` (freshly parsed, changed in place) with every sharded tensor's one index
    replaced by the indices of all its shards."""

    def expanded(node: Any) -> Any:
        if not _is_sharded(node):
            return node
        (index,) = node["D"]["i"]
        return {"D": {"i": shards.get(index, [index]), "g": node["D"]["g"]}}

    root = expanded(root)
    stack = [root] if isinstance(root, (dict, list)) else []
    while stack:
        node = stack.pop()
        if _is_sharded(node):
            continue
        for key, child in list(node.items() if isinstance(node, dict) else enumerate(node)):
            if isinstance(child, (dict, list)):
                node[key] = child = expanded(child)
                stack.append(child)
    return root


def _union(first: Any, other: Any) -> Any:
    """``first`` with the dict keys of ``other`` that it lacks, at every depth (neither is
    changed: merged dicts are new, their values shared)."""
    out: list[Any] = [None]
    stack: list[tuple[Any, Any, list[Any], int]] = [(first, other, out, 0)]
    while stack:
        mine, theirs, holder, slot = stack.pop()
        holder[slot] = mine
        if not (isinstance(mine, dict) and isinstance(theirs, dict)
                and len(mine) == len(theirs) == 1):
            continue
        ((tag, body),) = mine.items()
        if tag not in ("d", "o") or tag not in theirs:
            continue
        pairs = [[key, value] for key, value in body]
        where = {json.dumps(key, sort_keys=True): i for i, (key, _) in enumerate(pairs)}
        for key, value in theirs[tag]:
            i = where.setdefault(json.dumps(key, sort_keys=True), len(pairs))
            if i == len(pairs):
                pairs.append([key, value])
            else:
                stack.append((pairs[i][1], value, pairs[i], 1))
        holder[slot] = {tag: pairs}
    return out[0]

"""Flatten a state dict into the tree (tagged JSON, :mod:`ray_ckpt.format.tree`) and the leaves
whose bytes go to data files (tensors, arrays, objects to pickle).

The save path's half of the tree: it imports torch (and numpy) to tell tensors, DTensors and
torch values apart. Reading a tree back needs neither (:func:`ray_ckpt.format.tree.decode`).
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .._stateful import is_stateful, state_dict_of
from ..errors import PickleNotAllowedError, UnsupportedValueError
from ..sharding import ShardedTensor, ShardInfo, dtensor_box, is_dtensor
from .refs import MAX_DEPTH, dumps, key_string
from .tree import Branch, Leaf, encode_key, fold


class _Flattener:
    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.leaves: list[Leaf] = []
        self._tensor_items: dict[int, int] = {}  # id(tensor) -> item index, for tied tensors
        self._stack: set[int] = set()  # ids of the containers being encoded (the ancestors)

    def encode(self, value: Any, path: tuple[Any, ...]) -> Any:
        """The tree of ``value``: leaves encoded, containers as :class:`Branch` (see
        :func:`fold`), so that no nesting depth costs a Python stack frame."""
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
        if is_stateful(value):  # a module, an optimizer, a scheduler: its state dict
            state = state_dict_of(value)
            if not is_stateful(state):
                return self.encode(state, path)
        return self._pickled(value, path)

    def _container(self, value: Any, path: tuple[Any, ...]) -> Any:
        if id(value) in self._stack:
            raise UnsupportedValueError(
                f"key {key_string(path)!r}: the state dict contains itself (a reference cycle)"
            )
        if len(path) >= MAX_DEPTH:
            raise UnsupportedValueError(
                f"key {key_string(path)[:200]!r}...: nesting deeper than {MAX_DEPTH} levels, "
                "which ray_ckpt does not store; flatten the state dict (e.g. join the keys)"
            )
        if type(value) is torch.Size:
            return {"S": [int(d) for d in value]}
        self._stack.add(id(value))
        if isinstance(value, dict):
            tag = "o" if type(value) is OrderedDict else "d"
            keys = [encode_key(k, path) for k in value]

            def pairs(values: list[Any]) -> Any:
                self._stack.discard(id(value))
                return {tag: [[key, v] for key, v in zip(keys, values)]}

            return Branch(value.items(), pairs)
        tag = "l" if type(value) is list else "t"

        def sequence(values: list[Any]) -> Any:
            self._stack.discard(id(value))
            return {tag: values}

        return Branch(enumerate(value), sequence)

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
    tree = fold(state_dict, flattener.encode)
    return dumps(tree), flattener.leaves



"""Objects that carry their own state (PyTorch DCP's ``Stateful``): modules, optimizers, LR
schedulers, anything with ``state_dict()`` and ``load_state_dict()``.

ray_ckpt saves such an object as its state dict and loads into it through ``load_state_dict``.
A module wrapped for data parallelism (``DistributedDataParallel``, ``DataParallel``) is saved
under the wrapped module's own names, as PyTorch DCP's ``get_model_state_dict`` does: without
the wrapper's ``module.`` prefix, so that a checkpoint saved by a wrapped model loads into an
unwrapped one and back.
"""

from __future__ import annotations

from typing import Any

import torch

_WRAPPERS = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)


def is_stateful(value: Any) -> bool:
    """Whether ``value`` has ``state_dict()`` and ``load_state_dict()`` (and is no tensor)."""
    return (
        not isinstance(value, (torch.Tensor, dict))
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


def unwrap(value: Any) -> Any:
    """The module inside data-parallel wrappers (``value`` itself if it is not one)."""
    while isinstance(value, _WRAPPERS):
        value = value.module
    return value


def state_dict_of(value: Any) -> Any:
    """``value``'s state dict, a wrapped module's under the wrapped module's names."""
    return unwrap(value).state_dict()


def load_state_of(value: Any, state: Any) -> None:
    """Hand ``state`` to ``value`` (to the module inside a data-parallel wrapper)."""
    unwrap(value).load_state_dict(state)

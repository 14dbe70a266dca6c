"""``map_location`` of a load: where each tensor read on the CPU goes.

The reader reads every tensor into CPU memory (or straight into a target's own tensor); for
values read fresh, :func:`resolve_map_location` turns the user's ``map_location`` (``None``, a
device, a dict from saved device to device, or a callable, as in ``torch.load``) into one
function ``(cpu_tensor, saved_device) -> tensor`` that the reader applies to each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import UnsupportedValueError

MapLocation = Callable[[torch.Tensor, str | None], torch.Tensor]


def resolve_map_location(map_location: Any) -> MapLocation:
    """Turn ``default_map_location`` into a function ``(cpu_tensor, saved_device) -> tensor``.

    ``None`` keeps tensors on the CPU; a device or device string moves every tensor there; a
    dict maps saved device strings to devices (others stay on the CPU); a callable is called as
    ``fn(tensor, saved_device)``.
    """
    if map_location is None:
        return lambda t, _: t
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        return lambda t, saved: map_location(t, saved)
    if isinstance(map_location, dict):
        mapping = {str(k): _device(v) for k, v in map_location.items()}
        return lambda t, saved: t.to(mapping[saved]) if saved in mapping else t
    device = _device(map_location)
    if device.type == "cpu":
        return lambda t, _: t
    return lambda t, _: t.to(device)


def _device(value: Any) -> torch.device:
    if not isinstance(value, (str, torch.device)):
        raise UnsupportedValueError(
            f"default_map_location must be None, a device, a device string, a dict or a "
            f"callable, got {type(value).__qualname__}"
        )
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as e:
        raise UnsupportedValueError(
            f"default_map_location {value!r} is not a device: {e}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedValueError(
            f"default_map_location {value!r} asks for CUDA, which this process does not have; "
            "use 'cpu' or load on a GPU machine"
        )
    index = device.index
    if device.type == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise UnsupportedValueError(
            f"default_map_location {value!r}: this process sees {torch.cuda.device_count()} GPUs"
        )
    return device

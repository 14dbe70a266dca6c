"""Small shared types: the state dict alias and :class:`RankInfo`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

STATE_DICT: TypeAlias = dict[Any, Any]


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in a distributed job.

    Attributes:
        global_rank: rank of this process, ``0 <= global_rank < global_world_size``.
        global_world_size: number of processes that save one checkpoint together.
    """

    global_rank: int
    global_world_size: int

    def __post_init__(self) -> None:
        if self.global_world_size < 1:
            raise ValueError(
                f"RankInfo.global_world_size must be >= 1, got {self.global_world_size}"
            )
        if not 0 <= self.global_rank < self.global_world_size:
            raise ValueError(
                f"RankInfo.global_rank must be in [0, {self.global_world_size}), "
                f"got {self.global_rank}"
            )

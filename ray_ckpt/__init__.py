"""ray_ckpt: Ray-native, actor-based checkpointing for PyTorch.

    import ray_ckpt

    with ray_ckpt.make_sync_checkpointer() as ckptr:
        ckptr.save("/tmp/run/step-100", {"model": model.state_dict()})
        state = ckptr.load("/tmp/run/step-100")

See README.md for the async checkpointer, storage, Ray Train and the CLI. The tools over
committed checkpoints (inspect, verify, diff, export, import) are in :mod:`ray_ckpt.tools`,
every error in :mod:`ray_ckpt.errors`.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers; at run time each loads on first use
    from .builder import make_async_checkpointer, make_sync_checkpointer
    from .catalog import list_checkpoints
    from .checkpointer import AsyncCheckpointer, Checkpointer, SyncCheckpointer
    from .config import (
        CheckpointerConfig,
        CheckpointReaderConfig,
        CheckpointStagerConfig,
        CheckpointWriterConfig,
        StorageConfig,
    )
    from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
    from .futures import CheckpointFuture
    from .load.reader import CheckpointReader
    from .manager import CheckpointManager
    from .save.encoder import CheckpointWriter
    from .save.protocol import SaveResult, StageStats, WriterHook
    from .save.stager import CheckpointStager
    from .sharding import ShardedTensor
    from .types import RankInfo

__version__ = "0.1.0"

# The public API: DESIGN.md's contract names. Everything else public lives in its submodule:
# every error in ray_ckpt.errors, the tools (inspect, verify, diff, export, import) in
# ray_ckpt.tools (not imported here), ray_ckpt.catalog.CheckpointEntry and
# ray_ckpt.catalog.delete_checkpoint, ray_ckpt.load.validate.CheckpointInfo,
# ray_ckpt.save.stager.DefaultStager, ray_ckpt.types.STATE_DICT, ray_ckpt.builder.default_rank_info.
__all__ = [
    "AsyncCheckpointer",
    "CheckpointError",
    "CheckpointFuture",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointReaderConfig",
    "CheckpointStager",
    "CheckpointStagerConfig",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerConfig",
    "CorruptCheckpointError",
    "RankInfo",
    "SaveResult",
    "ShardedTensor",
    "StageStats",
    "StorageConfig",
    "SyncCheckpointer",
    "WriterHook",
    "list_checkpoints",
    "make_async_checkpointer",
    "make_sync_checkpointer",
]

# `import ray_ckpt` stays light (no torch, no Ray) until a name is used: `ray-ckpt --help` and
# `ray-ckpt ls` answer without them (benchmarks/cli_latency.py).
_HOME: dict[str, str] = {  # public name -> the module that defines it
    "AsyncCheckpointer": "ray_ckpt.checkpointer",
    "CheckpointError": "ray_ckpt.errors",
    "CheckpointFuture": "ray_ckpt.futures",
    "CheckpointManager": "ray_ckpt.manager",
    "CheckpointNotFoundError": "ray_ckpt.errors",
    "CheckpointReader": "ray_ckpt.load.reader",
    "CheckpointReaderConfig": "ray_ckpt.config",
    "CheckpointStager": "ray_ckpt.save.stager",
    "CheckpointStagerConfig": "ray_ckpt.config",
    "CheckpointWriter": "ray_ckpt.save.encoder",
    "CheckpointWriterConfig": "ray_ckpt.config",
    "Checkpointer": "ray_ckpt.checkpointer",
    "CheckpointerConfig": "ray_ckpt.config",
    "CorruptCheckpointError": "ray_ckpt.errors",
    "RankInfo": "ray_ckpt.types",
    "SaveResult": "ray_ckpt.save.protocol",
    "ShardedTensor": "ray_ckpt.sharding",
    "StageStats": "ray_ckpt.save.protocol",
    "StorageConfig": "ray_ckpt.config",
    "SyncCheckpointer": "ray_ckpt.checkpointer",
    "WriterHook": "ray_ckpt.save.protocol",
    "list_checkpoints": "ray_ckpt.catalog",
    "make_async_checkpointer": "ray_ckpt.builder",
    "make_sync_checkpointer": "ray_ckpt.builder",
}


# The submodules the README uses as ``ray_ckpt.<module>.<name>``: each imports on first use,
# so that ``ray_ckpt.tiers.persist(...)`` works after a bare ``import ray_ckpt`` (as the
# attribute of an imported submodule, it otherwise would only once something imported it).
_SUBMODULES = frozenset({"catalog", "errors", "storage", "tiers", "tools", "train", "types"})


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'ray_ckpt' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__, *_SUBMODULES])

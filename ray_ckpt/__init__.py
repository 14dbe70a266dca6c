"""ray_ckpt: Ray-native, actor-based checkpointing for PyTorch.

    import ray_ckpt

    with ray_ckpt.make_sync_checkpointer() as ckptr:
        ckptr.save("/tmp/run/step-100", {"model": model.state_dict()})
        state = ckptr.load("/tmp/run/step-100")

See README.md for the async checkpointer, storage, Ray Train and the CLI.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers; at run time they load on first use
    from .builder import default_rank_info, make_async_checkpointer, make_sync_checkpointer
    from .catalog import CheckpointEntry, delete_checkpoint, list_checkpoints
    from .checkpointer import AsyncCheckpointer, Checkpointer, SyncCheckpointer
    from .config import (
        CheckpointerConfig,
        CheckpointReaderConfig,
        CheckpointStagerConfig,
        CheckpointWriterConfig,
        StorageConfig,
    )
    from .coordinator import SaveResult, StageStats
    from .errors import (
        BarrierTimeoutError,
        CheckpointerClosedError,
        CheckpointError,
        CheckpointExistsError,
        CheckpointNotFoundError,
        CheckpointWriteError,
        CorruptCheckpointError,
        FormatVersionError,
        IncompleteCheckpointError,
        MissingKeysError,
        PickleNotAllowedError,
        StateDictMismatchError,
        StorageError,
        UnsupportedValueError,
    )
    from .futures import CheckpointFuture
    from .manager import CheckpointManager
    from .reader import CheckpointInfo, CheckpointReader
    from .sharding import ShardedTensor
    from .stager import CheckpointStager, DefaultStager
    from .tools import (
        CheckpointSummary,
        DiffReport,
        ExportResult,
        ImportResult,
        Problem,
        VerifyReport,
        diff_checkpoints,
        export_checkpoint,
        import_checkpoint,
        inspect_checkpoint,
        verify,
    )
    from .types import STATE_DICT, RankInfo
    from .writer import CheckpointWriter, WriterHook

_EXPORTS: dict[str, str] = {  # public name -> the module that defines it
    "default_rank_info": "builder",
    "make_async_checkpointer": "builder",
    "make_sync_checkpointer": "builder",
    "CheckpointEntry": "catalog",
    "delete_checkpoint": "catalog",
    "list_checkpoints": "catalog",
    "AsyncCheckpointer": "checkpointer",
    "Checkpointer": "checkpointer",
    "SyncCheckpointer": "checkpointer",
    "CheckpointReaderConfig": "config",
    "CheckpointStagerConfig": "config",
    "CheckpointWriterConfig": "config",
    "CheckpointerConfig": "config",
    "StorageConfig": "config",
    "SaveResult": "coordinator",
    "StageStats": "coordinator",
    "BarrierTimeoutError": "errors",
    "CheckpointError": "errors",
    "CheckpointExistsError": "errors",
    "CheckpointNotFoundError": "errors",
    "CheckpointWriteError": "errors",
    "CheckpointerClosedError": "errors",
    "CorruptCheckpointError": "errors",
    "FormatVersionError": "errors",
    "IncompleteCheckpointError": "errors",
    "MissingKeysError": "errors",
    "PickleNotAllowedError": "errors",
    "StateDictMismatchError": "errors",
    "StorageError": "errors",
    "UnsupportedValueError": "errors",
    "CheckpointFuture": "futures",
    "CheckpointManager": "manager",
    "CheckpointInfo": "reader",
    "CheckpointReader": "reader",
    "ShardedTensor": "sharding",
    "CheckpointStager": "stager",
    "DefaultStager": "stager",
    "CheckpointSummary": "tools",
    "DiffReport": "tools",
    "ExportResult": "tools",
    "ImportResult": "tools",
    "Problem": "tools",
    "VerifyReport": "tools",
    "diff_checkpoints": "tools",
    "export_checkpoint": "tools",
    "import_checkpoint": "tools",
    "inspect_checkpoint": "tools",
    "verify": "tools",
    "RankInfo": "types",
    "STATE_DICT": "types",
    "CheckpointWriter": "writer",
    "WriterHook": "writer",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use, so that ``import ray_ckpt`` (and the CLI's
    ``--help``, ``ls``) does not import torch and Ray before something needs them."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "AsyncCheckpointer",
    "BarrierTimeoutError",
    "CheckpointEntry",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFuture",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointReaderConfig",
    "CheckpointStager",
    "CheckpointStagerConfig",
    "CheckpointSummary",
    "CheckpointWriteError",
    "CheckpointWriter",
    "CheckpointWriterConfig",
    "Checkpointer",
    "CheckpointerClosedError",
    "CheckpointerConfig",
    "CorruptCheckpointError",
    "DefaultStager",
    "DiffReport",
    "ExportResult",
    "FormatVersionError",
    "ImportResult",
    "IncompleteCheckpointError",
    "MissingKeysError",
    "PickleNotAllowedError",
    "Problem",
    "RankInfo",
    "STATE_DICT",
    "SaveResult",
    "ShardedTensor",
    "StageStats",
    "StateDictMismatchError",
    "StorageConfig",
    "StorageError",
    "SyncCheckpointer",
    "UnsupportedValueError",
    "VerifyReport",
    "WriterHook",
    "default_rank_info",
    "delete_checkpoint",
    "diff_checkpoints",
    "export_checkpoint",
    "import_checkpoint",
    "inspect_checkpoint",
    "list_checkpoints",
    "make_async_checkpointer",
    "make_sync_checkpointer",
    "verify",
]

"""ray_ckpt: Ray-native, actor-based checkpointing for PyTorch.

    import ray_ckpt

    with ray_ckpt.make_sync_checkpointer() as ckptr:
        ckptr.save("/tmp/run/step-100", {"model": model.state_dict()})
        state = ckptr.load("/tmp/run/step-100")

See README.md for the async checkpointer, storage, Ray Train and the CLI.
"""

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
from .memory import (
    MemoryCopiesLostError,
    MemoryTierConfig,
    MemoryTierFullError,
    memory_filesystem,
)
from .reader import CheckpointInfo, CheckpointReader
from .sharding import ShardedTensor
from .stager import CheckpointStager, DefaultStager
from .tiers import (
    MemoryCheckpointInfo,
    TieredCheckpointManager,
    load_newest,
    memory_checkpoints,
    persist,
)
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

__version__ = "0.1.0"

__all__ = [
    "persist",
    "memory_filesystem",
    "memory_checkpoints",
    "load_newest",
    "TieredCheckpointManager",
    "MemoryTierFullError",
    "MemoryTierConfig",
    "MemoryCopiesLostError",
    "MemoryCheckpointInfo",
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

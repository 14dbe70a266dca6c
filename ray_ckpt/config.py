"""Configuration: one frozen dataclass per component, gathered in :class:`CheckpointerConfig`.

Every field carries its unit in its name. Each dataclass validates itself in ``__post_init__``
and says what is wrong and what is allowed. The defaults suit a real training job; tests
override them per instance, never globally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

MiB = 1 << 20


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class CheckpointStagerConfig:
    """How state is copied out of the training process into the Ray object store.

    Attributes:
        use_async_staging: stage on a background thread (``AsyncCheckpointer`` only), so the
            caller can overlap staging with its forward and backward pass and wait on
            ``stage_future`` just before ``optimizer.step()``.
        use_pinned_memory: on CUDA, copy device tensors into page-locked host buffers that are
            reused across saves (released on ``close()``).
        use_non_blocking_copy: on CUDA, issue device-to-host copies on a dedicated stream
            without blocking the caller's stream; staging waits for them before the data
            goes to the object store.
        bucket_size_bytes: target size of one staged object, which is also one data file.
            Small tensors are packed together up to this size; larger tensors are split into
            chunks of this size that different writers can write in parallel.
        pack_threshold_bytes: tensors at or below this size are copied into a shared pack
            buffer (in the caller's heap, until it is put), so that thousands of tiny tensors
            cost one array of a put, not thousands; larger ones are put straight from their
            own memory. Measured, 512 MiB of 256 KiB tensors: stall 1.9x a memcpy with 64 KiB,
            2.5x with 1 MiB (packing copies them twice).
        memory_budget_bytes: most bytes staged but not yet written at any time. ``None``
            takes half of the object store of this node. A state dict larger than the budget
            stages in pieces: piece k+1 is staged while piece k is written.
        rank_local_keys: in a multi-rank save, tensors are *replicated* by default (the
            checkpoint is the union of the ranks' keys: a key held by one rank, as a pipeline
            stage's layer, or by several, as under DDP, holds one tensor) and written once, by
            one of the ranks that hold it, balanced over them. Keys equal to one of these
            dotted prefixes, or below one, are *rank-local* instead: every rank writes and
            later reads its own
            (``("rng", "dataloader")``; ``("",)`` makes every key rank-local).
        async_write_during_staging: ``AsyncCheckpointer`` only: hand each bucket to a writer
            as soon as it is staged. Writing then competes with the copy for the cores and the
            memory bus: measured on 2 cores, the stall grows from 1.2x to 1.8x a memcpy while
            the total falls from 1.25x to 0.9x a sync save. Off by default: the stall is what
            an async caller waits for. (A sync save always overlaps.)
        verify_replicas: every rank checksums its replicated tensors so that the commit can
            refuse a save in which a "replicated" key in fact differs between ranks (which
            would otherwise load one rank's value on every rank). CPU tensors only.
        put_threads: ``AsyncCheckpointer`` only: how many groups of buckets (up to 256 MiB
            each) are copied into the object store at the same time, each copy on its own
            thread. Measured on 2 cores, 1 GiB: 2 threads 1.07x a memcpy, 1 thread 1.18x.
            CUDA tensors are staged by one thread (through one pinned buffer). A custom
            ``CheckpointStager`` must allow this many concurrent ``stage`` calls, or set 1.
        prefault_object_store: populate this process's page table for the pages of the
            node's object store already in memory, on a background thread, when the
            checkpointer is made and after each save (waiting while the process loads), so
            that staging does not pay a page fault per page it puts into
            (:mod:`ray_ckpt.save.prefault`; Linux). Measured, 1 GiB memory checkpoints once the
            store's pages are in memory: stall 1.3-2.5x a memcpy without, 0.5-0.9x with.
    """

    use_async_staging: bool = True
    use_pinned_memory: bool = True
    use_non_blocking_copy: bool = True
    bucket_size_bytes: int = 64 * MiB
    pack_threshold_bytes: int = 64 * 1024
    memory_budget_bytes: int | None = None
    rank_local_keys: tuple[str, ...] = ()
    verify_replicas: bool = True
    async_write_during_staging: bool = False
    put_threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    prefault_object_store: bool = True

    def __post_init__(self) -> None:
        _require(
            1 <= self.put_threads <= 16, f"put_threads must be in [1, 16], got {self.put_threads}"
        )
        _require(
            self.bucket_size_bytes >= 4096,
            f"bucket_size_bytes must be at least 4096, got {self.bucket_size_bytes}",
        )
        _require(
            0 <= self.pack_threshold_bytes <= self.bucket_size_bytes,
            "pack_threshold_bytes must be between 0 and bucket_size_bytes "
            f"({self.bucket_size_bytes}), got {self.pack_threshold_bytes}",
        )
        _require(
            self.memory_budget_bytes is None or self.memory_budget_bytes >= self.bucket_size_bytes,
            "memory_budget_bytes must be None (half the object store) or at least "
            f"bucket_size_bytes ({self.bucket_size_bytes}), got {self.memory_budget_bytes}",
        )
        _require(
            isinstance(self.rank_local_keys, tuple)
            and all(isinstance(k, str) for k in self.rank_local_keys),
            f"rank_local_keys must be a tuple of dotted key prefixes, got {self.rank_local_keys!r}",
        )


@dataclass(frozen=True)
class CheckpointWriterConfig:
    """How the writer actors write and how a save commits.

    Attributes:
        checksum: compute a CRC32C of every item as it is written (verified on load).
        io_threads: data files one writer actor writes at the same time.
        fsync: make every data file, the manifest and the directory durable before the
            commit marker is written (local and network filesystems).
        barrier_timeout_secs: how long a save waits for every rank to report before it fails
            on every rank (multi-rank saves), and for staging to finish.
        spread_across_nodes: hand buckets to the writers of every alive node in turn instead
            of this node's writer alone. The bytes then cross the network (Ray's object
            transfer), which pays when one node's storage bandwidth is the bottleneck and the
            storage is shared (an object store, a network filesystem).
        idle_timeout_secs: a writer actor exits once no save and no write has been in flight
            on it for this long, releasing its process and memory; the next save starts it
            again (a few seconds). ``None`` keeps writers until the cluster stops.
    """

    checksum: bool = True
    io_threads: int = 4
    fsync: bool = True
    barrier_timeout_secs: float = 1800.0
    spread_across_nodes: bool = False
    idle_timeout_secs: float | None = 600.0

    def __post_init__(self) -> None:
        _require(
            1 <= self.io_threads <= 16, f"io_threads must be in [1, 16], got {self.io_threads}"
        )
        _require(
            self.barrier_timeout_secs > 0,
            f"barrier_timeout_secs must be positive, got {self.barrier_timeout_secs}",
        )
        _require(
            self.idle_timeout_secs is None or self.idle_timeout_secs > 0,
            f"idle_timeout_secs must be positive or None (never), got {self.idle_timeout_secs}",
        )


@dataclass(frozen=True)
class CheckpointReaderConfig:
    """How checkpoints are read back.

    Attributes:
        verify_checksums: check every item's CRC32C as it is read; a mismatch raises
            :class:`~ray_ckpt.errors.CorruptCheckpointError` naming the key and the file.
        io_threads: threads that read (and verify) items in parallel; by default one more
            than this machine's cores (at most 8): reads and checksums release the GIL, and
            the extra thread fills the gaps each thread spends in Python (measured on 2
            cores: 3 threads load 1 GiB in place 4-17% faster than 2).
    """

    verify_checksums: bool = True
    io_threads: int = field(default_factory=lambda: min(8, (os.cpu_count() or 1) + 1))

    def __post_init__(self) -> None:
        _require(
            1 <= self.io_threads <= 64, f"io_threads must be in [1, 64], got {self.io_threads}"
        )


@dataclass(frozen=True)
class StorageConfig:
    """Retries and part sizes for storage calls.

    Attributes:
        max_attempts: attempts per storage call for transient errors (timeouts, 5xx,
            throttling); permanent errors fail at once.
        retry_initial_backoff_secs: first wait between attempts; doubles each time.
        retry_max_backoff_secs: cap on one wait.
        part_size_bytes: bytes handed to a (non-local) output stream per write call.
            pyarrow's S3 filesystem cuts what it is given into multipart parts of its own
            fixed size (10 MiB) either way; fsspec filesystems buffer by their block size.
    """

    max_attempts: int = 5
    retry_initial_backoff_secs: float = 0.2
    retry_max_backoff_secs: float = 10.0
    part_size_bytes: int = 16 * MiB

    def __post_init__(self) -> None:
        _require(self.max_attempts >= 1, f"max_attempts must be >= 1, got {self.max_attempts}")
        _require(
            0 <= self.retry_initial_backoff_secs <= self.retry_max_backoff_secs,
            "need 0 <= retry_initial_backoff_secs <= retry_max_backoff_secs, got "
            f"{self.retry_initial_backoff_secs} and {self.retry_max_backoff_secs}",
        )
        _require(
            self.part_size_bytes >= 5 * MiB,
            "part_size_bytes must be at least 5 MiB (the S3 minimum part), "
            f"got {self.part_size_bytes}",
        )


@dataclass(frozen=True)
class CheckpointerConfig:
    """Everything a checkpointer needs, one field per component.

    Attributes:
        staging_config: the stager (:class:`CheckpointStagerConfig`).
        writer_config: the writer actors and the commit (:class:`CheckpointWriterConfig`).
        reader_config: loading (:class:`CheckpointReaderConfig`).
        storage_config: retries and part sizes (:class:`StorageConfig`).
        ray_address: cluster to attach to when Ray is not initialised yet. ``None`` attaches
            to ``RAY_ADDRESS`` when it is set and otherwise starts a local Ray; it never
            attaches to a stray cluster found through a file under /tmp/ray.
        namespace: Ray namespace of the writer actors.
    """

    staging_config: CheckpointStagerConfig = field(default_factory=CheckpointStagerConfig)
    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    reader_config: CheckpointReaderConfig = field(default_factory=CheckpointReaderConfig)
    storage_config: StorageConfig = field(default_factory=StorageConfig)
    ray_address: str | None = None
    namespace: str = "ray_ckpt"

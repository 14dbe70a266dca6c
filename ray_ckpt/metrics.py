"""Metrics exported through ``ray.util.metrics``: they appear on Ray's Prometheus endpoint and
in the dashboard, tagged by the node and process that recorded them.

=================================  =========  ===============================================
name                               kind       what
=================================  =========  ===============================================
``ray_ckpt_saves``                 counter    committed saves
``ray_ckpt_save_failures``         counter    saves that failed (nothing committed)
``ray_ckpt_bytes_written``         counter    bytes of committed checkpoints
``ray_ckpt_save_seconds``          histogram  ``save()`` call to commit
``ray_ckpt_stall_seconds``         histogram  ``save()`` call to the end of staging
``ray_ckpt_bytes_read``            counter    bytes loaded
``ray_ckpt_load_seconds``          histogram  ``load()`` duration
=================================  =========  ===============================================

Recording is a no-op in a process that is not connected to Ray (a reader in a notebook).
"""

from __future__ import annotations

import threading
from typing import Any

import ray

_BOUNDARIES_SECS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900]
_lock = threading.Lock()
_metrics: dict[str, Any] | None = None


def _get() -> dict[str, Any] | None:
    global _metrics
    if not ray.is_initialized():
        return None
    with _lock:
        if _metrics is None:
            from ray.util.metrics import Counter, Histogram

            _metrics = {
                "saves": Counter("ray_ckpt_saves", "Committed ray_ckpt saves"),
                "failures": Counter("ray_ckpt_save_failures", "ray_ckpt saves that failed"),
                "written": Counter("ray_ckpt_bytes_written", "Bytes of committed checkpoints"),
                "save_secs": Histogram(
                    "ray_ckpt_save_seconds", "save() to commit", boundaries=_BOUNDARIES_SECS
                ),
                "stall_secs": Histogram(
                    "ray_ckpt_stall_seconds", "save() to the end of staging",
                    boundaries=_BOUNDARIES_SECS,
                ),
                "read": Counter("ray_ckpt_bytes_read", "Bytes loaded by ray_ckpt"),
                "load_secs": Histogram(
                    "ray_ckpt_load_seconds", "load() duration", boundaries=_BOUNDARIES_SECS
                ),
            }
        return _metrics


def record_commit(nbytes: int, total_secs: float) -> None:
    metrics = _get()
    if metrics is not None:
        metrics["saves"].inc()
        if nbytes > 0:  # Ray's counters refuse increments of 0
            metrics["written"].inc(nbytes)
        metrics["save_secs"].observe(total_secs)


def record_failure() -> None:
    metrics = _get()
    if metrics is not None:
        metrics["failures"].inc()


def record_stall(secs: float) -> None:
    metrics = _get()
    if metrics is not None:
        metrics["stall_secs"].observe(secs)


def record_load(nbytes: int, secs: float) -> None:
    metrics = _get()
    if metrics is not None:
        if nbytes > 0:
            metrics["read"].inc(nbytes)
        metrics["load_secs"].observe(secs)

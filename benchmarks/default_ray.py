"""Saves on a Ray started with its defaults, next to the Ray that ray_ckpt starts itself.

    python -m benchmarks.default_ray --size 1g --object-store 3g --runs 5

Users run ray_ckpt on a Ray they started (``ray start``, Ray Train, ``ray job submit``), with
Ray's default ``free_objects_period_milliseconds`` of 1000: a released object keeps its
object-store memory for up to a second. The local Ray that ray_ckpt starts sets 10 ms. For each
setting, in a fresh process and a fresh Ray (``ray.init(address="local")``, one node, the given
object store), with a transformer state of ``--size``:

* the first sync save after start (writer actors start, first touch of store pages);
* ``--runs`` sync saves, each to a fresh path, the previous checkpoint deleted first;
* ``--runs`` async saves the same way: the stall (until the caller may change its tensors)
  against one memcpy of the state, and the time until committed.

Results: a markdown table on stdout and ``--out``/default_ray.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SETTINGS = {"Ray defaults (1000 ms frees)": {}, "ray_ckpt's local Ray (10 ms frees)": {
    "free_objects_period_milliseconds": 10}}


def measure(size: int, store: int, runs: int, system_config: dict[str, Any]) -> dict[str, Any]:
    """One setting, in this process."""
    import ray
    import ray_ckpt
    import torch

    from benchmarks.state_dicts import tensors, transformer_state

    ray.init(address="local", num_cpus=2, object_store_memory=store, include_dashboard=False,
             log_to_driver=False, _system_config=system_config)
    work = tempfile.mkdtemp(prefix="ray_ckpt_default_ray_")
    try:
        state = transformer_state(size)
        target = {k: torch.empty_like(v) for k, v in state.items()}
        copies = []
        for _ in range(runs):
            started = time.perf_counter()
            for (_, src), (_, dst) in zip(tensors(state), tensors(target)):
                dst.copy_(src)
            copies.append(time.perf_counter() - started)
        out: dict[str, Any] = {"memcpy_s": statistics.median(copies)}
        sync, saves = ray_ckpt.make_sync_checkpointer(), []
        for i in range(runs + 1):
            path = os.path.join(work, f"sync-{i}")
            started = time.perf_counter()
            sync.save(path, state)
            saves.append(time.perf_counter() - started)
            shutil.rmtree(os.path.join(work, f"sync-{i - 1}"), ignore_errors=True)
        out["first_sync_save_s"], out["sync_save_s"] = saves[0], statistics.median(saves[1:])
        ckptr, stalls, totals = ray_ckpt.make_async_checkpointer(), [], []
        for i in range(runs):
            path = os.path.join(work, f"async-{i}")
            started = time.perf_counter()
            stage, write = ckptr.save(path, state)
            stage.result()
            stalls.append(time.perf_counter() - started)
            write.result()
            totals.append(time.perf_counter() - started)
            shutil.rmtree(os.path.join(work, f"async-{i - 1}"), ignore_errors=True)
        out["async_stall_s"], out["async_total_s"] = statistics.median(stalls), statistics.median(
            totals)
        out["async_stall_max_s"] = max(stalls)
        sync.close()
        ckptr.close()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()


def table(results: dict[str, dict[str, Any]], size: int, store: int, runs: int) -> str:
    lines = [f"{size / 2**30:.2f} GiB transformer state, {store / 2**30:.1f} GiB object store, "
             f"one node, median of {runs} saves (fresh paths, the previous one deleted)", "",
             "| Ray | memcpy | first sync save | sync save | async stall (x memcpy, max) | "
             "async until committed |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        m = r["memcpy_s"]
        lines.append(
            f"| {name} | {m:.3f} s | {r['first_sync_save_s']:.2f} s | {r['sync_save_s']:.3f} s | "
            f"{r['async_stall_s']:.3f} s ({r['async_stall_s'] / m:.2f}x, max "
            f"{r['async_stall_max_s'] / m:.2f}x) | {r['async_total_s']:.3f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.state_dicts import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1g")
    parser.add_argument("--object-store", default="3g")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # run one setting, print JSON
    args = parser.parse_args(argv)
    size, store = parse_size(args.size), parse_size(args.object_store)
    if args.setting is not None:
        sys.stdout.write(json.dumps(measure(size, store, args.runs, SETTINGS[args.setting])))
        return
    results = {}
    for name in SETTINGS:  # each in a fresh process: a fresh Ray, fresh object-store pages
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.default_ray", "--size", args.size,
             "--object-store", args.object_store, "--runs", str(args.runs), "--setting", name],
            check=True, stdout=subprocess.PIPE, text=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "default_ray.json"), "w") as f:
        json.dump({"size_bytes": size, "object_store_bytes": store, "runs": args.runs,
                   "results": results}, f, indent=1)
    sys.stdout.write(table(results, size, store, args.runs) + "\n")


if __name__ == "__main__":
    main()

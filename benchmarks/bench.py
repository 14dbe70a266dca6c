"""The benchmark: ray_ckpt against the machine's limits and its peers, in one process run.

    python -m benchmarks.bench --sizes 1g,4g --runs 5 --out benchmarks/results
    python -m benchmarks.bench --quick          # small sizes, one run: under a minute

Run it in a network namespace with only loopback up, as the tests do::

    unshare -n -- sh -c 'ip link set lo up && exec python -m benchmarks.bench ...'

How a run goes, per state dict (see benchmarks/README.md for what each row means):

1. build the state dict and preallocated tensors of the same structure (the in-place target);
2. saves, and the memcpy limit, round-robin: warm-up round(s), then ``--runs`` rounds, each
   save into a fresh directory that is deleted right after (untimed);
3. the peak memory of an async save, untimed (:mod:`benchmarks.memory`);
4. loads, in batches whose files fit in the page cache together: write each artifact once
   (untimed), warm up each load (its first warm-up run also checks every byte it loaded), then
   ``--runs`` rounds, round-robin;
5. free everything, delete every file.

Then the 2-node cluster part (it needs a Ray of its own), then the table (stdout and
``results.md``), ``results.json`` and ``results.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from . import memory, ops, report
from .state_dicts import (
    GiB,
    Spec,
    count_tensors,
    empty_like_tree,
    nbytes_of,
    parse_size,
    same_tensors,
    size_name,
)

logger = logging.getLogger("benchmarks")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="ray_ckpt vs the machine's limits and its peers (torch.save, safetensors, "
        "PyTorch DCP, Ray Train); medians of ratios, one process run.",
    )
    p.add_argument("--sizes", default="1g,4g",
                   help="transformer-shaped state dicts, comma separated (default: 1g,4g)")
    p.add_argument("--tiny", type=int, default=50_000,
                   help="count of tiny tensors in the tiny state dict; 0 skips it (default 50000)")
    p.add_argument("--optim", default="1g",
                   help="size of the model + Adam state dict; 0 skips it (default 1g)")
    p.add_argument("--cluster", default="1g",
                   help="bytes saved in the 2-node simulated cluster part; 0 skips it (default 1g)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per row (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--tiny-runs", type=int, default=3,
                   help="timed runs for the tiny state dict, where DCP takes ~40 s a run "
                   "(default 3; never more than --runs)")
    p.add_argument("--object-store", default="6g",
                   help="Ray object store of the local Ray (default 6g)")
    p.add_argument("--only", default="",
                   help="comma separated substrings: run only rows whose name holds one")
    p.add_argument("--cold-reads", action="store_true",
                   help="drop every file from the page cache (posix_fadvise) before each read")
    p.add_argument("--scratch", default=None,
                   help="directory for checkpoint files (default: the system temp dir); a "
                   "fresh subdirectory is made and removed")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results"),
                   help="where results.md, results.json and results.png go")
    p.add_argument("--quick", action="store_true",
                   help="small sizes, one run (a smoke test: under a minute)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--report-only", metavar="RESULTS_JSON",
                   help="measure nothing: write the table and plot of an earlier results.json")
    return p


def apply_quick(args: argparse.Namespace) -> None:
    args.sizes = "32m"
    args.tiny = 1000
    args.optim = "24m"
    args.cluster = "16m"
    args.runs = 1
    args.tiny_runs = 1
    args.warmup = 0  # loads still run once untimed, to check what they loaded
    args.object_store = "512m"


def specs(args: argparse.Namespace) -> list[Spec]:
    out = [Spec(f"transformer {size_name(parse_size(s))}", "transformer", parse_size(s))
           for s in args.sizes.split(",") if s.strip()]
    if args.tiny:
        out.append(Spec(f"{args.tiny:,} tiny tensors", "tiny", args.tiny))
    optim = parse_size(args.optim) if args.optim else 0
    if optim:
        out.append(Spec(f"model + Adam {size_name(optim)}", "optimizer", optim))
    return out


def selected(all_ops: Sequence[ops.Op], only: str) -> list[ops.Op]:
    words = [w.strip().lower() for w in only.split(",") if w.strip()]
    if not words:
        return list(all_ops)
    keep = []
    for op in all_ops:
        is_limit = all(r.group == "limit" for r in op.rows)
        if is_limit or any(w in r.name.lower() for r in op.rows for w in words):
            keep.append(op)  # limits always run: every ratio needs them
    return keep


# --- Ray and the checkpointers ----------------------------------------------------------------


def start_ray(object_store_bytes: int) -> None:
    import ray

    # workers import benchmarks.cluster by name
    path = os.environ.get("PYTHONPATH", "")
    if REPO_ROOT not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, path) if p)
    from ray_ckpt.builder import LOCAL_RAY_SYSTEM_CONFIG

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=object_store_bytes,
        include_dashboard=False,
        log_to_driver=False,
        _system_config=LOCAL_RAY_SYSTEM_CONFIG,  # as the local Ray that ray_ckpt starts
    )


def make_checkpointers() -> dict[str, Any]:
    import ray_ckpt

    on = ray_ckpt.CheckpointerConfig()
    off = ray_ckpt.CheckpointerConfig(
        writer_config=ray_ckpt.CheckpointWriterConfig(checksum=False),
        reader_config=ray_ckpt.CheckpointReaderConfig(verify_checksums=False),
    )
    return {
        "sync-crc on": ray_ckpt.make_sync_checkpointer(on),
        "sync-crc off": ray_ckpt.make_sync_checkpointer(off),
        "async-crc on": ray_ckpt.make_async_checkpointer(on),
        "async-crc off": ray_ckpt.make_async_checkpointer(off),
    }


# --- one state dict ---------------------------------------------------------------------------


def _record(times: dict[str, list[float]], result: dict[str, float]) -> None:
    for name, secs in result.items():
        times[name].append(secs)


def _load_batches(load_ops: list[ops.Op], nbytes: int) -> list[list[ops.Op]]:
    """Group loads so that the files of one batch fit in the page cache together."""
    available = (report._meminfo("MemAvailable") or 8 * GiB) // 2
    per_batch = max(1, available // max(nbytes, 1))
    artifacts: list[str] = []
    for op in load_ops:
        if op.artifact not in artifacts:
            artifacts.append(op.artifact or "")
    groups = [artifacts[i : i + per_batch] for i in range(0, len(artifacts), per_batch)]
    return [[op for op in load_ops if op.artifact in group] for group in groups]


def _verify(op: ops.Op, ctx: ops.Context) -> None:
    """Run ``op`` once into a zeroed target and check every byte it loaded."""
    for _, tensor in ops.tensors(ctx.target):
        tensor.zero_()
    if isinstance(op, ops.RayCkptLoad) and not op.in_place:
        ckptr = ctx.checkpointers[f"sync-{'crc on' if op.checksum else 'crc off'}"]
        loaded = ckptr.load(ctx.artifacts["ray_ckpt"])
        ok = same_tensors(loaded, ctx.state)
        del loaded
    else:
        op.run(ctx)
        ok = same_tensors(ctx.target, ctx.state)
    if not ok:
        raise RuntimeError(f"{op.rows[0].name} loaded different bytes than were saved")


def run_state_dict(
    spec: Spec, args: argparse.Namespace, checkpointers: dict[str, Any], scratch: str
) -> dict[str, Any]:
    started = time.perf_counter()
    log(f"[{spec.name}] building")
    state = spec.build()
    target = empty_like_tree(state)
    nbytes = nbytes_of(state)
    root = os.path.join(scratch, spec.kind + "-" + str(spec.nbytes))
    os.makedirs(root)
    ctx = ops.Context(state=state, target=target, scratch=root, nbytes=nbytes,
                      checkpointers=checkpointers)
    chosen = selected(ops.all_ops(), args.only)
    save_ops = [op for op in chosen if op.artifact is None]
    load_ops = [op for op in chosen if op.artifact is not None]
    times: dict[str, list[float]] = defaultdict(list)
    residency: dict[str, float | None] = {}
    runs = min(args.runs, args.tiny_runs) if spec.kind == "tiny" else args.runs
    try:
        for r in range(args.warmup + runs):
            log(f"[{spec.name}] saves: {'warm-up' if r < args.warmup else 'run'} "
                f"{r + 1 - (args.warmup if r >= args.warmup else 0)}")
            for op in save_ops:
                result = op.run(ctx)
                if r >= args.warmup:
                    _record(times, result)
        peaks = None
        if any(op.rows[0].name == ops.rc_stall(True) for op in save_ops):
            log(f"[{spec.name}] peak memory of an async save")
            peaks = memory.measure(state, nbytes, root)
        for batch in _load_batches(load_ops, nbytes):
            names = list(dict.fromkeys(op.artifact for op in batch if op.artifact))
            log(f"[{spec.name}] loads of {', '.join(names)}")
            for name in names:
                ctx.artifacts[name] = ops.ARTIFACT_MAKERS[name](ctx)
            for op in batch:  # warm-up; the first warm-up run also checks what it loaded
                for w in range(max(args.warmup, 1)):
                    _maybe_cold(args, ctx, op)
                    if w == 0:
                        _verify(op, ctx)
                    else:
                        op.run(ctx)
            for name in names:
                if args.cold_reads:
                    ops.drop_from_page_cache(ctx.artifacts[name])
                residency[name] = report.page_cache_fraction(ctx.artifacts[name])
            for _ in range(runs):
                for op in batch:
                    _maybe_cold(args, ctx, op)
                    _record(times, op.run(ctx))
            for name in names:
                ops.remove(ctx.artifacts.pop(name))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    log(f"[{spec.name}] done in {time.perf_counter() - started:.0f}s")
    return {
        "name": spec.name,
        "kind": spec.kind,
        "nbytes": nbytes,
        "tensors": count_tensors(state),
        "times": dict(times),
        "page_cache": residency,
        "runs": runs,
        "memory": peaks,
    }


def _maybe_cold(args: argparse.Namespace, ctx: ops.Context, op: ops.Op) -> None:
    if args.cold_reads and op.artifact:
        ops.drop_from_page_cache(ctx.artifacts[op.artifact])


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# --- main -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    scratch = ops.scratch_dir(args.scratch)
    results: dict[str, Any] = {
        "machine": report.machine_info(scratch),
        "settings": {
            "runs": args.runs,
            "tiny_runs": min(args.runs, args.tiny_runs),
            "warmup": args.warmup,
            "object_store_bytes": parse_size(args.object_store),
            "cold_reads": args.cold_reads,
            "quick": args.quick,
        },
        "state_dicts": [],
        "cluster": None,
    }
    checkpointers: dict[str, Any] = {}
    try:
        start_ray(parse_size(args.object_store))
        checkpointers = make_checkpointers()
        torch.set_num_threads(os.cpu_count() or 1)
        for spec in specs(args):
            results["state_dicts"].append(run_state_dict(spec, args, checkpointers, scratch))
            _save_partial(results, args.out)
            gc.collect()
        for ckptr in checkpointers.values():
            ckptr.close()
        checkpointers = {}
        ray.shutdown()
        cluster_bytes = parse_size(args.cluster) if args.cluster else 0
        if cluster_bytes and not args.only:
            from . import cluster

            log(f"[cluster] 2 nodes, {size_name(cluster_bytes)}")
            results["cluster"] = cluster.run(
                cluster_bytes, runs=args.runs, warmup=max(args.warmup, 1), scratch=scratch
            )
    finally:
        for ckptr in checkpointers.values():
            try:
                ckptr.close()
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    cache: dict[str, float] = {}
    for sd in results["state_dicts"]:
        for name, value in sd["page_cache"].items():
            if value is not None:
                cache[name] = min(value, cache.get(name, 1.0))
    results["page_cache"] = cache
    return results


def _save_partial(results: dict[str, Any], out: str) -> None:
    """What is measured so far, in case a long run dies later (removed when it finishes)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.partial.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


def save_results(results: dict[str, Any], out: str, *, plot: bool) -> str:
    os.makedirs(out, exist_ok=True)
    text = report.markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    if plot:
        report.plot(results, os.path.join(out, "results.png"))
    partial = os.path.join(out, "results.partial.json")
    if os.path.exists(partial):
        os.unlink(partial)
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        apply_quick(args)
    logging.basicConfig(level=logging.WARNING)
    # a SIGTERM (a timeout, a kill) still deletes the files and stops Ray
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report_only:
        with open(args.report_only) as f:
            results = json.load(f)
    else:
        results = run(args)
    text = save_results(results, args.out, plot=not args.no_plot)
    print(text)
    log(f"wrote {args.out}/results.md, results.json" + ("" if args.no_plot else ", results.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

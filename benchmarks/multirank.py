"""The cost curve of multi-rank saves: how the barrier and the commit grow with the ranks.

Two parts (``python -m benchmarks.multirank [--real 2,8,16,32,64] [--synthetic 1000,4000,16000]
[--items 200] [--plot docs/multirank.png] [--json out.json]``):

* **real**: N rank actors (``num_cpus=0``) spread over a simulated 4-node cluster
  (``ray.cluster_utils.Cluster``), each saving a small state that mixes replicated keys (DDP),
  per-stage keys (4 pipeline stages), row-sharded tensors (``ShardedTensor`` over the ranks of a
  stage) and one rank-local key, with an async checkpointer. *barrier + commit* is the time from
  the last rank's end of staging to the last rank's committed write future (every actor stamps
  ``time.time()`` on this machine): waiting on the slowest writer, the reports crossing to the
  coordinator, the merge and the commit. *control bytes* are the pickled size of what each rank
  sends to the coordinator: its replicated keys (``assign``) and its report, rebuilt from the
  rank's real staging plan (items, tree, replicas, shards, one extent per owned item).
* **synthetic**: the merge/commit logic alone, :class:`ray_ckpt.save.dedup.Merger` and
  :func:`ray_ckpt.save.commit.commit_merged` (to a local directory), fed reports of R ranks x
  ``items`` items (90% replicated over every rank, 10% sharded over every rank), and
  :func:`ray_ckpt.save.dedup.assign_replica_owners` for the same key sets. Reports are built before
  the clock starts; each is dropped once merged, as the coordinator does. Prints time per
  rank-item, manifest bytes, the merger's rows (items, extents, distinct trees) and the peak
  memory the merge allocates (tracemalloc, a separate pass).
"""

from __future__ import annotations

import argparse
import gc
import json
import pickle
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import ray
import torch

MiB = 1 << 20
STAGES = 4

# --- synthetic reports --------------------------------------------------------------------------


def synthetic_reports(ranks: int, items: int) -> Iterator[Any]:
    """Report by report, what ``ranks`` ranks of a data-parallel + sharded job send: ``items``
    keys each, 90% replicated (the owner of key k is rank k % ranks: it alone has an extent),
    10% 1-D tensors sharded over every rank (a 16-element box each)."""
    from ray_ckpt._util import PackedRows
    from ray_ckpt.format.manifest import Extent, ItemMeta
    from ray_ckpt.save.protocol import RankReport

    sharded = max(1, items // 10)
    replicated = items - sharded
    pairs = [f'[["m{k}",{{"T":{k}}}]]' for k in range(replicated)]
    pairs += [f'[["s{k}",{{"D":{{"i":[{replicated + k}],"g":[{16 * ranks}]}}}}]]'
              for k in range(sharded)]
    tree = '{"d":[' + ",".join(p[1:-1] for p in pairs) + "]}"
    for rank in range(ranks):
        metas: list[Any] = PackedRows()
        extents: list[Any] = PackedRows()
        replicas: dict[int, tuple[str, int, int | None]] = {}
        shard_items: dict[int, tuple[str, int]] = {}
        file = f"data-{rank:06d}-0000.bin"
        for k in range(replicated):
            metas.append(ItemMeta(k, f"m{k}", "tensor", "float32", (256,), "cpu", 1024))
            replicas[k] = (f'["m{k}"]', k % ranks, 1234 + k)
            if k % ranks == rank:
                extents.append(Extent(k, 0, file, 64 + 1024 * k, 1024, 99, rank))
        for k in range(sharded):
            i = replicated + k
            metas.append(ItemMeta(i, f"s{k}", "tensor", "float32", (16,), "cpu", 64,
                                  global_shape=(16 * ranks,), global_offset=(16 * rank,)))
            shard_items[i] = (f'["s{k}"]', rank)
            extents.append(Extent(i, 0, file, 64 + 1024 * items + 64 * k, 64, 99, rank))
        yield RankReport(
            rank=rank, save_id="bench", items=metas, extents=extents, tree_json=tree,
            replicas=replicas, shard_items=shard_items, files=[file], writers={"n": 1},
            stage_secs=0.0,
        )


def _target(path: str) -> Any:
    from ray_ckpt.save.protocol import CommitTarget
    from ray_ckpt.storage.storage import Storage

    return CommitTarget(
        storage=Storage.from_path(path), checkpoint_id="bench", overwrite=False, hook=None,
        fsync=False, started_unix=time.time(),
    )


def synthetic(ranks: int, items: int) -> dict[str, Any]:
    """Merge and commit ``ranks`` x ``items`` synthetic rank-items; time and size them."""
    from ray_ckpt.save.commit import commit_merged
    from ray_ckpt.save.dedup import Merger, assign_replica_owners

    reports = list(synthetic_reports(ranks, items))
    report_bytes = len(pickle.dumps(reports[-1], protocol=5))
    first = reports[0]
    keys = [(path, first.items[i].nbytes) for i, (path, _, _) in first.replicas.items()]
    assign_msg = len(pickle.dumps(keys, protocol=5))
    scratch = tempfile.mkdtemp(prefix="ray_ckpt-multirank-")
    try:
        gc.collect()
        t0 = time.perf_counter()
        owners = assign_replica_owners([(list(range(ranks)), keys)])
        t_assign = time.perf_counter() - t0
        assert len(owners[0]) == len(keys)
        merger = Merger(_target(scratch).storage)
        t0 = time.perf_counter()
        while reports:
            merger.add(reports.pop())  # dropped once merged
        t_merge = time.perf_counter() - t0
        rows = (len(merger.items), len(merger.extents), len(merger.trees))
        t0 = time.perf_counter()
        result = commit_merged(_target(scratch), merger)
        t_commit = time.perf_counter() - t0
        manifest = max(
            (p for p in __import__("pathlib").Path(scratch).iterdir() if "manifest" in p.name),
            key=lambda p: p.stat().st_size,
        ).stat().st_size
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rank_items = ranks * items
    total = t_assign + t_merge + t_commit
    return {
        "ranks": ranks, "items": items, "rank_items": rank_items,
        "assign_s": t_assign, "merge_s": t_merge, "commit_s": t_commit, "total_s": total,
        "us_per_rank_item": total / rank_items * 1e6,
        "report_bytes_per_rank": report_bytes, "assign_bytes_per_rank": assign_msg,
        "manifest_bytes": manifest, "merged_items": rows[0], "merged_extents": rows[1],
        "distinct_trees": rows[2], "committed_items": result.items,
        "merge_peak_mib": _merge_peak_mib(ranks, items),
    }


def _merge_peak_mib(ranks: int, items: int) -> float:
    """Peak memory the merger holds while every report is merged (reports made one at a time,
    as they arrive at the coordinator); tracemalloc, so a separate, slower pass."""
    from ray_ckpt.save.dedup import Merger
    from ray_ckpt.storage.storage import Storage

    merger = Merger(Storage.from_path(tempfile.gettempdir()))
    tracemalloc.start()
    for report in synthetic_reports(ranks, items):
        merger.add(report)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / MiB


# --- real ranks ---------------------------------------------------------------------------------


def rank_state(rank: int, world: int) -> dict[str, Any]:
    """Replicated (every rank), per-stage (the ranks of one of 4 stages), sharded (rows over
    the ranks of a stage) and rank-local keys; about 100 items."""
    stages = min(STAGES, world)
    per_stage = world // stages
    stage, shard = divmod(rank, per_stage) if rank < stages * per_stage else (stages - 1, 0)
    import ray_ckpt

    torch.manual_seed(0)
    shared = {f"shared.{i}": torch.randn(64) for i in range(40)}
    torch.manual_seed(1 + stage)
    staged = {f"stage{stage}.{i}": torch.randn(128) for i in range(40)}
    rows = 4
    sharded = {
        f"stage{stage}.sharded.{i}": ray_ckpt.ShardedTensor(
            torch.full((rows, 8), float(i + stage)), (rows * per_stage, 8), (rows * shard, 0)
        )
        for i in range(20)
    }
    return {"model": shared | staged | sharded, "rng": torch.full((2,), float(rank))}


@ray.remote(num_cpus=0)
class BenchRank:
    def __init__(self, rank: int, world: int) -> None:
        import ray_ckpt

        self.rank, self.world = rank, world
        config = ray_ckpt.CheckpointerConfig(
            staging_config=ray_ckpt.CheckpointStagerConfig(rank_local_keys=("rng",)),
            writer_config=ray_ckpt.CheckpointWriterConfig(barrier_timeout_secs=600),
        )
        self.config = config
        self.ckptr = ray_ckpt.make_async_checkpointer(
            config=config, rank_info=ray_ckpt.RankInfo(rank, world)
        )

    def save(self, path: str) -> dict[str, float]:
        state = rank_state(self.rank, self.world)
        t0 = time.time()
        stage, write = self.ckptr.save(path, state)
        stage.result()
        t_staged = time.time()
        write.result()
        return {"start": t0, "staged": t_staged, "done": time.time(),
                "control_bytes": self._control_bytes(state)}

    def _control_bytes(self, state: dict[str, Any]) -> int:
        """What this rank sends to the coordinator: its replicated keys, then its report,
        rebuilt from its real staging plan (one extent per owned item)."""
        from ray_ckpt._util import PackedRows
        from ray_ckpt.format.manifest import Extent
        from ray_ckpt.save.protocol import RankReport
        from ray_ckpt.save.stager import DefaultStager

        sent: list[Any] = []

        def assign(keys: list[tuple[str, int]]) -> list[int]:
            sent.append(keys)
            return [self.rank] * len(keys)

        plan = DefaultStager(self.config.staging_config).plan(
            state, checkpoint_id="x", rank=self.rank, world_size=self.world,
            assign_replicas=assign,
        )
        owned = [m for m in plan.items
                 if m.item not in plan.replicas or plan.replicas[m.item].owner == self.rank]
        report = RankReport(
            rank=self.rank, save_id="x", items=plan.items,
            extents=PackedRows(Extent(m.item, 0, "data-000000-0000-x.bin", 64, m.nbytes, 1,
                                      self.rank) for m in owned),
            tree_json=plan.tree_json,
            replicas={i: (r.path_id, r.owner, 1) for i, r in plan.replicas.items()},
            shard_items={i: (plan.leaves[i].path_id, o) for i, o in plan.shard_owners.items()},
            files=["data-000000-0000-x.bin"], writers={"node": 1}, stage_secs=0.0,
        )
        return len(pickle.dumps(sent, protocol=5)) + len(pickle.dumps(report, protocol=5))

    def check(self, path: str) -> bool:
        import ray_ckpt

        with ray_ckpt.make_sync_checkpointer(
            self.config, rank_info=ray_ckpt.RankInfo(self.rank, self.world)
        ) as ckptr:
            loaded = ckptr.load(path, state_dict=rank_state(self.rank, self.world))
        expected = rank_state(self.rank, self.world)
        return all(
            torch.equal(getattr(a, "local", a), getattr(b, "local", b))
            for a, b in zip(_leaves(loaded), _leaves(expected))
        )


def _leaves(state: dict[str, Any]) -> list[Any]:
    return [state["rng"], *(state["model"][k] for k in sorted(state["model"]))]


def real(worlds: list[int], scratch: str) -> list[dict[str, Any]]:
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 256 * MiB})
    for _ in range(3):
        cluster.add_node(num_cpus=1, object_store_memory=128 * MiB)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="ray_ckpt_bench", log_to_driver=False)
    rows = []
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        for world in worlds:
            ranks = [
                BenchRank.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                    nodes[r * len(nodes) // world], soft=False)).remote(r, world)
                for r in range(world)
            ]
            path = f"{scratch}/w{world}"
            stamps = ray.get([r.save.remote(path) for r in ranks], timeout=1800)
            exact = all(ray.get([r.check.remote(path) for r in ranks], timeout=1800))
            staged = max(s["staged"] for s in stamps)
            done = max(s["done"] for s in stamps)
            control = sum(s["control_bytes"] for s in stamps)
            rows.append({
                "ranks": world, "barrier_commit_s": done - staged,
                "save_s": done - min(s["start"] for s in stamps),
                "control_bytes": control, "control_bytes_per_rank": control / world,
                "loads_exact": exact,
            })
            print(json.dumps(rows[-1]), flush=True)
            for r in ranks:
                ray.kill(r)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return rows


# --- report -------------------------------------------------------------------------------------


def table(real_rows: list[dict[str, Any]], synth_rows: list[dict[str, Any]]) -> str:
    lines = []
    if real_rows:
        lines += ["| real ranks | barrier + commit (s) | whole save (s) | control bytes / rank "
                  "| loads exact |", "| ---: | ---: | ---: | ---: | :---: |"]
        lines += [f"| {r['ranks']} | {r['barrier_commit_s']:.2f} | {r['save_s']:.2f} | "
                  f"{r['control_bytes_per_rank']:,.0f} | {'yes' if r['loads_exact'] else 'NO'} |"
                  for r in real_rows]
        lines.append("")
    if synth_rows:
        lines += ["| synthetic ranks × items | assign (s) | merge (s) | commit (s) "
                  "| µs / rank-item | report bytes / rank | manifest bytes | merged items "
                  "| distinct trees | merge peak (MiB) |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['ranks']:,} × {r['items']} | {r['assign_s']:.2f} | {r['merge_s']:.2f} | "
                  f"{r['commit_s']:.2f} | {r['us_per_rank_item']:.2f} | "
                  f"{r['report_bytes_per_rank']:,} | {r['manifest_bytes']:,} | "
                  f"{r['merged_items']:,} | {r['distinct_trees']} | {r['merge_peak_mib']:.1f} |"
                  for r in synth_rows]
    return "\n".join(lines)


def plot(real_rows: list[dict[str, Any]], synth_rows: list[dict[str, Any]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if real_rows:
        axes[0].plot([r["ranks"] for r in real_rows], [r["barrier_commit_s"] for r in real_rows],
                     "o-", label="barrier + commit (s)")
        ax2 = axes[0].twinx()
        ax2.plot([r["ranks"] for r in real_rows],
                 [r["control_bytes"] / 1e6 for r in real_rows], "s--", color="C1",
                 label="control MB (all ranks)")
        ax2.set_ylabel("control messages (MB)")
        axes[0].set_xlabel("real rank actors (4 simulated nodes)")
        axes[0].set_ylabel("seconds")
        axes[0].set_title("real ranks")
        axes[0].legend(loc="upper left")
        ax2.legend(loc="lower right")
    if synth_rows:
        x = [r["rank_items"] for r in synth_rows]
        axes[1].plot(x, [r["us_per_rank_item"] for r in synth_rows], "o-",
                     label="assign + merge + commit")
        axes[1].set_xscale("log")
        axes[1].set_ylim(bottom=0)
        axes[1].set_xlabel("rank-items (ranks × 200)")
        axes[1].set_ylabel("µs per rank-item")
        axes[1].set_title("merge/commit alone (synthetic)")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)


# --- the 1,024-GPU model (docs/SCALE.md) ----------------------------------------------------------

PARAMS = 70e9
NODES, RANKS_PER_NODE, PP = 128, 8, 8
PARAM_TENSORS = 723  # a Llama-2-70B: 80 layers x 9 tensors, embedding, head, final norm
S3_PART = 10 * MiB  # pyarrow's S3 multipart part (fixed)
S3_PUTS_PER_PREFIX = 3500  # S3: PUT/COPY/POST/DELETE per second per prefix


def scale_model(real_rows: list[dict[str, Any]], synth_rows: list[dict[str, Any]]) -> list[str]:
    """docs/SCALE.md's figures, each from the numbers measured above."""
    from ray_ckpt.config import CheckpointStagerConfig

    ranks = NODES * RANKS_PER_NODE
    total = PARAMS * 12  # fp32 params + AdamW exp_avg + exp_avg_sq (FSDP2 keeps fp32 shards)
    per_rank, per_node = total / ranks, total / NODES
    # a rank holds its stage's parameters: a shard of each (x3 with the two moments) and the
    # step of each (a replicated scalar tensor)
    items = round(PARAM_TENSORS / PP) * 4
    sharded_items = ranks * round(PARAM_TENSORS / PP) * 3
    bucket = CheckpointStagerConfig().bucket_size_bytes
    files = -(-int(per_rank) // bucket)
    parts = -(-min(bucket, int(per_rank)) // S3_PART)
    requests = ranks * files * (parts + 2) + 2  # create + parts + complete; manifest, marker
    big = max(synth_rows, key=lambda r: r["ranks"]) if synth_rows else None
    lines = [
        f"state: {total / 1e9:,.0f} GB; per node {per_node / 1e9:.2f} GB; per rank "
        f"{per_rank / 1e6:,.0f} MB; {items} items per rank, {ranks * items:,} rank-items",
        f"object store per node to stage a whole save at once: {per_node / 1e9:.2f} GB",
        f"S3 per save: {ranks * files:,} data files ({files} per rank of <= {bucket / MiB:.0f} "
        f"MiB), {ranks * files * parts:,} multipart parts, {requests:,} requests; at "
        f"{S3_PUTS_PER_PREFIX} PUT/s per prefix >= {requests / S3_PUTS_PER_PREFIX:.0f} s",
    ]
    if big is not None:
        us = big["us_per_rank_item"]
        manifest_row = big["manifest_bytes"] / big["merged_items"]
        report_item = big["report_bytes_per_rank"] / big["items"]
        merged = sharded_items + round(PARAM_TENSORS / PP) * PP
        lines += [
            f"merge + commit: {us:.2f} us/rank-item (measured at {big['ranks']:,} ranks) x "
            f"{ranks * items:,} = {us * ranks * items / 1e6:.2f} s",
            f"reports to the coordinator: {report_item:.0f} B/item x {items} = "
            f"{report_item * items / 1e3:.1f} kB per rank, {report_item * items * ranks / 1e6:.1f}"
            f" MB in all",
            f"manifest: {manifest_row:.0f} B/row x {merged:,} rows = "
            f"{manifest_row * merged / 1e6:.1f} MB",
        ]
    if len(real_rows) >= 2:
        xs = [r["ranks"] for r in real_rows]
        ys = [r["barrier_commit_s"] for r in real_rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        b = real_rows[-1]
        if slope > 0:
            at_scale = f"-> {b['barrier_commit_s'] + slope * (ranks - b['ranks']):.1f} s at {ranks}"
        else:
            at_scale = "(no growth above the noise of this run)"
        lines.append(
            f"barrier + commit, real ranks: {b['barrier_commit_s']:.2f} s at {b['ranks']}, "
            f"least-squares slope {slope * 1e3:.1f} ms per rank {at_scale}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", default="2,8,16,32,64")
    parser.add_argument("--synthetic", default="1000,4000,16000")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--plot", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    synth_rows = []
    if args.synthetic:
        synthetic(10, args.items)  # warm-up: imports, first manifest write
    for ranks in [int(x) for x in args.synthetic.split(",") if x]:
        synth_rows.append(synthetic(ranks, args.items))
        print(json.dumps(synth_rows[-1]), flush=True)
    real_rows: list[dict[str, Any]] = []
    worlds = [int(x) for x in args.real.split(",") if x]
    if worlds:
        scratch = tempfile.mkdtemp(prefix="ray_ckpt-multirank-real-")
        try:
            real_rows = real(worlds, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print(table(real_rows, synth_rows))
    print("\n1,024-GPU model (docs/SCALE.md):")
    for line in scale_model(real_rows, synth_rows):
        print("  " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"real": real_rows, "synthetic": synth_rows,
                       "scale": scale_model(real_rows, synth_rows)}, f, indent=1)
    if args.plot:
        plot(real_rows, synth_rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

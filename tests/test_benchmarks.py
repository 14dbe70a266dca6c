"""The benchmark harness runs end to end (``--quick``) and reports every row with sane numbers.

No timing assertions: this machine is shared and noisy; the benchmark's own ratios are its
result, read by people, not by tests.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.ops import all_rows
from benchmarks.report import load_targets

TIMES = "\u00d7"  # the multiplication sign of the table's ratios
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, str]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results"
    scratch = tmp / "scratch"
    scratch.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--quick", "--out", str(out),
         "--scratch", str(scratch)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text()
    assert proc.stdout.strip().endswith(table.strip()), "the table printed is the table saved"
    assert os.listdir(scratch) == [], "every file the benchmark wrote is deleted"
    return results, table, str(out)


def test_every_state_dict_has_every_row_with_positive_finite_times(quick_run):
    results, _, _ = quick_run
    kinds = [sd["kind"] for sd in results["state_dicts"]]
    assert kinds == ["transformer", "tiny", "optimizer"]
    expected = {row.name for row in all_rows()}
    for sd in results["state_dicts"]:
        assert set(sd["times"]) == expected, sd["name"]
        for name, times in sd["times"].items():
            assert len(times) == results["settings"]["runs"] == 1, name
            assert all(math.isfinite(t) and t > 0 for t in times), (sd["name"], name, times)
        assert sd["nbytes"] > 0 and sd["tensors"] > 0


def test_state_dicts_have_the_requested_shape(quick_run):
    results, _, _ = quick_run
    by_kind = {sd["kind"]: sd for sd in results["state_dicts"]}
    assert by_kind["tiny"]["tensors"] == 1000
    assert abs(by_kind["transformer"]["nbytes"] - (32 << 20)) < 0.15 * (32 << 20)
    # model (a third) + Adam's two moments (two thirds) + one 0-d step per parameter
    assert by_kind["optimizer"]["tensors"] % 4 == 0


def test_table_lists_every_row_with_ratios_and_the_machine(quick_run):
    results, table, _ = quick_run
    assert f"{results['machine']['cpus']} {TIMES} " in table
    assert "GiB memory" in table and "disk " in table and "UTC" in table
    assert "from the page cache" in table
    for row in all_rows():
        assert f"| {row.name} |" in table, row.name
    for sd in results["state_dicts"]:
        assert f"### {sd['name']}" in table
    summary = table.split("## Per state dict")[0]
    assert summary.count(f"{TIMES}** ") >= len([r for r in all_rows() if r.group != "limit"])


def test_ratios_are_positive_and_finite(quick_run):
    from benchmarks.report import table_rows

    results, _, _ = quick_run
    for sd in results["state_dicts"]:
        rows = table_rows(sd)
        assert len(rows) == len(all_rows())
        for r in rows:
            assert r["gbps"] > 0 and math.isfinite(r["gbps"])
            if r["row"].group != "limit":
                assert r["x_limit"] is not None and 0 < r["x_limit"] < math.inf, r["row"].name
                assert r["x_peer"] is not None and 0 < r["x_peer"] < math.inf, r["row"].name


def test_two_node_part_and_plot(quick_run):
    results, table, out = quick_run
    c = results["cluster"]
    assert c["one_node_gbps"] > 0 and c["two_nodes_gbps"] > 0
    assert c["nbytes_two_nodes"] > 0 and c["nbytes_one_node"] > 0
    assert "2-node simulated cluster" in table
    with open(os.path.join(out, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_peak_memory_of_an_async_save_is_measured_and_judged(quick_run):
    """Every state dict reports what an async save added to memory, judged against the target:
    the object store within the staging budget, and no copy of a (non-packed) state on the
    caller's heap. (Upper bounds only: a sample can miss a short peak, never invent one.)"""
    results, table, _ = quick_run
    for sd in results["state_dicts"]:
        (peak,) = sd["memory"]  # quick sizes are too small for a second, quarter budget
        assert 0 < peak["budget_bytes"] <= results["settings"]["object_store_bytes"]
        assert peak["store_peak_bytes"] <= peak["budget_bytes"] + (8 << 20), sd["name"]
        if sd["kind"] != "tiny":  # tiny tensors are packed: copied through the caller's heap
            assert peak["caller_heap_peak_bytes"] < sd["nbytes"] // 2, sd["name"]
    assert table.count("| async save peak memory ≤ state + budget") == len(results["state_dicts"])


def test_targets_table_names_rows_the_benchmark_times(tmp_path):
    table = load_targets()
    assert {t["text"].split(" (")[0] for t in table} >= {
        f"async stall \u2264 1.2{TIMES} memcpy time", "sync save faster than every peer"
    }
    bad = {"targets": [{**table[0], "numerator": "torch.sav +fsync"}]}
    (tmp_path / "targets.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"torch\.sav "):
        load_targets(str(tmp_path / "targets.json"))


@pytest.mark.slow
def test_train_recovery_resumes_from_memory_after_the_node_loss(tmp_path):
    """The node-loss benchmark, tiny and memory tier only (each variant starts its own cluster
    and Ray Train run: minutes here): a Ray Train run that loses the node of rank 0 after step 4
    resumes from memory checkpoint 4, which the library logs, losing no step (Ray Train's
    registered checkpoint is step 2's)."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_recovery", "--variants", "memory",
         "--fail-step", "4", "--durable-every", "3", "--steps-after", "1", "--d-model", "32",
         "--layers", "1", "--vocab", "64", "--batch", "2", "--seq", "8", "--store-mib", "128",
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    [run] = json.loads((out / "train_recovery.json").read_text())["runs"]
    assert (run["variant"], run["resumed_step"], run["steps_lost"]) == ("memory", 4, 0)
    assert run["last_durable_checkpoint"] == 2
    assert run["loaded_from"] in ("a peer's holder", "this node's holder"), run["load_log"]
    assert "mem://" in run["load_log"] and "step-000000004" in run["load_log"]
    assert len(run["final_loss"]) == 2 and run["recovery_s"] > run["workers_restarted_s"] > 0
    assert "| memory every step + durable every 3 steps |" in proc.stdout

"""Turning timings into the result: ratios to the machine's limits and to the peers.

Absolute times on a shared machine drift from run to run; ratios between things measured in
the same process, on the same state dict, minutes apart, drift much less. So every row is
reported as

* ``× limit``: limit's median time / the row's median time, i.e. its speed as a fraction of
  the machine's limit for that phase (1.00 = as fast as the limit; higher is faster);
* ``× best peer``: the fastest peer's median time for that phase / the row's median time
  (above 1.00 = faster than every peer).

Targets of issues 3 and 7 are data (``targets.json``), checked in their own words (a stall "at
most 1.2× one memcpy" is a ratio of times; "at least 0.95× the raw fsync write" a ratio of
speeds; peak memory "under state size + memory budget + a small constant" from
:mod:`benchmarks.memory`).
"""

from __future__ import annotations

import datetime
import json
import operator
import os
import platform
import shutil
import statistics
import subprocess
from typing import Any

from .memory import SLACK_BYTES
from .ops import (
    MEMCPY,
    RAW_READ,
    RAW_WRITE,
    Row,
    all_rows,
)

GROUP_TITLES = {"limit": "limits", "peer": "peers", "ray_ckpt": "ray_ckpt"}


# --- the machine ------------------------------------------------------------------------------


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mount_of(path: str) -> tuple[str, str]:
    """(device, filesystem type) of the mount holding ``path``."""
    path = os.path.realpath(path)
    best = ("?", "?", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[2]):
                    best = (device, fstype, mount)
    except OSError:
        pass
    return best[0], best[1]


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "ray_ckpt"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        return commit + ("+uncommitted changes in ray_ckpt/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine_info(scratch: str) -> dict[str, Any]:
    import numpy
    import pyarrow
    import ray
    import torch

    try:
        import safetensors

        st_version = safetensors.__version__
    except ImportError:
        st_version = "-"
    device, fstype = _mount_of(scratch)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": _meminfo("MemTotal"),
        "memory_available_bytes": _meminfo("MemAvailable"),
        "disk": f"{device} ({fstype})",
        "disk_free_bytes": shutil.disk_usage(scratch).free,
        "scratch": os.path.dirname(scratch.rstrip("/")) or scratch,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "ray": ray.__version__,
            "pyarrow": pyarrow.__version__,
            "numpy": numpy.__version__,
            "safetensors": st_version,
        },
        "git": _git_commit(),
        "load_average": os.getloadavg(),
    }


def page_cache_fraction(path: str) -> float | None:
    """Fraction of the bytes under ``path`` resident in the page cache (``fincore``), or None
    when it cannot be measured here."""
    files = [path] if os.path.isfile(path) else [
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names
    ]
    if not files or shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *files],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    resident = size = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            resident += int(parts[0])
            size += int(parts[1])
    return resident / size if size else None


# --- ratios -----------------------------------------------------------------------------------


def medians(rows: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(times) for name, times in rows.items() if times}


def best_peer(meds: dict[str, float], phase: str) -> tuple[str, float] | None:
    peers = [
        (row.name, meds[row.name])
        for row in all_rows()
        if row.group == "peer" and row.phase == phase and not row.partial and row.name in meds
    ]
    return min(peers, key=lambda p: p[1]) if peers else None


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per row of a state dict's table, with its ratios."""
    meds = medians(result["times"])
    nbytes = result["nbytes"]
    out = []
    for row in all_rows():
        if row.name not in meds:
            continue
        med = meds[row.name]
        limit = row.limit
        peer = best_peer(meds, row.phase) if row.group != "limit" else None
        mins = {name: min(times) for name, times in result["times"].items() if times}
        out.append(
            {
                "row": row,
                "median": med,
                "min": mins[row.name],
                "x_limit_best": mins[limit] / mins[row.name]
                if limit in mins and mins[row.name] > 0 else None,
                "runs": len(result["times"][row.name]),
                "gbps": nbytes / med / 1e9 if med > 0 else float("inf"),
                "x_limit": meds[limit] / med if limit in meds and med > 0 else None,
                "x_peer": peer[1] / med if peer and med > 0 else None,
                "peer": peer[0] if peer else None,
            }
        )
    return out


TARGETS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets.json")
_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_BEST_PEER = "best peer: "


def load_targets(path: str = TARGETS_FILE) -> list[dict[str, Any]]:
    """The targets table (``targets.json``), each entry checked for the rows it names."""
    with open(path) as f:
        table = json.load(f)["targets"]
    names = {row.name for row in all_rows()}
    for t in table:
        rows = [t["numerator"], t["denominator"]] + ([t["bound"]["row"]] if "bound" in t else [])
        unknown = [r for r in rows if r not in names and not r.startswith(_BEST_PEER)]
        if unknown or t["op"] not in _COMPARE:
            raise ValueError(f"{path}: target {t['text']!r} names unknown rows {unknown} "
                             f"or an unknown op {t['op']!r}")
    return table


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the targets (``targets.json``) this state dict shows."""
    m = medians(result["times"])
    checks: list[tuple[str, str, bool | None]] = []
    for peak in result.get("memory") or []:
        extra = sum(peak[k] for k in (
            "store_peak_bytes", "caller_heap_peak_bytes", "writer_heap_peak_bytes"))
        budget = peak["budget_bytes"]
        checks.append((
            f"async save peak memory ≤ state + budget ({_mib(budget)}) + {_mib(SLACK_BYTES)}",
            f"state + {_mib(extra)} (object store {_mib(peak['store_peak_bytes'])}, caller heap "
            f"{_mib(peak['caller_heap_peak_bytes'])}, writer heap "
            f"{_mib(peak['writer_heap_peak_bytes'])})",
            extra <= budget + SLACK_BYTES,
        ))
    for t in load_targets():
        if result["kind"] in t["kinds"]:
            check = _check(t, m)
            if check is not None:
                checks.append(check)
    return checks


def _check(t: dict[str, Any], m: dict[str, float]) -> tuple[str, str, bool] | None:
    """One target on one state dict's medians; None where a row it needs was not timed."""
    text, numerator = t["text"], t["numerator"]
    if numerator.startswith(_BEST_PEER):
        peer = best_peer(m, numerator[len(_BEST_PEER):])
        if peer is None:
            return None
        text, numerator = text.format(peer=peer[0]), peer[0]
    if numerator not in m or t["denominator"] not in m:
        return None
    r = m[numerator] / m[t["denominator"]]
    met = bool(_COMPARE[t["op"]](r, t["want"]))
    measured = f"{r:.2f}{t['unit']}"
    bound = t.get("bound")
    if not met and bound and bound["row"] in m:
        sides = {"numerator": numerator, "denominator": t["denominator"]}
        sides[bound["replace"]] = bound["row"]
        ratio = m[sides["numerator"]] / m[sides["denominator"]]
        measured += f" ({bound['note'].format(ratio=ratio)})"
    return text, measured, met


# --- markdown ---------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def _gib(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / 2**30:.1f} GiB"


def header(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["settings"]
    v = m["versions"]
    cache = results.get("page_cache", {})
    resident = ", ".join(
        f"{k} {v * 100:.0f}%" for k, v in sorted(cache.items()) if v is not None
    ) or "not measured"
    reads = (
        "cold (posix_fadvise DONTNEED before every read)" if s["cold_reads"]
        else "warm: from the page cache"
    )
    lines = [
        f"# ray_ckpt benchmark — {m['date']}",
        "",
        f"- machine: {m['cpus']} × {m['cpu']}, {_gib(m['memory_bytes'])} memory, disk "
        f"{m['disk']} ({_gib(m['disk_free_bytes'])} free), Linux {m['kernel']}, load average "
        f"at start {m['load_average'][0]:.2f}",
        f"- software: Python {m['python']}, torch {v['torch']}, ray {v['ray']}, pyarrow "
        f"{v['pyarrow']}, safetensors {v['safetensors']}, numpy {v['numpy']}; ray_ckpt at "
        f"{m['git']}",
        f"- runs: median of {s['runs']} (tiny tensors: {s.get('tiny_runs', s['runs'])}) after "
        f"{s['warmup']} warm-up; Ray object store "
        f"{_gib(s['object_store_bytes'])} (ray_ckpt's staging budget: half of it)",
        f"- reads: {reads} — resident when read: {resident}",
    ]
    return "\n".join(lines)


def summary_table(results: dict[str, Any]) -> str:
    """Rows × state dicts, each cell ``× limit`` (GB/s)."""
    sds = results["state_dicts"]
    tables = {sd["name"]: {r["row"].name: r for r in table_rows(sd)} for sd in sds}
    head = "| | phase | " + " | ".join(f"{sd['name']}" for sd in sds) + " |"
    sep = "|---|---|" + "---:|" * len(sds)
    lines = [head, sep]
    for row in all_rows():
        cells = []
        seen = False
        for sd in sds:
            r = tables[sd["name"]].get(row.name)
            if r is None:
                cells.append("–")
                continue
            seen = True
            ratio = "" if row.group == "limit" else f"**{_fmt(r['x_limit'])}×** "
            cells.append(f"{ratio}{_fmt(r['gbps'])} GB/s")
        if seen:
            lines.append(f"| {row.name} | {row.phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(sd: dict[str, Any]) -> str:
    lines = [
        f"### {sd['name']}: {sd['nbytes'] / 2**20:.1f} MiB in {sd['tensors']:,} tensors, "
        f"median of {sd.get('runs', '?')} runs",
        "",
        "| | phase | median s | min s | GB/s | × limit | × limit, best runs | × best peer |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table_rows(sd):
        row: Row = r["row"]
        lines.append(
            f"| {row.name} | {row.phase} | {r['median']:.3f} | {r['min']:.3f} | "
            f"{_fmt(r['gbps'])} | {_fmt(r['x_limit'])} | {_fmt(r['x_limit_best'])} | "
            f"{_fmt(r['x_peer'])} |"
        )
    checks = targets(sd)
    if checks:
        lines += ["", "| target | measured | met |", "|---|---:|:---:|"]
        for name, measured, met in checks:
            lines.append(f"| {name} | {measured} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def cluster_table(c: dict[str, Any]) -> str:
    ratio = c["two_nodes_gbps"] / c["one_node_gbps"] if c["one_node_gbps"] else None
    return "\n".join(
        [
            "### 2-node simulated cluster: ray_ckpt sync save, "
            f"{c['nbytes_one_node'] / 2**20:.0f} MiB in all",
            "",
            "Both nodes run on this machine and write to the same disk.",
            "",
            "| | median s | GB/s | × one node |",
            "|---|---:|---:|---:|",
            f"| one node saves it all | {statistics.median(c['one_node_secs']):.3f} | "
            f"{c['one_node_gbps']:.2f} | 1.00 |",
            f"| two nodes save half each, at once | {statistics.median(c['two_nodes_secs']):.3f} | "
            f"{c['two_nodes_gbps']:.2f} | {_fmt(ratio)} |",
        ]
    )


def markdown(results: dict[str, Any]) -> str:
    parts = [
        header(results),
        "",
        "## Summary: speed as a fraction of the machine's limit (GB/s)",
        "",
        "`× limit` = the limit's time / this row's time, for the limit of its phase: save → "
        f"`{RAW_WRITE}`, stall → `{MEMCPY}`, load → `{RAW_READ}`. Higher is faster; 1.00 is "
        "the limit.",
        "",
        summary_table(results),
        "",
        "## Per state dict",
    ]
    for sd in results["state_dicts"]:
        parts += ["", detail_table(sd)]
    if results.get("cluster"):
        parts += ["", cluster_table(results["cluster"])]
    return "\n".join(parts) + "\n"


# --- plot -------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sds = results["state_dicts"]
    if not sds:
        return
    names = [row.name for row in all_rows() if row.group != "limit"]
    colors = {"peer": "#9aa5b1", "ray_ckpt": "#1f77b4"}
    fig, axes = plt.subplots(1, len(sds), figsize=(5.5 * len(sds), 0.34 * len(names) + 2),
                             sharey=True, squeeze=False)
    for ax, sd in zip(axes[0], sds, strict=True):
        by_name = {r["row"].name: r for r in table_rows(sd)}
        ys, values, cols = [], [], []
        for i, name in enumerate(names):
            r = by_name.get(name)
            ys.append(i)
            values.append((r["x_limit"] or 0.0) if r else 0.0)
            cols.append(colors[r["row"].group] if r else "white")
        ax.barh(ys, [v if v > 0 else float("nan") for v in values], color=cols)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{sd['name']}", fontsize=10)
        ax.set_xlabel("speed × limit of its phase (1 = limit; log scale)")
        for y, v in zip(ys, values, strict=True):
            if v:
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=7)
    axes[0][0].set_yticks(range(len(names)))
    axes[0][0].set_yticklabels(names, fontsize=8)
    axes[0][0].invert_yaxis()
    m = results["machine"]
    fig.suptitle(
        f"ray_ckpt vs peers, as a fraction of the machine's limits — {m['date']}, "
        f"{m['cpus']} CPUs, {m['disk']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

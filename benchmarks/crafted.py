"""Crafted checkpoints (issue 13): hostile ones built by hand with
:mod:`ray_ckpt.format.manifest`, no Ray, and what each costs ray_ckpt to refuse.

``python -m benchmarks.crafted [--json]`` builds every attack in a temporary directory and runs
``ray-ckpt verify`` and ``ray-ckpt inspect`` on each in a fresh subprocess, recording the exit
status, the error line, the peak RSS of the subprocess (``ru_maxrss`` of the child) and its wall
time. The table in docs/RELIABILITY.md ("Crafted checkpoints") is its output. The builders are
also used by tests/test_crafted.py (one regression test per attack).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ray_ckpt._checksum import crc32c
from ray_ckpt.format.header import HEADER_SIZE, encode_header
from ray_ckpt.format.manifest import (
    META_TREES,
    Extent,
    ItemMeta,
    build_manifest,
    manifest_from_bytes,
    manifest_to_bytes,
)
from ray_ckpt.format.names import (
    FORMAT_NAME,
    FORMAT_VERSION,
    KIND_TENSOR,
    MARKER_NAME,
    data_file_name,
    dtype_name,
    manifest_file_name,
)

CKPT_ID = "0123456789abcdef"
DATA = data_file_name(0, 0, CKPT_ID)
GiB = 1 << 30


class Crafter:
    """Builds one checkpoint directory by hand: items, extents, tree, then :meth:`write`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[ItemMeta] = []
        self.extents: list[Extent] = []
        self.data = bytearray()  # the data file's bytes after its header

    def add(
        self,
        key: str,
        tensor: torch.Tensor,
        *,
        offset: int | None = None,
        shape: tuple[int, ...] | None = None,
        global_shape: tuple[int, ...] | None = None,
        global_offset: tuple[int, ...] | None = None,
    ) -> int:
        """Add an item holding ``tensor``'s bytes (appended to the data file unless ``offset``
        points at bytes already there); ``shape`` overrides the recorded shape."""
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if offset is None:
            self.data += b"\0" * (-len(self.data) % 64)
            offset = HEADER_SIZE + len(self.data)
            self.data += raw
        index = len(self.items)
        self.items.append(ItemMeta(
            index, key, KIND_TENSOR, dtype_name(tensor.dtype),
            tuple(tensor.shape) if shape is None else shape, "cpu", len(raw),
            global_shape=global_shape, global_offset=global_offset,
        ))
        self.extents.append(Extent(index, 0, DATA, offset, len(raw), crc32c(raw), 0))
        return index

    def write(
        self,
        tree: Any,
        *,
        trees: list[Any] | None = None,
        marker: dict[str, Any] | None = None,
        manifest_sparse_bytes: int = 0,
        marker_sparse_bytes: int = 0,
    ) -> Path:
        """Write the data file, the manifest (with ``tree``, JSON or a ready string) and the
        marker (``marker`` overrides its fields). ``*_sparse_bytes``: extend that file, sparse,
        to this size after writing it."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / DATA).write_bytes(encode_header(0, 0, CKPT_ID) + bytes(self.data))
        tree_json = tree if isinstance(tree, str) else json.dumps(tree)
        rank_trees = None if trees is None else [
            t if isinstance(t, str) else json.dumps(t) for t in trees
        ]
        table = build_manifest(self.items, self.extents, tree_json, CKPT_ID, rank_trees)
        raw = manifest_to_bytes(table)
        manifest = self.path / manifest_file_name(CKPT_ID)
        manifest.write_bytes(raw)
        nbytes = len(raw)
        if manifest_sparse_bytes:
            os.truncate(manifest, manifest_sparse_bytes)
            nbytes = manifest_sparse_bytes
        doc = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "checkpoint_id": CKPT_ID,
            "manifest": manifest_file_name(CKPT_ID), "manifest_nbytes": nbytes,
            "manifest_crc32c": crc32c(raw), "created_unix": 1.7e9, "world_size": 1,
            "total_nbytes": sum(m.nbytes for m in self.items), "metadata": {},
            **(marker or {}),
        }
        text = doc.pop("__raw__", None) or json.dumps(doc)
        (self.path / MARKER_NAME).write_text(text)
        if marker_sparse_bytes:
            os.truncate(self.path / MARKER_NAME, marker_sparse_bytes)
        return self.path


def plain(path: Path, key: str = "w", **write: Any) -> Path:
    """A valid one-tensor checkpoint (``write`` goes to :meth:`Crafter.write`)."""
    c = Crafter(path)
    c.add(key, torch.arange(6, dtype=torch.float32))
    return c.write({"d": [[key, {"T": 0}]]}, **write)


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# --- the attacks of issue 13, one builder each -----------------------------------------------


def zero_length_overlap(path: Path, copies: int = 512, elements: int = 1 << 20) -> Path:
    """1: one data range shared by ``copies`` items, a zero-length extent between each pair."""
    c = Crafter(path)
    first = c.add("t0", torch.ones(elements))
    pairs = [["t0", {"T": first}]]
    for i in range(1, copies):
        zero = c.add(f"z{i}", torch.zeros(0), offset=HEADER_SIZE)
        big = c.add(f"t{i}", torch.ones(elements), offset=HEADER_SIZE)
        c.data = c.data[: elements * 4]  # the bytes exist once
        pairs += [[f"z{i}", {"T": zero}], [f"t{i}", {"T": big}]]
    return c.write({"d": pairs})


def same_box_shards(path: Path) -> Path:
    """2: two shards with the same box, the global shape twice a shard."""
    c = Crafter(path)
    a = c.add("w", torch.ones(4), global_shape=(8,), global_offset=(0,))
    b = c.add("w", torch.full((4,), 2.0), global_shape=(8,), global_offset=(0,))
    return c.write({"d": [["w", {"D": {"i": [a, b], "g": [8]}}]]})


def huge_world_size(path: Path) -> Path:
    """3: ``world_size = 10**12`` in the marker."""
    return plain(path, marker={"world_size": 10**12})


def sparse_marker(path: Path) -> Path:
    """4: a 2 GiB sparse commit marker."""
    return plain(path, marker_sparse_bytes=2 * GiB)


def sparse_manifest(path: Path) -> Path:
    """4: a 2 GiB sparse manifest, the marker claiming that size."""
    return plain(path, manifest_sparse_bytes=2 * GiB)


def deep_marker(path: Path) -> Path:
    """5: the marker's metadata nested 100,000 levels deep."""
    doc = json.dumps({"format": FORMAT_NAME, "metadata": None})
    raw = doc.replace('"metadata": null', f'"metadata": {{"x": {deep(100_000)}}}')
    return plain(path, marker={"__raw__": raw})


def deep_trees(path: Path) -> Path:
    """5: the manifest's per-rank trees nested 100,000 levels deep."""
    c = Crafter(path)
    c.add("w", torch.arange(6, dtype=torch.float32))
    c.write({"d": [["w", {"T": 0}]]}, trees=[{"d": [["w", {"T": 0}]]}] * 2,
            marker={"world_size": 2})
    # the trees' metadata entry replaced by a deep document, the marker re-signed
    manifest = path / manifest_file_name(CKPT_ID)
    table = manifest_from_bytes(manifest.read_bytes(), where="craft")
    meta = dict(table.schema.metadata)
    meta[META_TREES] = deep(100_000).encode()
    raw = manifest_to_bytes(table.replace_schema_metadata(meta))
    manifest.write_bytes(raw)
    doc = json.loads((path / MARKER_NAME).read_text())
    doc.update(manifest_nbytes=len(raw), manifest_crc32c=crc32c(raw))
    (path / MARKER_NAME).write_text(json.dumps(doc))
    return path


def infinite_time(path: Path) -> Path:
    """7: ``created_unix`` of inf."""
    doc = json.loads(plain(path).joinpath(MARKER_NAME).read_text())
    (path / MARKER_NAME).write_text(json.dumps({**doc, "created_unix": float("inf")}))
    return path


def huge_time(path: Path) -> Path:
    """7: ``created_unix`` of 1e300."""
    return plain(path, marker={"created_unix": 1e300})


def numpy_bfloat16(path: Path) -> Path:
    """8: an ``N`` (numpy) tag on a bfloat16 item."""
    c = Crafter(path)
    c.add("x", torch.ones(4, dtype=torch.bfloat16))
    return c.write({"d": [["x", {"N": 0}]]})


def stride_overflow(path: Path) -> Path:
    """8: shape ``[0, 2**62, 2**62]`` (no elements, strides that overflow int64)."""
    c = Crafter(path)
    c.add("x", torch.zeros(0), shape=(0, 2**62, 2**62))
    return c.write({"d": [["x", {"T": 0}]]})


def huge_global_shape(path: Path) -> Path:
    """8: a ``D`` tag with ``g = [2**40]`` and one 4-element shard."""
    c = Crafter(path)
    c.add("x", torch.ones(4), global_shape=(2**40,), global_offset=(0,))
    return c.write({"d": [["x", {"D": {"i": [0], "g": [2**40]}}]]})


def bits16(path: Path, fill: int = 1) -> Path:
    """8: a genuine checkpoint of one ``bits16`` tensor (for ``diff``)."""
    c = Crafter(path)
    c.add("b", torch.full((4,), fill, dtype=torch.int16).view(torch.bits16))
    return c.write({"d": [["b", {"T": 0}]]})


def escape_keys(path: Path) -> Path:
    """9: keys holding ESC and BEL (terminal control sequences)."""
    return plain(path, key="evil\x1b[2J\x1b]0;owned\x07")


def metadata_key(path: Path) -> Path:
    """9: a tensor named ``__metadata__`` (reserved by safetensors)."""
    return plain(path, key="__metadata__")


ATTACKS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "1 zero-length extents between shared ranges (512 x 4 MiB)": ("1", zero_length_overlap),
    "2 two shards with the same box": ("2", same_box_shards),
    "3 world_size = 10**12": ("3", huge_world_size),
    "4 2 GiB sparse marker": ("4", sparse_marker),
    "4 2 GiB sparse manifest": ("4", sparse_manifest),
    "5 marker nested 100,000 deep": ("5", deep_marker),
    "5 per-rank trees nested 100,000 deep": ("5", deep_trees),
    "7 created_unix = inf": ("7", infinite_time),
    "7 created_unix = 1e300": ("7", huge_time),
    "8 N tag on bfloat16": ("8", numpy_bfloat16),
    "8 shape [0, 2**62, 2**62]": ("8", stride_overflow),
    "8 D tag with g = [2**40]": ("8", huge_global_shape),
}


def run_cli(args: list[str], timeout: float = 600) -> dict[str, Any]:
    """Run ``python -m ray_ckpt ARGS`` in a fresh subprocess: exit status, output, peak RSS in
    bytes, wall time. The peak is measured by a wrapper process whose only child is the CLI
    (``getrusage(RUSAGE_CHILDREN)`` there is exactly the CLI's ``ru_maxrss``)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.crafted", "--child", *args], capture_output=True,
        text=True, timeout=timeout, env=env, check=True,
    )
    return dict(json.loads(done.stdout))


def _child(args: list[str]) -> None:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "ray_ckpt", *args], capture_output=True, text=True, check=False
    )
    secs = time.perf_counter() - started
    lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
    print(json.dumps({
        "rc": done.returncode, "secs": secs, "stdout": done.stdout, "stderr": done.stderr,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "last_line": lines[-1] if lines else "",
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child)
        return
    if not args.json:
        print("| attack | command | exit | error (stderr / verify's first problem) | peak RSS | "
              "time |")
        print("| --- | --- | --- | --- | ---: | ---: |", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (name, (_, build)) in enumerate(ATTACKS.items()):
            path = build(Path(tmp) / f"a{n}")
            # inspect too where reading is the attack (item 4); verify runs every check
            for command in ("verify", "inspect") if name.startswith("4") else ("verify",):
                result = run_cli([command, "-q", str(path)])
                row = {"attack": name, "command": command, **{
                    k: result[k] for k in ("rc", "secs", "peak_rss_bytes", "stdout", "stderr")}}
                rows.append(row)
                if not args.json:
                    print(_row(row, tmp), flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


def _row(r: dict[str, Any], tmp: str) -> str:
    lines = [ln.strip() for ln in (r["stderr"] + r["stdout"]).splitlines() if ln.strip()]
    line = next((ln for ln in lines if not ln.startswith("FAILED")), "")
    line = line.replace(tmp, "...").replace("|", "\\|")
    line = line if len(line) <= 150 else line[:147] + "..."
    return (f"| {r['attack']} | {r['command']} | {r['rc']} | {line} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | {r['secs']:.1f} s |")


if __name__ == "__main__":
    main()

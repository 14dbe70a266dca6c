"""How long ``ray-ckpt import`` of a small model takes, whole process (interpreter start,
imports, reading the source, writing the checkpoint, exit).

    python -m benchmarks.import_latency [--runs 3] [--kib 291]

Writes a ``torch.save`` file and a ``.safetensors`` file of a small MLP's state dict (about
``--kib`` KiB) into a temporary directory, then runs ``python -m ray_ckpt import SRC DEST``
``--runs`` times for each (the cases taking turns), each into a new destination in a fresh
process, and prints the median and the fastest wall time next to ``python -c "import torch"``
(the floor of any command that reads a torch file). The ``ray_ckpt`` measured is the one
this interpreter imports (``PYTHONPATH`` selects a checkout).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def wall_secs(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def write_sources(directory: str, kib: int) -> dict[str, str]:
    """A small MLP's state dict (``kib`` KiB of float32) as a torch file and a safetensors file."""
    import torch
    from safetensors.torch import save_file

    width = max(8, int((kib * 1024 / 4 / 2) ** 0.5))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width)
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    sources = {"torch": os.path.join(directory, "model.pt"),
               "safetensors": os.path.join(directory, "model.safetensors")}
    torch.save(state, sources["torch"])
    save_file(state, sources["safetensors"])
    return sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kib", type=int, default=291, help="size of the model's tensors")
    args = parser.parse_args(argv)
    python = sys.executable
    with tempfile.TemporaryDirectory() as directory:
        sources = write_sources(directory, args.kib)
        sizes = {fmt: os.path.getsize(path) for fmt, path in sources.items()}
        print(f"| command | median s | fastest s | ({args.runs} runs each) |")
        print("| --- | ---: | ---: | --- |")
        # the cases take turns, run after run, so that a change in the machine's load
        # touches them alike
        times: dict[str, list[float]] = {"floor": [], **{fmt: [] for fmt in sources}}
        for run in range(args.runs):
            times["floor"].append(wall_secs([python, "-c", "import torch"]))
            for fmt, src in sources.items():
                dest = os.path.join(directory, f"{fmt}-{run}")
                times[fmt].append(wall_secs([python, "-m", "ray_ckpt", "import", src, dest]))
        for case, secs in times.items():
            name = ("`python -c 'import torch'`" if case == "floor"
                    else f"`ray-ckpt import` {case} ({sizes[case] / 1024:.0f} KiB)")
            print(f"| {name} | {statistics.median(secs):.2f} | {min(secs):.2f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

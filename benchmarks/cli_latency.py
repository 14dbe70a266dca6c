"""How long ``ray-ckpt`` takes to answer, whole process (interpreter start, imports, work).

    python -m benchmarks.cli_latency CHECKPOINT [--runs 7]

Runs ``python -m ray_ckpt --help``, ``ls`` of CHECKPOINT's parent and ``inspect CHECKPOINT``
(table and ``--json``) ``--runs`` times each in fresh processes and prints the median and the
fastest wall time and the median CPU time, next to the floor: ``python -c pass`` (the
interpreter alone) and ``python -c "import torch"`` (what every command paid when the CLI
imported torch up front).
The load average before and after is printed too: on a busy machine every wall time grows,
the floor with them, so compare rows of one run; the CPU time (user + system) grows much less.
Issue 16's aim: ``--help`` under 0.3 s, ``ls`` and ``inspect`` of a small checkpoint under
0.6 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time


def timed_runs(command: list[str], runs: int) -> tuple[list[float], list[float]]:
    """The wall time and the CPU time (user + system, of the process and its children) of
    each of ``runs`` runs of ``command``."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a small committed checkpoint")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    python = sys.executable
    cases = {
        "python -c pass (floor)": [python, "-c", "pass"],
        "python -c 'import torch'": [python, "-c", "import torch"],
        "ray-ckpt --help": [python, "-m", "ray_ckpt", "--help"],
        "ray-ckpt ls ROOT": [python, "-m", "ray_ckpt", "ls", os.path.dirname(args.checkpoint)],
        "ray-ckpt inspect CKPT": [python, "-m", "ray_ckpt", "inspect", args.checkpoint],
        "ray-ckpt inspect --json CKPT": [
            python, "-m", "ray_ckpt", "inspect", "--json", args.checkpoint
        ],
    }
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"| command | median s | fastest s | median CPU s | ({args.runs} runs each) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, command in cases.items():
        walls, cpus = timed_runs(command, args.runs)
        print(f"| `{name}` | {statistics.median(walls):.2f} | {min(walls):.2f} | "
              f"{statistics.median(cpus):.2f} | |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmarks of ray_ckpt against the machine's limits and its peers.

Run ``python -m benchmarks.bench --help`` (or ``ray-ckpt bench``); see benchmarks/README.md.
"""

"""The ``ray-ckpt`` command line (also ``python -m ray_ckpt``)."""

from __future__ import annotations

import argparse
import logging
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args.dir, d_model=args.d_model, layers=args.layers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-ckpt",
        description="Ray-native checkpointing for PyTorch: inspect, verify and try checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="save, load and verify a model-plus-optimizer state on a local Ray",
        description="Train a small transformer for two steps, save its model and AdamW state "
        "sync and async, load it back whole and in place, verify every tensor and print sizes "
        "and throughput. Example: ray-ckpt demo --layers 12",
    )
    demo.add_argument("--dir", help="keep the checkpoints in this directory (default: a temp dir)")
    demo.add_argument("--d-model", type=int, default=512, help="model width (default 512)")
    demo.add_argument("--layers", type=int, default=6, help="transformer layers (default 6)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

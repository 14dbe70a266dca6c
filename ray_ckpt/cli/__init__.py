"""The ``ray-ckpt`` command line (also ``python -m ray_ckpt``).

Each subcommand is a thin layer over a library function (:mod:`ray_ckpt.tools`,
:func:`ray_ckpt.list_checkpoints`, :mod:`ray_ckpt.demo`): parse, call, print. What a command
finds is printed on stdout (a table, or JSON with ``--json``); progress and errors go to
stderr. A progress bar appears only when stdout and stderr are both terminals, and only once an
operation has run for half a second; ``--quiet`` turns it off along with every line that is not
a result.

Exit status: 0 success; 1 the checkpoint is bad or the operation failed (``verify`` found
problems, a :class:`~ray_ckpt.CheckpointError`, an I/O error), with the message on stderr; 2 a
usage error (bad arguments, an unresolvable path). ``diff --exit-code`` exits 1 when the
checkpoints differ, like ``git diff --exit-code``.

The package: this module builds the parser and runs a command; :mod:`.commands` holds the
commands, :mod:`.output` what they print.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from ..errors import CheckpointError
from .commands import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    run_bench,
    run_clean,
    run_demo,
    run_diff,
    run_export,
    run_import,
    run_inspect,
    run_ls,
    run_verify,
    source_checkout,
)
from .output import ProgressBar, clean, human_bytes, parse_size

__all__ = [
    "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "ProgressBar", "build_parser", "clean",
    "human_bytes", "main", "parse_size", "source_checkout",
]

logger = logging.getLogger("ray_ckpt.cli")


Handler = Callable[[argparse.Namespace], int]


def _command(
    sub: Any, common: argparse.ArgumentParser, name: str, handler: Handler, summary: str,
    description: str, examples: str,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=textwrap.fill(description, 88), parents=[common],
        epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=handler)
    return parser


def _rank_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, default=0, metavar="R",
                        help="a multi-rank checkpoint as rank R saved it (default 0)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bar, print only results and errors")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what ray_ckpt does (INFO), with tracebacks on errors")
    parser = argparse.ArgumentParser(
        prog="ray-ckpt", parents=[common],
        description="Ray-native checkpointing for PyTorch: inspect, verify, list, compare, "
        "export and import checkpoints. PATH and ROOT may be local paths or URIs (s3://, gs://, "
        "file://, or mem:// for the memory tier of the Ray cluster that RAY_ADDRESS or a local "
        "`ray start` names). Exit status: 0 success, 1 bad checkpoint or failure, 2 usage error.",
        epilog="Run 'ray-ckpt COMMAND --help' for a command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, common, "inspect", run_inspect,
                 "keys, dtypes, shapes and sizes of a checkpoint (reads no tensor data)",
                 "Print every key of a committed checkpoint with its kind, dtype, shape (or "
                 "value) and size, and the totals, read from the manifest alone. A sharded "
                 "tensor (DTensor shards saved by several ranks) is one key with its global "
                 "shape and its number of shards; --json lists each shard's box.",
                 "  ray-ckpt inspect /tmp/run/step-100\n"
                 "  ray-ckpt inspect s3://bucket/run/step-100 --json | jq '.leaves[].key'\n")
    p.add_argument("path", metavar="PATH", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _rank_option(p)

    p = _command(sub, common, "verify", run_verify,
                 "check every byte of a checkpoint against its CRC32C checksums",
                 "Read every extent of every data file, streaming (memory stays at one "
                 "buffer), and check its CRC32C; also the commit marker, the manifest, data "
                 "file headers and sizes. Every bad file and key is reported; exit status 1 "
                 "if there is any.",
                 "  ray-ckpt verify /tmp/run/step-100\n"
                 "  ray-ckpt verify -q gs://bucket/run/step-100 || echo damaged\n")
    p.add_argument("path", metavar="PATH", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--chunk-size", type=parse_size, default=16 << 20, metavar="SIZE",
                   help="read buffer (default 16MiB)")

    p = _command(sub, common, "ls", run_ls,
                 "checkpoints under a root: step, state, size, commit time, Ray Train's view",
                 "List every checkpoint directory directly under ROOT, committed or not "
                 "(an incomplete one is a save that never finished), ordered by the step the "
                 "state saved (its top-level 'step'; else a step-N directory name; else the "
                 "commit time). On a Ray Train run directory, also whether Ray Train "
                 "registered each (from its checkpoint_manager_snapshot.json). On a directory "
                 "of roots, the roots it holds.",
                 "  ray-ckpt ls /tmp/run\n  ray-ckpt ls s3://bucket/run --json\n")
    p.add_argument("root", metavar="ROOT", help="directory holding checkpoint directories")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = _command(sub, common, "clean", run_clean,
                 "delete incomplete saves (and unregistered Ray Train checkpoints)",
                 "Delete, under ROOT, the checkpoint directories of saves that never committed "
                 "and, with --unregistered, on a Ray Train run, committed checkpoints Ray Train "
                 "never registered (it would never delete them). A dry run unless --yes. Never "
                 "deleted: the newest committed checkpoint, Ray Train's latest, anything "
                 "touched within --min-age seconds (a save may be in progress), and any "
                 "directory holding files ray_ckpt did not write.",
                 "  ray-ckpt clean /tmp/run\n"
                 "  ray-ckpt clean ~/ray_results/my_run --unregistered --yes\n")
    p.add_argument("root", metavar="ROOT", help="directory holding checkpoint directories")
    p.add_argument("--unregistered", action="store_true",
                   help="also committed checkpoints Ray Train never registered")
    p.add_argument("--yes", action="store_true", help="delete (default: only say what)")
    p.add_argument("--min-age", type=float, default=600.0, metavar="SECS",
                   help="leave alone what changed in the last SECS seconds (default 600)")
    p.add_argument("--json", action="store_true", help="print the decisions as JSON")

    p = _command(sub, common, "diff", run_diff,
                 "keys added, removed and changed between two checkpoints",
                 "Compare checkpoint B with checkpoint A key by key: keys only in B (+), only "
                 "in A (-), and changed (~) with the number of elements that differ and the "
                 "largest absolute difference. Sharded tensors compare by their global value "
                 "(a sharded and an unsharded save of one model are equal). Streams one "
                 "window of each tensor per side at a time.",
                 "  ray-ckpt diff /tmp/run/step-100 /tmp/run/step-200\n"
                 "  ray-ckpt diff A B --exit-code >/dev/null && echo identical\n")
    p.add_argument("a", metavar="A", help="the old checkpoint")
    p.add_argument("b", metavar="B", help="the new checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--exit-code", action="store_true",
                   help="exit with status 1 when the checkpoints differ")
    _rank_option(p)

    p = _command(sub, common, "export", run_export,
                 "write a checkpoint as a torch.save file or as safetensors",
                 "Export a checkpoint, streaming, so memory stays bounded. --to torch writes "
                 "one file for torch.load (structure and plain values kept). --to safetensors "
                 "writes OUT/model.safetensors, or shards model-0000k-of-0000n.safetensors "
                 "plus model.safetensors.index.json when larger than --max-shard-size (the "
                 "Hugging Face layout); non-tensor values are skipped. Sharded tensors are "
                 "consolidated into one full tensor each.",
                 "  ray-ckpt export /tmp/run/step-100 --to torch model.pt\n"
                 "  ray-ckpt export /tmp/run/step-100 --to safetensors --only model hf-model/\n"
                 "  ray-ckpt export DDP_CKPT --to safetensors --only model --strip-prefix module. "
                 "out/\n")
    p.add_argument("path", metavar="PATH", help="checkpoint directory")
    p.add_argument("--to", required=True, choices=("torch", "safetensors"), help="format")
    p.add_argument("out", metavar="OUT",
                   help="torch: the file to write; safetensors: the directory to write into")
    p.add_argument("--only", metavar="KEY",
                   help="export only the dict under this dotted key, prefix stripped (e.g. model)")
    p.add_argument("--strip-prefix", metavar="PREFIX",
                   help="remove PREFIX from the exported keys that start with it (e.g. module. "
                   "for a DDP model: module.0.weight -> 0.weight)")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="SIZE",
                   help="safetensors: largest shard (default 5GB)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="torch: export pickled objects too (unpickles them: trusted files only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")
    _rank_option(p)

    p = _command(sub, common, "import", run_import,
                 "save a torch.save file or safetensors model as a checkpoint",
                 "Import SRC, a torch.save file, a .safetensors file, or a Hugging Face model "
                 "directory (model.safetensors, or model.safetensors.index.json and its "
                 "shards), as the checkpoint DEST (a local path or a URI). Tensors are memory-"
                 "mapped, not read into memory. A local DEST (a path or file://) is written "
                 "by this process, without Ray; any other (s3://, mem://, ...) is saved through "
                 "a checkpointer on a local Ray (or the cluster in RAY_ADDRESS). torch files "
                 "are loaded weights-only: "
                 "one holding arbitrary objects is refused. safetensors names stay flat keys "
                 "(model.layers.0.weight).",
                 "  ray-ckpt import model.pt /tmp/run/step-0\n"
                 "  ray-ckpt import hf-model/ s3://bucket/base --under model\n")
    p.add_argument("src", metavar="SRC", help="torch.save file, .safetensors file or model dir")
    p.add_argument("dest", metavar="DEST", help="checkpoint directory to write")
    p.add_argument("--under", metavar="KEY",
                   help="put the imported state under this key (e.g. model)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="store values ray_ckpt keeps only as pickle (loading needs it too)")
    p.add_argument("--overwrite", action="store_true", help="replace a committed DEST")

    p = _command(sub, common, "demo", run_demo,
                 "save, load and verify a model-plus-optimizer state on a local Ray",
                 "Train a small transformer for two steps, save its model and AdamW state "
                 "sync and async, load it back whole and in place, verify every tensor and "
                 "print sizes and throughput.",
                 "  ray-ckpt demo\n  ray-ckpt demo --layers 12 --dir /tmp/demo\n")
    p.add_argument("--dir", help="keep the checkpoints in this directory (default: a temp dir)")
    p.add_argument("--d-model", type=int, default=512, help="model width (default 512)")
    p.add_argument("--layers", type=int, default=6, help="transformer layers (default 6)")

    p = _command(sub, common, "bench", run_bench,
                 "run the benchmarks (python -m benchmarks.bench, from a source checkout)",
                 "Run ray_ckpt's benchmarks against its peers and the machine's limits. They "
                 "live in benchmarks/ of a source checkout; arguments after -- go to them.",
                 "  ray-ckpt bench\n  ray-ckpt bench -- --help\n")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for benchmarks.bench")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except BrokenPipeError:  # the reader went away (`ray-ckpt diff A B | head`): not an error
        return _quiet_broken_pipe()
    except CheckpointError as e:
        return _fail(args, e, EXIT_FAILED)
    except ValueError as e:  # invalid arguments the library refused (a URI, a size)
        return _fail(args, e, EXIT_USAGE)
    except OSError as e:  # the output could not be written, the storage refused access
        return _fail(args, e, EXIT_FAILED)
    except KeyboardInterrupt:
        print(f"ray-ckpt {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_broken_pipe() -> int:
    """End like other Unix tools when stdout's reader has gone: quietly, status 0. stdout is
    pointed at /dev/null so that the interpreter's last flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_OK


def _fail(args: argparse.Namespace, error: BaseException, status: int) -> int:
    from ..storage.credentials import redact  # imports pyarrow: not for `ray-ckpt --help`

    if args.verbose:
        logger.error("ray-ckpt %s failed", args.command, exc_info=error)
    print(f"ray-ckpt {args.command}: error: {clean(redact(str(error)))}", file=sys.stderr)
    return status


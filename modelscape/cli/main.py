"""The `modelscape` command: run (a demo sweep), coord-check, show, plot, fit, export."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from modelscape._version import VERSION
from modelscape.cli.args import ArgumentParser
from modelscape.errors import HParamError, MissingExtra, SweepError

DESCRIPTION = """\
Grids of PyTorch training runs for the science of deep learning.

Start with `modelscape run` (a small learning-curve sweep on the CPU, results in runs/demo),
then `modelscape show runs/demo`. `modelscape COMMAND --help` describes each command.
"""

# subcommand name -> module providing add_parser(subparsers, name) and run(args, rest)
SUBCOMMANDS = {
    "run": "modelscape.cli.demo",
    "coord-check": "modelscape.coord_check",
    "show": "modelscape.cli.show",
    "plot": "modelscape.cli.show",
    "fit": "modelscape.cli.show",
    "export": "modelscape.cli.show",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The top-level parser, and each subcommand's module by name."""
    parser = ArgumentParser(
        prog="modelscape",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"modelscape {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(sub, name)
        modules[name] = module
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader went away (`modelscape show ... | head`): end quietly, as `cat` does; stdout
        # points at /dev/null so Python's flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a program the pipe ended


def _main(argv: Sequence[str] | None) -> int:
    parser, modules = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(modules[args.command].run(args, rest) or 0)
    except (HParamError, SweepError, MissingExtra) as err:
        # bad input: the message says what to fix, a traceback would only bury it
        print(f"modelscape {args.command}: {err}", file=sys.stderr)
        return 2

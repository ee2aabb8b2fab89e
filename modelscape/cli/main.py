"""The `modelscape` command: run (a demo sweep), coord-check, show, plot, fit, export.

Each subcommand lives in the module that owns its concept and registers itself through
``add_parser(subparsers)``; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from modelscape.errors import HParamError, SweepError

# subcommand name -> module providing add_parser(subparsers) and run(args)
SUBCOMMANDS = {
    "run": "modelscape.cli.demo",
    "coord-check": "modelscape.coord_check",
    "show": "modelscape.cli.show",
    "plot": "modelscape.cli.show",
    "fit": "modelscape.cli.show",
    "export": "modelscape.cli.show",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelscape", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_parser(sub, name)
        modules[name] = module
    args, rest = parser.parse_known_args(argv)
    try:
        return int(modules[args.command].run(args, rest) or 0)
    except (HParamError, SweepError) as err:
        # bad input: the message says what to fix, a traceback would only bury it
        print(f"modelscape {args.command}: {err}", file=sys.stderr)
        return 2

"""``masrefine`` command line: one sub-command per module in :mod:`MASRefineLib.commands`."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .errors import Cancelled, MASRefineError

# Order = order in --help. Each name is a module MASRefineLib.commands.<name> with add_parser().
COMMANDS: list[str] = ["atlas", "register", "segment", "batch", "refine", "fuse", "train", "experiment", "evaluate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="masrefine", description="Multi-atlas segmentation with registration "
                                     "refinement (VoteNet++).")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command; returns the exit status (0 done, 2 error, 3 cancelled). Everything, the parser's
    construction (which imports every command module) included, runs inside the handlers, so an interrupt
    at any moment is a clean cancel and a bad input one line."""
    command = "masrefine"

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        # a library warning (an atlas skipped, a field of view) reads like the errors: one line, no source line
        print(f"{command}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        command = f"masrefine {args.command}"
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            return int(args.func(args) or 0)
    except MASRefineError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print(f"{command}: cancelled", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

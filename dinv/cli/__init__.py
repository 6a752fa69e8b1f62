"""The `dinv` command: `dinv info`, `dinv demo`, `dinv invert`, `dinv distill`, `dinv prune`.

Every subcommand is a module here with `add_parser(subparsers)` and `run(args)`. Errors are one
line on stderr: exit status 2 for bad arguments (before any work), 1 for a failure while running
(DINV_DEBUG=1 shows the traceback); an interrupted run exits 130 and resumes when started again.
"""
from __future__ import annotations

import os
import sys

from . import demo, distill, info, invert, prune
from .common import Parser, UsageError

SUBCOMMANDS = (info, demo, invert, distill, prune)


def build_parser() -> Parser:
    parser = Parser(prog="dinv", description="Fast DeepInversion: synthesize images from a "
                    "trained classifier, and distill, prune or extend it without its data.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    """Runs one `dinv` command; returns its exit status."""
    args = build_parser().parse_args(argv)
    prog = f"dinv {args.command}"
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - one line per failure, traceback on request
        if os.environ.get("DINV_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"{prog}: error: {message or type(error).__name__}", file=sys.stderr)
        return 1
    return 0

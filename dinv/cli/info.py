"""`dinv info`: which backends were built and which one runs where, and why the others do not."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="backends built and available here")
    p.set_defaults(run=run)


def run(args) -> None:
    from ..info import describe

    print(describe())

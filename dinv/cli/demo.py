"""`dinv demo`: the embedded digits demo (the README's first command)."""
from __future__ import annotations

import json

from .common import positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="end to end on the bundled digits: teacher -> images")
    p.add_argument("--out", default="dinv-demo")
    p.add_argument("--per-class", type=positive_int, default=20)
    p.add_argument("--iterations", type=positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run)


def run(args) -> None:
    from ..demo import run_demo

    result = run_demo(args.out, per_class=args.per_class, iterations=args.iterations,
                      seed=args.seed, progress=not args.quiet)
    print(json.dumps(result, indent=1))

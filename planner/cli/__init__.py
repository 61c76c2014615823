"""`meshplan` command line: one subcommand per use, each a thin layer over the library.

One module per subcommand (describe.py holds the look-ups: describe, models, gpus,
validate); flags.py has what they share. Every user mistake surfaces as a
`MeshplanError`; `main` prints it as one line on stderr and returns exit code 2.
Nothing here writes over a user's file.
"""
from __future__ import annotations

import argparse
import sys

from cost_models.errors import MeshplanError
from planner.cli.flags import Parser

__all__ = ["Parser", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from planner.cli import compare, describe, plan, profile, simulate, train
    from planner.version import version
    parser = Parser(prog="meshplan", description="Plan, simulate and run parallel PyTorch training.")
    parser.add_argument("--version", action="version", version=f"meshplan {version()}",
                        help="print meshplan's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    describe.register(sub)          # describe, models, gpus, validate
    for name, module in (("simulate", simulate), ("plan", plan), ("compare", compare), ("profile", profile)):
        p = sub.add_parser(name, help=module.HELP)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    # Listed for --help; main() forwards everything after `train` to runtime.train.
    sub.add_parser("train", help=train.HELP, add_help=False)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train"]:
            from planner.cli.train import launch
            return launch(argv[1:])
        args = build_parser().parse_args(argv)
        args.argv = argv   # for a report's "made by" line
        return args.handler(args)
    except MeshplanError as exc:
        print(f"meshplan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meshplan: interrupted", file=sys.stderr)
        return 130


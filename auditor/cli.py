"""`wmaudit` command line: thin. Each subcommand lives in auditor/commands/<name>.py
and exposes HELP, add_arguments(parser) and run(args) -> exit code.

Exit codes: 0 = pass / watermark found, 1 = fail / not found, 2 = error.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from auditor.errors import AuditError

# Order is the order of `wmaudit --help`.
SUBCOMMANDS = ["inspect", "extract", "key", "attack", "robustness", "query", "gate", "report", "scan",
               "provenance", "obfuscate", "sweep", "keyed", "phash", "targets"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from auditor import __version__

    parser = _Parser(prog="wmaudit", description="Audit deep-network watermarks in ONNX files.")
    parser.add_argument("--version", action="version", version=f"wmaudit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.commands.{name}":
                continue  # subcommand not available in this build
            raise
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args))
    except AuditError as e:
        print(f"wmaudit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wmaudit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: still one line unless debugging
        if os.environ.get("WMAUDIT_DEBUG"):
            raise
        print(f"wmaudit {args.command}: internal error: {type(e).__name__}: {e} "
              f"(set WMAUDIT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

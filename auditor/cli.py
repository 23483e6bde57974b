"""`wmaudit` command line: thin. Each subcommand lives in auditor/commands/<name>.py
and exposes HELP, add_arguments(parser) and run(args) -> exit code.

Exit codes: 0 = pass / watermark found, 1 = fail / not found, 2 = error.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

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


def _warned(caught: list) -> str:
    """The first warning a failed run raised, as the tail of its one error line."""
    for w in caught:
        text = " ".join(str(w.message).split())
        if text:
            return f" (after a {w.category.__name__}: {text[:200]})"
    return ""


def main(argv: list[str] | None = None) -> int:
    """Run one command. stderr gets nothing but one line on failure: warnings (NumPy, onnx,
    onnxruntime's Python side) are recorded, dropped when the command succeeds and named at the end
    of the error line when it fails; child processes inherit PYTHONWARNINGS=ignore."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return 2
    before = os.environ.get("PYTHONWARNINGS")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        return _run(args)
    finally:  # a caller running several commands in one process gets its environment back
        if before is None:
            os.environ.pop("PYTHONWARNINGS", None)


def _run(args) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return int(args._run(args))
        except AuditError as e:
            print(f"wmaudit {args.command}: error: {e}{_warned(caught)}", file=sys.stderr)
            return 2
        except MemoryError as e:  # the input asked for more memory than this process has: a limit, not a bug
            detail = " ".join(str(e).split())[:200]
            print(f"wmaudit {args.command}: error: not enough memory for this input"
                  f"{f' ({detail})' if detail else ''}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("wmaudit: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # a bug, not a user error: still one line unless debugging
            if os.environ.get("WMAUDIT_DEBUG"):
                raise
            text = " ".join(str(e).split())
            print(f"wmaudit {args.command}: internal error: {type(e).__name__}: {text} "
                  f"(set WMAUDIT_DEBUG=1 for a traceback)", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

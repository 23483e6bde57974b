"""Write docs/reference/cli.md: the --help of every wmaudit command and action, as argparse
prints it (80 columns). `make docs` and a test keep it equal to the command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "reference" / "cli.md"


def render() -> str:
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal: fixed here, so the page is stable
    from auditor.cli import SUBCOMMANDS, build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["# Command-line reference", "",
             "Generated from the command line itself (`python scripts/cli_reference.py`); a test keeps it current.",
             "Exit codes everywhere: 0 = pass / detected, 1 = fail / not detected, 2 = bad input (one line on stderr).",
             "", "```text", parser.format_help().rstrip(), "```", ""]
    for name in SUBCOMMANDS:
        p = subs.choices.get(name)
        if p is None:
            continue
        parts += [f"## wmaudit {name}", "", "```text", p.format_help().rstrip(), "```", ""]
        inner = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for action in inner:
            for sub_name, sp in action.choices.items():
                parts += [f"### wmaudit {name} {sub_name}", "", "```text", sp.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else f"{OUT} is out of date: run python scripts/cli_reference.py")
    OUT.write_text(text)
    print(f"wrote {OUT}")

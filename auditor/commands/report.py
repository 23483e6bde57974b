"""wmaudit report: render result JSON files as one self-contained HTML page (or text / JUnit)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from auditor.errors import AuditError

HELP = "render result JSON (gate, robustness, query, extract) as a self-contained HTML report"
DESCRIPTION = """Render one or more wmaudit result files into a single HTML file that needs no
network (charts are inline SVG, images data: URIs). With --format text the
terminal table is printed instead; --format junit writes JUnit XML of a gate
result. Rendering the same JSON twice gives byte-identical output."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="result JSON files (wmaudit-result/1)")
    p.add_argument("-o", "--output", help="output file (default: stdout)")
    p.add_argument("--format", choices=("html", "text", "junit"), default="html", help="default: html")
    p.add_argument("--title", default="wmaudit report", help="page title (html)")


def run(args) -> int:
    from auditor.report import html, junit, load_result, terminal

    docs = [load_result(p) for p in args.results]
    if args.format == "html":
        text = html.render(docs, title=args.title)
    elif args.format == "text":
        text = "\n".join(terminal.render(d) for d in docs)
    else:
        gates = [d for d in docs if d.get("kind") == "gate"]
        if len(gates) != 1 or len(docs) != 1:
            raise AuditError("--format junit renders exactly one gate result")
        text = junit.render(gates[0])
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0

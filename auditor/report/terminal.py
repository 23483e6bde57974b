"""Plain-text rendering for terminals: fixed-width tables of gate and robustness
results, and a progress bar for long runs.

``render(doc)`` takes a result document (the JSON envelope of auditor/results.py)
and returns text; it never prints. ``Progress`` draws on stderr only when stderr
is a TTY and ``CI`` is not set to a true value, so logs and pipes stay clean.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Sequence, TextIO

from auditor.report import fmt_num, fmt_p


# ------------------------------------------------------------------ tables
def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, align: str | None = None,
          max_width: int = 48) -> str:
    """A fixed-width text table (rich, no colour): a header line, a line of dashes per column,
    one line per row. `align` has one letter per column: l (left) or r (right).

    Cells longer than `max_width` are cut with '~' so one long note cannot push
    the table off the screen.
    """
    import io

    from rich.console import Console
    from rich.table import Table

    rows = [[_cell(c, max_width) for c in r] for r in rows]
    headers = [_cell(h, max_width) for h in headers]
    n = len(headers)
    align = (align or "l" * n).ljust(n, "l")
    t = Table(box=_DASHED, show_edge=False, pad_edge=False, padding=(0, 1), header_style="", expand=False)
    for i, h in enumerate(headers):
        t.add_column(h, justify="right" if align[i] == "r" else "left", no_wrap=True)
    for r in rows:
        t.add_row(*[r[i] if i < len(r) else "" for i in range(n)])
    buf = io.StringIO()
    Console(file=buf, width=100_000, color_system=None, highlight=False, emoji=False,
            markup=False).print(t)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines() if line.strip()) + "\n"


def _dashed():
    from rich.box import Box

    # header, a dash line under it, rows; columns separated by spaces
    return Box("    \n    \n -  \n    \n    \n    \n    \n    \n")


_DASHED = _dashed()


def _cell(v: Any, max_width: int) -> str:
    s = "" if v is None else str(v)
    s = " ".join(s.split())
    return s if len(s) <= max_width else s[: max_width - 1] + "~"


# ------------------------------------------------------------------ result documents
def render(doc: dict[str, Any]) -> str:
    """Human-readable text for a result document (gate, robustness, or any other kind)."""
    kind = doc.get("kind")
    if kind == "gate":
        return render_gate(doc)
    if kind == "robustness":
        return render_robustness(doc)
    return _header(doc) + f"(no table for result kind {kind!r}; see the JSON)\n"


def _header(doc: dict[str, Any]) -> str:
    m = doc.get("model") or {}
    lines = [f"model:      {m.get('path', '-')}",
             f"sha256:     {m.get('sha256', '-')}"]
    if doc.get("key_commitment"):
        lines.append(f"key:        {doc['key_commitment']}")
    ev = doc.get("evidence")
    if isinstance(ev, dict) and ev.get("kind"):
        lines.append(f"evidence:   {ev['kind']} ({ev.get('sentence', '')})")
    tool = doc.get("tool") or {}
    lines.append(f"tool:       {tool.get('name', 'wmaudit')} {tool.get('version', '')}".rstrip())
    lines.append(f"command:    {doc.get('command', '-')}")
    from auditor.backends.hardware import measured_on_lines

    lines += [f"hardware:   {ln.split(' on ', 1)[1]}" for ln in measured_on_lines(doc)]
    return "\n".join(lines) + "\n"


def render_gate(doc: dict[str, Any]) -> str:
    reqs = doc.get("requirements", [])
    s = doc.get("summary", {})
    pol = doc.get("policy", {})
    out = [_header(doc), f"policy:     {pol.get('name', '-')} ({pol.get('path', '-')})\n"]
    ref = doc.get("reference") or {}
    if ref:
        out.append(f"reference:  {ref.get('path')} (BatchNorm folding undone with the owner's model)\n")
    ev = (doc.get("data") or {}).get("evaluation") or {}
    if ev:
        out.append(f"data:       {ev.get('source')} ({ev.get('samples')} examples"
                   + (", labelled" if ev.get("labels") else ", no labels: fidelity only") + ")\n")
    if ev.get("synthetic"):
        out.append(f"note:       {ev.get('caveat')}\n")
    out.append("\n")
    rows = []
    for r in reqs:
        rows.append([r["status"].upper(), r["id"], _measured_brief(r.get("measured", {})),
                     "; ".join(r.get("reasons", []))])
    out.append(table(["status", "requirement", "measured", "why"], rows, max_width=72))
    m = doc.get("matrix") or {}
    if len(m.get("targets") or []) > 1:
        out.append("\nattack x target:\n")
        out.append(table(["attack", *m["targets"]],
                         [[r["attack"], *[(r["cells"][t] or "-").upper() for t in m["targets"]]] for r in m["rows"]],
                         max_width=40))
    verdict = doc.get("verdict", "?").upper()
    out.append(f"\nGATE {verdict}: {s.get('passed', 0)} of {s.get('requirements', len(reqs))} requirements met"
               + (f", {s.get('failed', 0)} failed" if s.get("failed") else "")
               + (f", {s.get('errors', 0)} errors" if s.get("errors") else "")
               + (f", {s['unreadable']} could not read" if s.get("unreadable") else "") + "\n")
    return "".join(out)


def _measured_brief(m: dict[str, Any]) -> str:
    parts = []
    if "matches" in m and "n_bits" in m:
        parts.append(f"k/T={m['matches']}/{m['n_bits']}")
    if "ber" in m:
        parts.append(f"BER={fmt_num(m['ber'], 4)}")
    if "p_value" in m:
        parts.append(f"p={fmt_p(m['p_value'])}")
    if m.get("batchnorm") in ("folded", "probably-folded"):
        parts.append(f"BN {m['batchnorm']}")
    if "signed_margin_min" in m:
        parts.append(f"margin={fmt_num(m['signed_margin_min'], 4)}")
    if "normalized_margin_min" in m:
        parts.append(f"norm.margin={fmt_num(m['normalized_margin_min'], 4)}")
    if "accuracy_drop" in m:
        parts.append(f"drop={fmt_num(m['accuracy_drop'], 2)}pt")
    if "accuracy" in m and "accuracy_drop" not in m:
        parts.append(f"acc={fmt_num(100 * m['accuracy'], 2)}%")
    if "top1_agreement" in m:
        parts.append(f"agree={fmt_num(100 * m['top1_agreement'], 2)}%")
    if "sqnr_db" in m:
        parts.append(f"SQNR={fmt_num(m['sqnr_db'], 1)}dB")
    return " ".join(parts)


def render_robustness(doc: dict[str, Any]) -> str:
    from auditor.report import grid_rows

    rows = grid_rows(doc)
    out = [_header(doc), "\n"]
    body = []
    for r in rows:
        body.append([r["attack"], r.get("mark", ""), r.get("k_over_t", ""), fmt_num(r.get("ber"), 4),
                     fmt_p(r.get("p_value")), fmt_num(r.get("margin_min"), 4), fmt_num(r.get("margin_median"), 4),
                     fmt_num(None if r.get("accuracy") is None else 100 * r["accuracy"], 2),
                     fmt_num(None if r.get("top1_agreement") is None else 100 * r["top1_agreement"], 2),
                     fmt_num(r.get("sqnr_db"), 1),
                     {True: "usable", False: "BROKEN"}.get(r["cell"].get("usable"), "-"), r.get("verdict", "")])
    ev = doc.get("evaluation") or (doc.get("data") or {}).get("evaluation") or {}
    if ev.get("synthetic"):
        out.append(f"note: {ev.get('caveat', 'synthetic data')}\n")
    out.append(table(["attack", "mark", "k/T", "BER", "p", "margin min", "margin med", "acc %", "agree %",
                      "SQNR dB", "model", "verdict"], body, align="lllrrrrrrrll", max_width=60))
    if isinstance(doc.get("summary"), dict):
        from auditor.gate.usability import headline

        out.append(headline(doc["summary"]) + "\n")
    return "".join(out)


# progress bars live below the stages that draw them; re-exported for callers
from auditor.progress import Progress, progress_enabled  # noqa: E402,F401

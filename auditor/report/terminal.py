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
    """A fixed-width text table. `align` has one letter per column: l (left) or r (right).

    Cells longer than `max_width` are cut with '~' so one long note cannot push
    the table off the screen.
    """
    rows = [[_cell(c, max_width) for c in r] for r in rows]
    headers = [_cell(h, max_width) for h in headers]
    n = len(headers)
    align = (align or "l" * n).ljust(n, "l")
    widths = [max([len(headers[i])] + [len(r[i]) for r in rows if i < len(r)]) for i in range(n)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i in range(n):
            c = cells[i] if i < len(cells) else ""
            out.append(c.rjust(widths[i]) if align[i] == "r" else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows]) + "\n"


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
                     fmt_num(r.get("sqnr_db"), 1), r.get("verdict", "")])
    ev = doc.get("evaluation") or (doc.get("data") or {}).get("evaluation") or {}
    if ev.get("synthetic"):
        out.append(f"note: {ev.get('caveat', 'synthetic data')}\n")
    out.append(table(["attack", "mark", "k/T", "BER", "p", "margin min", "margin med", "acc %", "agree %",
                      "SQNR dB", "verdict"], body, align="lllrrrrrrrl", max_width=60))
    return "".join(out)


# ------------------------------------------------------------------ progress
def progress_enabled(stream: TextIO | None = None) -> bool:
    """Draw progress only for a person watching: a TTY, and not under CI."""
    stream = stream if stream is not None else sys.stderr
    ci = os.environ.get("CI", "").strip().lower()
    if ci and ci not in ("0", "false", "no"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """A one-line progress bar on stderr: ``with Progress(n, "attacks") as p: p.advance(note=...)``.

    Silent (does nothing) when stderr is not a TTY or CI is set; never writes to stdout,
    so `--json` output stays machine-readable.
    """

    def __init__(self, total: int, label: str = "", *, stream: TextIO | None = None,
                 enabled: bool | None = None, width: int = 28):
        self.total = max(0, int(total))
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = progress_enabled(self.stream) if enabled is None else enabled
        self.width = width
        self.done = 0
        self.note = ""
        self._t0 = time.monotonic()
        self._last_len = 0

    def __enter__(self) -> "Progress":
        self._draw()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        if note:
            self.note = note
        self._draw()

    def set_note(self, note: str) -> None:
        self.note = note
        self._draw()

    def line(self) -> str:
        """The text of the bar as it would be drawn now."""
        frac = self.done / self.total if self.total else 0.0
        fill = int(round(frac * self.width))
        bar = "#" * fill + "." * (self.width - fill)
        secs = time.monotonic() - self._t0
        s = f"{self.label} [{bar}] {self.done}/{self.total} {secs:5.1f}s"
        return f"{s} {self.note}" if self.note else s

    def _draw(self) -> None:
        if not self.enabled:
            return
        s = self.line()[:120]
        pad = " " * max(0, self._last_len - len(s))
        self.stream.write("\r" + s + pad)
        self.stream.flush()
        self._last_len = len(s)

    def close(self) -> None:
        if self.enabled and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()
            self._last_len = 0

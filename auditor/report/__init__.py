"""Renderers of result documents: JSON is the artefact; JUnit XML (junit.py),
the terminal table (terminal.py) and the HTML report (html.py, with charts from
plots.py) are views of it and add no numbers of their own.

This module holds what the renderers share: loading result files, number
formatting, and flattening a gate or robustness document into one row per
(attack, mark) cell of the attack grid.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from auditor.errors import AuditError
from auditor.results import SCHEMA


# ------------------------------------------------------------------ loading
def load_result(path: str | Path) -> dict[str, Any]:
    """A result document from a file; AuditError if it is not a wmaudit result."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditError(f"result file not found: {p}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AuditError(f"{p} is not a JSON result: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise AuditError(f"{p} is not a wmaudit result (schema {got!r}, expected {SCHEMA!r})")
    if not isinstance(doc.get("kind"), str):
        raise AuditError(f"{p}: result has no 'kind'")
    return doc


# ------------------------------------------------------------------ numbers
def as_float(v: Any) -> float | None:
    """Numbers as floats; the strings results.py writes for non-finite values back to floats."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    return None


def fmt_num(v: Any, digits: int = 3) -> str:
    """Fixed-point text; '-' when there is no number."""
    f = as_float(v)
    if f is None:
        return "-"
    if not math.isfinite(f):
        return str(f)
    return f"{f:.{digits}f}"


def fmt_p(v: Any, log10_p: Any = None) -> str:
    """A p-value in 3 significant digits; from log10 p where p underflowed to 0."""
    f = as_float(v)
    if f is None:
        return "-"
    lp = as_float(log10_p)
    if f == 0.0 and lp is not None and math.isfinite(lp):
        e = math.floor(lp)
        return f"{10 ** (lp - e):.2f}e{e}"
    if f == 0.0:
        return "0"
    out = f"{f:.3g}" if f >= 1e-3 else f"{f:.2e}"
    if math.floor(math.log10(float(out))) != math.floor(math.log10(f)):
        # rounding carried into the next power of ten (9.99999e-07 -> 1.00e-06): against a
        # threshold like 1e-6 that reads as the wrong side, so show the digits
        out = f"{f:.6g}"
    return out


# ------------------------------------------------------------------ the attack grid
def _attack_label(cell: dict[str, Any]) -> str:
    for k in ("id", "name"):
        if cell.get(k):
            return str(cell[k])
    steps = cell.get("steps")
    if isinstance(steps, str):
        return steps or "original"
    if steps:
        return " + ".join(_step_label(s) for s in steps)
    return _step_label(cell)


def _step_label(step: dict[str, Any]) -> str:
    name = step.get("attack") or step.get("name") or "?"
    params = step.get("params") or {}
    if not params:
        return str(name)
    return f"{name}(" + ", ".join(f"{k}={params[k]}" for k in sorted(params)) + ")"


def _marks_of(cell: dict[str, Any]) -> list[dict[str, Any]]:
    wb = cell.get("whitebox")
    if isinstance(wb, dict):
        return list(wb.get("marks") or [])
    if isinstance(wb, list):
        return wb
    return list(cell.get("marks") or [])


def _accuracy_of(cell: dict[str, Any], kind: str | None) -> tuple[float | None, float | None]:
    """(accuracy as a fraction, drop in percentage points) of a cell, first backend.

    Gate documents hold accuracy per backend with the drop already in points;
    robustness documents hold one accuracy and the drop as a fraction.
    """
    acc = cell.get("accuracy")
    if isinstance(acc, dict):
        for _, v in sorted(acc.items()):
            if isinstance(v, dict) and "accuracy" in v:
                return as_float(v.get("accuracy")), as_float(v.get("accuracy_drop"))
        return None, None
    drop = as_float(cell.get("accuracy_drop"))
    if drop is not None and kind == "robustness":
        drop = 100.0 * drop
    return as_float(acc), drop


def _fidelity_of(cell: dict[str, Any]) -> dict[str, Any]:
    """Fidelity against the unattacked model (auditor.data.fidelity), first backend for gate cells."""
    fid = cell.get("fidelity")
    if isinstance(fid, dict):
        return fid
    acc = cell.get("accuracy")
    if isinstance(acc, dict):
        for _, v in sorted(acc.items()):
            if isinstance(v, dict) and isinstance(v.get("fidelity"), dict):
                return v["fidelity"]
    return {}


_STEP_PRUNE = re.compile(r"^prune:([0-9.eE+-]+)(?::([a-z0-9-]+))?$")


def step_axes(steps: Any) -> tuple[float, str]:
    """(pruning rate, precision) of a compose step string, for survival curves:
    "prune:0.5,quantize:static-qdq" -> (0.5, "static-qdq"); no pruning -> 0.0; no
    quantization step -> "float"."""
    if isinstance(steps, list):
        steps = ",".join(str(s) for s in steps)
    rate, precision = 0.0, "float"
    for part in [p.strip() for p in str(steps or "").split(",") if p.strip()]:
        m = _STEP_PRUNE.match(part)
        if m:
            try:
                rate = float(m.group(1))
            except ValueError:
                pass
        elif part.startswith("quantize:"):
            precision = part.split(":", 1)[1]
        elif part in ("fp16", "int4") or part.startswith("simulate"):
            precision = part
    return rate, precision


def grid_cells(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The attacked-model cells of a gate or robustness document, in document order."""
    cells: list[dict[str, Any]] = []
    base = doc.get("baseline")
    if isinstance(base, dict) and base.get("marks") is not None:  # robustness: the unattacked model
        cells.append({"name": "original", "steps": "", **base})
    for k in ("attacks", "configs", "cells"):
        v = doc.get(k)
        if isinstance(v, list):
            cells.extend(c for c in v if isinstance(c, dict))
            break
    return cells


def grid_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per (attack cell, white-box mark) with the numbers every view shows."""
    rows = []
    for cell in grid_cells(doc):
        acc, drop = _accuracy_of(cell, doc.get("kind"))
        rate, precision = step_axes(cell.get("steps"))
        fid = _fidelity_of(cell)
        base = {"attack": _attack_label(cell), "steps": cell.get("steps") or "", "prune_rate": rate,
                "precision": precision, "accuracy": acc, "accuracy_drop": drop,
                "top1_agreement": as_float(fid.get("top1_agreement")), "sqnr_db": as_float(fid.get("sqnr_db")),
                "cosine": as_float(fid.get("cosine")),
                "simulated": bool(cell.get("simulated", False)), "cell": cell}
        marks = _marks_of(cell)
        if not marks:
            rows.append(dict(base, mark="", verdict=cell.get("error", "")))
            continue
        for m in marks:
            rows.append(dict(
                base, mark=m.get("id", m.get("param", "")),
                k_over_t=f"{m.get('matches', '?')}/{m.get('n_bits', '?')}",
                # the p-value corrected for the candidate tensors tried, as extract reports it
                ber=as_float(m.get("ber")), p_value=as_float(m.get("p_corrected", m.get("p_value"))),
                log10_p=as_float(m.get("log10_p_corrected", m.get("log10_p"))),
                margin_min=as_float(m.get("margin_min")), margin_median=as_float(m.get("margin_median")),
                signed_margin_min=as_float(m.get("signed_margin_min")), verdict=m.get("verdict", ""),
                signed_margins=m.get("signed_margins"), margin_histogram=m.get("margin_histogram")))
    return rows

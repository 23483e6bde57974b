"""One self-contained HTML file a reviewer reads in a browser.

``render(docs)`` turns result documents (gate, robustness, query, extract, ...)
into a page with: the verdict up front; the model's provenance (path, sha256,
key commitment, tool version, command); survival curves (BER and margin
against pruning rate, one line per precision) and margin charts drawn as
inline SVG (auditor.report.plots); the attack grid with task accuracy;
decoded logos for every number of key images a query result holds (PNG as
data: URIs); and how each number was produced (command and every seed).

No scripts, no external CSS, fonts or images: the file works offline and
from an e-mail attachment. All text is escaped. The output depends only on
the documents, so rendering the same JSON twice gives the same bytes.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any, Iterator

from auditor.report import as_float, fmt_num, fmt_p, grid_rows
from auditor.report import plots

_CSS = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1200px; color: #1a1a1a; line-height: 1.4; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin-top: 20px; }
.verdict { padding: 14px 18px; border-radius: 6px; font-size: 18px; font-weight: bold; margin: 12px 0; }
.pass { background: #e3f4e6; border: 2px solid #2e7d32; color: #1b5e20; }
.fail { background: #fdeaea; border: 2px solid #c62828; color: #8e0000; }
.neutral { background: #eef2f7; border: 2px solid #5c6f87; color: #2b3a4d; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-family: monospace; }
table.matrix td { text-align: center; font-weight: bold; min-width: 9em; }
td.m-pass { background: #d8f0dc; color: #1b5e20; } td.m-fail { background: #fbdada; color: #b00020; }
td.m-broken { background: #e6e6e6; color: #555555; font-weight: normal; font-style: italic; }
td.st-pass { color: #1b5e20; font-weight: bold; } td.st-fail, td.st-error { color: #b00020; font-weight: bold; }
code, .mono { font-family: monospace; font-size: 12px; word-break: break-all; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } .charts svg { border: 1px solid #e0e0e0; }
.logos { display: flex; flex-wrap: wrap; gap: 16px; } .logos figure { margin: 0; text-align: center; font-size: 12px; }
.logos img { image-rendering: pixelated; border: 1px solid #999; }
.note { color: #555; font-size: 12px; }
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


# ------------------------------------------------------------------ verdicts
def verdict_of(doc: dict[str, Any]) -> tuple[str, str]:
    """(css class, one-line verdict) of a document."""
    kind = doc.get("kind")
    v = doc.get("verdict")
    if kind == "gate":
        s = doc.get("summary", {})
        if v == "pass":
            return "pass", f"GATE PASSED: all {s.get('requirements', 0)} requirements met"
        return "fail", (f"GATE FAILED: {s.get('failed', 0)} requirements not met, {s.get('errors', 0)} not "
                        f"measurable" + (f", {s['unreadable']} marks could not be read" if s.get("unreadable") else "")
                        + f", of {s.get('requirements', 0)}")
    if kind == "robustness":
        from auditor.gate.usability import headline

        s = doc.get("summary", {})
        text = ("mark " + headline(s)
                + ("" if s.get("baseline_detected", True) else "; NOT detected in the unattacked model"))
        return ("pass" if v == "survived" else "fail"), ("SURVIVED: " if v == "survived" else "BROKEN: ") + text
    inner = doc.get("result") if isinstance(doc.get("result"), dict) else doc
    v = inner.get("verdict", v)
    if isinstance(v, dict):  # query results: {"verdict": ..., "reason": ..., "p_value": ...}
        inner, v = v, v.get("verdict")
    if kind == "provenance" and v in ("derived", "not derived") and inner.get("method") == "phash":
        p = inner.get("p_value")
        return ("pass" if v == "derived" else "fail"), (
            f"provenance (phash): {v} from the reference (score {inner.get('score', 0):+.3f}, threshold "
            f"{inner.get('threshold', 0):g}; " + (f"rank p {p:.3g} among {inner['calibration']['n']} null models)"
                                                 if p is not None else "decision rule, no p-value without null models)"))
    if kind == "provenance" and v in ("derived", "not derived"):
        return ("pass" if v == "derived" else "fail"), (f"provenance: {v} from the reference "
                                                        f"(combined p 10^{inner.get('log10_p_combined', 0):.1f})")
    if v == "could not read":  # neither detected nor absent: the weight was not read
        return "neutral", f"{kind}: COULD NOT READ the mark" + (f" ({inner['reason']})" if inner.get("reason") else "")
    if kind == "scan" and v is not None:
        n = len(inner.get("findings", []))
        return ("pass" if v == "detected" else "fail"), f"scan: {inner.get('detected', 0)} of {n} marks detected"
    if v == "detected":
        return "pass", f"{kind}: watermark detected" + (f" ({inner['reason']})" if inner.get("reason") else "")
    if v in ("not detected", "insufficient evidence"):
        return "fail", f"{kind}: {v}" + (f" ({inner['reason']})" if inner.get("reason") else "")
    return "neutral", f"{kind}: {v if v is not None else 'see details'}"


# ------------------------------------------------------------------ pieces
def _table(headers: list[str], rows: list[list[tuple[str, str]]]) -> str:
    """rows of (css class, already-escaped html) cells."""
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="{c}">{h}</td>' if c else f"<td>{h}</td>" for c, h in r) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def provenance(doc: dict[str, Any]) -> str:
    model = doc.get("model") or {}
    tool = doc.get("tool") or {}
    rows = [("kind", doc.get("kind")), ("model path", model.get("path")), ("model sha256", model.get("sha256")),
            ("key commitment", doc.get("key_commitment")),
            ("evidence", (f"{doc['evidence'].get('kind')}: {doc['evidence'].get('sentence', '')}"
                          if isinstance(doc.get("evidence"), dict) else None)),
            ("tool", f"{tool.get('name', 'wmaudit')} {tool.get('version', '')}"),
            ("command", doc.get("command")), ("created", doc.get("created")), ("schema", doc.get("schema"))]
    pol = doc.get("policy")
    if isinstance(pol, dict):
        rows += [("policy", f"{pol.get('name', '')} ({pol.get('path', '')})"), ("policy sha256", pol.get("sha256"))]
    ref = doc.get("reference")
    if isinstance(ref, dict):  # the owner's BN-kept model used to undo BatchNorm folding
        rows += [("reference (BN folding undone)", ref.get("path")), ("reference sha256", ref.get("sha256"))]
    return _table(["field", "value"], [[("", _e(k)), ("mono", _e(v))] for k, v in rows if v not in (None, "")])


def _walk(x: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(x, dict):
        for k in sorted(x):
            yield from _walk(x[k], f"{path}.{k}" if path else str(k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, x


def how_produced(doc: dict[str, Any]) -> str:
    """The command and every seed and data description in the document, with where it sits."""
    seeds = [(p, v) for p, v in _walk(doc) if p.rsplit(".", 1)[-1].endswith("seed") and not isinstance(v, (dict, list))]
    out = [f"<p>Command: <code>{_e(doc.get('command'))}</code></p>"]
    data = []
    # data recorded only where it was used: calibration when a static mode calibrated,
    # evaluation when accuracy / fidelity were measured
    for src in (doc, doc.get("data") if isinstance(doc.get("data"), dict) else {}):
        for key in ("calibration", "evaluation", "heldout"):
            v = src.get(key)
            if isinstance(v, dict):
                data.append((key, json.dumps(v, sort_keys=True)))
    if data:
        out.append(_table(["data", "description"], [[("", _e(k)), ("mono", _e(v))] for k, v in data]))
    if seeds:
        # the same seed repeated per cell says nothing new: show each (field, value) once, first place
        seen: dict[tuple[str, str], str] = {}
        for p, v in seeds:
            leaf = p.rsplit(".", 1)[-1]
            seen.setdefault((leaf, json.dumps(v)), p)
        out.append(_table(["seed", "value", "first recorded at"],
                          [[("", _e(leaf)), ("num", _e(val)), ("mono", _e(p))]
                           for (leaf, val), p in sorted(seen.items(), key=lambda kv: kv[1])]))
    else:
        out.append('<p class="note">This result records no random seed.</p>')
    return "\n".join(out)


# ------------------------------------------------------------------ the survival matrix
def _target_name(cell: dict[str, Any]) -> str:
    t = cell.get("target")
    if isinstance(t, dict):
        return str(t.get("name") or t.get("id") or "target")
    return str(t) if t else ""


def survival_matrix(doc: dict[str, Any]) -> str:
    """Attack x target: did the mark survive where the model still works? One row per attack,
    one column per deployment target (the grid's targets; the gate's backends; else the one
    onnxruntime CPU run). Robustness cells: survived / mark lost / model broken (with what
    the mark did there); gate cells: every requirement of that attack on that backend met or not."""
    kind = doc.get("kind")
    cells: dict[tuple[str, str], tuple[str, str]] = {}
    attacks: list[str] = []
    targets: list[str] = []

    def put(attack: str, target: str, cls: str, text: str) -> None:
        if attack not in attacks:
            attacks.append(attack)
        if target not in targets:
            targets.append(target)
        cells[(attack, target)] = (cls, text)

    if kind == "robustness":
        for r in doc.get("configs", []):
            mark = "mark detected" if r.get("survived") else "mark lost"
            per = r.get("targets") or {(_target_name(r) or (doc.get("targets") or ["native"])[0]): r}
            order = [t for t in doc.get("targets") or [] if t in per] or list(per)  # the order asked
            for tgt in order:
                cell = per[tgt]
                usable = cell.get("usable", r.get("usable"))
                if usable is False:
                    put(r["name"], tgt, "broken", f"model broken ({mark})")
                elif r.get("survived"):
                    put(r["name"], tgt, "pass", "survived" + ("" if usable else " (usability not measured)"))
                else:
                    put(r["name"], tgt, "fail", "mark lost")
    elif kind == "gate":
        pol = doc.get("policy") or {}
        backends = list(pol.get("targets") or pol.get("backends") or [])
        by: dict[tuple[str, str], list[str]] = {}
        for q in doc.get("requirements", []):
            for b in ([q["backend"]] if q.get("backend") else backends or ["-"]):
                by.setdefault((q.get("attack", ""), b), []).append(q.get("status", ""))
        for (attack, b), statuses in by.items():
            bad = [x for x in statuses if x != "pass"]
            put(attack, b, "pass" if not bad else "fail",
                f"{len(statuses)} met" if not bad else f"{len(bad)} of {len(statuses)} not met")
    else:
        return ""
    if not cells:
        return ""
    head = "<tr><th>attack</th>" + "".join(f"<th>{_e(t)}</th>" for t in targets) + "</tr>"
    body = []
    for a in attacks:
        tds = []
        for t in targets:
            cls, text = cells.get((a, t), ("", "-"))
            tds.append(f'<td class="m-{cls}">{_e(text)}</td>' if cls else "<td>-</td>")
        body.append(f"<tr><th class=\"attack\">{_e(a)}</th>{''.join(tds)}</tr>")
    legend = ('<p class="note">Survival counts only where the attacked model still works; '
              '"model broken" cells are attacks that broke the model (whatever the mark did there).</p>'
              if kind == "robustness" else "")
    return f'<table class="matrix"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>{legend}'


# ------------------------------------------------------------------ charts
def survival_charts(doc: dict[str, Any]) -> str:
    """BER, margin and accuracy against pruning rate, one line per precision (and per mark)."""
    rows = [r for r in grid_rows(doc) if r.get("mark")]
    if not rows:
        return ""
    marks = sorted({r["mark"] for r in rows})
    precisions = sorted({r["precision"] for r in rows}, key=lambda p: (p != "float", p))
    if len({r["prune_rate"] for r in rows}) < 2:
        return _bars(doc, rows)

    def series(field: str, scale: float = 1.0):
        out = []
        for mk in marks:
            for prec in precisions:
                pts = [(r["prune_rate"], scale * r[field]) for r in rows
                       if r["mark"] == mk and r["precision"] == prec and r.get(field) is not None
                       and math.isfinite(r[field])]
                if pts:
                    out.append((prec if len(marks) == 1 else f"{mk} / {prec}", sorted(set(pts))))
        return out

    thr = (doc.get("policy") or {}).get("thresholds", {})
    charts = [plots.line_chart(series("ber"), title="Bit error rate vs pruning rate", x_label="pruning rate",
                               y_label="BER", y_range=(0.0, 0.5),
                               hline=(thr["max_ber"], f"max_ber {thr['max_ber']:g}") if "max_ber" in thr else
                               (0.5, "chance")),
              plots.line_chart(series("margin_min"), title="Minimum margin |x_i . w| vs pruning rate",
                               x_label="pruning rate", y_label="min margin"),
              plots.line_chart(series("margin_median"), title="Median margin |x_i . w| vs pruning rate",
                               x_label="pruning rate", y_label="median margin")]
    acc = []
    for prec in precisions:
        pts = sorted({(r["prune_rate"], 100.0 * r["accuracy"]) for r in rows
                      if r["precision"] == prec and r.get("accuracy") is not None})
        if pts:
            acc.append((prec, pts))
    if acc:
        charts.append(plots.line_chart(acc, title="Task accuracy vs pruning rate", x_label="pruning rate",
                                       y_label="accuracy (%)"))
    return '<div class="charts">' + "\n".join(charts) + "</div>"


def _bars(doc: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Without a pruning axis (e.g. a gate with a few attacks): one bar per attacked model."""
    label = lambda r: r["attack"] if len({x["mark"] for x in rows}) == 1 else f"{r['attack']}/{r['mark']}"  # noqa: E731
    charts = [plots.bar_chart([(label(r), r["ber"]) for r in rows if r.get("ber") is not None],
                              title="Bit error rate per attack", y_label="BER")]
    field = "signed_margin_min" if all(r.get("signed_margin_min") is not None for r in rows) else "margin_min"
    charts.append(plots.bar_chart([(label(r), r[field]) for r in rows if r.get(field) is not None],
                                  title=("Signed" if field.startswith("signed") else "Absolute")
                                  + " minimum margin per attack", y_label="margin",
                                  hline=(0.0, "bit flips below 0") if field.startswith("signed") else None))
    return '<div class="charts">' + "\n".join(charts) + "</div>"


def margin_histograms(doc: dict[str, Any]) -> str:
    """Histograms of the signed per-bit margins (2 b_i - 1) x_i . w: from the bins computed at
    extraction time (results never carry per-bit values unless revealed), or from the per-bit
    values of a result made with --reveal-bits; otherwise min / median margin per attacked model."""
    rows = [r for r in grid_rows(doc) if r.get("mark")]
    binned = [r for r in rows if isinstance(r.get("margin_histogram"), dict) and r["margin_histogram"].get("counts")]
    with_bits = [r for r in rows if isinstance(r.get("signed_margins"), list) and r["signed_margins"]]
    if binned:
        charts = [plots.histogram_bins(r["margin_histogram"]["edges"], r["margin_histogram"]["counts"],
                                       title=f"{r['attack']} / {r['mark']}",
                                       x_label="signed margin (below 0: bit wrong)")
                  for r in binned]
        return '<div class="charts">' + "\n".join(charts) + "</div>"
    if with_bits:
        charts = [plots.histogram([float(v) for v in r["signed_margins"]],
                                  title=f"{r['attack']} / {r['mark']}", x_label="signed margin (below 0: bit wrong)")
                  for r in with_bits]
        return '<div class="charts">' + "\n".join(charts) + "</div>"
    if not rows:
        return ""
    bars = []
    for r in rows:
        lab = r["attack"] if len({x["mark"] for x in rows}) == 1 else f"{r['attack']}/{r['mark']}"
        if r.get("margin_median") is not None:
            bars.append((lab, r["margin_median"]))
    return ('<p class="note">The results carry margin summaries (min / median of |x_i . w|), not the '
            'per-bit margins; the chart shows the median per attacked model.</p><div class="charts">'
            + plots.bar_chart(bars, title="Median margin per attacked model", y_label="median |x_i . w|",
                              width=max(560, 28 * len(bars) + 100)) + "</div>")


# ------------------------------------------------------------------ tables
def grid_table(doc: dict[str, Any]) -> str:
    rows = grid_rows(doc)
    if not rows:
        return '<p class="note">No attacked models in this result.</p>'
    body = []
    for r in rows:
        verdict = r.get("verdict", "")
        cls = "st-pass" if verdict == "detected" else ("st-fail" if verdict else "")
        body.append([("", _e(r["attack"])), ("mono", _e(r.get("steps") or "-")), ("", _e(r.get("mark", ""))),
                     ("num", _e(r.get("k_over_t", "-"))), ("num", _e(fmt_num(r.get("ber"), 4))),
                     ("num", _e(fmt_p(r.get("p_value"), r.get("log10_p")))),
                     ("num", _e(fmt_num(r.get("margin_min"), 4))), ("num", _e(fmt_num(r.get("margin_median"), 4))),
                     ("num", _e(fmt_num(None if r.get("accuracy") is None else 100 * r["accuracy"], 2))),
                     ("num", _e(fmt_num(r.get("accuracy_drop"), 2))),
                     ("num", _e(fmt_num(None if r.get("top1_agreement") is None else 100 * r["top1_agreement"], 2))),
                     ("num", _e(fmt_num(r.get("sqnr_db"), 1))),
                     ("", "simulated" if r.get("simulated") else ""), (cls, _e(verdict))])
    return _table(["attack", "steps", "mark", "k/T", "BER", "p", "margin min", "margin median", "accuracy %",
                   "drop (points)", "top-1 agreement %", "SQNR dB", "", "verdict"], body)


def requirements_table(doc: dict[str, Any]) -> str:
    reqs = doc.get("requirements") or []
    body = []
    for r in reqs:
        st = r.get("status", "")
        body.append([(f"st-{st}", _e(st.upper())), ("mono", _e(r.get("id"))), ("", _e(r.get("message")))])
    return _table(["status", "requirement", "numbers / why"], body)


def notes_table(doc: dict[str, Any]) -> str:
    rows = []
    for r in grid_rows(doc):
        notes = (r.get("cell") or {}).get("notes") or []
        if notes and r["attack"] not in {x[0] for x in rows}:
            rows.append((r["attack"], notes))
    if not rows:
        return ""
    return "<h3>What each attack did</h3>" + _table(
        ["attack", "notes"], [[("", _e(a)), ("", "<br>".join(_e(n) for n in ns))] for a, ns in rows])


# ------------------------------------------------------------------ logos
def _logo_sets(x: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every dict in the document that holds decoded logo maps, as `wmaudit query` writes
    them: {"decoded": {k: 2-D list}, "target": 2-D list, "per_k": [...], ...}."""
    if isinstance(x, dict):
        if isinstance(x.get("decoded"), dict) and x["decoded"]:
            yield path, x
        for k in sorted(x):
            if k != "decoded":
                yield from _logo_sets(x[k], f"{path}.{k}" if path else k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _logo_sets(v, f"{path}[{i}]")


def _to_gray(m: Any):
    import numpy as np

    a = np.asarray(m, dtype=np.float64)
    if a.ndim != 2 or a.size == 0 or not np.all(np.isfinite(a)):
        return None
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


def logos(doc: dict[str, Any]) -> str:
    out = []
    for path, lg in _logo_sets(doc):
        per_k = {str(p.get("k")): p for p in lg.get("per_k", []) if isinstance(p, dict)}
        figs = []
        target = _to_gray(lg["target"]) if lg.get("target") is not None else None
        if target is not None:
            figs.append(f'<figure><img alt="{_e("embedded logo")}" src="{plots.png_data_uri(target)}">'
                        f"<figcaption>embedded logo</figcaption></figure>")
        for k in sorted(lg["decoded"], key=lambda s: int(s) if str(s).isdigit() else 0):
            g = _to_gray(lg["decoded"][k])
            if g is None:
                continue
            info = per_k.get(str(k), {})
            cap = f"{k} key image{'s' if str(k) != '1' else ''}"
            if info:
                cap += f"<br>r = {_e(fmt_num(info.get('r'), 3))}, p = {_e(fmt_p(info.get('p_value')))}"
            figs.append(f'<figure><img alt="{_e(f"decoded logo, {k} key images")}" '
                        f'src="{plots.png_data_uri(g)}"><figcaption>{cap}</figcaption></figure>')
        if figs:
            out.append(f"<h3>Decoded logo <code>{_e(path)}</code></h3>"
                       f"<p>Verdict: {_e(lg.get('verdict', '-'))}; permutation p = {_e(fmt_p(lg.get('p_value')))} "
                       f"({_e(lg.get('n_perm', '-'))} permutations, seed {_e(lg.get('permutation_seed', '-'))})</p>"
                       f'<div class="logos">{"".join(figs)}</div>')
    return "\n".join(out)


def triggers(doc: dict[str, Any]) -> str:
    rows = []
    for path, v in _walk_dicts(doc):
        if isinstance(v, dict) and "hits" in v and "null_rate" in v and "n" in v:
            rows.append([("mono", _e(path)), ("num", _e(f"{v['hits']}/{v['n']}")),
                         ("num", _e(fmt_num(v.get("null_rate"), 3))),
                         ("num", _e(fmt_p(v.get("p_value"), v.get("log10_p")))), ("", _e(v.get("verdict", "")))])
    if not rows:
        return ""
    return "<h3>Trigger sets</h3>" + _table(["where", "hits", "null rate", "p", "verdict"], rows)


def _walk_dicts(x: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(x, dict):
        yield path, x
        for k in sorted(x):
            yield from _walk_dicts(x[k], f"{path}.{k}" if path else k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _walk_dicts(v, f"{path}[{i}]")


# ------------------------------------------------------------------ forensics
def _cls(v: str) -> str:
    return "pass" if v in ("detected", "derived") else "neutral" if v == "could not read" else "fail"


def scan_section(doc: dict[str, Any]) -> str:
    """Findings of `wmaudit scan`: where each mark was found, what was undone, the corrected p."""
    r = doc.get("result") or {}
    t = r.get("tried") or {}
    rows = []
    for f in r.get("findings", []):
        fd = f.get("found") or {}
        where = (f"{fd.get('weight', '—')} [{fd.get('transform', '')}] {fd.get('shape_in_file', '')} "
                 f"({fd.get('source', '')})") if fd else "—"
        rows.append([("", _e(f.get("mark"))), ("mono", _e(str(f.get("key_commitment", ""))[:23] + "…")),
                     ("", _e((f.get("evidence") or {}).get("kind"))), ("mono", _e(where)),
                     ("", "<br>".join(_e(u) for u in f.get("undone", []))),
                     ("", _e(f"{f.get('matches', '—')}/{f.get('n_bits')}")),
                     ("", _e(fmt_p(f.get("p_value"), f.get("log10_p")) if "p_value" in f else "—")),
                     ("", _e(fmt_p(f.get("p_corrected"), f.get("log10_p_corrected")) if "p_corrected" in f else "—")),
                     (_cls(f.get("verdict", "")), _e(f.get("verdict")))])
    out = [_table(["mark", "key commitment", "evidence", "found", "undone", "bits", "p", "corrected p", "verdict"],
                  rows)]
    out.append(f'<p class="note">Tried: {_e(t.get("keys"))} keys, {_e(t.get("marks"))} marks, '
               f'{_e(t.get("candidate_tensors"))} candidate tensors, {_e(t.get("variants"))} variants. '
               f'{_e(t.get("correction"))}</p>')
    lim = r.get("cannot_recover") or []
    if lim:
        out.append('<p class="note">Not recoverable here: ' + "; ".join(_e(x) for x in lim) + "</p>")
    return "\n".join(out)


def provenance_section(doc: dict[str, Any]) -> str:
    """Per-layer tests of `wmaudit provenance`, their Fisher combination and the calibration."""
    r = doc.get("result") or {}
    if r.get("method") == "phash":
        return _provenance_phash(r)
    rows = [[("mono", _e(l.get("weight"))), ("", _e(f"{l.get('rows_above_rho0')}/{l.get('rows')}")),
             ("", _e(f"{l.get('median_r', 0):+.3f}")), ("", _e(fmt_p(l.get("p_value"), l.get("log10_p")))),
             ("", _e(l.get("matching")))]
            for l in r.get("layers", []) + [l for b in r.get("branches", []) for l in b.get("layers", [])]]
    out = ['<p class="note">Method: weights (layers aligned to the reference).</p>',
           _table(["layer", "rows above rho0", "median held-out r", "p (sign test)", "matching"], rows),
           f'<p class="note">{_e(r.get("null"))}; {_e(r.get("fit"))}. Fisher X² = {r.get("fisher_x2", 0):.1f} '
           f'(df {_e(r.get("df"))}), combined p {_e(fmt_p(r.get("p_combined"), r.get("log10_p_combined")))}, '
           f'alpha {_e(r.get("alpha"))}.</p>']
    if r.get("branches") is not None:
        untested = "; ".join(f"{u['weight']}: {u['reason']}" for u in r.get("untested", [])) or "none"
        out.append(f'<p class="note">Every layer (--all-layers): {_e(r.get("chains"))} chains, each Bonferroni-corrected '
                   f'for its suspect chains, combined by Fisher; untested: {_e(untested)}.</p>')
    cal = r.get("calibration")
    if cal:
        out.append(f'<p class="note">False-positive rate measured on {cal["n"]} independently trained models: '
                   f'{cal["false_positives"]} called derived (smallest combined p 10^{cal["min_log10_p"]:.1f}).</p>')
    return "\n".join(out)


def _provenance_phash(r: dict[str, Any]) -> str:
    """`wmaudit provenance --method phash`: probes, tensors, score, agreement test, calibration."""
    pr, pp, at, cal = r.get("probes", {}), r.get("per_probe", {}), r.get("agreement_test", {}), r.get("calibration", {})
    lay = r.get("layers", {})
    rows = [[("", "method"), ("", "phash (behaviour: perceptual hashes of one tensor on probe inputs)")],
            [("", "probes"), ("mono", _e(f"{pr.get('path')}: {pr.get('count')} ({pr.get('fit')} fit, "
                                          f"{pr.get('tested')} tested), {pr.get('sha256')}"))],
            [("", "tensor (reference / suspect)"), ("mono", _e(f"{lay.get('reference')} / {lay.get('suspect')}"))],
            [("", "score"), ("", _e(f"{r.get('score', 0):+.4f} (threshold {r.get('threshold')}; "
                                    f"{pp.get('above_threshold')}/{pp.get('tested')} probes above)"))],
            [("", "agreement test"), ("", _e(f"p {fmt_p(at.get('p_value'), at.get('log10_p'))}: {at.get('null')}"))],
            [("", "null"), ("", _e(r.get("null")))]]
    if cal.get("n"):
        rows.append([("", "calibration"), ("", _e(
            f"rank p {r.get('p_value'):.3g} (resolution {r.get('p_resolution'):.3g}); false positives at the "
            f"threshold {cal.get('false_positives')}/{cal.get('n')}; largest null score {cal.get('max_null_score'):+.4f}"))])
    rows.append([("", "verdict"), ("", _e(f"{r.get('verdict')}: {r.get('decision')}"))])
    return _table(["", ""], rows)


# ------------------------------------------------------------------ the page
def document_section(doc: dict[str, Any], index: int) -> str:
    # the verdict is the page's headline (render), said once
    parts = [f'<section id="result-{index}">',
             f"<h2>{index + 1}. {_e(doc.get('kind', 'result'))}: {_e((doc.get('model') or {}).get('path', ''))}</h2>"]
    matrix = survival_matrix(doc)
    if matrix:
        parts += ["<h3>Survival: attack &times; target</h3>", matrix]
    ev = doc.get("evaluation") or (doc.get("data") or {}).get("evaluation") or {}
    if isinstance(ev, dict) and ev.get("synthetic"):
        parts.append(f'<p class="note"><b>Synthetic data:</b> {_e(ev.get("caveat"))}</p>')
    mx = target_matrix(doc)
    if mx:
        parts += ["<h3>Fidelity per target</h3>", mx]
    parts += ["<h3>Where it was measured</h3>", hardware_table(doc)]
    parts += ["<h3>Provenance</h3>", provenance(doc)]
    if doc.get("kind") == "gate":
        parts += ["<h3>Requirements</h3>", requirements_table(doc)]
    if doc.get("kind") == "scan":
        parts += ["<h3>Forensic scan</h3>", scan_section(doc)]
    if doc.get("kind") == "provenance":
        parts += ["<h3>Model provenance test</h3>", provenance_section(doc)]
    charts = survival_charts(doc)
    if charts:
        parts += ["<h3>Survival of the mark</h3>", charts]
    hist = margin_histograms(doc)
    if hist:
        parts += ["<h3>Margins</h3>", hist]
    if grid_rows(doc):
        parts += ["<h3>Attack grid</h3>", grid_table(doc), notes_table(doc)]
    lg, tr = logos(doc), triggers(doc)
    if lg or tr:
        parts += ["<h3>Black-box evidence</h3>", tr, lg]
    parts += ["<h3>How these numbers were produced</h3>", how_produced(doc), "</section>"]
    return "\n".join(p for p in parts if p)


def target_matrix(doc: dict[str, Any]) -> str:
    """The attack x target matrix (gate: requirement status; robustness: SQNR / agreement), when
    the result ran on more than one target."""
    m = doc.get("matrix") or {}
    ts = m.get("targets") or []
    if len(ts) < 2:
        return ""
    rows = []
    for r in m.get("rows", []):
        cells = [("", _e(r["attack"]))]
        for t in ts:
            c = r["cells"].get(t)
            if isinstance(c, dict):  # robustness: fidelity per target, the mark's verdict
                sq = c.get("sqnr_db")
                ag = c.get("top1_agreement")
                txt = (f"{sq:.1f} dB" if isinstance(sq, (int, float)) else "-") + " / " + (
                    f"{ag:.3f}" if isinstance(ag, (int, float)) else "-")
                cls = "broken" if c.get("usable") is False else ("pass" if c.get("survived") else "fail")
                cells.append((cls, _e(txt + (" (model broken)" if c.get("usable") is False else ""))))
            else:
                cells.append(("pass" if c == "pass" else "fail", _e((c or "-").upper())))
        rows.append(cells)
    notes = "".join(f'<p class="note"><b>{_e(n["attack"])} on {_e(n["target"])}:</b> {_e(n["why"])}'
                    + (" Try: " + _e("; ".join(n["try"])) + "." if n.get("try") else "") + "</p>"
                    for n in doc.get("hardware_notes") or [])
    head = "SQNR dB / top-1 agreement per target" if doc.get("kind") == "robustness" else "status per target"
    return f'<p class="note">{head}</p>' + _table(["attack", *ts], rows) + notes


def hardware_table(doc: dict[str, Any]) -> str:
    """One row per target: the hardware record of the process that ran the model."""
    hw = doc.get("hardware") or {}
    per = hw.get("targets") or {hw.get("target", "native"): hw}
    rows = []
    for t, rec in per.items():
        cpu = rec.get("cpu") or {}
        ort = rec.get("onnxruntime") or {}
        em = rec.get("emulated") or {}
        gpu = rec.get("gpu") or {}
        feats = ", ".join(f for f, v in (cpu.get("features") or {}).items() if v) or "none"
        rows.append([("", _e(t)), ("", _e(cpu.get("model") or cpu.get("arch") or "?")),
                     ("", _e(" / ".join(x for x in (cpu.get("microarchitecture"), cpu.get("level")) if x) or "?")),
                     ("", _e(feats)),
                     ("", _e(f"{ort.get('version') or '?'} {ort.get('execution_provider') or ''}".strip())),
                     ("", _e(f"{em.get('emulator')} {em.get('version') or ''} -cpu {em.get('cpu')}" if em else "no")),
                     ("", _e(f"{gpu.get('device')}, driver {gpu.get('driver')}, CUDA {gpu.get('cuda_runtime')}, "
                             f"cuDNN {gpu.get('cudnn')}, TensorRT {gpu.get('tensorrt')}" if gpu.get("device")
                             else "-"))])
    return _table(["target", "CPU", "microarchitecture / level", "kernel-selecting features", "onnxruntime",
                   "emulated", "GPU"], rows)


def render(docs: list[dict[str, Any]], title: str = "wmaudit report") -> str:
    """The complete HTML page for one or more result documents."""
    summary = []
    for i, d in enumerate(docs):
        cls, text = verdict_of(d)
        summary.append(f'<div class="verdict {cls}"><a href="#result-{i}" style="color:inherit">'
                       f"{_e(text)}</a></div>")
    tools = sorted({f"{(d.get('tool') or {}).get('name', 'wmaudit')} {(d.get('tool') or {}).get('version', '')}"
                    for d in docs})
    page = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            # nothing may load from elsewhere: no scripts at all, images only inline
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'\">",
            f"<title>{_e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
            f"<h1>{_e(title)}</h1>",
            f'<p class="note">{len(docs)} result document{"s" if len(docs) != 1 else ""}; '
            f"rendered by {_e(', '.join(tools))}. Every number below is read from the result JSON.</p>",
            '<div id="verdict">', *summary, "</div>",
            *[document_section(d, i) for i, d in enumerate(docs)],
            "</body>", "</html>", ""]
    return "\n".join(page)


__all__ = ["render", "verdict_of", "as_float"]

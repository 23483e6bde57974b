"""wmaudit extract: read a white-box mark off an ONNX file and judge it."""
from __future__ import annotations

import argparse
from auditor.commands import _types
from auditor import results
from auditor.backends.hardware import measured_on_lines
from auditor.marks import stats
from auditor.marks.keys import load_key
from auditor.marks.manifest import check_manifest, load_manifest  # noqa: F401 (re-exported)
from auditor.report import fmt_p

HELP = "extract white-box (Uchida) marks from an ONNX file and give a verdict"
DESCRIPTION = """Extract every white-box mark of KEY from MODEL and give a verdict with an exact
binomial p-value (detected when p < --alpha). Exit 0 detected, 1 not detected or
insufficient evidence, 2 error or could not read (the key's layer was not located, or its weight is
stored in a layout the reader does not understand: nothing was judged)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file")
    p.add_argument("--key", required=True, help="key file (wmaudit-key/1 JSON)")
    p.add_argument("--manifest", help="exporter manifest mapping torch parameters to ONNX tensors")
    p.add_argument("--reference", help="owner's reference ONNX model (BatchNorm kept) to undo BN folding")
    p.add_argument("--mark", action="append", help="only this mark id or parameter (repeatable)")
    p.add_argument("--alpha", type=_types.alpha, default=stats.DEFAULT_ALPHA,
                   help="detection threshold on the p-value (default 1e-6)")
    p.add_argument("--null-corpus", action="append", metavar="PATH",
                   help="ONNX file or folder of unrelated models for the empirical null of keys that fail "
                        "the fair-coin checks (repeatable; default: $WMAUDIT_DATA/thirdparty)")
    p.add_argument("--reveal-bits", action="store_true",
                   help="also put the extracted bit string and every per-bit signed margin in the result "
                        "(they give the key's bits away; off by default)")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")
    p.add_argument("-o", "--output", help="also write the result JSON to this file")



def run(args) -> int:
    import wmaudit

    r = wmaudit.extract(args.model, args.key, manifest=args.manifest, reference=args.reference, marks=args.mark,
                        alpha=args.alpha, null_corpus=args.null_corpus, reveal_bits=args.reveal_bits,
                        command=results.command_line())
    results.emit(r.document, output=args.output, as_json=args.json, render=render)
    if r.exit_code == 2:  # nothing was judged: the one line says why (the result is written in full)
        _types.say_unreadable("extract", r.document["result"]["marks"])
    return r.exit_code


def render(doc: dict) -> str:
    """Human summary of an extract result document."""
    r = doc["result"]
    lines = [f"model  {doc['model']['path']}  ({doc['model']['sha256'][:19]}…)",
             f"key    {doc.get('key_commitment', '')[:19]}…"]
    for m in r["marks"]:
        lines.append("")
        lines.append(f"mark {m['id']}: {m['param']} {m['shape']} reduce={m['reduce']}, {m['n_bits']} bits")
        loc = m.get("location")
        if m["verdict"] == stats.UNREADABLE:
            lines.append(f"  verdict   {m['verdict']}: {m['reason']}")
            continue
        if loc:
            q = f", dequantized from {loc['quant']}" if loc.get("quant") else ""
            lines.append(f"  found     {loc['weight']} [{loc['transform']}] by {loc['how']}"
                         f"{_cands(loc)}; "
                         f"{loc.get('location') or '?'}, {loc.get('stored_dtype') or '?'}{q}")
        lines.append(f"  bits      {m['matches']}/{m['n_bits']} match   BER {m['ber']:.4f}   "
                     f"p {fmt_p(m['p_value'], m['log10_p'])} (log10 {m['log10_p']:.2f})"
                     + (f"   corrected p {fmt_p(m['p_corrected'])}" if loc and loc['candidates'] > 1 else ""))
        lines.append(f"  margin    |x.w| min {m['margin_min']:.4g}  median {m['margin_median']:.4g}   "
                     f"signed min {m['signed_margin_min']:.4g}   normalised min "
                     f"{m.get('normalized_margin_min', 0.0):.4g} median {m.get('normalized_margin_median', 0.0):.4g}")
        bn = m.get("batchnorm") or {}
        if bn.get("status") not in (None, "not-applicable"):
            lines.append(f"  batchnorm {bn['status']}: {bn.get('detail', '')}")
        for n in m.get("notes", []):
            lines.append(f"  note      {n}")
        lines.extend(render_null(m))
        ev = m.get("evidence") or {}
        if ev:
            lines.append(f"  evidence  {ev['sentence']}")
        lines.append(f"  verdict   {m['verdict']} ({m['reason']})")
    lines.append("")
    if r.get("bits_revealed"):
        lines.append("note: --reveal-bits: the result holds the extracted bits and per-bit margins "
                     "(they give the key away; do not publish it)")
    lines.append(f"VERDICT: {r['verdict'].upper()} ({r['reason']})")
    ev = r.get("evidence") or doc.get("evidence") or {}
    if ev:
        lines.append(f"EVIDENCE: {ev['kind'].upper()} ({ev['sentence']})")
    return "\n".join(lines + measured_on_lines(doc))


def render_null(m: dict) -> list[str]:
    """The null a mark's p-value was computed under, and the checks that chose it."""
    nl = m.get("null") or {}
    if not nl:
        return []
    out = [f"  null      {nl['reason']}"]
    ch = nl.get("checks", {})
    for name in ("rows", "bit_balance", "independence"):
        c = ch.get(name)
        if c and not c.get("by_construction"):
            detail = c.get("detail") or f"{c.get('ones')} ones of {c.get('n_bits')} (p = {c.get('p_value', 1):.3g})"
            state = "passed" if c["passed"] else ("not needed" if c.get("needed") is False else "FAILED")
            out.append(f"            {name}: {state} — {detail}")
    emp = nl.get("empirical")
    if emp:
        if emp.get("n"):
            out.append(f"            empirical null: {emp['exceed']} of {emp['n']} unrelated vectors match "
                       f">= the observed count (null mean {emp.get('null_matches_mean', 0):.1f}, max "
                       f"{emp.get('null_matches_max', 0)}); p = (1 + {emp['exceed']})/(1 + {emp['n']}) = "
                       f"{emp['p_value']:.3g}, resolution {emp['resolution']:.3g}")
        if emp.get("refused"):
            out.append(f"            refused: {emp['reason']}")
        out.append(f"            fair-coin p {fmt_p(nl['fair_coin_p'])} would not be valid for this key")
    return out


def _cands(loc: dict) -> str:
    return f" among {loc['candidates']} candidates" if loc["candidates"] > 1 else ""

"""wmaudit scan: every mark of every key against every weight of a file of unknown history."""
from __future__ import annotations

import argparse

from auditor import results
from auditor.backends.hardware import measured_on_lines
from auditor.commands import _types
from auditor.marks import stats
from auditor.marks.keys import load_keys  # noqa: F401 (re-exported)
from auditor.report import fmt_p

HELP = "forensic scan: every mark of every key against every weight, undoing obfuscation"
DESCRIPTION = """Scan MODEL for every white-box mark of every key (--key, repeatable; --keys DIR for every
*.json key in a folder), with no manifest and no names: every weight view is a candidate, after
undoing dummy / clique / split neurons, per-channel scales (with the key's BatchNorm anchors)
and permutations (fitted to the key, or aligned to the owner's --reference models). Every
p-value is Bonferroni-corrected for everything tried. Exit 0 when a mark is detected, 1 when
none, 2 on error or when a mark could not be read (a weight that could hold it is stored in a
layout the reader does not understand)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file")
    p.add_argument("--key", action="append", default=[], help="key file (repeatable)")
    p.add_argument("--keys", help="folder of key files (every *.json that is a wmaudit key)")
    p.add_argument("--reference", action="append", default=[], help="owner's reference ONNX model (repeatable)")
    p.add_argument("--alpha", type=_types.alpha, default=stats.DEFAULT_ALPHA, help="detection threshold (default 1e-6)")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")
    p.add_argument("-o", "--output", help="also write the result JSON to this file")


def run(args) -> int:
    import wmaudit

    r = wmaudit.scan(args.model, args.key, keys_dir=args.keys, references=args.reference, alpha=args.alpha,
                     command=results.command_line())
    results.emit(r.document, output=args.output, as_json=args.json, render=render)
    if r.exit_code == 2:  # nothing was judged: the one line says why (the result is written in full)
        _types.say_unreadable("scan", r.document["result"]["findings"])
    return r.exit_code


def render(doc: dict) -> str:
    r = doc["result"]
    t = r["tried"]
    lines = [f"model  {doc['model']['path']}  ({doc['model']['sha256'][:19]}…)",
             f"tried  {t['keys']} keys, {t['marks']} marks, {t['candidate_tensors']} candidate tensors, "
             f"{t['variants']} variants",
             f"       {t['correction']}"]
    if t.get("weight_views") is not None:
        held = t.get("peak_weight_bytes_held") or 0
        lines.insert(2, f"       read {t['weight_views_read']} of {t['weight_views']} weight views (the others fit no "
                        f"mark), at most {held / 2 ** 20:.1f} MiB of weights held at once")
    for f in r["findings"]:
        lines.append("")
        lines.append(f"mark {f['mark']} (key {f['key_commitment'][:19]}…): {f['param']} {f['shape']} "
                     f"reduce={f['reduce']}, {f['n_bits']} bits; evidence: {f['evidence'].get('kind')}")
        if "matches" in f:
            fd = f["found"]
            lines.append(f"  found     {fd['weight']} [{fd['transform']}] {fd['shape_in_file']} "
                         f"({fd['location']}, {fd['stored_dtype']}{', ' + fd['quant'] if fd.get('quant') else ''}; "
                         f"{fd['source']})")
            for u in f["undone"]:
                lines.append(f"  undone    {u}")
            lines.append(f"  bits      {f['matches']}/{f['n_bits']}  BER {f['ber']:.4f}  p {fmt_p(f['p_value'], f['log10_p'])}"
                         f"  corrected p {fmt_p(f['p_corrected'], f['log10_p_corrected'])}")
            lines.append(f"  margin    |x.w| min {f['margin_min']:.4g} median {f['margin_median']:.4g}  "
                         f"signed min {f['signed_margin_min']:.4g}")
        for n in f.get("notes", []):
            lines.append(f"  note      {n}")
        for n in f.get("not_searched", []):
            lines.append(f"  skipped   {n}")
        lines.append(f"  verdict   {f['verdict']} ({f['reason']})")
    for c in r.get("cannot_recover", []):
        lines.append(f"limit  {c}")
    lines.append("")
    lines.append(f"VERDICT: {r['verdict'].upper()} ({r['detected']} of {len(r['findings'])} marks detected)")
    return "\n".join(lines + measured_on_lines(doc))

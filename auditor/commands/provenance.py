"""wmaudit provenance: is a suspect model derived from the reference, or trained independently?"""
from __future__ import annotations

import argparse
from pathlib import Path

from auditor import results
from auditor.commands import _types
from auditor.errors import AuditError
from auditor.report import fmt_p

HELP = "is SUSPECT derived from REFERENCE (quantized, pruned, fine-tuned, obfuscated) or independent?"
DESCRIPTION = """Align SUSPECT to --reference layer by layer (dummy / split neurons removed, permutations and
scales undone), test each layer (exact sign test on held-out row correlations against
rho0) and combine the layers with Fisher's method. --null MODEL (repeatable): independently
trained models of the same architecture, run through the same test to measure the
false-positive rate. Exit 0 derived, 1 not derived, 2 error."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from auditor.forensics.provenance import DEFAULT_ALPHA, RHO0

    p.add_argument("model", help="suspect ONNX file")
    p.add_argument("--reference", required=True, help="owner's reference ONNX model")
    p.add_argument("--null", action="append", default=[], help="independently trained model (repeatable)")
    p.add_argument("--alpha", type=_types.alpha, default=DEFAULT_ALPHA, help="threshold on the combined p (1e-6)")
    p.add_argument("--rho0", type=float, default=RHO0, help="row correlation independent training stays below")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")
    p.add_argument("-o", "--output", help="also write the result JSON to this file")


def run(args) -> int:
    from auditor.forensics.provenance import provenance

    for f in [args.reference] + args.null:
        if not Path(f).is_file():
            raise AuditError(f"model not found: {f}")
    if not 0.0 <= args.rho0 < 1.0:
        raise AuditError("--rho0 must be in [0, 1)")
    body = provenance(args.model, args.reference, null_models=tuple(args.null), alpha=args.alpha, rho0=args.rho0)
    doc = results.envelope("provenance", model_path=args.model,
                           reference={"path": args.reference, "sha256": results.file_sha256(args.reference)},
                           result=body)
    results.emit(doc, output=args.output, as_json=args.json, render=render)
    return 0 if body["verdict"] == "derived" else 1


def render(doc: dict) -> str:
    r = doc["result"]
    lines = [f"suspect    {doc['model']['path']}  ({doc['model']['sha256'][:19]}…)",
             f"reference  {doc['reference']['path']}  ({doc['reference']['sha256'][:19]}…)",
             f"null       {r['null']}", ""]
    for l in r["layers"]:
        lines.append(f"  {l['weight']:<28} rows {l['rows_above_rho0']:>4}/{l['rows']:<4} above rho0  "
                     f"median r {l['median_r']:+.3f}  p {fmt_p(l['p_value'], l['log10_p'])}  ({l['matching']})")
    lines.append("")
    lines.append(f"Fisher X2 = {r['fisher_x2']:.1f} (df {r['df']}), combined p {fmt_p(r['p_combined'], r['log10_p_combined'])}")
    cal = r.get("calibration")
    if cal:
        lines.append(f"calibration: {cal['false_positives']}/{cal['n']} independent models called derived "
                     f"(smallest combined p 10^{cal['min_log10_p']:.1f})")
    lines.append(f"VERDICT: {r['verdict'].upper()} (alpha {r['alpha']:g})")
    return "\n".join(lines)

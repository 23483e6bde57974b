"""wmaudit provenance: is a suspect model derived from the reference, or trained independently?"""
from __future__ import annotations

import argparse
from pathlib import Path

from auditor import results
from auditor.backends.hardware import measured_on_lines
from auditor.commands import _types
from auditor.errors import AuditError
from auditor.report import fmt_p

HELP = "is SUSPECT derived from REFERENCE (quantized, pruned, fine-tuned, obfuscated) or independent?"
DESCRIPTION = """Align SUSPECT to --reference layer by layer (dummy / split neurons removed, permutations and
scales undone), test each layer (exact sign test on held-out row correlations against
rho0) and combine the layers with Fisher's method. --null MODEL (repeatable): independently
trained models of the same architecture, run through the same test to measure the
false-positive rate. Exit 0 derived, 1 not derived, 2 error.

--method phash --probes DATA [--layer T] [--suspect-layer T]: from behaviour instead, when the
weights cannot be aligned (another architecture, a distilled copy): the per-probe agreement of
the two models' perceptual hashes at one tensor (default: each model's first output) on held-out
probes; the score is its median, derived when it reaches --threshold (0.5). With --null models
the score is ranked among theirs (exact rank p, resolution 1/(n+1)) and the false-positive rate
at the threshold is measured; without them no p-value is given, only the decision rule and the
false-positive rate it was calibrated at."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from auditor.forensics.provenance import DEFAULT_ALPHA, RHO0

    p.add_argument("model", help="suspect ONNX file")
    p.add_argument("--reference", required=True, help="owner's reference ONNX model")
    p.add_argument("--null", action="append", default=[], help="independently trained model (repeatable)")
    p.add_argument("--alpha", type=_types.alpha, default=DEFAULT_ALPHA, help="threshold on the combined p (1e-6)")
    p.add_argument("--rho0", type=float, default=RHO0, help="row correlation independent training stays below")
    p.add_argument("--all-layers", action="store_true",
                   help="weights: also test every layer off the deepest chain (other residual branches, the classifier)")
    p.add_argument("--method", choices=("weights", "phash"), default="weights",
                   help="weights (align layers, default) or phash (behaviour on --probes)")
    p.add_argument("--probes", help="phash: probe inputs (.npy / .npz / image folder / IDX), checked against each model")
    p.add_argument("--layer", help="phash: tensor to compare (default: the first output of each model)")
    p.add_argument("--suspect-layer", help="phash: the suspect's (and null models') tensor, when named otherwise")
    p.add_argument("--threshold", type=float, default=None, help="phash: derived when the score reaches this (0.5)")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")
    p.add_argument("-o", "--output", help="also write the result JSON to this file")


def run(args) -> int:
    import wmaudit
    from auditor.forensics.provenance import DEFAULT_ALPHA, RHO0

    for f in [args.model, args.reference] + args.null:
        if not Path(f).is_file():
            raise AuditError(f"model not found: {f}")
    if args.method == "phash":
        given = [o for o, v in (("--all-layers", args.all_layers), ("--alpha", args.alpha != DEFAULT_ALPHA),
                                ("--rho0", args.rho0 != RHO0)) if v]
        if given:
            raise AuditError(f"{', '.join(given)}: only with --method weights")
        if not args.probes:
            raise AuditError("--method phash needs --probes (the probe inputs both models are run on)")
        kw = dict(probes=args.probes, layer=args.layer, suspect_layer=args.suspect_layer, threshold=args.threshold)
    else:
        given = [o for o, v in (("--probes", args.probes), ("--layer", args.layer),
                                ("--suspect-layer", args.suspect_layer), ("--threshold", args.threshold))
                 if v is not None]
        if given:
            raise AuditError(f"{', '.join(given)}: only with --method phash")
        if not 0.0 <= args.rho0 < 1.0:
            raise AuditError("--rho0 must be in [0, 1)")
        kw = dict(alpha=args.alpha, rho0=args.rho0, all_layers=args.all_layers)
    r = wmaudit.provenance(args.model, args.reference, null_models=args.null, method=args.method,
                           command=results.command_line(), **kw)
    results.emit(r.document, output=args.output, as_json=args.json, render=render)
    return r.exit_code


def render(doc: dict) -> str:
    r = doc["result"]
    lines = [f"suspect    {doc['model']['path']}  ({doc['model']['sha256'][:19]}…)",
             f"reference  {doc['reference']['path']}  ({doc['reference']['sha256'][:19]}…)",
             f"method     {r.get('method', 'weights')}"]
    if r.get("method") == "phash":
        return "\n".join(lines + _render_phash(r) + measured_on_lines(doc))
    lines += [f"null       {r['null']}"] + ([f"meaning    {r['derived_means']}"] if r.get("derived_means") else []) + [""]
    for l in r["layers"]:
        lines.append(f"  {l['weight']:<28} rows {l['rows_above_rho0']:>4}/{l['rows']:<4} above rho0  "
                     f"median r {l['median_r']:+.3f}  p {fmt_p(l['p_value'], l['log10_p'])}  ({l['matching']})")
    lines.append("")
    if "branches" in r:
        lines.append(f"deepest chain: Fisher X2 = {r['fisher_x2']:.1f} (df {r['df']}), p 10^{r['log10_p_main_chain']:.1f} "
                     f"(Bonferroni over {r['candidates']} suspect chains)")
        for b in r["branches"]:
            lines.append(f"chain to {b['last']}:")
            for l in b["layers"]:
                lines.append(f"  {l['weight']:<28} rows {l['rows_above_rho0']:>4}/{l['rows']:<4} above rho0  "
                             f"median r {l['median_r']:+.3f}  p {fmt_p(l['p_value'], l['log10_p'])}  ({l['matching']})")
            lines.append(f"  chain p 10^{b['log10_p_combined']:.1f} (Bonferroni over {b['candidates']} suspect chains)")
        for u in r["untested"]:
            lines.append(f"untested: {u['weight']}: {u['reason']}")
        lines.append(f"{r['chains']} chains, Fisher X2 = {r['fisher_x2_chains']:.1f} (df {r['df_chains']}), "
                     f"combined p {fmt_p(r['p_combined'], r['log10_p_combined'])}")
    else:
        lines.append(f"Fisher X2 = {r['fisher_x2']:.1f} (df {r['df']}), combined p "
                     f"{fmt_p(r['p_combined'], r['log10_p_combined'])}")
    cal = r.get("calibration")
    if cal:
        lines.append(f"calibration: {cal['false_positives']}/{cal['n']} independent models called derived "
                     f"(smallest combined p 10^{cal['min_log10_p']:.1f})")
    lines.append(f"VERDICT: {r['verdict'].upper()} (alpha {r['alpha']:g})")
    return "\n".join(lines + measured_on_lines(doc))


def _render_phash(r: dict) -> list[str]:
    pr, pp, at, cal = r["probes"], r["per_probe"], r["agreement_test"], r["calibration"]
    lines = [f"probes     {pr['path']}: {pr['count']} ({pr['fit']} fit the centres, {pr['tested']} tested), "
             f"sha256 {pr['sha256'][:19]}… of {pr['sha256_of']}",
             f"layers     reference {r['layers']['reference']}, suspect {r['layers']['suspect']} ({r['units']} values)",
             "",
             f"score      {r['score']:+.4f} = {r['statistic']} (threshold {r['threshold']:g}; "
             f"{pp['above_threshold']}/{pp['tested']} probes above, 5th percentile {pp['p05']:+.3f})",
             f"agreement  p {fmt_p(at['p_value'], at['log10_p'])} under H0: {at['null']}",
             f"null       {r['null']}"]
    if cal.get("n"):
        lines.append(f"calibration: score above {cal['rank_above']} of {cal['n']} independent models "
                     f"(largest {cal['max_null_score']:+.4f}); rank p {r['p_value']:.3g} "
                     f"(resolution {r['p_resolution']:.3g}); false positives at the threshold "
                     f"{cal['false_positives']}/{cal['n']}")
    else:
        lines.append("calibration: none (no --null models), so no p-value; " + r["decision"])
    lines.append(f"VERDICT: {r['verdict'].upper()} ({r['decision'] if cal.get('n') else 'decision rule'})")
    return lines

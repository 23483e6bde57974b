"""wmaudit query: black-box detection by querying the key images (trigger set, logo)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from auditor.commands import _types
from auditor import results
from auditor.marks import stats
from auditor.marks.query import check_key_images, query_model  # noqa: F401
from auditor.report import fmt_p
from auditor.backends.hardware import measured_on_lines

HELP = "query a model with the key's trigger set / logo key images and test the answers"
DESCRIPTION = """Query MODEL with the black-box key images of --key on each --target and judge the
answers: trigger accuracy with an exact binomial p-value against a null rate (measured on
--reference unmarked models, else the key's recorded one, else 1/C); logo decoded from 1, 3,
5, 10, 20 key images per group, Pearson r and a seeded permutation p-value. Optional
--query-attack processes every key image first (jpeg:Q, noise:S[:SEED], resize:F, crop:F,
rotate:DEG, shift:DX,DY). With several --target, every target is queried and the mark counts as
detected only where it is detected on all of them. Exit 0 = detected, 1 = not detected or
insufficient evidence, 2 = error."""



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file to query")
    p.add_argument("--key", required=True, help="key.json with a blackbox section")
    _types.add_target_argument(p)
    p.add_argument("--reference", action="append", default=[], metavar="UNMARKED.onnx",
                   help="unmarked reference model for the trigger null rate (repeatable)")
    p.add_argument("--query-attack", metavar="SPEC", help="process key images before querying, e.g. jpeg:50")
    p.add_argument("--attack-seed", type=int, default=0, help="seed of random query attacks (noise)")
    p.add_argument("--logo-out", metavar="DIR", help="write decoded logos as PNG (logo_k<K>.png)")
    p.add_argument("--batch-size", type=_types.positive_int, default=64)
    p.add_argument("--permutations", type=_types.positive_int, default=10_000,
                   help="permutations per key-image count (the verdict uses enough for alpha)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation test")
    p.add_argument("--alpha", type=_types.alpha, default=stats.DEFAULT_ALPHA)
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def _human(doc: dict[str, Any]) -> str:
    lines = [f"model    {doc['model']['path']}  ({doc['backend']})"]
    if doc.get("query_attack"):
        lines.append(f"attack   {doc['query_attack']} (seed {doc['attack_seed']})")
    t = doc.get("triggers")
    if t:
        src = t["null_rate_source"]["source"]
        lines.append(f"triggers {t['hits']}/{t['n']} = {t['trigger_accuracy']:.3f}  null rate {t['null_rate']:.4g} "
                     f"({src})  p = {fmt_p(t['p_value'])}  -> {t['verdict']}")
    lg = doc.get("logo")
    if lg:
        for d in lg["per_k"]:
            lines.append(f"logo k={d['k']:>2}  r = {d['r']:+.3f}  p = {fmt_p(d['p_value'])} "
                         f"({d['n_perm']} permutations)")
        lines.append(f"logo     k={lg['k']}  p = {fmt_p(lg['p_value'])} by the {lg.get('p_method', 'permutation test')} "
                     f"({lg.get('margin_log10', 0):.1f} decades below alpha; smallest possible p "
                     f"{lg['resolution_limit']:.3g})  -> {lg['verdict']}")
        for k, path in (lg.get("png") or {}).items():
            lines.append(f"png      k={k}: {path}")
    for name, r in (doc.get("targets") or {}).items():
        tv = r["verdict"]
        lines.append(f"target   {name:10s} {tv['verdict']:>20s}  p = {tv['p_corrected']:.6g} ({tv['best_mark']})")
    v = doc["verdict"]
    ev = doc.get("evidence")
    if ev:
        lines.append(f"evidence {ev['kind'].upper()}: {ev['sentence']}")
    lines.append(f"verdict  {v['verdict'].upper()}  (best mark: {v['best_mark']}, p = {v['p_corrected']:.6g} "
                 f"corrected for {v['marks_tested']} mark(s), alpha = {v['alpha']:g})")
    lines += measured_on_lines(doc)
    return "\n".join(lines) + "\n"


def run(args) -> int:
    import wmaudit

    r = wmaudit.query(args.model, args.key, targets=_types.targets_of(args), references=args.reference,
                      attack=args.query_attack, attack_seed=args.attack_seed, batch_size=args.batch_size,
                      permutations=args.permutations, seed=args.seed, alpha=args.alpha, logo_out=args.logo_out,
                      command=results.command_line())
    sys.stdout.write(results.dumps(r.document) if args.json else _human(r.document))
    return r.exit_code

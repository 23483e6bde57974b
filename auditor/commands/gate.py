"""wmaudit gate: hold a model to a release policy before it ships."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from auditor import results
from auditor.errors import AuditError
from auditor.marks.manifest import default_manifest  # noqa: F401 (re-exported)

HELP = "check a model against a release policy (attacks it must survive, thresholds); JUnit for CI"
DESCRIPTION = """Apply every attack the policy names to MODEL, extract the key's marks from each
attacked model, measure task accuracy on the policy's backends, and hold every
piece of evidence to the policy's thresholds. Exit 0 when every requirement is
met, 1 when any is not (each failing requirement is listed), 2 on an error
(malformed policy, unreadable model or key)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file to release")
    p.add_argument("--key", required=True, help="key file (wmaudit-key/1 JSON)")
    p.add_argument("--policy", required=True, help="release policy (TOML, see examples/release-policy.toml)")
    p.add_argument("--manifest", help="exporter manifest (default: manifest.json next to the model, "
                                      "when it describes this file)")
    p.add_argument("--reference", metavar="REF.onnx",
                   help="owner's model with BatchNorm kept, to undo BN folding (default: the key's anchors, "
                        "else the model itself where a BN follows the marked conv)")
    from auditor.data.inputs import add_data_arguments

    add_data_arguments(p)
    p.add_argument("--samples", type=int, help="examples for accuracy / fidelity (overrides accuracy.samples)")
    p.add_argument("--seed", type=int, help="seed of the data subsets (overrides accuracy.seed and calibration.seed)")
    p.add_argument("--junit", metavar="OUT.xml", help="write JUnit XML (one testcase per requirement)")
    p.add_argument("-o", "--output", metavar="OUT.json", help="write the result JSON to this file")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def _write_text(path: str, text: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)


def with_data_args(policy, args):
    """The policy with the command line's data options in place of its [data] table."""
    import dataclasses

    kw = {}
    if args.data:
        kw["data_source"] = args.data
        kw["calibration_data"] = None
    if args.labels:
        kw["data_labels"] = args.labels
    if args.preprocess:
        kw["data_preprocess"] = args.preprocess
    if args.samples is not None:
        if args.samples < 1:
            raise AuditError("--samples must be >= 1")
        kw["accuracy_samples"] = args.samples
    if args.seed is not None:
        kw["accuracy_seed"] = kw["calibration_seed"] = args.seed
    return dataclasses.replace(policy, **kw) if kw else policy


def preprocess_for(policy, args):
    import dataclasses

    from auditor.data.inputs import parse_preprocess, preprocess_from_args

    pre = preprocess_from_args(args)
    if not args.preprocess and policy.data_preprocess:
        base = parse_preprocess(policy.data_preprocess)
        changed = {f.name: getattr(pre, f.name) for f in dataclasses.fields(pre)
                   if getattr(pre, f.name) != f.default}
        pre = dataclasses.replace(base, **changed)
    return pre


def run(args) -> int:
    from auditor.marks.manifest import load_manifest
    from auditor.gate.gate import exit_code, gate_document
    from auditor.marks.keys import load_key
    from auditor.gate.policy import load_policy
    from auditor.report import junit, terminal

    # policy first: a malformed policy is reported before any model work starts
    policy = with_data_args(load_policy(args.policy), args)
    key = load_key(args.key)
    if not Path(args.model).is_file():
        raise AuditError(f"model not found: {args.model}")
    manifest = load_manifest(args.manifest) if args.manifest else default_manifest(args.model)
    if args.reference is not None and not Path(args.reference).is_file():
        raise AuditError(f"reference model not found: {args.reference}")
    n = 1 + len(policy.attacks)
    with terminal.Progress(n, "gate") as progress:
        doc = gate_document(args.model, key, policy, policy_path=args.policy, manifest=manifest,
                            progress=progress, reference=args.reference,
                            preprocess=preprocess_for(policy, args))
    if args.output:
        results.write_result(args.output, doc)
    if args.junit:
        _write_text(args.junit, junit.render(doc))
    if args.json:
        sys.stdout.write(results.dumps(doc))
    else:
        sys.stdout.write(terminal.render_gate(doc))
        for r in doc["requirements"]:
            if r["status"] != "pass":
                print(f"FAILED {r['id']}: {r['message']}", file=sys.stderr)
    return exit_code(doc)

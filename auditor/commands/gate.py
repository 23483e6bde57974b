"""wmaudit gate: hold a model to a release policy before it ships."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from auditor import results
from auditor.errors import AuditError

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
    p.add_argument("--junit", metavar="OUT.xml", help="write JUnit XML (one testcase per requirement)")
    p.add_argument("-o", "--output", metavar="OUT.json", help="write the result JSON to this file")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def default_manifest(model: str | os.PathLike) -> dict | None:
    """manifest.json beside the model, when it names this model file."""
    from auditor.commands.extract import load_manifest

    m = Path(model).with_name("manifest.json")
    if not m.is_file():
        return None
    try:
        doc = load_manifest(str(m))
    except AuditError:
        return None  # not a manifest of ours: the gate locates weights without it
    if doc.get("onnx") in (None, Path(model).name) and isinstance(doc.get("params"), dict):
        return doc
    return None


def _write_text(path: str, text: str) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)


def run(args) -> int:
    from auditor.commands.extract import load_manifest
    from auditor.gate.gate import exit_code, gate_document
    from auditor.marks.keys import load_key
    from auditor.gate.policy import load_policy
    from auditor.report import junit, terminal

    # policy first: a malformed policy is reported before any model work starts
    policy = load_policy(args.policy)
    key = load_key(args.key)
    if not Path(args.model).is_file():
        raise AuditError(f"model not found: {args.model}")
    manifest = load_manifest(args.manifest) if args.manifest else default_manifest(args.model)
    n = 1 + len(policy.attacks)
    with terminal.Progress(n, "gate") as progress:
        doc = gate_document(args.model, key, policy, policy_path=args.policy, manifest=manifest,
                            progress=progress)
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

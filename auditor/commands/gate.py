"""wmaudit gate: hold a model to a release policy before it ships."""
from __future__ import annotations

import argparse
import sys

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
    from auditor.backends.targets import target_name

    p.add_argument("--target", action="append", type=target_name, metavar="TARGET",
                   help="also run the attacked models on this target (repeatable; added to the policy's "
                        "targets, never replacing them)")
    p.add_argument("--mlflow", metavar="TRACKING_URI",
                   help="log one MLflow run (metrics per attack and backend, result JSON and HTML report, "
                        "the verdict as the tag wmaudit.verdict)")
    p.add_argument("--mlflow-experiment", default="wmaudit", help="MLflow experiment (default wmaudit)")
    p.add_argument("-o", "--output", metavar="OUT.json", help="write the result JSON to this file")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def _preprocess_arg(args):
    """--preprocess text replaces the policy's preprocessing; the single flags override the fields they set."""
    from auditor.data.inputs import preprocess_from_args

    single = any(getattr(args, k, None) is not None for k in ("image_size", "layout", "scale", "mean", "std"))
    if args.preprocess and not single:
        return args.preprocess
    return preprocess_from_args(args) if (args.preprocess or single) else None


def run(args) -> int:
    import wmaudit
    from auditor.report import terminal

    if args.samples is not None and args.samples < 1:
        raise AuditError("--samples must be >= 1")
    from auditor.gate.policy import load_policy

    policy = load_policy(args.policy)  # a malformed policy is reported before any model work starts
    with terminal.Progress(1 + len(policy.attacks), "gate") as progress:
        r = wmaudit.gate(args.model, args.key, args.policy, manifest=args.manifest, reference=args.reference,
                         data=args.data, labels=args.labels, preprocess=_preprocess_arg(args),
                         samples=args.samples, seed=args.seed, output=args.output, junit=args.junit,
                         mlflow=args.mlflow, mlflow_experiment=args.mlflow_experiment, progress=progress,
                         targets=args.target,
                         command=results.command_line())
    doc = r.document
    if args.json:
        sys.stdout.write(results.dumps(doc))
    else:
        sys.stdout.write(terminal.render_gate(doc))
        for req in doc["requirements"]:
            if req["status"] != "pass":
                print(f"FAILED {req['id']}: {req['message']}", file=sys.stderr)
    return r.exit_code

"""wmaudit robustness: does the mark survive a grid of deployment attacks?"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from auditor.commands import _types
from auditor import results
from auditor.errors import AuditError

HELP = "run a grid of pruning / quantization attacks and measure the mark and the task"
DESCRIPTION = """Attack MODEL with every config of --grid (TOML; a default grid of pruning rates x
quantization modes x fp16 otherwise), extract the white-box marks of --key from each
attacked model and measure what the task lost on --data: fidelity against the
unattacked model (top-1 agreement, cosine, SQNR; no labels needed) and accuracy when
the data has labels (Fashion-MNIST's test split by default for [N,1,28,28] models). Writes
DIR/results.json (and DIR/models/*.onnx with --save-models). Exit 0 when the mark
survives every config, 1 otherwise, 2 on error."""



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="marked ONNX file")
    p.add_argument("--key", required=True, help="key file (wmaudit-key/1 JSON)")
    p.add_argument("--grid", help="grid TOML (default: built-in grid)")
    from auditor.data.inputs import add_data_arguments

    add_data_arguments(p)
    p.add_argument("--calibration-samples", type=_types.positive_int, default=256)
    p.add_argument("--samples", "--heldout", dest="samples", type=_types.positive_int, default=2000,
                   help="examples for accuracy / fidelity (seeded subset of --data)")
    p.add_argument("--no-accuracy", action="store_true", help="skip accuracy and fidelity (marks only)")
    p.add_argument("--manifest", help="exporter manifest (default: manifest.json next to MODEL, if any)")
    p.add_argument("--reference", help="owner's model with BatchNorm kept, to undo BN folding (default: "
                                       "the key's anchors, else MODEL itself where a BN follows the conv)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration and evaluation subsets "
                                                      "(and of synthetic data)")
    p.add_argument("--jobs", type=_types.positive_int, help="worker processes (default: all cores)")
    p.add_argument("--save-models", action="store_true", help="keep the attacked models in DIR/models/")
    p.add_argument("-o", "--output", required=True, help="output folder (results.json)")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def run(args) -> int:
    from auditor.attacks import load_model
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data, preprocess_from_args
    from auditor.marks.keys import load_key
    from auditor.gate.robustness import default_grid, load_grid, load_manifest, run_grid
    from auditor.commands.extract import load_manifest as load_manifest_file

    model = Path(args.model)
    if not model.is_file():
        raise AuditError(f"model not found: {model}")
    key = load_key(args.key)
    grid = load_grid(args.grid) if args.grid else default_grid()
    from auditor.read.weights import WeightStore

    WeightStore.open(model)  # a malformed model is refused before any data set is loaded
    manifest = load_manifest_file(args.manifest) if args.manifest else load_manifest(model)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise AuditError(f"-o {out} exists and is not a folder")
    from auditor.gate.robustness import _static_prefix

    if args.reference is not None and not Path(args.reference).is_file():
        raise AuditError(f"reference model not found: {args.reference}")
    proto = load_model(model)
    pre = preprocess_from_args(args)
    # data is read and checked against the model's inputs before any attack runs
    evaluation = None if args.no_accuracy else load_data(args.data, proto, purpose="evaluation",
                                                         samples=args.samples, seed=args.seed,
                                                         labels=args.labels, preprocess=pre)
    calibration = None
    if any(_static_prefix(c.steps) is not None for c in grid.configs):
        calibration = Calibration(load_data(args.data, proto, purpose="calibration",
                                            samples=args.calibration_samples, seed=args.seed,
                                            labels=None, preprocess=pre))
    del proto
    doc = run_grid(model, key, grid, calibration, evaluation=evaluation, manifest=manifest, jobs=args.jobs,
                   models_dir=out / "models" if args.save_models else None, reference=args.reference)
    results.write_result(out / "results.json", doc)
    if args.json:
        sys.stdout.write(results.dumps(doc))
    else:
        print(render(doc))
    return 0 if doc["summary"]["all_survived"] else 1


def render(doc: dict) -> str:
    """A table: config, BER, log10 p (corrected, as extract reports it), min margin, normalised
    min margin, accuracy, top-1 agreement and SQNR against the unattacked model, verdict."""
    lines = []
    ev = doc.get("evaluation")
    if ev and ev.get("synthetic"):
        lines.append(f"note: {ev['caveat']}")
    lines.append(f"{'config':44s} {'BER':>6s} {'log10 p':>8s} {'m_min':>7s} {'nm_min':>7s} {'acc':>6s} "
                 f"{'agree':>6s} {'SQNR dB':>8s}  verdict")

    def row(name, r):
        mk = r["marks"][0]
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        bn = f" (BN {mk['batchnorm']})" if mk.get("batchnorm") in ("folded", "probably-folded") else ""
        fid = r.get("fidelity") or {}
        agree = f"{fid['top1_agreement']:.3f}" if "top1_agreement" in fid else "-"
        sq = f"{fid['sqnr_db']:.1f}" if isinstance(fid.get("sqnr_db"), (int, float)) else "-"
        lp = mk.get("log10_p_corrected", mk["log10_p"])
        ber = f"{mk['ber']:6.3f}" if mk.get("ber") is not None else "unread"  # None: the mark could not be read
        return (f"{name[:44]:44s} {ber:>6s} {lp:8.1f} {mk['margin_min']:7.3f} "
                f"{mk.get('normalized_margin_min', 0.0):7.4f} {acc:>6s} {agree:>6s} {sq:>8s}  {r['verdict']}{bn}")

    lines.append(row("(unattacked)", doc["baseline"]))
    lines += [row(r["name"], r) for r in doc["configs"]]
    s = doc["summary"]
    if doc.get("reference"):
        lines.append(f"reference {doc['reference']['path']}: BatchNorm folding undone with the owner's model")
    hints = {n for r in [doc["baseline"]] + doc["configs"] for mk in r["marks"] for n in mk.get("notes", [])
             if "--reference" in n}
    lines += [f"note: {h}" for h in sorted(hints)[:1]]
    lines.append(f"survived {s['survived']}/{s['configs']}" + (f"; broken by: {', '.join(s['broken'])}"
                                                              if s["broken"] else "")
                 + (f"; could not read the mark after: {', '.join(s['unreadable'])}" if s.get("unreadable") else ""))
    ev = doc.get("evidence")
    if ev:
        lines.append(f"evidence: {ev['kind']} ({ev['sentence']})")
    return "\n".join(lines)

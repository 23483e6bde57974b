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
    _types.add_target_argument(p)
    p.add_argument("--min-top1-agreement", type=_unit, metavar="A",
                   help="a config leaves the model usable when its top-1 agreement with the unattacked model "
                        "is at least A (default 0.90); survival is counted on usable configs only")
    p.add_argument("--max-accuracy-drop", type=_points, metavar="D",
                   help="... and its accuracy drop (labelled data) at most D percentage points (default 5)")
    p.add_argument("--mlflow", metavar="TRACKING_URI",
                   help="log one MLflow run (metrics per config, result JSON and HTML report, verdict tag)")
    p.add_argument("--mlflow-experiment", default="wmaudit", help="MLflow experiment (default wmaudit)")
    p.add_argument("-o", "--output", required=True, help="output folder (results.json)")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def _points(s: str) -> float:
    """Percentage points in [0, 100]."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 <= v <= 100.0:
        raise argparse.ArgumentTypeError("must be in [0, 100] percentage points")
    return v


def _unit(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("must be in [0, 1]")
    return v


def run(args) -> int:
    import wmaudit
    from auditor.data.inputs import preprocess_from_args

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise AuditError(f"-o {out} exists and is not a folder")
    r = wmaudit.robustness(args.model, args.key, grid=args.grid, data=args.data, labels=args.labels,
                           preprocess=preprocess_from_args(args), samples=args.samples,
                           calibration_samples=args.calibration_samples, accuracy=not args.no_accuracy,
                           manifest=args.manifest, reference=args.reference, seed=args.seed, jobs=args.jobs,
                           output_dir=out, save_models=args.save_models,
                           min_top1_agreement=args.min_top1_agreement, max_accuracy_drop=args.max_accuracy_drop,
                           mlflow=args.mlflow, mlflow_experiment=args.mlflow_experiment, progress=True,
                           targets=_types.targets_of(args),
                           command=results.command_line())
    if args.json:
        sys.stdout.write(results.dumps(r.document))
    else:
        print(render(r.document))
    return r.exit_code


def render(doc: dict) -> str:
    """A table: config, BER, log10 p (corrected, as extract reports it), min margin, normalised
    min margin, accuracy, top-1 agreement and SQNR against the unattacked model, whether the
    model stayed usable, the mark's verdict; then the headline (survival on usable configs)."""
    from auditor.gate.usability import headline
    from auditor.report.terminal import table

    lines = []
    ev = doc.get("evaluation")
    if ev and ev.get("synthetic"):
        lines.append(f"note: {ev['caveat']}")

    def row(name, r):
        mk = r["marks"][0]
        bn = f" (BN {mk['batchnorm']})" if mk.get("batchnorm") in ("folded", "probably-folded") else ""
        fid = r.get("fidelity") or {}
        sq = fid.get("sqnr_db")
        model = {True: "usable", False: "BROKEN", None: "-"}[r.get("usable")] if "usable" in r else ""
        ber = f"{mk['ber']:.3f}" if mk.get("ber") is not None else "unread"  # None: the mark could not be read
        return [name, ber, f"{mk.get('log10_p_corrected', mk['log10_p']):.1f}",
                f"{mk['margin_min']:.3f}", f"{mk.get('normalized_margin_min', 0.0):.4f}",
                f"{r['accuracy']:.3f}" if "accuracy" in r else "-",
                f"{fid['top1_agreement']:.3f}" if "top1_agreement" in fid else "-",
                f"{sq:.1f}" if isinstance(sq, (int, float)) else "-", model, f"{r['verdict']}{bn}"]

    body = [row("(unattacked)", doc["baseline"])] + [row(r["name"], r) for r in doc["configs"]]
    lines.append(table(["config", "BER", "log10 p", "m_min", "nm_min", "acc", "agree", "SQNR dB", "model",
                        "mark"], body, align="lrrrrrrrll", max_width=60).rstrip("\n"))
    if doc.get("reference"):
        lines.append(f"reference {doc['reference']['path']}: BatchNorm folding undone with the owner's model")
    hints = {n for r in [doc["baseline"]] + doc["configs"] for mk in r["marks"] for n in mk.get("notes", [])
             if "--reference" in n}
    lines += [f"note: {h}" for h in sorted(hints)[:1]]
    lines.append(headline(doc["summary"]) + (f"; could not read the mark after: "
                                             f"{', '.join(doc['summary']['unreadable'])}"
                                             if doc["summary"].get("unreadable") else ""))
    ev = doc.get("evidence")
    if ev:
        lines.append(f"evidence: {ev['kind']} ({ev['sentence']})")
    lines += matrix_lines(doc)
    from auditor.backends.hardware import measured_on_lines
    from auditor.gate.targets import gap_lines

    lines += gap_lines(doc.get("hardware_notes") or [])
    lines += measured_on_lines(doc)
    return "\n".join(lines)


def matrix_lines(doc: dict) -> list[str]:
    """The attack x target matrix (SQNR dB / top-1 agreement per target), when several targets ran."""
    m = doc.get("matrix")
    if not m or len(m["targets"]) < 2:
        return []
    ts = m["targets"]
    out = ["", f"{'attack x target':44s} " + " ".join(f"{t:>18s}" for t in ts) + "  mark"]
    for r in m["rows"]:
        cells = []
        for t in ts:
            c = r["cells"][t]
            sq = f"{c['sqnr_db']:.1f} dB" if isinstance(c.get("sqnr_db"), (int, float)) else "-"
            ag = f"{c['top1_agreement']:.3f}" if isinstance(c.get("top1_agreement"), (int, float)) else "-"
            cells.append(f"{sq + ' / ' + ag:>18s}")
        out.append(f"{r['attack'][:44]:44s} " + " ".join(cells) + f"  {r['mark']}")
    return out

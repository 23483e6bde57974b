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
attacked model and measure accuracy on the Fashion-MNIST test split. Writes
DIR/results.json (and DIR/models/*.onnx with --save-models). Exit 0 when the mark
survives every config, 1 otherwise, 2 on error."""



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="marked ONNX file")
    p.add_argument("--key", required=True, help="key file (wmaudit-key/1 JSON)")
    p.add_argument("--grid", help="grid TOML (default: built-in grid)")
    p.add_argument("--data", default="fashion-mnist", help="calibration inputs: fashion-mnist or a .npy file")
    p.add_argument("--calibration-samples", type=_types.positive_int, default=256)
    p.add_argument("--heldout", type=_types.positive_int, default=2000, help="Fashion-MNIST test images for accuracy")
    p.add_argument("--no-accuracy", action="store_true", help="skip accuracy (non-Fashion-MNIST models)")
    p.add_argument("--manifest", help="exporter manifest (default: manifest.json next to MODEL, if any)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration and held-out subsets")
    p.add_argument("--jobs", type=_types.positive_int, help="worker processes (default: all cores)")
    p.add_argument("--save-models", action="store_true", help="keep the attacked models in DIR/models/")
    p.add_argument("-o", "--output", required=True, help="output folder (results.json)")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def run(args) -> int:
    from auditor.data.accuracy import fashion_mnist_heldout
    from auditor.data.calibration import Calibration, calibration_data
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
    heldout = None if args.no_accuracy else fashion_mnist_heldout(args.heldout, args.seed)
    calibration = Calibration(calibration_data(args.data, args.calibration_samples, args.seed))
    doc = run_grid(model, key, grid, calibration, heldout=heldout, manifest=manifest, jobs=args.jobs,
                   models_dir=out / "models" if args.save_models else None)
    results.write_result(out / "results.json", doc)
    if args.json:
        sys.stdout.write(results.dumps(doc))
    else:
        print(render(doc))
    return 0 if doc["summary"]["all_survived"] else 1


def render(doc: dict) -> str:
    """A table: config, BER, log10 p, min margin, accuracy, verdict."""
    lines = [f"{'config':44s} {'BER':>6s} {'log10 p':>8s} {'m_min':>7s} {'acc':>6s}  verdict"]

    def row(name, r):
        mk = r["marks"][0]
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        return (f"{name[:44]:44s} {mk['ber']:6.3f} {mk['log10_p']:8.1f} {mk['margin_min']:7.3f} {acc:>6s}  "
                f"{r['verdict']}")

    lines.append(row("(unattacked)", doc["baseline"]))
    lines += [row(r["name"], r) for r in doc["configs"]]
    s = doc["summary"]
    lines.append(f"survived {s['survived']}/{s['configs']}" + (f"; broken by: {', '.join(s['broken'])}"
                                                              if s["broken"] else ""))
    return "\n".join(lines)

"""wmaudit attack: apply deployment attacks (pruning, int8, fp16, int4) to an ONNX file."""
from __future__ import annotations

import argparse
import sys

from auditor import results
from auditor.errors import AuditError

HELP = "prune / quantize / convert an ONNX model the way a deployer would"
DESCRIPTION = """Apply pruning and quantization to MODEL and write the attacked model to -o OUT.
Steps run in --order (default: prune, then quantize). Quantization uses onnxruntime's
own tools; static modes calibrate on --data (.npy, .npz, image folder, IDX, synthetic;
Fashion-MNIST's train split by default for [N,1,28,28] models).
Prints the parameters used; exit 0 on success, 2 on bad input."""

QUANT_CHOICES = ("dynamic", "static-qdq", "static-qdq-per-channel", "static-qop",
                 "static-qop-per-channel", "fp16", "int4")


def _rate(s: str) -> float:
    try:
        r = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 <= r < 1.0:
        raise argparse.ArgumentTypeError("pruning rate must be in [0, 1)")
    return r


def add_arguments(p: argparse.ArgumentParser) -> None:
    from auditor.attacks.prune import MODES as PRUNE_MODES
    from auditor.data.calibration import METHODS

    p.add_argument("model", help="ONNX file")
    p.add_argument("--prune", type=_rate, help="pruning rate in [0, 1)")
    p.add_argument("--prune-mode", choices=PRUNE_MODES, default="magnitude")
    p.add_argument("--prune-seed", type=int, default=0, help="seed of random pruning")
    p.add_argument("--quantize", choices=QUANT_CHOICES)
    p.add_argument("--calibration", choices=METHODS, default="minmax", help="static calibration method")
    from auditor.data.inputs import add_data_arguments

    add_data_arguments(p)
    p.add_argument("--calibration-samples", "--samples", dest="calibration_samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    p.add_argument("--reduce-range", action="store_true", help="7-bit weights (onnxruntime reduce_range)")
    p.add_argument("--weight-type", choices=("int8", "uint8"), default="int8")
    p.add_argument("--fold-batchnorm", action="store_true",
                   help="let quant_pre_process fold BatchNorm into conv weights (kept by default)")
    p.add_argument("--order", default="prune,quantize", help="order of the steps (prune,quantize or quantize,prune)")
    p.add_argument("-o", "--output", required=True, help="attacked ONNX file (written atomically)")
    from auditor.backends.targets import target_name

    p.add_argument("--target", action="append", type=target_name, metavar="TARGET",
                   help="measure the attacked model against the original on --data on this target "
                        "(repeatable: native, x86-64-v3, x86-64-v2, aarch64, ort-cuda, ort-trt, tensorrt)")
    p.add_argument("--eval-samples", type=int, default=512, help="examples for the --target evaluation")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def steps_from_args(args) -> str:
    order = [s.strip() for s in args.order.split(",") if s.strip()]
    if sorted(order) != ["prune", "quantize"]:
        raise AuditError(f"--order must name prune and quantize once each, got {args.order!r}")
    parts = []
    for kind in order:
        if kind == "prune" and args.prune is not None:
            parts.append(f"prune:{args.prune:g}:{args.prune_mode}")
        if kind == "quantize" and args.quantize:
            parts.append(args.quantize if args.quantize in ("fp16", "int4") else f"quantize:{args.quantize}")
    if not parts:
        raise AuditError("nothing to do: give --prune and/or --quantize")
    return ",".join(parts)


def run(args) -> int:
    from auditor.attacks import load_model, write_model
    from auditor.attacks.compose import compose
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data, preprocess_from_args

    steps = steps_from_args(args)
    if args.calibration_samples < 1:
        raise AuditError("--calibration-samples must be >= 1")
    model = load_model(args.model)
    targets, evaluation = [], None
    if args.target:
        from auditor.backends.targets import check_available, resolve

        targets = list(dict.fromkeys(resolve(t).name for t in args.target))
        check_available(targets)
        if args.eval_samples < 1:
            raise AuditError("--eval-samples must be >= 1")
        evaluation = load_data(args.data, model, purpose="evaluation", samples=args.eval_samples,
                               seed=args.seed, labels=args.labels, preprocess=preprocess_from_args(args))
    calibration = None
    if "static" in steps:
        calibration = Calibration(load_data(args.data, model, purpose="calibration",
                                            samples=args.calibration_samples, seed=args.seed,
                                            labels=args.labels, preprocess=preprocess_from_args(args)))
    r = compose(model, steps, calibration, calibration_method=args.calibration, prune_seed=args.prune_seed,
                reduce_range=args.reduce_range, weight_type=args.weight_type,
                keep_batchnorm=not args.fold_batchnorm)
    out = write_model(r.model, args.output)
    extra = {}
    if targets:
        from auditor.backends import hardware
        from auditor.gate.targets import fidelity_gaps, fidelity_on_targets

        per, hw = fidelity_on_targets(args.model, out, evaluation, targets)
        extra = {"targets": per, "evaluation": evaluation.describe(), "hardware": hardware.combine(hw)}
        gaps = fidelity_gaps([(steps, steps, per)], hw)
        if gaps:
            extra["hardware_notes"] = gaps
    doc = results.envelope("attack", model_path=args.model, output={"path": str(out),
                           "sha256": results.file_sha256(out)}, steps=steps, params=r.params,
                           notes=r.notes, simulated=r.simulated, **extra,
                           **({"calibration": calibration.data.describe()} if calibration is not None else {}))
    if args.json:
        sys.stdout.write(results.dumps(doc))
    else:
        print(f"{args.model} -> {out}: {steps}" + ("  [simulated]" if r.simulated else ""))
        for n in r.notes:
            print(f"  {n}")
        if calibration is not None and calibration.data.synthetic:
            print(f"  note: {calibration.data.describe()['caveat']}")
        if targets:
            from auditor.backends.hardware import measured_on_lines
            from auditor.gate.targets import gap_lines

            for t, d in doc["targets"].items():
                f = d["fidelity"]
                acc = f"  accuracy {d['accuracy_original']:.3f} -> {d['accuracy']:.3f}" if "accuracy" in d else ""
                print(f"  {t:10s} SQNR {f.get('sqnr_db', float('nan')):.1f} dB  top-1 agreement "
                      f"{f.get('top1_agreement', float('nan')):.3f}{acc}")
            for line in gap_lines(doc.get("hardware_notes") or []) + measured_on_lines(doc):
                print(f"  {line}")
    return 0

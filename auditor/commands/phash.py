"""wmaudit phash: perceptual hashes from a model's intermediate layer (build, match, survive, fingerprint)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from auditor import results
from auditor.commands import _types
from auditor.errors import AuditError

HELP = "perceptual hashes from an intermediate layer: build, match, survive deployment, fingerprint a model"
DESCRIPTION = """Perceptual hashes (centroid + radius R of a Signal image set's latents at one tensor).
  build        hash of --signal images through MODEL at --layer (any tensor; default the output)
  match        distance to the centroid in units of R and the decision per image (exit 0 all match)
  survive      decisions, flips and centroid drift under int8 / fp16 / pruning of MODEL
  fingerprint  is SUSPECT derived from --reference? (features of a probe set; exit 0 derived)
DATA is any data form the other commands take (docs/reference/data.md): .npy, .npz (the
model's input array; labels under y are ignored), a folder of PNG/JPEG images (see
--preprocess), IDX files, fashion-mnist[:train|test] or synthetic. Exit 2 on bad input."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="phash_command", metavar="ACTION", parser_class=type(p))
    sub.required = True

    b = sub.add_parser("build", help="build a hash from Signal images")
    b.add_argument("model", help="ONNX file")
    b.add_argument("--signal", required=True, help="Signal images (DATA)")
    b.add_argument("--noise", help="Noise images (DATA): PCA is fitted on them too; in-sample FPR is recorded")
    b.add_argument("--heldout", help="held-out Signal images for R (default: a seeded split of --signal)")
    b.add_argument("--layer", help="tensor to read features from (default: the model's first output)")
    b.add_argument("--reduce", default="none", help="none (default) or pca:K")
    b.add_argument("--encoder", help="ONNX encoder (e.g. a VAE encoder or a PCA Gemm) in the output's folder")
    b.add_argument("--quantile", type=_types.fraction_to_one, default=0.95, help="R = this quantile of held-out Signal distances")
    b.add_argument("--holdout", type=_types.open_fraction, default=0.5, help="held-out fraction of --signal without --heldout")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("-o", "--output", required=True, help="hash file (JSON, written atomically)")
    b.add_argument("--json", action="store_true")
    _preprocess_flags(b)
    b.set_defaults(_phash=_build)

    m = sub.add_parser("match", help="match images against a hash")
    m.add_argument("model", help="ONNX file the hash was built for")
    m.add_argument("--hash", required=True, help="hash file")
    m.add_argument("--data", required=True, help="images (DATA)")
    m.add_argument("--json", action="store_true")
    _preprocess_flags(m)
    m.set_defaults(_phash=_match)

    s = sub.add_parser("survive", help="hash decisions under deployment attacks on the model")
    s.add_argument("model", help="ONNX file the hash was built for")
    s.add_argument("--hash", required=True, help="hash file")
    s.add_argument("--signal", required=True, help="Signal images (DATA)")
    s.add_argument("--noise", required=True, help="Noise images (DATA)")
    s.add_argument("--data", help="calibration inputs for static int8 (DATA; default: Signal + Noise)")
    s.add_argument("--attacks", help="semicolon-separated attack specs (default: every int8 mode, fp16, pruning)")
    s.add_argument("--seed", type=int, default=0)
    _types.add_target_argument(s)
    s.add_argument("-o", "--output", required=True, help="result JSON (written atomically)")
    s.add_argument("--json", action="store_true")
    _preprocess_flags(s)
    s.set_defaults(_phash=_survive)

    f = sub.add_parser("fingerprint", help="is SUSPECT derived from --reference?")
    f.add_argument("suspect", help="suspect ONNX file")
    f.add_argument("--reference", required=True, help="owner's ONNX file")
    f.add_argument("--probes", required=True, help="probe images (DATA)")
    f.add_argument("--layer", help="tensor to compare (default: the first output)")
    f.add_argument("--threshold", type=float, default=None, help="derived when score >= this (default 0.5)")
    f.add_argument("--json", action="store_true")
    _preprocess_flags(f)
    f.set_defaults(_phash=_fingerprint)


def _model_input(path: str, args):
    """The model (one input, as perceptual hashes need) and the image preprocessing of ``args``."""
    from auditor.attacks import load_model
    from auditor.data.inputs import preprocess_from_args
    from auditor.phash.features import input_info

    model = load_model(path)
    input_info(model)
    return model, preprocess_from_args(args)


def _read(spec: str, target):
    from auditor.phash.inputs import read_images

    model, pre = target
    return read_images(spec, model, pre)


def _preprocess_flags(p) -> None:
    from auditor.data.inputs import add_preprocess_arguments

    add_preprocess_arguments(p.add_argument_group("image preprocessing (image folders and IDX files)"))


def _build(args) -> int:
    from auditor.phash import hashfile, hashing

    target = _model_input(args.model, args)
    signal = _read(args.signal, target)
    noise = _read(args.noise, target) if args.noise else None
    heldout = _read(args.heldout, target) if args.heldout else None
    out = Path(args.output)
    h = hashing.build(args.model, signal, noise=noise, heldout=heldout, layer=args.layer, reduce=args.reduce,
                      encoder_path=args.encoder, out_folder=out.resolve().parent, q=args.quantile,
                      holdout=args.holdout, seed=args.seed,
                      sources={"signal": args.signal, "noise": args.noise or ""})
    hashfile.save_hash(h, out)
    if args.json:
        sys.stdout.write(results.dumps(results.envelope("phash-build", model_path=args.model, hash=h.to_json(),
                                                        output=str(out))))
    else:
        print(f"{args.model} layer {args.layer or '(output)'} reduce {h.reduce['kind']}: "
              f"centroid of {h.radius_rule['n_centroid']} Signal images, R = {h.radius:.6g} "
              f"(q{h.radius_rule['q']:g} of {h.radius_rule['n_heldout']} held-out) -> {out}")
        for k, v in h.build.items():
            print(f"  {k}: {v:.4f}")
    return 0


def _match(args) -> int:
    from auditor.phash import hashfile, hashing

    h = hashfile.load_hash(args.hash)
    target = _model_input(args.model, args)
    x = _read(args.data, target)
    r = hashing.match(args.model, h, x)
    if args.json:
        sys.stdout.write(results.dumps(results.envelope("phash-match", model_path=args.model, layer=h.layer,
                                                        radius=h.radius, data=args.data, **r)))
    else:
        for im in r["images"]:
            print(f"  {im['index']:5d}  d/R = {im['distance_r']:.3f}  {'match' if im['match'] else 'no match'}")
        print(f"{r['matched']}/{r['n']} images match (match rate {r['match_rate']:.3f})")
    return 0 if r["matched"] == r["n"] else 1


def _survive(args) -> int:
    from auditor.attacks import load_model
    from auditor.phash import hashfile, hashing, survive

    h = hashfile.load_hash(args.hash)
    hashing.check_model(args.model, h)
    model = load_model(args.model)
    target = _model_input(args.model, args)
    signal, noise = _read(args.signal, target), _read(args.noise, target)
    calib = _read(args.data, target) if args.data else None
    attacks = [a.strip() for a in args.attacks.split(";") if a.strip()] if args.attacks else survive.DEFAULT_ATTACKS
    from auditor.backends import hardware
    from auditor.backends.targets import check_available

    targets = _types.targets_of(args)
    check_available(targets)
    per = {t: survive.survive(model, h, signal, noise, calib, attacks, seed=args.seed,
                              calibration_source=args.data or "signal+noise", target=t) for t in targets}
    r = dict(per[targets[0]])
    hw = {t: p.pop("hardware") for t, p in per.items()}
    r.pop("hardware", None)
    if len(targets) > 1:
        r["targets"] = per
        r["survived"] = all(p["survived"] for p in per.values())
    doc = results.envelope("phash-survive", model_path=args.model, layer=h.layer, radius=h.radius, **r,
                           hardware=hardware.combine(hw))
    results.write_result(args.output, doc)
    if args.json:
        sys.stdout.write(results.dumps(doc))
    else:
        b = r["before"]
        print(f"before: TPR {b['tpr']:.3f}  FPR {b['fpr']:.3f}  AUC {b['auc']:.3f}")
        for row in r["attacks"]:
            if "error" in row:
                print(f"  {row['attack']:45s} error: {row['error']}")
                continue
            print(f"  {row['attack']:45s} TPR {row['tpr']:.3f}  FPR {row['fpr']:.3f}  flips {row['flips']:3d}  "
                  f"centroid drift {row['centroid_drift_r']:.3f} R")
        for t, p in (r.get("targets") or {}).items():
            print(f"  on {t}: {'survived' if p['survived'] else 'broken'}")
        from auditor.backends.hardware import measured_on_lines

        for line in measured_on_lines(doc):
            print(line)
        print(f"-> {args.output}")
    return 0 if r["survived"] else 1


def _fingerprint(args) -> int:
    from auditor.phash import fingerprint as fp

    target = _model_input(args.reference, args)
    probes = _read(args.probes, target)
    thr = fp.DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    r = fp.fingerprint(args.suspect, args.reference, probes, layer=args.layer, threshold=thr)
    if args.json:
        sys.stdout.write(results.dumps(results.envelope("phash-fingerprint", model_path=args.suspect, **r)))
    else:
        score = "n/a" if r["score"] is None else f"{r['score']:.4f}"
        print(f"{args.suspect}: {'DERIVED from' if r['derived'] else 'not derived from'} {args.reference} "
              f"(score {score}, threshold {r['threshold']:g}, {r['n_probes']} probes, {r['units']} units)"
              + (f" - {r['reason']}" if r.get("reason") else ""))
    return 0 if r["derived"] else 1


def run(args) -> int:
    if not getattr(args, "_phash", None):
        raise AuditError("give an action: build, match, survive or fingerprint")
    return int(args._phash(args))

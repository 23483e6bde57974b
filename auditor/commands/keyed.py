"""wmaudit keyed: client keys, keyed models and encrypted images (source document 003)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from auditor import results
from auditor.commands import _types
from auditor.errors import AuditError

HELP = "keyed models: block-wise image encryption and key-transformed ViTs"
DESCRIPTION = """Keyed models (source document 003): one plain ViT, a differently keyed ONNX file per client.

  wmaudit keyed keygen --image-size 28 --channels 1 --block 4 --seed 7 [--variant orthogonal|permutation] -o KEY.json
  wmaudit keyed encrypt-model PLAIN.onnx --key KEY.json -o KEYED.onnx [--data DATA]
      patch embedding W -> W M^T, position rows permuted; written only when the keyed
      file on encrypted inputs matches the plain file on plain inputs (exit 1 otherwise)
  wmaudit keyed encrypt-images DATA --key KEY.json -o OUT.npz
  wmaudit keyed verify KEYED.onnx --key KEY.json --plain PLAIN.onnx --data DATA [--attacks all]
      parity, accuracy (right key / plain images / wrong keys), under int8, fp16, pruning;
      exit 0 when parity holds, 1 when not
  wmaudit keyed trace LEAKED.onnx --plain PLAIN.onnx --keys DIR
      which issued key the file carries; exit 0 traced, 1 no key fits

DATA: every data form the other commands take (docs/reference/data.md): fashion-mnist[:test|train],
.npy inputs [n,C,H,W], .npz (array per input name, labels under y), image folders (class
sub-folders give labels) or IDX images (labels from the sibling IDX file). Images are normalised
with the Fashion-MNIST mean and std unless --preprocess / --mean / --std say otherwise."""


def _size(s: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in s.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be S or HxW, got {s!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"image size must be S or HxW, got {s!r}")
    return parts[0], parts[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="keyed_command", metavar="ACTION", parser_class=type(p))
    g = sub.add_parser("keygen", help="make a client key (generator + seed)")
    g.add_argument("--image-size", type=_size, required=True, help="S or HxW")
    g.add_argument("--channels", type=_types.positive_int, required=True)
    g.add_argument("--block", type=_types.positive_int, required=True, help="block size = the ViT's patch size")
    g.add_argument("--seed", type=_types.non_negative_int, required=True, help="block permutation seed; the matrix uses seed + 1")
    g.add_argument("--variant", choices=("orthogonal", "permutation"), default="orthogonal")
    g.add_argument("--client", help="name of the client the key is issued to (stored in the key)")
    g.add_argument("-o", "--output", required=True)
    g.add_argument("--json", action="store_true")
    e = sub.add_parser("encrypt-model", help="apply a key to a plain ONNX ViT")
    e.add_argument("model")
    e.add_argument("--key", required=True)
    e.add_argument("--data", help="inputs for the parity check (default: 32 seeded N(0,1) inputs)")
    e.add_argument("--samples", type=_types.positive_int, default=256, help="at most this many inputs from --data")
    e.add_argument("--atol", type=float, default=1e-4, help="largest allowed |logit difference|")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--json", action="store_true")
    _preprocess_flags(e)
    i = sub.add_parser("encrypt-images", help="encrypt a data file with a key")
    i.add_argument("data")
    i.add_argument("--key", required=True)
    i.add_argument("--input-name", default="input", help="model input name (array name in the .npz)")
    i.add_argument("-o", "--output", required=True, help=".npz (array per input name, labels under y)")
    i.add_argument("--json", action="store_true")
    _preprocess_flags(i)
    v = sub.add_parser("verify", help="parity and accuracy of a keyed model, also under deployment attacks")
    v.add_argument("model", help="keyed ONNX file")
    v.add_argument("--key", required=True)
    v.add_argument("--plain", required=True, help="the plain ONNX model")
    v.add_argument("--data", default="fashion-mnist:test", help="labelled inputs")
    v.add_argument("--samples", type=_types.positive_int, default=1000, help="seeded subset of --data")
    v.add_argument("--wrong-keys", type=_types.non_negative_int, default=5)
    v.add_argument("--seed", type=_types.non_negative_int, default=0, help="seed of the subset and of the wrong keys")
    v.add_argument("--attacks", default="none",
                   help="'all', 'none' or steps separated by ';' (e.g. 'quantize:dynamic;fp16;prune:0.5')")
    v.add_argument("--calibration", default="fashion-mnist:train", help="plain calibration inputs for static int8")
    v.add_argument("--calibration-samples", type=_types.positive_int, default=128)
    v.add_argument("--atol", type=float, default=1e-4)
    _types.add_target_argument(v)
    v.add_argument("--labels", metavar="FILE", help="labels for --data (.npy, IDX, or one integer per line)")
    v.add_argument("--json", action="store_true")
    _preprocess_flags(v)
    t = sub.add_parser("trace", help="which issued key a leaked keyed file carries")
    t.add_argument("model", help="leaked keyed ONNX file (float, int8 or pruned)")
    t.add_argument("--plain", required=True)
    t.add_argument("--keys", required=True, help="folder of the issued keys (*.json)")
    t.add_argument("--alpha", type=float, default=1e-6)
    t.add_argument("--json", action="store_true")


def _preprocess_flags(p) -> None:
    from auditor.data.inputs import add_preprocess_arguments

    add_preprocess_arguments(p.add_argument_group("image preprocessing (image folders and IDX files; "
                                                  "default: Fashion-MNIST mean and std)"))


def _preprocess(args):
    """The command line's preprocessing, or None for the keyed default (auditor.keyed.inputs)."""
    from auditor.data.inputs import Preprocess, preprocess_from_args

    pre = preprocess_from_args(args)
    return None if pre == Preprocess() else pre


def run(args) -> int:
    cmd = getattr(args, "keyed_command", None)
    if cmd is None:
        raise AuditError("give an action: keygen, encrypt-model, encrypt-images, verify or trace")
    return {"keygen": _keygen, "encrypt-model": _encrypt_model, "encrypt-images": _encrypt_images,
            "verify": _verify, "trace": _trace}[cmd](args)


def _emit(args, doc, lines) -> None:
    if args.json:
        sys.stdout.write(results.dumps(doc))
    else:
        print("\n".join(lines))


def _tmp(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(f".{out.name}.tmp{os.getpid()}")


def _keygen(args) -> int:
    from auditor.keyed import keys

    doc = keys.generate(image_size=args.image_size, channels=args.channels, block=args.block, seed=args.seed,
                        variant=args.variant, client=args.client)
    key = keys.save(doc, args.output)
    out = results.envelope("keyed-keygen", key=key, output={"path": str(args.output)}, key_summary=key.describe())
    _emit(args, out, [f"{args.output}: {key.variant} key, {key.n_blocks} blocks of {key.block}x{key.block}, "
                      f"L = {key.size}, {key.commitment}"])
    return 0


def _parity_inputs(args, key, model):
    from auditor.keyed import model as km
    from auditor.keyed.inputs import read_data

    if args.data:
        d = read_data(args.data, model, limit=args.samples, preprocess=_preprocess(args))
        return d.inputs, d.source
    return km.probe_inputs(key), "32 seeded N(0,1) inputs (seed 0)"


def _encrypt_model(args) -> int:
    from auditor.attacks import load_model
    from auditor.keyed import keys
    from auditor.keyed import model as km

    key = keys.load(args.key)
    plain = load_model(args.model)
    emb = km.locate(plain, key)
    keyed = km.transform(plain, key, emb)
    x, source = _parity_inputs(args, key, plain)
    par = km.parity(plain, keyed, key, x, atol=args.atol)
    par["inputs"] = source
    out = Path(args.output)
    written = None
    if par["holds"]:
        from auditor.attacks import write_model

        write_model(keyed, out)
        written = {"path": str(out), "sha256": results.file_sha256(out)}
    doc = results.envelope("keyed-encrypt-model", model_path=args.model, key=key, embeddings=emb.describe(),
                           parity=par, output=written, key_summary=key.describe())
    verdict = "parity holds" if par["holds"] else "PARITY FAILS, nothing written"
    _emit(args, doc, [f"{args.model} -> {out if written else '-'}: {verdict}",
                      f"  patch embedding: {emb.kind} {emb.weight}; position table: {emb.pos} (patch rows from {emb.pos_offset})",
                      f"  max |logit diff| {par['max_abs_diff']:.3g} (atol {args.atol:g}), top-1 agreement "
                      f"{par['top1_agreement']:.4f} on {par['samples']} inputs ({source})"])
    return 0 if par["holds"] else 1


def _encrypt_images(args) -> int:
    from auditor.keyed import cipher, keys
    from auditor.keyed.inputs import read_data

    from auditor.keyed.inputs import image_input

    key = keys.load(args.key)
    d = read_data(args.data, image_input(args.input_name, key.channels, key.height, key.width),
                  preprocess=_preprocess(args))
    enc = cipher.encrypt(d.inputs, key)
    arrays = {d.input_name: enc}
    if d.labels is not None:
        arrays["y"] = d.labels
    out = Path(args.output)
    if out.suffix != ".npz":
        raise AuditError("encrypt-images writes .npz: give -o OUT.npz")
    tmp = _tmp(out)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    doc = results.envelope("keyed-encrypt-images", key=key, data=d.source, samples=int(len(enc)),
                           labels=d.labels is not None, output={"path": str(out), "sha256": results.file_sha256(out)})
    _emit(args, doc, [f"{d.source} -> {out}: {len(enc)} inputs encrypted ({key.variant}, block {key.block})"
                      + ("" if d.labels is not None else ", no labels")])
    return 0


def _verify(args) -> int:
    from auditor.attacks import load_model
    from auditor.keyed import keys, verify
    from auditor.keyed import model as km
    from auditor.keyed.inputs import read_data

    key = keys.load(args.key)
    plain, keyed = load_model(args.plain), load_model(args.model)
    km.locate(plain, key)   # the key must fit the model (block size, geometry)
    km.locate(keyed, key)
    km._input_name(plain)  # one image input
    d = read_data(args.data, plain, limit=args.samples, seed=args.seed, preprocess=_preprocess(args),
                  labels=args.labels)
    if d.labels is None:
        raise AuditError(f"{args.data}: verify needs labels (IDX labels file or 'y' in the .npz)")
    from auditor.backends import hardware
    from auditor.backends.targets import TargetRunner, check_available

    targets = _types.targets_of(args)
    check_available(targets)
    steps = _attack_steps(args.attacks)
    cal = (read_data(args.calibration, plain, limit=args.calibration_samples, seed=args.seed,
                     preprocess=_preprocess(args)).inputs if steps else None)
    per, hw = {}, {}
    for t in targets:
        b = verify.accuracies(plain, keyed, key, d.inputs, d.labels, n_wrong=args.wrong_keys, seed=args.seed,
                              atol=args.atol, target=t)
        b["attacks"] = (verify.under_attacks(plain, keyed, key, d.inputs, d.labels, cal, attacks=steps,
                                             calibration_seed=args.seed, target=t) if steps else [])
        per[t] = b
        with TargetRunner(args.model, t, threads=1) as r:  # where this target's models ran
            hw[t] = r.hardware
    body = dict(per[targets[0]])
    rows = body["attacks"]
    if len(targets) > 1:
        body["targets"] = per
        body["parity"] = dict(body["parity"], holds=all(p["parity"]["holds"] for p in per.values()))
    body["data"] = d.source
    doc = results.envelope("keyed-verify", model_path=args.model, key=key, plain={"path": args.plain,
                           "sha256": results.file_sha256(args.plain)}, **body, hardware=hardware.combine(hw))
    par, acc = body["parity"], body["accuracy"]
    wk = acc["keyed_model_wrong_keys"]
    lines = [f"{args.model}: parity {'holds' if par['holds'] else 'FAILS'}: max |logit diff| "
             f"{par['max_abs_diff']:.3g}, top-1 agreement {par['top1_agreement']:.4f} ({par['samples']} inputs)",
             f"  accuracy ({d.source}): plain model {acc['plain_model_plain_images']['accuracy']:.4f}, "
             f"keyed + right key {acc['keyed_model_right_key']['accuracy']:.4f}, "
             f"keyed + plain images {acc['keyed_model_plain_images']['accuracy']:.4f}"
             + (f", keyed + {wk['keys']} wrong keys mean {wk['mean']:.4f} worst {wk['worst']:.4f}" if wk["keys"] else "")]
    for r in rows:
        lines.append(f"  {r['attack']:32s} plain {r['plain_accuracy']:.4f}  keyed {r['keyed_accuracy']:.4f}  "
                     f"(keyed - plain {r['keyed_minus_plain']:+.4f}), top-1 agreement keyed vs plain "
                     f"{r['parity']['top1_agreement']:.4f}")
    for t, p in (body.get("targets") or {}).items():
        lines.append(f"  on {t}: parity {'holds' if p['parity']['holds'] else 'FAILS'} (max |logit diff| "
                     f"{p['parity']['max_abs_diff']:.3g})")
    from auditor.backends.hardware import measured_on_lines

    lines += [f"  {ln}" for ln in measured_on_lines(doc)]
    _emit(args, doc, lines)
    return 0 if par["holds"] else 1


def _attack_steps(spec: str) -> list[str]:
    from auditor.attacks.compose import parse_steps
    from auditor.keyed.verify import ATTACKS

    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec == "all":
        return list(ATTACKS)
    steps = [s.strip() for s in spec.split(";") if s.strip()]
    for s in steps:
        parse_steps(s)
    return steps


def _trace(args) -> int:
    from auditor.attacks import load_model
    from auditor.keyed import trace
    from auditor.read.graph import open_model

    registry = trace.load_registry(args.keys)
    open_model(args.model)  # safety checks on the leaked file before reading it
    plain = load_model(args.plain)
    r = trace.trace(args.model, plain, registry, alpha=args.alpha)
    doc = results.envelope("keyed-trace", model_path=args.model, plain={"path": args.plain,
                           "sha256": results.file_sha256(args.plain)}, **r)
    b = r["best"]
    head = (f"{args.model}: traced to {b['file']} ({b['commitment']})" if r["traced"]
            else f"{args.model}: no issued key fits")
    lines = [head, f"  best key {b['file']}: {b['block_agreements']}/{b['blocks']} block positions agree, "
                   f"p = {b['p_value']:.3g} (log10 {b['log10_p']:.1f}), Bonferroni over {r['keys_tried']} keys "
                   f"{b['p_corrected']:.3g}, alpha {r['alpha']:g}"
             + (f", matrix agreement {b['matrix_agreement']:.3f}" if "matrix_agreement" in b else "")]
    others = [k for k in r["keys"] if k is not b]
    if others:
        worst = min(others, key=lambda k: k["log10_p"])
        lines.append(f"  next best {worst['file']}: {worst['block_agreements']}/{worst['blocks']}, "
                     f"p = {worst['p_value']:.3g}")
    _emit(args, doc, lines)
    return 0 if r["traced"] else 1

"""wmaudit obfuscate: function-preserving transformations of an ONNX model (an attack on white-box marks)."""
from __future__ import annotations

import argparse
import sys

from auditor import results

HELP = "permute / scale / split / pad neurons of a layer without changing what the model computes"
DESCRIPTION = """Apply function-preserving obfuscation steps to MODEL (the attacks that defeat white-box
marks): perm-in, perm-out, scale, split:K, dummy:K, clique:K, in the order given, on --layer
(a Conv/Gemm/MatMul node or weight name; default every layer whose channels can be traced).
A per-channel constant Add right after a layer is its bias (MatMul + Add, Conv + Add) and a
squeeze-excitation gate follows the channels it gates; both are rewritten with them.
A layer writing into a residual Add rewrites the whole stream: every layer writing into it and
every layer reading it.
A depthwise conv on the way (MobileNet/EfficientNet blocks) is rewritten with the channels
(kernel, bias, group); a scale does not pass a ReLU6 (Clip) and is refused there.
The result is checked function-preserving with onnxruntime (max |diff| on seeded inputs)
before it is written. Exit 0 written, 2 error (nothing written)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file")
    p.add_argument("--steps", required=True, help="comma-separated steps, e.g. perm-in,perm-out,scale,split:4,dummy:4")
    p.add_argument("--layer", help="layer to transform (node or weight name, e.g. features.conv2.weight)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("-o", "--output", required=True, help="obfuscated ONNX file (written atomically)")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def run(args) -> int:
    from auditor.attacks import load_model, write_model
    from auditor.attacks.obfuscate import obfuscate

    model = load_model(args.model)
    r = obfuscate(model, args.steps, layer=args.layer, seed=args.seed)
    out = write_model(r.model, args.output)
    doc = results.envelope("obfuscate", model_path=args.model,
                           output={"path": str(out), "sha256": results.file_sha256(out)},
                           steps=args.steps, params=r.params, notes=r.notes)
    if args.json:
        sys.stdout.write(results.dumps(doc))
    else:
        print(f"{args.model} -> {out}: {args.steps} on {', '.join(r.params['layers'])} (seed {args.seed})")
        for n in r.notes:
            print(f"  {n}")
    return 0

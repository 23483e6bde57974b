"""End-to-end demo: train a marked SmallCNN, export it, audit the ONNX file.

    python -m exporters.demo --out build/demo          (make demo)

1. Train SmallCNN on 6,000 Fashion-MNIST training images (seeded subset),
   one epoch, with a 256-bit Uchida mark on ``features.conv2.weight``
   (reduce mean; bits = default_rng(1).integers(0, 2, 256), X from
   default_rng(2).standard_normal((256, 288))); print test accuracy on the
   full 10,000-image test set.
2. Export with the dynamo exporter, BatchNorm kept; validate against torch
   with onnxruntime; write model.onnx, key.json, manifest.json.
3. Audit: ``wmaudit extract model.onnx --key key.json`` (the owner's key,
   expected: detected, exit 0) and with a key of the same shape but another
   secret (expected: not detected, exit 1).
4. Survival grid: ``wmaudit robustness`` over ``examples/demo-grid.toml``
   (pruning 0 / 50 / 80 % x float, dynamic int8, static int8 per channel,
   fp16), with accuracy and fidelity on 1,000 Fashion-MNIST test images; the
   table in the terminal, ``robustness/results.json`` and ``report.html``.
About 3 minutes on 2 idle cores (test accuracy about 0.83).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from . import data, export, models, train
from . import watermark as wm

TARGET = "features.conv2.weight"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exporters.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/demo", help="output folder (default build/demo)")
    ap.add_argument("--train-subset", type=int, default=6000, help="training images (default 6000)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--bits", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="training seed (model init, shuffling, subset)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results are reproducible per count)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m exporters.demo " + " ".join(shlex.quote(s) for s in (argv if argv is not None else sys.argv[1:]))
    print(f"$ {cmd}", flush=True)

    t0 = time.perf_counter()
    (x, y), test = data.fashion("train", n=a.train_subset, seed=a.seed), data.fashion("test")
    train.seeded(a.seed, a.threads)
    model = models.SmallCNN()
    spec = wm.MarkSpec(TARGET, wm.random_bits(a.bits, 1), "mean", seed=2, id="owner")
    reg = wm.UchidaRegularizer(model, [spec], strength=10.0)
    print(f"[1/4] training SmallCNN ({models.n_params(model):,} parameters) on {len(y):,} Fashion-MNIST images, "
          f"{a.bits}-bit mark on {TARGET} (reduce mean)", flush=True)
    metrics = train.train_classifier(model, x, y, epochs=a.epochs, batch=32, lr=1e-3, seed=a.seed, reg=reg,
                                     test=test, target_lr={TARGET: 1e-2})
    print(f"      test accuracy {metrics['test_accuracy']:.4f} on {metrics['test_examples']:,} test images; "
          f"BER in torch {metrics['ber']['owner']:.4f}; {metrics['train_seconds']:.0f} s", flush=True)

    print("[2/4] exporting to ONNX (dynamo, BatchNorm kept) and validating with onnxruntime", flush=True)
    key = wm.make_key(model, [spec], {"name": "SmallCNN", "demo": True, "torch": torch.__version__.split("+")[0]},
                      strength=reg.strength)
    res = export.export_marked(model, out, test[0][:2], [test[0][:256]], key=key, exporter="dynamo",
                               dynamic_axes={0: "batch"}, inputs_description="Fashion-MNIST test images 0-255")
    print(f"      {res.onnx_path}: max |onnx - torch| = {res.manifest['validation']['max_abs_diff']:.2e}; "
          f"{TARGET} -> {res.manifest['params'][TARGET]['onnx']} ({res.manifest['params'][TARGET]['transform']})")
    # A key with the same shape but another secret: what a wrong claim looks like.
    other = wm.MarkSpec(TARGET, wm.random_bits(a.bits, 101), "mean", seed=102, id="other")
    keys_other = out / "other-key.json"
    from auditor.marks import keys as keyfile
    keyfile.save_key(wm.make_key(model, [other], {"name": "SmallCNN", "demo": True}), keys_other)
    (out / "train.json").write_text(json.dumps({"command": cmd, "metrics": metrics, "seed": a.seed,
                                                "threads": a.threads, "bits_seed": 1, "projection_seed": 2},
                                               indent=2) + "\n")

    print("[3/4] auditing the ONNX file", flush=True)
    from auditor import cli

    codes = {}
    for label, k in (("owner key", out / "key.json"), ("another key", keys_other)):
        argv_x = ["extract", str(res.onnx_path), "--key", str(k), "--manifest", str(out / "manifest.json")]
        print(f"\n$ wmaudit {' '.join(shlex.quote(s) for s in argv_x)}    # {label}", flush=True)
        codes[label] = cli.main(argv_x)
        print(f"(exit {codes[label]})", flush=True)

    grid = Path(__file__).resolve().parents[1] / "examples" / "demo-grid.toml"
    argv_r = ["robustness", str(res.onnx_path), "--key", str(out / "key.json"), "--grid", str(grid),
              "--samples", "1000", "--calibration-samples", "128", "-o", str(out / "robustness")]
    print(f"\n[4/4] survival grid on deployment attacks\n$ wmaudit {' '.join(shlex.quote(s) for s in argv_r)}",
          flush=True)
    codes["robustness"] = cli.main(argv_r)
    argv_h = ["report", str(out / "robustness" / "results.json"), "-o", str(out / "report.html"),
              "--title", "wmaudit demo: SmallCNN survival grid"]
    cli.main(argv_h)
    print(f"(robustness exit {codes['robustness']}: 0 = the mark survived every attack)\n"
          f"HTML report: {(out / 'report.html').resolve()}", flush=True)

    print(f"\nverdicts: owner key -> exit {codes['owner key']} (0 = detected), "
          f"another key -> exit {codes['another key']} (1 = not detected); {time.perf_counter() - t0:.0f} s total")
    print("reproduce:")
    print(f"  {cmd}")
    for k in ("key.json", "other-key.json"):
        print(f"  wmaudit extract {out / 'model.onnx'} --key {out / k} --manifest {out / 'manifest.json'}")
    print(f"  wmaudit {' '.join(shlex.quote(s) for s in argv_r)}")
    return 0 if codes["owner key"] == 0 and codes["another key"] == 1 else 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m exporters embed ...``: train a marked model on real data and export it.

    python -m exporters embed --model small-cnn --bits 256 --reduce mean --out build/marked
    python -m exporters embed --model seq-lstm --bits 256 --reduce flatten --target both --exporter legacy --out DIR

Writes DIR/model.onnx, key.json, manifest.json and train.json (metrics, seeds,
the command). Bits come from numpy default_rng(--bits-seed), X from
default_rng(--projection-seed) (one seed per mark: projection seed + index).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from . import data, export, models, train
from . import watermark as wm

CNN_TARGET = "features.conv2.weight"


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m exporters", description="Train, mark and export models.")
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed", help="train a model with a white-box mark and export it to ONNX")
    e.add_argument("--model", choices=["small-cnn", "large-cnn", "seq-lstm", "seq-gru", "seq-rnn"], required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--bits", type=_positive, default=256)
    e.add_argument("--reduce", choices=["mean", "flatten"], default="mean")
    e.add_argument("--target", choices=["kernel", "recurrent", "both"], default="kernel",
                   help="sequence models: which weight(s) carry a mark (CNNs: features.conv2.weight)")
    e.add_argument("--strength", type=float, default=None, help="regulariser weight (default 10 CNN, 1 sequence)")
    e.add_argument("--bits-seed", type=int, default=1)
    e.add_argument("--projection-seed", type=int, default=2)
    e.add_argument("--seed", type=int, default=0, help="training seed")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--train-subset", type=_positive, default=3000, help="CNNs: Fashion-MNIST training images")
    e.add_argument("--epochs", type=_positive, default=None, help="default 1 (CNN) / 60 (sequence)")
    e.add_argument("--unmarked", action="store_true", help="train the same way without the regulariser")
    e.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    e.add_argument("--optimize", choices=["none", "keep-batchnorm"], default="none")
    return ap


def embed(a: argparse.Namespace, command: str) -> int:
    out = Path(a.out)
    train.seeded(a.seed, a.threads)
    if a.model.endswith("cnn"):
        model = models.SmallCNN() if a.model == "small-cnn" else models.LargeCNN()
        targets = [CNN_TARGET]
    else:
        model = models.SeqRNN(a.model.split("-")[1], 16, 32, 1)
        targets = {"kernel": ["rnn.weight_ih_l0"], "recurrent": ["rnn.weight_hh_l0"],
                   "both": ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]}[a.target]
    specs = [wm.MarkSpec(p, wm.random_bits(a.bits, a.bits_seed + i), a.reduce, seed=a.projection_seed + i)
             for i, p in enumerate(targets)]
    strength = a.strength if a.strength is not None else (10.0 if a.model.endswith("cnn") else 1.0)
    reg = None if a.unmarked else wm.UchidaRegularizer(model, specs, strength=strength)
    if a.model.endswith("cnn"):
        (x, y), test = data.fashion("train", n=a.train_subset, seed=a.seed), data.fashion("test", n=2000, seed=a.seed)
        metrics = train.train_classifier(model, x, y, epochs=a.epochs or 1, batch=32, lr=1e-3, seed=a.seed,
                                         reg=reg, test=test, target_lr={CNN_TARGET: 1e-2})
        example, validation, axes = test[0][:2], [test[0][:256]], {0: "batch"}
    else:
        (x, y), test = data.sine_windows(data.sine_signal(), 8, 16), data.sine_windows(data.sine_signal(phase=0.7), 8, 16)
        metrics = train.train_regression(model, x, y, epochs=a.epochs or 60, batch=32, lr=1e-2, seed=a.seed,
                                         reg=reg, test=test)
        example, validation, axes = test[0][:2], [test[0][:64]], {0: "batch", 1: "time"}
    key = wm.make_key(model, specs, {"name": type(model).__name__, "torch": torch.__version__.split("+")[0]},
                      strength=None if a.unmarked else strength)
    res = export.export_marked(model, out, example, validation, key=key, exporter=a.exporter,
                               dynamic_axes=axes, optimize=a.optimize)
    (out / "train.json").write_text(json.dumps({"command": command, "metrics": metrics}, indent=2) + "\n")
    ber = wm.UchidaRegularizer(model, specs).ber()
    print(f"{res.onnx_path}: " + ", ".join(f"{k} BER {v:.4f}" for k, v in ber.items())
          + f"; max |onnx - torch| {res.manifest['validation']['max_abs_diff']:.2e}")
    print(f"audit: wmaudit extract {res.onnx_path} --key {out / 'key.json'} --manifest {out / 'manifest.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    command = "python -m exporters " + " ".join(shlex.quote(s) for s in argv)
    if a.command == "embed":
        from auditor.errors import AuditError

        try:
            return embed(a, command)
        except AuditError as e:  # a key that cannot hold the mark: one line, exit 2
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())

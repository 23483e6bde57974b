"""Scaled copies after magnitude pruning, on the `forensics-blocks` fixture's basic and bottleneck blocks.

`rounds/int8.onnx` and `rounds/prune-int8.onnx` carry the same obfuscation of the marked conv's input
axis (fixtures/blocks.py ROUNDS, seed 11: split, scaled-copy, dummy, pair, clique, scale; 16 -> 31
channels); the second was pruned by 20 % (per layer, magnitude) before int8. The copy pairs of the
feeding conv are read where pruning left them parallel (int8 alone: canon's exact search); for each,
in the pruned file: cosine of the effective rows, entries both / only one keeps, the ratio on the
common entries, and whether canon's pruned-copy search finds it. Then the input-side cleaning and the
scan (no reference, key with anchors, alpha 1e-6) of the file, of the twin's int8 round and of the twin's
same obfuscation (graph/twin-clean.onnx) pruned and int8-quantized here the same way (auditor.attacks,
calibrated as the fixture), and the layer's pruning threshold estimate.

    python bench/bench_pruned_copies.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _feeding(path: Path, channels: int = 31):
    from auditor.forensics import canon
    from auditor.read import channels as ch
    from auditor.read.weights import WeightStore

    gv = canon.GraphValues(WeightStore.open(path))
    for lay in ch.layers(gv.model, gv.graph):
        pf = gv.input_flow(lay)
        if pf is not None and not pf.blocked and pf.channels == channels:
            return gv, lay, pf
    raise SystemExit(f"{path}: no layer reads {channels} channels")


def _prune_int8(d: Path, rel: str, out: Path) -> None:
    """`rel` pruned by 20 % then int8 static QDQ per channel, as fixtures/blocks.py ROUNDS["prune-int8"]."""
    import onnx

    from auditor.attacks import load_model
    from auditor.attacks.compose import compose
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data
    from fixtures.blocks import CAL

    cal = Calibration(load_data(str(d / "calib.npy"), d / rel, purpose="calibration", samples=CAL, seed=0))
    r = compose(load_model(d / rel), "prune:0.2,quantize:static-qdq-per-channel", cal, keep_batchnorm=False)
    onnx.save_model(r.model, str(out))


def main() -> int:
    from auditor.forensics import canon
    from auditor.forensics import scan as scanmod
    from auditor.marks.keys import load_key
    from fixtures.build import ensure

    fx = ensure("forensics-blocks")
    for block in ("basic", "bottleneck"):
        d = fx / block
        gv0, _, pf0 = _feeding(d / "rounds/int8.onnx")
        W2, f, sh = canon._row_affine(gv0, pf0)
        _, truth, _ = canon._copies(gv0, pf0, W2, f, sh)
        pairs = sorted({(min(i, j), max(i, j)) for i, js in truth.items() for j in js})
        gv, lay, pf = _feeding(d / "rounds/prune-int8.onnx")
        W2, f, sh = canon._row_affine(gv, pf)
        A = np.asarray(W2, np.float64) * f[:, None]
        quant = canon._stored_rounded(gv, pf.layer.weight) == "quant"
        theta = canon.pruned_threshold(W2, quant)
        found = canon.pruned_copy_pairs(W2, f, sh, theta, quant, canon.COS_EQUAL_QUANT)
        E = np.concatenate([A, sh[:, None]], axis=1)
        U = E / np.linalg.norm(E, axis=1, keepdims=True)
        print(f"{block}: feeding conv {pf.layer.name} [{A.shape[0]} x {A.shape[1]}], exact zeros "
              f"{float((A == 0).mean()):.4f}, pruning threshold estimate {theta:.5f}")
        for i, j in pairs:
            a, b = A[i], A[j]
            both = (a != 0) & (b != 0)
            r = float(np.sqrt((b[both] @ b[both] + sh[j] ** 2) / (a[both] @ a[both] + sh[i] ** 2)))
            print(f"  copies {i:2d},{j:2d}: cosine {float(U[i] @ U[j]):.6f}  kept by both {int(both.sum()):3d}, "
                  f"only {i} {int(((a != 0) & (b == 0)).sum()):2d}, only {j} {int(((b != 0) & (a == 0)).sum()):2d}  "
                  f"ratio {r:.3f}  found {'yes' if (i, j) in found else 'no'}")
        extra = sorted(set(found) - set(pairs))
        print(f"  pairs found that are not copies: {extra if extra else 'none'}")
        cl = canon.clean(gv, lay)
        print("  " + "; ".join(u for u in cl.undone if u.startswith("input neurons")))
        key = load_key(d / "key-anchors.json")
        with tempfile.TemporaryDirectory() as td:
            twin = Path(td) / "twin-prune-int8.onnx"
            _prune_int8(d, "graph/twin-clean.onnx", twin)
            for rel in ("rounds/prune-int8.onnx", "rounds/twin-int8.onnx", twin):
                r = scanmod.scan(d / rel, [key], alpha=1e-6)["findings"][0]
                print(f"  scan {Path(rel).name if rel is twin else rel}: {r.get('matches')}/{key.whitebox[0].n_bits} "
                      f"{r['verdict']}, corrected log10 p {r.get('log10_p_corrected', 0.0):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

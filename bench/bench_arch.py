"""Marks on architectures wmaudit did not make, through every deployment attack.

For each architecture fixture (``arch-resnet``, ``arch-mobilenet``, ``arch-vit``,
``arch-bert``; fixtures/arch.py) the default export (BatchNorm folded, renamed
weights, no manifest) and the unmarked twin go through onnxruntime's int8 modes
(dynamic, static QDQ per-tensor / per-channel, QOperator), fp16 and 50 % magnitude
pruning; each mark is extracted with the owner's BN-kept export as reference.
Per (architecture, attack, mark): k/T, BER, corrected p, normalised margin
min / median, how the weight was located; for the twin: the smallest p.

    python bench/bench_arch.py --out build/bench [--quick]

--quick: dynamic int8 and fp16 only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARCHS = ("arch-resnet", "arch-mobilenet", "arch-vit", "arch-bert")
ATTACKS = ("", "quantize:dynamic", "quantize:static-qdq", "quantize:static-qdq-per-channel", "quantize:static-qop",
           "fp16", "prune:0.5")
QUICK = ("", "quantize:dynamic", "fp16")


def calibration(d: Path):
    import numpy as np

    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data

    data = d / "calib.npz" if (d / "calib.npz").is_file() else d / "calib.npy"
    return Calibration(load_data(str(data), d / "default.onnx", purpose="calibration", samples=64, seed=0))


def audit(d: Path, model: str, steps: str, cal):
    from auditor.attacks import load_model, save
    from auditor.attacks.compose import compose
    from auditor.marks.keys import load_key
    from auditor.marks.whitebox import extract

    key = load_key(d / "key.json")
    if not steps:
        return extract(d / model, key, reference=d / "kept.onnx")
    res = compose(load_model(d / model), steps, cal)
    with tempfile.TemporaryDirectory() as tmp:
        return extract(save(res.model, Path(tmp) / "model.onnx"), key, reference=d / "kept.onnx")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    from fixtures.build import ensure

    rows = []
    t0 = time.perf_counter()
    for name in ARCHS:
        d = ensure(name)
        cal = calibration(d)
        for steps in (QUICK if a.quick else ATTACKS):
            marked, twin = audit(d, "default.onnx", steps, cal), audit(d, "twin.onnx", steps, cal)
            for m in marked.marks:
                rows.append({"arch": name, "attack": steps or "none", "mark": m.param, "k": m.matches,
                             "T": m.n_bits, "ber": m.ber, "log10_p_corrected": round(math.log10(m.p_corrected), 2)
                             if m.p_corrected > 0 else m.log10_p,
                             "normalized_margin_min": round(m.normalized_margin_min, 4),
                             "normalized_margin_median": round(m.normalized_margin_median, 4),
                             "located_by": m.location.how if m.location else None,
                             "candidates": m.location.candidates if m.location else 0,
                             "batchnorm": m.batchnorm.get("status"), "verdict": m.verdict,
                             "twin_min_p": min(t.p_corrected for t in twin.marks), "twin_verdict": twin.verdict})
                r = rows[-1]
                print(f"{name:15s} {r['attack']:32s} {m.param:34s} {r['k']:3d}/{r['T']} "
                      f"log10p {r['log10_p_corrected']:7.2f} n.margin {r['normalized_margin_min']:+.4f} "
                      f"{r['located_by']:12s} twin p {r['twin_min_p']:.2g}", flush=True)
    doc = {"bench": "arch", "quick": a.quick, "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
           "all_detected": all(r["verdict"] == "detected" for r in rows),
           "twins_never": all(r["twin_verdict"] == "not detected" for r in rows)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "arch.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"all detected: {doc['all_detected']}; twins never: {doc['twins_never']}; {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

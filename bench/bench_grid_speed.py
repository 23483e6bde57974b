"""Grid speed: 6 pruning rates x 2 static quantization modes, calibration included.

Compares ``auditor.gate.robustness.run_grid`` (calibration once per float model,
process pool) with a naive loop that calls onnxruntime's ``quantize_static``
with a fresh calibration for every config and runs the configs one by one.
Goal: <= 60 s on 2 cores for the grid on the small CNN.

    python bench/bench_grid_speed.py --out build/bench [--quick] [--model M.onnx --key K.json]

Without --model it uses the ``attacks-tinycnn-marked`` fixture (--quick) or
trains nothing and expects the white-box ``cnn-small-mean`` fixture.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RATES = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9)
MODES = ("static-qdq", "static-qdq-per-channel")


def naive(model_path: Path, key, heldout, samples: int, seed: int) -> float:
    """Every config re-calibrates inside quantize_static; one process."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from auditor.attacks import prune, quantize
    from auditor.data.calibration import DatasetReader
    from auditor.data.inputs import fashion_mnist
    from auditor.gate.robustness import measure

    data = fashion_mnist("calibration", samples, seed)
    model = onnx.load(str(model_path))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for r in RATES:
            for mode in MODES:
                m = prune.prune(model, r).model if r else model
                pre, _ = quantize.preprocess(m)
                onnx.save_model(pre, f"{d}/f.onnx")
                quantize_static(f"{d}/f.onnx", f"{d}/q.onnx",
                                DatasetReader(data),
                                quant_format=QuantFormat.QDQ, per_channel=mode.endswith("per-channel"),
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                measure(f"{d}/q.onnx", key, None, heldout)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--key")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from auditor.marks import keys
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import fashion_mnist
    from auditor.gate.robustness import Config, Grid, load_manifest, run_grid
    from fixtures.build import ensure

    if a.model:
        model_path, key_path = Path(a.model), Path(a.key)
    else:
        d = ensure("attacks-tinycnn-marked" if a.quick else "cnn-small-mean")
        model_path, key_path = d / "model.onnx", d / "key.json"
    key = keys.load_key(key_path)
    samples, n_heldout = (64, 500) if a.quick else (256, 2000)
    heldout = fashion_mnist("evaluation", n_heldout, a.seed)
    configs = []
    for mode in MODES:
        for r in RATES:
            steps = ",".join(([f"prune:{r:g}:magnitude"] if r else []) + [f"quantize:{mode}"])
            configs.append(Config(steps, steps))
    grid = Grid(tuple(configs))
    t0 = time.perf_counter()
    doc = run_grid(model_path, key, grid, Calibration(fashion_mnist("calibration", samples, a.seed)), heldout,
                   load_manifest(model_path), jobs=a.jobs, progress=False)
    t_grid = time.perf_counter() - t0
    t_naive = naive(model_path, key, heldout, samples, a.seed)
    out = {"benchmark": "grid_speed", "command": " ".join([sys.executable, *sys.argv]),
           "model": str(model_path), "configs": len(configs), "jobs": a.jobs, "cores": os.cpu_count(),
           "calibration_samples": samples, "heldout": n_heldout,
           "grid_seconds": round(t_grid, 2), "naive_seconds": round(t_naive, 2),
           "speedup": round(t_naive / t_grid, 2), "goal_seconds": 60, "meets_goal": t_grid <= 60,
           "calibrated_models": doc["summary"]["calibrated_models"],
           "survived": doc["summary"]["survived"]}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench_grid_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What each target costs, and the int8 fidelity it gives: native vs the emulated CPUs.

`python bench/bench_targets.py --out DIR [--quick]` measures, for every CPU target
available here (auditor/backends/targets.py; `wmaudit targets` says which):

- start:     median seconds to start the target's child and load the model (open);
- inference: median seconds per batch of 64 inputs of the 8x8 digits CNN fixture, and its
             ratio to native in the same run (what emulation costs per inference);
- fidelity:  SQNR and top-1 agreement of the static int8 (QDQ per channel, QOperator) and
             dynamic int8 files against the float model on 360 digits, on each target: the
             attack x target matrix of docs/hardware.md.

Timings of emulated targets are the emulator's, not the CPU's: they say what an audit on
that target costs here, nothing about the real CPU's speed. Writes DIR/targets.json with
the hardware record of every target.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

QUANT = ("static-qdq-per-channel", "static-qop", "dynamic", "static-qdq-per-channel:reduce-range")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    import numpy as np

    from auditor.attacks import load_model, write_model
    from auditor.attacks.compose import compose
    from auditor.backends.targets import TARGETS, TargetRunner, availability
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data
    from auditor.gate.targets import fidelity_gaps, fidelity_on_targets
    from fixtures.build import ensure

    fx = ensure("data-digits-cnn")
    model, data_path = fx / "model.onnx", fx / "digits.npz"
    targets = [n for n, t in TARGETS.items() if t.kind != "gpu" and availability(n)[0]]
    repeat = 3 if a.quick else 7
    proto = load_model(model)
    x = np.load(data_path)["x"][:64].astype(np.float32)
    out: dict = {"command": " ".join([sys.executable, *sys.argv]), "model": str(model), "targets": {},
                 "skipped": {n: availability(n)[1] for n, t in TARGETS.items() if n not in targets}}
    for t in targets:
        starts, runs = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            with TargetRunner(model, t) as r:
                starts.append(time.perf_counter() - t0)
                r.infer({"x": x})  # warm-up
                for _ in range(repeat):
                    t1 = time.perf_counter()
                    r.infer({"x": x})
                    runs.append(time.perf_counter() - t1)
                hw = r.hardware
        out["targets"][t] = {"start_s": statistics.median(starts), "inference_s_per_batch64": statistics.median(runs),
                             "hardware": hw}
        print(f"{t:10s} start {statistics.median(starts):6.2f} s  batch of 64 {1e3 * statistics.median(runs):8.2f} ms",
              flush=True)
    base = out["targets"]["native"]["inference_s_per_batch64"]
    for t, d in out["targets"].items():
        d["inference_vs_native"] = d["inference_s_per_batch64"] / base
    evaluation = load_data(str(data_path), proto, purpose="evaluation", samples=360, seed=0)
    calibration = Calibration(load_data(str(data_path), proto, purpose="calibration", samples=256, seed=0))
    rows, hardware = [], {}
    with tempfile.TemporaryDirectory(prefix="wmaudit-bench-targets-") as d:
        for q in QUANT:
            path = write_model(compose(proto, f"quantize:{q}", calibration).model, Path(d) / "q.onnx")
            per, hw = fidelity_on_targets(model, path, evaluation, targets)
            hardware.update(hw)
            rows.append({"attack": f"quantize:{q}", "targets": {t: {"sqnr_db": v["fidelity"]["sqnr_db"],
                                                                     "top1_agreement": v["fidelity"]["top1_agreement"]}
                                                                 for t, v in per.items()}})
            print(f"quantize:{q:38s} " + "  ".join(f"{t} {v['fidelity']['sqnr_db']:6.2f} dB" for t, v in per.items()),
                  flush=True)
            rows[-1]["notes"] = fidelity_gaps([(q, f"quantize:{q}", per)], hw)
    out["fidelity"] = {"data": "digits.npz, 360 examples, seed 0; calibration 256 examples, seed 0", "rows": rows}
    dst = Path(a.out) / "targets.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"-> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of running onnxruntime in an isolated process (auditor/backends/isolate.py), per file.

`python bench/bench_isolation.py --out DIR [--quick]` measures, on the fixture models and
the third-party files (when `make data` fetched them), the median wall time of:

- session:  an InferenceSession built in-process vs. the isolated load check the auditor
            now does first (a spawned process imports onnxruntime and loads the file);
- predict:  logits of 256 Fashion-MNIST-shaped inputs in-process vs. in an isolated process
            (fixtures taking 1x28x28 inputs only);
- quantize: onnxruntime's quantize_dynamic on files in-process vs. isolated.

The overhead per call is the isolated time minus the in-process time. Writes DIR/isolation.json.
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


def _median_time(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def models() -> list[tuple[str, Path, bool]]:
    """(name, path, takes 1x28x28 images) of the models measured."""
    fx = Path(os.environ.get("WMAUDIT_FIXTURES", ROOT / "build" / "fixtures"))
    out = []
    for name in ("attacks-tinycnn-marked", "cnn-small-flatten", "seq-lstm-legacy"):
        p = fx / name / "model.onnx"
        if p.is_file():
            out.append((name, p, name.startswith(("attacks-", "cnn-"))))
    tp = Path(os.environ.get("WMAUDIT_DATA", ROOT / "build" / "data")) / "thirdparty"
    for p in sorted(tp.rglob("*.onnx"))[:2]:
        out.append((f"thirdparty/{p.name}", p, False))
    return out


def main(argv=None) -> int:
    import numpy as np

    from auditor.attacks.quantize import _quantize_dynamic_files
    from auditor.backends import isolate
    from auditor.backends.onnxruntime import _load_session
    from auditor.data.accuracy import _predict

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 7, no third-party quantization")
    a = ap.parse_args(argv)
    repeat = 3 if a.quick else 7
    x = np.random.default_rng(0).standard_normal((256, 1, 28, 28)).astype(np.float32)
    rows = []
    for name, path, images in models():
        row = {"model": name, "bytes": path.stat().st_size}
        prov = ["CPUExecutionProvider"]
        row["session_inprocess_s"] = _median_time(lambda: _load_session(str(path), prov, 1, keep=True), repeat)
        row["session_isolated_s"] = _median_time(lambda: isolate.call(_load_session, str(path), prov, 1), repeat)
        if images:
            row["predict_inprocess_s"] = _median_time(lambda: _predict(str(path), x, 128, 1), repeat)
            row["predict_isolated_s"] = _median_time(lambda: isolate.call(_predict, str(path), x, 128, 1), repeat)
        if not (a.quick and name.startswith("thirdparty")):
            with tempfile.TemporaryDirectory(prefix="wmaudit-bench-iso-") as d:
                dst = str(Path(d) / "q.onnx")
                try:
                    row["quantize_inprocess_s"] = _median_time(
                        lambda: _quantize_dynamic_files(str(path), dst, "int8", False, False), repeat)
                    row["quantize_isolated_s"] = _median_time(
                        lambda: isolate.call(_quantize_dynamic_files, str(path), dst, "int8", False, False), repeat)
                except Exception as e:  # a third-party file onnxruntime's quantizer refuses: say so
                    row["quantize_error"] = str(e).splitlines()[0][:200]
        for k in ("session", "predict", "quantize"):
            if f"{k}_isolated_s" in row:
                row[f"{k}_overhead_s"] = row[f"{k}_isolated_s"] - row[f"{k}_inprocess_s"]
        rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        print(json.dumps(rows[-1]), flush=True)
    over = [r[f"{k}_overhead_s"] for r in rows for k in ("session", "predict", "quantize") if f"{k}_overhead_s" in r]
    doc = {"bench": "isolation", "command": " ".join([sys.executable] + sys.argv), "repeat": repeat,
           "threads": os.environ.get("OMP_NUM_THREADS"), "models": rows,
           "overhead_per_call_s": {"median": round(statistics.median(over), 4) if over else None,
                                   "max": round(max(over), 4) if over else None}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "isolation.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["overhead_per_call_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Python API against the command line on the marked SmallCNN fixture
(attacks-tinycnn-marked): what a pipeline step saves by calling wmaudit in process.

    python bench/bench_api.py --out build/bench [--quick]

Measures (median of --repeats runs, wall clock): ``wmaudit.extract`` on a path and on an
in-memory ``onnx.ModelProto``; ``wmaudit extract --json`` as a subprocess (interpreter start,
imports, the same work); ``wmaudit.gate`` with a two-attack policy, with and without logging
the run to a fresh local MLflow store (SQLite). Writes DIR/api.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICY = """
format = "wmaudit-policy/1"
name = "bench"
backends = ["ort-cpu"]
seed = 0
[thresholds]
max_p_value = 1e-6
max_ber = 0.05
max_accuracy_drop = 3.0
[accuracy]
samples = 500
seed = 0
[[attacks]]
id = "fp16"
steps = "fp16"
[[attacks]]
id = "prune-30"
steps = "prune:0.3"
"""


def _median(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    a = ap.parse_args(argv)
    n = a.repeats or (3 if a.quick else 7)
    import onnx

    import wmaudit
    from fixtures.build import ensure

    fx = ensure("attacks-tinycnn-marked")
    model, key = fx / "model.onnx", fx / "key.json"
    proto = onnx.load(str(model))
    wmaudit.extract(model, key)  # warm: imports, caches
    out: dict = {"fixture": "attacks-tinycnn-marked", "repeats": n}
    out["extract_path_s"] = _median(lambda: wmaudit.extract(model, key), n)
    out["extract_proto_s"] = _median(lambda: wmaudit.extract(proto, key), n)
    cli = [sys.executable, "-m", "auditor", "extract", str(model), "--key", str(key), "--json"]
    out["extract_cli_subprocess_s"] = _median(lambda: subprocess.run(cli, capture_output=True, check=True), n)
    with tempfile.TemporaryDirectory() as d:
        pol = Path(d) / "policy.toml"
        pol.write_text(POLICY)
        wmaudit.gate(model, key, pol)  # warm: the evaluation data set is read and cached once per process
        out["gate_s"] = _median(lambda: wmaudit.gate(model, key, pol), max(1, n // 2))
        try:
            import mlflow  # noqa: F401

            cwd = os.getcwd()
            os.chdir(d)
            try:
                uri = f"sqlite:///{Path(d) / 'mlflow.db'}"
                wmaudit.gate(model, key, pol, mlflow=uri)  # creates the store's tables once
                out["gate_mlflow_s"] = _median(lambda: wmaudit.gate(model, key, pol, mlflow=uri), max(1, n // 2))
            finally:
                os.chdir(cwd)
        except ImportError:
            out["gate_mlflow_s"] = None
    out["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "python": platform.python_version()}
    out["command"] = " ".join([sys.executable, *sys.argv])
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "api.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

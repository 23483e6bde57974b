"""Every GPU target on a small fixture, one JSON result: `scripts/gpu-check.sh WHEELDIR OUT.json`
prepares the environment (onnxruntime-gpu from WHEELDIR) and runs this.

    python scripts/gpu_check.py --fixtures DIR --out OUT.json [--targets ort-cuda,ort-trt,tensorrt]

The fixture is data-digits-cnn (an 8x8 digits CNN, its 360 digits and its key). Its float
model, an fp16 copy and a static QDQ per-channel int8 copy (calibrated on 256 digits, made by
auditor.attacks) run on each target; each is compared with the float model on onnxruntime's CPU
provider (top-1 agreement, cosine, SQNR) and timed (median of 5 passes over the 360 inputs).

A target that cannot run is written as {"ran": false, "why": ...} and nothing else: no number
is ever written for a target that did not run. onnxruntime's runner refuses a session whose
first provider fell back to another one, so a CUDA or TensorRT row is always that provider's.
Exit codes: 0 every asked target ran, 1 some did not (each says why), 2 bad input or the
CUDA provider itself missing (one line on stderr, nothing written).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GPU_TARGETS = ("ort-cuda", "ort-trt", "tensorrt")
# ort-cpu runs the same measuring code on a machine without a GPU (the tests do); it is never a GPU result
KNOWN_TARGETS = GPU_TARGETS + ("ort-cpu",)
FIXTURE = "data-digits-cnn"
VARIANTS = ("float", "fp16", "quantize:static-qdq-per-channel")
REPEATS = 5


class Refusal(Exception):
    """Bad input or a missing piece: one line, exit 2."""


def _run(cmd: list[str], timeout: float = 60) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def gpu_record() -> dict:
    """Device, driver, CUDA, cuDNN and TensorRT versions, each from the piece that has it:
    nvidia-smi (device, driver), torch in a child process (its CUDA and cuDNN builds),
    onnxruntime (version, build, providers), tensorrt (its own version, when importable)."""
    rec: dict = {}
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None
    rec["nvidia_smi"] = ({"devices": [dict(zip(("name", "driver", "memory", "compute_capability"),
                                               (f.strip() for f in line.split(","))))
                                      for line in smi.splitlines() if line.strip()]}
                         if smi else {"error": "nvidia-smi not found or failed"})
    probe = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
             "'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(), 'cuda_available': c, "
             "'device': torch.cuda.get_device_name(0) if c else None}))")
    out = _run([sys.executable, "-c", probe], timeout=120)
    rec["torch"] = json.loads(out) if out else {"error": "torch did not import or failed to report"}
    import onnxruntime as ort

    rec["onnxruntime"] = {"version": ort.__version__, "build": getattr(ort, "get_build_info", lambda: None)(),
                          "device": ort.get_device(), "providers": ort.get_available_providers()}
    try:
        import tensorrt

        rec["tensorrt"] = {"version": tensorrt.__version__}
    except Exception as e:  # noqa: BLE001 - any import failure means: not importable here
        rec["tensorrt"] = {"error": f"tensorrt not importable: {type(e).__name__}: {e}".splitlines()[0]}
    return rec


def host_record() -> dict:
    """The CPU as this process sees it: wmaudit's hardware record (auditor/backends/hardware.py:
    CPUID through archspec, the kernel-selecting features incl. AVX-VNNI and AMX)."""
    from auditor.backends.hardware import process_record

    return process_record()


def prepare(fixtures: Path, work: Path) -> tuple[dict[str, Path], "object"]:
    """The three model files of the fixture and its 360 evaluation inputs."""
    from auditor.attacks import load_model, save
    from auditor.attacks.compose import compose
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data

    fx = fixtures / FIXTURE
    model, data = fx / "model.onnx", fx / "digits.npz"
    if not (fx / ".done").is_file() or not model.is_file() or not data.is_file():
        raise Refusal(f"fixture {FIXTURE} is missing in {fixtures}: build it with "
                      f"`python -m fixtures.build --out {fixtures} {FIXTURE}` (or `make fixtures`)")
    ev = load_data(str(data), model, purpose="evaluation", samples=360, seed=0)
    cal = Calibration(load_data(str(data), model, purpose="calibration", samples=256, seed=0))
    files = {"float": model}
    for v in VARIANTS[1:]:
        files[v] = save(compose(load_model(model), v, cal).model, work / (v.replace(":", "_") + ".onnx"))
    return files, ev


def _infer(path: Path, target: str, x) -> tuple[object, list[float], dict]:
    from auditor.backends import open_runner

    with open_runner(path, target) as r:
        y = r.infer_batches(x, 64)
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            r.infer_batches(x, 64)
            times.append(time.perf_counter() - t0)
        return y, times, dict(r.describe(), hardware=getattr(r, "hardware", None))


def run_target(target: str, files: dict[str, Path], x, ref) -> dict:
    """One target: every variant's fidelity to the float model on the CPU provider, and its time.
    Returns {"ran": False, "why": ...} when the target cannot run here."""
    from auditor.backends import availability
    from auditor.data import fidelity
    from auditor.errors import AuditError

    ok, why = availability(target)
    if not ok:
        return {"ran": False, "why": why}
    rows = {}
    for v, path in files.items():
        try:
            y, times, desc = _infer(path, target, x)
        except AuditError as e:
            rows[v] = {"ran": False, "why": str(e)}
            continue
        c = fidelity.compare({"y": ref}, {"y": y})
        rows[v] = {"ran": True, "runner": desc, "top1_agreement": c.get("top1_agreement"),
                   "cosine": c.get("cosine"), "sqnr_db": c.get("sqnr_db"),
                   "ms_per_pass_median": round(1000 * statistics.median(times), 3), "inputs": int(len(x))}
    ran = [v for v, r in rows.items() if r["ran"]]
    out = {"ran": bool(ran), "variants": rows}
    if not ran:
        out["why"] = "; ".join(f"{v}: {r['why']}" for v, r in rows.items())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.py")
    ap.add_argument("--fixtures", required=True, help="fixture folder holding data-digits-cnn")
    ap.add_argument("--out", required=True, help="result JSON (written once, at the end)")
    ap.add_argument("--targets", default=",".join(GPU_TARGETS), help="comma-separated, default every GPU target")
    ap.add_argument("--onnxruntime-lock", default="unknown", help="the onnxruntime version requirements.lock pins")
    a = ap.parse_args(argv)
    from auditor.errors import AuditError

    try:
        targets = [t for t in a.targets.split(",") if t]
        bad = [t for t in targets if t not in KNOWN_TARGETS]
        if bad or not targets:
            raise Refusal(f"--targets: unknown {', '.join(bad) or '(none given)'}; known: {', '.join(KNOWN_TARGETS)}")
        out = Path(a.out)
        if out.suffix != ".json" or not out.parent.is_dir() or out.is_dir():
            raise Refusal(f"{out}: the result must be a .json file in an existing folder")
        from auditor.backends import availability

        if any(t in GPU_TARGETS for t in targets):
            ok, why = availability("ort-cuda")
            if not ok:  # the base of every GPU target: without it there is nothing to check
                raise Refusal(f"the CUDA execution provider is missing: {why}")
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            files, ev = prepare(Path(a.fixtures), Path(tmp))
            x = next(iter(ev.inputs.values()))
            from auditor.backends import open_runner

            with open_runner(files["float"], "ort-cpu") as r:
                ref = r.infer_batches(x, 64)
            t0 = time.time()
            results = {t: run_target(t, files, x, ref) for t in targets}
            seconds = round(time.time() - t0, 1)
    except (Refusal, AuditError) as e:
        print(f"gpu-check: error: {e}", file=sys.stderr)
        return 2
    doc = {"schema": "wmaudit-gpu-check/1", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "scripts/gpu-check.sh " + " ".join(sys.argv[1:]),
           "hardware": {"gpu": gpu_record(), "host": host_record(), "onnxruntime_lock": a.onnxruntime_lock},
           "fixture": {"name": FIXTURE, "inputs": int(len(x)), "variants": list(VARIANTS),
                       "reference": "float model on onnxruntime's CPUExecutionProvider"},
           "targets": results, "seconds": seconds,
           "summary": {"ran": [t for t, r in results.items() if r["ran"]],
                       "not_run": {t: r["why"] for t, r in results.items() if not r["ran"]}}}
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp_out, out)
    for t, r in results.items():
        if r["ran"]:
            cells = ", ".join(f"{v} {c['sqnr_db']:.1f} dB / {c['ms_per_pass_median']:.2f} ms" if c["ran"]
                              else f"{v} not run ({c['why']})" for v, c in r["variants"].items())
            print(f"{t}: {cells}")
        else:
            print(f"{t}: NOT RUN: {r['why']}", file=sys.stderr)
    print(f"wrote {out}")
    return 0 if all(r["ran"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

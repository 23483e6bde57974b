"""scripts/gpu-check.sh and scripts/gpu_check.py: what can be checked without a GPU (the argument
checks, the refusal without a GPU or a CUDA provider, targets that cannot run recorded as not run
and never with a number) and the measuring path itself on onnxruntime's CPU provider."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SH = ROOT / "scripts" / "gpu-check.sh"
PY = ROOT / "scripts" / "gpu_check.py"


def _sh(*args, env=None):
    return subprocess.run(["bash", str(SH), *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env)


def _py(*args):
    return subprocess.run([sys.executable, str(PY), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: error: "), err
    return lines[0]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_argument_checks(tmp_path):
    r = _sh()
    assert r.returncode == 2 and "usage: scripts/gpu-check.sh WHEELDIR OUT.json" in _one_line(r.stderr)
    r = _sh(tmp_path / "nowheels", tmp_path / "out.json")
    assert r.returncode == 2 and "nowheels: no such folder" in _one_line(r.stderr)
    r = _sh(tmp_path, tmp_path / "out.txt")
    assert r.returncode == 2 and "must be a .json file" in _one_line(r.stderr)
    r = _sh(tmp_path, tmp_path / "missing" / "out.json")
    assert r.returncode == 2 and "no such folder for the result" in _one_line(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_refuses_without_a_gpu(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the refusal is checked on machines without a GPU")
    r = _sh(tmp_path, tmp_path / "out.json")
    assert r.returncode == 2 and "no NVIDIA GPU here: nvidia-smi not found" in _one_line(r.stderr)
    assert not (tmp_path / "out.json").exists()


def test_gpu_targets_refused_without_the_cuda_provider(build_fixture, tmp_path):
    from auditor.backends import availability

    if availability("ort-cuda")[0]:
        pytest.skip("onnxruntime has the CUDA provider here")
    root = build_fixture("data-digits-cnn").parent
    r = _py("--fixtures", root, "--out", tmp_path / "g.json")
    assert r.returncode == 2 and "the CUDA execution provider is missing" in _one_line(r.stderr)
    r = _py("--fixtures", root, "--out", tmp_path / "g.json", "--targets", "ort-cpu,gpu9")
    assert r.returncode == 2 and "--targets: unknown gpu9" in _one_line(r.stderr)
    r = _py("--fixtures", tmp_path / "empty", "--out", tmp_path / "g.json", "--targets", "ort-cpu")
    assert r.returncode == 2 and "fixture data-digits-cnn is missing" in _one_line(r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_a_target_that_cannot_run_has_no_numbers():
    from auditor.backends import availability

    mod = _module()
    for target in mod.GPU_TARGETS:
        ok, why = availability(target)
        if ok:
            continue
        row = mod.run_target(target, {}, None, None)
        assert row == {"ran": False, "why": why} and why


def test_measuring_path_on_the_cpu_provider(build_fixture, tmp_path):
    """The same code a GPU target runs, on ort-cpu: the float model against itself is exact, fp16
    and int8 stay close (floors: the int8 SQNR depends on the CPU's kernels), and the hardware
    record says what was read and from where."""
    root = build_fixture("data-digits-cnn").parent
    out = tmp_path / "cpu.json"
    r = _py("--fixtures", root, "--out", out, "--targets", "ort-cpu", "--onnxruntime-lock", "1.32.0")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["schema"] == "wmaudit-gpu-check/1" and doc["summary"] == {"ran": ["ort-cpu"], "not_run": {}}
    rows = doc["targets"]["ort-cpu"]["variants"]
    assert set(rows) == {"float", "fp16", "quantize:static-qdq-per-channel"} and all(v["ran"] for v in rows.values())
    assert rows["float"]["top1_agreement"] == 1.0 and rows["float"]["sqnr_db"] > 100
    assert rows["fp16"]["top1_agreement"] >= 0.99 and rows["fp16"]["sqnr_db"] >= 50
    assert rows["quantize:static-qdq-per-channel"]["top1_agreement"] >= 0.95
    assert rows["quantize:static-qdq-per-channel"]["sqnr_db"] >= 15
    assert all(v["ms_per_pass_median"] > 0 and v["inputs"] == 360 for v in rows.values())
    assert all(v["runner"]["providers"][0] == "CPUExecutionProvider" for v in rows.values())
    hw = doc["hardware"]
    import numpy
    import onnxruntime

    assert hw["onnxruntime_lock"] == "1.32.0" and hw["gpu"]["onnxruntime"]["version"] == onnxruntime.__version__
    assert hw["host"]["numpy"] == numpy.__version__ and hw["host"]["cpu"]["features"]
    if not shutil.which("nvidia-smi"):
        assert "error" in hw["gpu"]["nvidia_smi"]
    assert "ort-cpu" in r.stdout and f"wrote {out}" in r.stdout


def test_make_target_downloads_the_locked_release():
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    lock = re.search(r"^onnxruntime==(\S+)", (ROOT / "requirements.lock").read_text(), re.M).group(1)
    r = subprocess.run(["make", "-n", "gpu-wheels"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cmd = next(ln for ln in r.stdout.replace("\\\n", " ").splitlines() if "onnxruntime-gpu==" in ln)
    assert "pip download" in cmd and "--no-deps" in cmd and "-d build/gpu-wheels" in cmd
    assert f"onnxruntime-gpu=={lock}" in cmd
    r = subprocess.run(["make", "-n", "gpu-wheels", "ORT_GPU_VERSION=1.31.1"], capture_output=True, text=True, cwd=ROOT)
    assert "onnxruntime-gpu==1.31.1" in r.stdout

"""Nothing outside the outputs: every command runs with an empty HOME, and HOME stays empty
(onnxruntime's telemetry database, caches, configs); the files the command and every child
open (traced with strace -f: onnxruntime's C++ opens included, not only Python's) stay inside
the model's folder, the outputs, the temporary folder it was given (left empty), the
checkout, the virtualenv and the system's paths, and nothing is written outside the case
folder. ORT_DISABLE_TELEMETRY is removed from the environment first: the auditor sets it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures import hostile

ROOT = Path(__file__).resolve().parent.parent
STRACE = shutil.which("strace")

# Paths a process reads on its own (loader, locale, CPU and memory facts); never written.
SYSTEM = ("/usr/", "/lib/", "/lib64/", "/etc/", "/proc/", "/sys/", "/dev/", "/run/")
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")


def _case(root: Path) -> Path:
    """A model, its white-box key, a trigger key, a policy, a grid and data: the command lines' inputs."""
    d = root / "case"
    (d / "out").mkdir(parents=True)
    (d / "model.onnx").write_bytes(hostile.base_model().SerializeToString())
    (d / "key.json").write_text(json.dumps(hostile.key_doc()))
    (d / "policy.toml").write_text(hostile.POLICY)
    (d / "grid.toml").write_text(hostile.GRID)
    r = np.random.default_rng(20)
    x = r.standard_normal((40, 1, 28, 28)).astype(np.float32)
    np.savez(d / "data.npz", input=x, y=r.integers(0, 10, 40))
    np.save(d / "x.npy", x)
    np.save(d / "images.npy", r.random((12, 1, 28, 28)).astype(np.float32))
    np.save(d / "labels.npy", np.arange(12) % 10)
    (d / "corpus").mkdir()
    (d / "corpus" / "a.onnx").write_bytes(hostile.base_model().SerializeToString())
    return d


# (command line, exit codes it may give); run in this order in one case folder (later lines use earlier outputs)
RUNS = [
    (["inspect", "model.onnx", "--json"], {0}),
    (["extract", "model.onnx", "--key", "key.json", "--json", "-o", "out/extract.json"], {0, 1}),
    (["key", "new", "--owner", "ACME", "--nonce", "n1", "--date", "2026-01-15", "--param", "conv.weight",
      "--shape", "8,1,3,3", "--reduce", "flatten", "--bits-count", "32", "-o", "out/new-key.json"], {0}),
    (["key", "show", "key.json"], {0}),
    (["key", "verify", "out/new-key.json"], {0}),
    (["key", "import", "--images", "images.npy", "--labels", "labels.npy", "-o", "out/trigger-key.json"], {0}),
    (["attack", "model.onnx", "--quantize", "dynamic", "-o", "out/int8.onnx"], {0}),
    (["attack", "model.onnx", "--prune", "0.5", "--quantize", "static-qdq-per-channel", "--data", "x.npy",
      "-o", "out/static.onnx"], {0}),
    (["attack", "model.onnx", "--quantize", "fp16", "-o", "out/fp16.onnx"], {0}),
    (["robustness", "model.onnx", "--key", "key.json", "--grid", "grid.toml", "--data", "data.npz",
      "--jobs", "1", "-o", "out/robustness"], {0, 1}),
    (["report", "out/robustness/results.json", "-o", "out/report.html"], {0}),
    (["gate", "model.onnx", "--key", "key.json", "--policy", "policy.toml", "-o", "out/gate.json"], {0, 1}),
    (["query", "model.onnx", "--key", "out/trigger-key.json", "--backend", "ort-cpu"], {0, 1}),
    (["scan", "model.onnx", "--key", "key.json", "--json"], {0, 1}),
    (["obfuscate", "model.onnx", "--steps", "perm-out", "--seed", "1", "-o", "out/obf.onnx"], {0}),
    (["provenance", "out/obf.onnx", "--reference", "model.onnx", "--json"], {0, 1}),
    (["sweep", "corpus", "--key", "key.json", "-o", "out/sweep.jsonl", "--jobs", "1"], {0}),
    (["phash", "build", "model.onnx", "--signal", "x.npy", "-o", "out/hash.json"], {0}),
    (["phash", "match", "model.onnx", "--hash", "out/hash.json", "--data", "x.npy"], {0, 1}),
    (["keyed", "keygen", "--image-size", "28", "--channels", "1", "--block", "4", "--seed", "7",
      "-o", "out/keyed-key.json"], {0}),
]

_OPEN = re.compile(r'^(\d+)\s+(?:open|openat|openat2|creat)\((?:[^"]*?)"(?P<path>(?:[^"\\]|\\.)*)"(?P<rest>.*)\)\s+=\s+'
                   r'(?P<fd>-?\d+)(?:<(?P<resolved>[^>]*)>)?')
_OTHER = re.compile(r'^(\d+)\s+(?P<call>mkdir|mkdirat|rename|renameat2?|unlink|unlinkat|link|linkat|symlink|symlinkat|rmdir)'
                    r'\((?P<args>.*)\)\s+=\s+0')


def _roots() -> list[str]:
    paths = sysconfig.get_paths()
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, paths["stdlib"],
             paths["purelib"], paths["platlib"], str(ROOT)}
    return sorted({os.path.realpath(r) for r in roots})


def _inside(path: str, roots) -> bool:
    p = os.path.realpath(path)
    return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)


def _opened(trace: Path, cwd: Path) -> tuple[set[str], set[str]]:
    """(files opened successfully, files written or created or removed), absolute."""
    opened, written = set(), set()
    for line in trace.read_text(errors="replace").splitlines():
        m = _OPEN.match(line)
        if m:
            if int(m["fd"]) < 0:
                continue
            p = m["resolved"] or m["path"]
            p = p if os.path.isabs(p) else str(cwd / p)
            opened.add(p)
            if any(f in m["rest"] for f in WRITE_FLAGS):
                written.add(p)
            continue
        m = _OTHER.match(line)
        if m:
            for q in re.findall(r'"((?:[^"\\]|\\.)*)"', m["args"]):
                written.add(q if os.path.isabs(q) else str(cwd / q))
    return opened, written


# onnxruntime writes no telemetry when it sees a CI marker (CI=true, as .ci/run sets it): without them
# the children behave as on a user's machine, so these checks are not vacuous under CI
CI_MARKERS = ("CI", "CONTINUOUS_INTEGRATION", "GITHUB_ACTIONS", "GITLAB_CI", "TF_BUILD", "BUILD_ID", "JENKINS_URL",
              "TRAVIS", "BUILDKITE", "CIRCLECI", "TEAMCITY_VERSION")


def _env(home: Path, tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("XDG_", "ORT_", "WMAUDIT_ALLOW")) and k not in CI_MARKERS}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WMAUDIT_DATA", None)  # no command here reads the tool's own data sets
    return env


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """Every command of RUNS under strace -f (or plainly without strace): one result per run."""
    base = tmp_path_factory.mktemp("notrace")
    case = _case(base)
    home, tmp = base / "home", base / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = _env(home, tmp)
    results = []
    for i, (argv, codes) in enumerate(RUNS):
        trace = base / f"trace-{i}.txt"
        cmd = [sys.executable, "-m", "auditor", *argv]
        if STRACE:
            cmd = [STRACE, "-f", "--seccomp-bpf", "-qq", "-y", "-s", "4096", "-o", str(trace),
                   "-e", "trace=open,openat,openat2,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,"
                         "link,linkat,symlink,symlinkat,rmdir"] + cmd
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=case, env=env, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - t0
        opened, written = _opened(trace, case) if STRACE else (set(), set())
        results.append({"argv": argv, "codes": codes, "rc": r.returncode, "seconds": round(seconds, 1), "stderr": r.stderr,
                        "home": sorted(str(p.relative_to(home)) for p in home.rglob("*")),
                        "tmp": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")),
                        "opened": opened, "written": written})
    return {"case": case, "tmp": tmp, "results": results}


def test_every_command_runs(traced):
    bad = [(" ".join(r["argv"][:2]), r["rc"], r["stderr"].strip()[-300:]) for r in traced["results"]
           if r["rc"] not in r["codes"]]
    assert not bad, bad


def test_home_stays_empty(traced):
    """No telemetry database, cache or config under HOME, after any command."""
    bad = [(" ".join(r["argv"][:2]), r["home"]) for r in traced["results"] if r["home"]]
    assert not bad, bad


def test_temporary_files_are_removed(traced):
    bad = [(" ".join(r["argv"][:2]), r["tmp"]) for r in traced["results"] if r["tmp"]]
    assert not bad, bad


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (make test installs it)")
def test_files_opened_stay_inside(traced):
    """What the commands and their children open (onnxruntime's own C++ opens included) lies in
    the case folder (model, inputs, outputs, the temporary folder), the checkout, the virtualenv or
    system paths; what they write, create or remove lies in the case folder only."""
    case = os.path.realpath(traced["case"].parent)
    roots = _roots() + [case]
    assert sum(len(r["opened"]) for r in traced["results"]) > 100  # the trace saw the runs
    # onnxruntime itself was traced: its shared library was opened by the runs that use it
    assert any(any("libonnxruntime" in p or "onnxruntime_pybind11" in p for p in r["opened"])
               for r in traced["results"])
    outside, wrote = [], []
    for r in traced["results"]:
        name = " ".join(r["argv"][:2])
        for p in r["opened"]:
            if not _inside(p, roots) and not p.startswith(SYSTEM):
                outside.append((name, p))
        for p in r["written"]:
            if not _inside(p, [case]) and p not in ("/dev/null", "/dev/shm") and not p.startswith(("/dev/shm/", "/proc/self/", "/proc/thread-self/")):
                wrote.append((name, p))
    assert not outside, sorted(set(outside))[:30]
    assert not wrote, sorted(set(wrote))[:30]


def test_telemetry_opt_in_is_honoured(tmp_path):
    """WMAUDIT_ALLOW_ORT_TELEMETRY=1 leaves onnxruntime's default: the check above is not vacuous."""
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, tmp_path)
    env["WMAUDIT_ALLOW_ORT_TELEMETRY"] = "1"
    code = ("import auditor, os, onnxruntime as ort\n"
            "from fixtures import hostile\n"
            "ort.InferenceSession(hostile.base_model().SerializeToString(), providers=['CPUExecutionProvider'])\n"
            "print(os.environ.get('ORT_DISABLE_TELEMETRY'))\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "None"
    assert list(home.rglob("onnxruntime.db"))  # what the default run would leave behind
    env.pop("WMAUDIT_ALLOW_ORT_TELEMETRY")
    shutil.rmtree(home)
    home.mkdir()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
    assert not list(home.rglob("*"))

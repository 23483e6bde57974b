"""Targets: where a model runs, and the hardware each one stands for.

A target is a runner plus the hardware it stands for. Every target runs the
model in a child process of its own (``auditor/backends/child.py``), under a
time limit, so a model that crashes or hangs onnxruntime during inference is
one line; the child reports the hardware record of the process that ran the
model.

==============  ======================================================================
``native``      this machine's CPU, onnxruntime's CPU execution provider (the default)
``x86-64-v3``   an AVX2 + FMA CPU without AVX-512 (Haswell), emulated by
                ``qemu-x86_64 -cpu Haswell-v4`` running this Python environment
``x86-64-v2``   an SSE4.2 CPU without AVX (Nehalem), ``qemu-x86_64 -cpu Nehalem-v2``
``aarch64``     64-bit Arm Neoverse N1 (NEON, dotprod), emulated by ``qemu-aarch64`` on an
                arm64 root built by ``make aarch64-root``, with the onnxruntime release that
                runs there (``AARCH64_ONNXRUNTIME``)
``aarch64-i8mm`` the same root on qemu's ``max`` CPU (i8mm, bf16, SVE2): onnxruntime picks
                its i8mm int8 kernels there
``ort-cuda``    onnxruntime's CUDA execution provider (a GPU)
``ort-trt``     onnxruntime's TensorRT execution provider (a GPU)
``tensorrt``    native TensorRT (``auditor/backends/tensorrt.py``, a GPU)
==============  ======================================================================

The emulated child is started under the emulator itself: under qemu-user a
program that the emulated process starts with exec runs natively, so a
forkserver or any re-exec would escape the emulation. Emulated results say so
(``hardware.emulated``) and carry no timings. The old ``--backend`` names are
aliases: ``ort-cpu`` is ``native``.
"""
from __future__ import annotations

import functools
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import AuditError

CHILD = Path(__file__).resolve().with_name("child.py")
REPO = Path(__file__).resolve().parents[2]
# The newest onnxruntime whose aarch64 wheel imports under Debian 12's qemu-aarch64 (7.2):
# 1.28 to 1.32 stop at import there. Pinned with numpy for the arm64 root.
AARCH64_ONNXRUNTIME = "1.27.0"
AARCH64_NUMPY = "2.4.6"
AARCH64_ARCHSPEC = "0.2.7"


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # native | emulated | gpu
    stands_for: str
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    emulator: str | None = None
    emulator_cpu: str | None = None
    session_config: tuple[tuple[str, str], ...] = ()  # onnxruntime session config entries
    base: str | None = None  # the target this one adds session options to

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "stands_for": self.stands_for,
                "emulator": self.emulator, "emulator_cpu": self.emulator_cpu,
                "providers": list(self.providers), "session_config": dict(self.session_config)}


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("native", "native", "this machine's CPU (onnxruntime CPU execution provider)"),
    Target("x86-64-v3", "emulated", "x86-64-v3: AVX2, FMA, BMI2, no AVX-512 (the common server and laptop floor)",
           emulator="qemu-x86_64", emulator_cpu="Haswell-v4"),
    Target("x86-64-v2", "emulated", "x86-64-v2: SSE4.2, POPCNT, no AVX",
           emulator="qemu-x86_64", emulator_cpu="Nehalem-v2"),
    Target("aarch64", "emulated", "64-bit Arm Neoverse N1: NEON, dotprod (AWS Graviton2, Ampere Altra)",
           emulator="qemu-aarch64", emulator_cpu="neoverse-n1"),
    Target("aarch64-i8mm", "emulated", "64-bit Arm with i8mm, bf16, SVE2 (qemu's max CPU; Graviton3-class "
           "features)", emulator="qemu-aarch64", emulator_cpu="max"),
    Target("ort-cuda", "gpu", "an NVIDIA GPU through onnxruntime's CUDA execution provider",
           providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
    Target("ort-trt", "gpu", "an NVIDIA GPU through onnxruntime's TensorRT execution provider",
           providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")),
    Target("tensorrt", "gpu", "an NVIDIA GPU through native TensorRT"),
)}
ALIASES = {"ort-cpu": "native"}
NAMES = tuple(TARGETS)
CHOICES = NAMES + tuple(ALIASES)
# ``TARGET+OPTION``: a CPU target with an onnxruntime session option a deployer can set.
# x64quantprecision: onnxruntime's slower x64 int8 kernels that do not saturate 16-bit sums on
# AVX2 CPUs without VNNI (the session config key session.x64quantprecision).
SESSION_OPTIONS = {"x64quantprecision": (("session.x64quantprecision", "1"),)}


def resolve(name: str) -> Target:
    """The target called ``name``: a target, an old backend name, or ``TARGET+OPTION`` with an
    onnxruntime session option (``SESSION_OPTIONS``) on an x86 CPU target."""
    base, *opts = str(name).split("+")
    t = TARGETS.get(ALIASES.get(base, base))
    if t is None:
        raise AuditError(f"unknown target {name!r} (known: {', '.join(NAMES)}; ort-cpu = native; "
                         f"TARGET+{'|'.join(SESSION_OPTIONS)} adds a session option)")
    if not opts:
        return t
    for o in opts:
        if o not in SESSION_OPTIONS:
            raise AuditError(f"unknown session option {o!r} in target {name!r} (known: {', '.join(SESSION_OPTIONS)})")
    if t.kind == "gpu" or t.emulator == "qemu-aarch64":
        raise AuditError(f"target {name!r}: {', '.join(opts)} applies to x86 CPU targets only")
    config = tuple(kv for o in dict.fromkeys(opts) for kv in SESSION_OPTIONS[o])
    return Target(f"{t.name}+{'+'.join(dict.fromkeys(opts))}", t.kind,
                  f"{t.stands_for}, with onnxruntime session option(s) {', '.join(f'{k}={v}' for k, v in config)}",
                  t.providers, t.emulator, t.emulator_cpu, config, t.name)


def target_name(value: str) -> str:
    """argparse type of --target: a name ``resolve`` accepts (one line otherwise)."""
    import argparse

    try:
        return resolve(value).name if "+" in value else (value if value in CHOICES else resolve(value).name)
    except AuditError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def aarch64_root() -> Path:
    return Path(os.environ.get("WMAUDIT_AARCH64_ROOT") or REPO / "build" / "targets" / "aarch64")


@functools.lru_cache(maxsize=None)
def _emulator_version(binary: str) -> str | None:
    """The emulator's version line, asked once per process (every emulated child's record names it)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    return first.replace(f"{Path(binary).name} version ", "").strip() or None


def availability(name: str) -> tuple[bool, str, str]:
    """(usable here, why not, the one command that makes it available)."""
    t = resolve(name)
    if t.base:
        return availability(t.base)
    if t.kind == "native":
        return True, "", ""
    if t.kind == "emulated":
        if shutil.which(t.emulator) is None:
            return False, f"{t.emulator} is not installed", "apt-get install qemu-user"
        if t.emulator == "qemu-aarch64":
            root = aarch64_root()
            if not (root / "usr" / "bin" / "python3.11").exists() or not (root / ".done").exists():
                return False, f"no arm64 root at {root}", "make aarch64-root"
        return True, "", ""
    if t.name == "tensorrt":
        from auditor.backends.tensorrt import availability as trt_availability

        ok, why = trt_availability()
        return ok, why, "" if ok else "pip install tensorrt (on a machine with an NVIDIA GPU and CUDA)"
    from auditor.backends.onnxruntime import provider_available

    ok, why = provider_available(t.providers[0])
    return ok, why, "" if ok else "pip install onnxruntime-gpu (on a machine with an NVIDIA GPU and CUDA)"


def check_available(names) -> list[Target]:
    out = []
    for n in names:
        t = resolve(n)
        ok, why, fix = availability(t.name)
        if not ok:
            raise AuditError(f"target {t.name} is not available: {why}" + (f" (run: {fix})" if fix else ""))
        out.append(t)
    return out


def _child_command(t: Target) -> tuple[list[str], dict[str, str]]:
    """The command that starts the target's child, and its environment. The child runs in isolated
    mode (-I: no PYTHONPATH, no user site, not even its own folder on sys.path), so that nothing
    of the caller's path can shadow the standard library or onnxruntime there."""
    env = dict(os.environ)
    if env.get("WMAUDIT_ALLOW_ORT_TELEMETRY") != "1":  # the documented opt-in (auditor/__init__.py)
        env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if t.emulator == "qemu-aarch64":
        root = aarch64_root()
        env["QEMU_LD_PREFIX"] = str(root)
        return ([shutil.which(t.emulator) or t.emulator, "-cpu", t.emulator_cpu, "-L", str(root),
                 str(root / "usr" / "bin" / "python3.11"), "-I", "-B", str(CHILD), "--site", str(root / "site")], env)
    # this interpreter and its packages (the venv), started as a script so that nothing of
    # auditor but child.py is imported there
    cmd = [sys.executable, "-I", "-B", str(CHILD)]
    if t.kind == "emulated":
        cmd = [shutil.which(t.emulator) or t.emulator, "-cpu", t.emulator_cpu] + cmd
    return cmd, env


def _limit_memory(limit: int):
    def apply() -> None:
        from auditor.backends.isolate import limit_address_space

        limit_address_space(limit)
    return apply


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


class TargetRunner:
    """Runner on a target: the model runs in the target's child process (see the module doc).

    Same interface as the in-process runners: a context manager with ``infer``,
    ``infer_batches``, ``fixed_batch``, ``describe``, ``input_names``; plus ``hardware``,
    the record the child reported."""

    def __init__(self, model_path: str | os.PathLike, target: str = "native", threads: int | None = None,
                 timeout: float | None = None, memory: int | None = None):
        from auditor.backends import isolate

        self.model_path = Path(model_path)
        self.target = resolve(target)
        self.name = self.target.name
        self.threads = threads
        self.timeout = isolate.timeout_s() if timeout is None else timeout
        self.memory = isolate.memory_bytes() if memory is None else memory
        self.proc: subprocess.Popen | None = None
        self.hardware: dict[str, Any] = {}
        self.inputs: list[tuple[str, Any, list]] = []
        self.output_names: list[str] = []

    # -- lifecycle
    def __enter__(self) -> "TargetRunner":
        if not self.model_path.is_file():
            raise AuditError(f"model not found: {self.model_path}")
        check_available([self.name])
        cmd, env = _child_command(self.target)
        self._stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                         env=env, close_fds=True, start_new_session=True,
                                         preexec_fn=_limit_memory(self.memory) if self.target.kind != "emulated"
                                         else None)
        except OSError as e:
            self._stderr.close()
            raise AuditError(f"target {self.name}: cannot start the model's process ({e.strerror})") from None
        try:
            reply, _ = self._request({"op": "open", "model": str(self.model_path.resolve()),
                                      "providers": list(self.target.providers), "threads": self.threads,
                                      "session_config": dict(self.target.session_config)})
        except BaseException:
            self.__exit__()
            raise
        self.inputs = [(i["name"], _ORT_TYPES.get(i["type"], np.float32), list(i["shape"])) for i in reply["inputs"]]
        self.output_names = list(reply["outputs"])
        self.hardware = annotate(reply["hardware"], self.target)
        return self

    def __exit__(self, *exc) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            try:
                if p.poll() is None:
                    from auditor.backends.child import write_message

                    write_message(p.stdin, {"op": "close"})
                    p.stdin.close()
                    p.wait(5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    p.kill()
                p.wait()
            for f in (p.stdout,):
                try:
                    f.close()
                except OSError:
                    pass
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
            self._stderr = None

    # -- the protocol
    def _died(self) -> AuditError:
        p = self.proc
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        from auditor.backends.isolate import killed_by_signal

        code = p.returncode
        where = f"on target {self.name}" if self.name != "native" else "on this model"
        line = killed_by_signal(code, "onnxruntime", where)
        if line is not None:
            return AuditError(line)
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().decode("utf-8", "replace").splitlines()
                     if ln.strip() and "TCG doesn't support" not in ln]
            tail = f": {lines[-1].strip()[:200]}" if lines else ""
        if code is not None and code != 0 and any(("MemoryError" in ln or "bad_alloc" in ln) for ln in [tail]):
            return AuditError(f"onnxruntime ran out of memory (limit {self.memory / (1 << 30):.1f} GiB) {where}")
        return AuditError(f"the model's process exited without a result (exit {code}) {where}{tail}")

    def _request(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None):
        from auditor.backends.child import read_message, write_message

        p = self.proc
        if p is None:
            raise RuntimeError("runner is not active; use it in a `with` block")
        try:
            write_message(p.stdin, header, arrays)
        except (BrokenPipeError, OSError):
            raise self._died() from None
        ready, _, _ = select.select([p.stdout], [], [], self.timeout)
        if not ready:
            where = f"on target {self.name}" if self.name != "native" else "on this model"
            raise AuditError(f"onnxruntime ran out of time ({self.timeout:g} s) {where}")
        try:
            reply, out = read_message(p.stdout)
        except (EOFError, OSError, ValueError, struct.error):
            raise self._died() from None
        if not reply.get("ok"):
            where = f" (on target {self.name})" if self.name != "native" else ""
            raise AuditError(f"{reply.get('error', 'the model failed')}{where}")
        return reply, out

    # -- queries (the OnnxrtRunner interface)
    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.inputs]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "target": self.name,
                "onnxruntime": (self.hardware.get("onnxruntime") or {}).get("version"),
                "providers": (self.hardware.get("onnxruntime") or {}).get("providers", list(self.target.providers)),
                "inputs": [{"name": n, "dtype": np.dtype(t).name, "shape": [str(s) for s in sh]}
                           for n, t, sh in self.inputs]}

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = {}
        for name, dtype, _ in self.inputs:
            if name not in feed:
                raise AuditError(f"model input {name!r} is not in the feed (have {sorted(feed)})")
            cast[name] = np.ascontiguousarray(feed[name], dtype=dtype)
        _, out = self._request({"op": "run"}, cast)
        return {n: out[n] for n in self.output_names}

    def fixed_batch(self) -> int | None:
        dim = self.inputs[0][2][0] if self.inputs and self.inputs[0][2] else None
        return int(dim) if isinstance(dim, int) and dim > 0 else None

    def infer_batches(self, x: np.ndarray, batch_size: int = 64, output: str | None = None) -> np.ndarray:
        from auditor.backends import infer_batches

        return infer_batches(self, x, batch_size, output)
def annotate(record: dict[str, Any], target: Target) -> dict[str, Any]:
    """The child's record plus what only the parent knows: the target and the emulator."""
    rec = dict(record)
    rec["target"] = target.name
    if target.session_config:
        rec["onnxruntime"] = dict(rec.get("onnxruntime") or {}, session_config=dict(target.session_config))
    rec["stands_for"] = target.stands_for
    if target.kind == "emulated":
        rec["emulated"] = {"emulator": target.emulator, "version": _emulator_version(shutil.which(target.emulator)
                                                                                       or target.emulator),
                           "cpu": target.emulator_cpu,
                           "note": "emulated: results are this instruction set's arithmetic; no timings"}
        if target.emulator == "qemu-aarch64":
            rec["emulated"]["root"] = str(aarch64_root())
    else:
        rec["emulated"] = None
    if target.kind == "gpu":
        from auditor.backends.child import gpu_record

        rec["gpu"] = gpu_record()
    return rec

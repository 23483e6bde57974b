"""The process that runs a model for a target, and the hardware record it reports.

This module is started as a script (``python child.py``) by
``auditor.backends.targets``: natively, under ``qemu-x86_64 -cpu MODEL`` or
under ``qemu-aarch64 -L ROOT`` with an arm64 Python and its own numpy and
onnxruntime. It therefore imports only the standard library, numpy,
onnxruntime and (optionally) archspec, never the rest of ``auditor``.

The hardware record is read by the process that runs the model, from what
that process sees: on x86 the CPUID instruction (archspec's collector, which
qemu emulates), on Arm the kernel's HWCAP words (``getauxval``, which qemu
emulates too), never the host's ``/proc/cpuinfo`` alone (under emulation it
describes the host, not the CPU the model ran on). archspec names the
microarchitecture and the generic level from those features.

Protocol (binary, on the child's stdin and a private copy of its stdout): a
message is a 4-byte big-endian length, a JSON header, then for each name in
``header["arrays"]`` an 8-byte big-endian length and an ``.npy`` blob
(``allow_pickle=False`` both ways). Requests: ``open`` (model path,
providers, threads) -> inputs, outputs and the hardware record; ``run``
(arrays by input name) -> arrays by output name; ``close``. A failure is
``{"ok": false, "error": one line}``; the child keeps serving after an
inference error and exits after a failed ``open``.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # started as a script: this folder must not shadow `onnxruntime`
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    if len(sys.argv) > 2 and sys.argv[1] == "--site":  # an interpreter's packages beside it (arm64 root)
        sys.path.append(sys.argv[2])

import ctypes
import io
import json
import platform
import struct
from typing import Any, BinaryIO

# The instruction-set features that select onnxruntime's CPU kernels (MLAS): its int8 GEMM
# picks AVX512-VNNI / AVX-VNNI / AMX or AVX2 u8s8 on x86, dotprod / i8mm / SVE on Arm.
X86_KERNEL_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                       "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8",
                       "amx_bf16")
ARM_KERNEL_FEATURES = ("asimd", "asimdhp", "fphp", "asimddp", "asimdfhm", "i8mm", "bf16", "sve", "sve2",
                       "svei8mm", "svebf16")

# Linux arm64 HWCAP / HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h), named as the kernel
# names them in /proc/cpuinfo (the names archspec's Arm targets use).
_HWCAP = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp",
          "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512",
          "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg")
_HWCAP2 = ("dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint",
           "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte")
_AT_HWCAP, _AT_HWCAP2 = 16, 26


def _arm_features() -> set[str]:
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    words = (getauxval(_AT_HWCAP), getauxval(_AT_HWCAP2))
    return {name for word, names in zip(words, (_HWCAP, _HWCAP2))
            for bit, name in enumerate(names) if word >> bit & 1}


def _x86_cpuid() -> tuple[str, str | None, set[str]]:
    """(vendor, brand string, features) from the CPUID instruction of this process."""
    from archspec.cpu.detect import CpuidInfoCollector

    c = CpuidInfoCollector()
    features = set(c.features)
    if "pni" in features:  # /proc/cpuinfo's name for SSE3; archspec's targets say sse3
        features.add("sse3")
    if c.highest_extension_support >= 0x80000008 and c.cpuid.registers_for(eax=0x80000008, ecx=0).ebx & 1:
        features.add("clzero")  # AMD leaf 0x80000008 EBX[0]; the Zen targets require it
    return c.vendor, c.brand_string(), features


def _name_microarchitecture(vendor: str, features: set[str]) -> dict[str, Any]:
    """archspec's best specific and best generic target for these features (its host() rule)."""
    try:
        from archspec.cpu.detect import compatible_microarchitectures, partial_uarch
    except ImportError:
        return {"microarchitecture": None, "level": None, "named_by": "archspec is not installed"}
    info = partial_uarch(vendor=vendor or "generic", features=features)
    candidates = compatible_microarchitectures(info)
    key = lambda t: (len(t.ancestors), len(t.features))  # noqa: E731 - archspec's sorting rule
    generic = [c for c in candidates if c.vendor == "generic"]
    best_generic = max(generic, key=key) if generic else None
    specific = [c for c in candidates if best_generic is None or c > best_generic]
    best = max(specific, key=key) if specific else best_generic
    import archspec

    return {"microarchitecture": best.name if best else None,
            "level": best_generic.name if best_generic else None,
            "named_by": f"archspec {getattr(archspec, '__version__', '?')}"}


def _host_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_record() -> dict[str, Any]:
    """The CPU as this process sees it (see the module doc)."""
    arch = platform.machine()
    rec: dict[str, Any] = {"arch": arch}
    try:
        if arch in ("x86_64", "AMD64"):
            vendor, brand, features = _x86_cpuid()
            rec.update(vendor=vendor, model=brand, source="cpuid")
            kernel = X86_KERNEL_FEATURES
        elif arch in ("aarch64", "arm64"):
            features = _arm_features()
            vendor, kernel = "", ARM_KERNEL_FEATURES
            rec.update(vendor=None, model=None, source="getauxval(AT_HWCAP, AT_HWCAP2)")
        else:
            features, vendor, kernel = set(), "", ()
            rec.update(vendor=None, model=None, source=None)
    except Exception as e:  # noqa: BLE001 - a record that says what could not be read beats none
        rec.update(vendor=None, model=None, features=None, error=f"{type(e).__name__}: {e}"[:200])
        return rec
    rec.update(_name_microarchitecture(vendor, features) if features else
               {"microarchitecture": None, "level": None, "named_by": None})
    rec["features"] = {f: f in features for f in kernel}
    rec["all_features"] = sorted(features)
    try:
        rec["logical_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        rec["logical_cpus"] = os.cpu_count()
    return rec


def onnxruntime_record(session=None, threads: int | None = None) -> dict[str, Any]:
    """onnxruntime's version, build and the providers and threads a session uses."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"version": None, "error": f"onnxruntime cannot be imported ({e})"}
    rec: dict[str, Any] = {"version": ort.__version__}
    try:
        info = ort.get_build_info() if hasattr(ort, "get_build_info") else ""
        rec["build"] = " ".join(str(info).split())[:300] or None
    except Exception:  # noqa: BLE001
        rec["build"] = None
    rec["device"] = ort.get_device()
    if session is not None:
        rec["providers"] = session.get_providers()
        rec["execution_provider"] = rec["providers"][0]
    rec["intra_op_threads"] = int(threads) if threads else "default (one per core)"
    return rec


def gpu_record() -> dict[str, Any]:
    """The GPU, its driver and the CUDA, cuDNN and TensorRT versions this process loads
    (nvidia-smi for the device and driver, the libraries' own version calls for the rest)."""
    import shutil
    import subprocess

    rec: dict[str, Any] = {"device": None, "driver": None, "cuda_runtime": None, "cudnn": None, "tensorrt": None}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            if out:
                name, driver, mem = (x.strip() for x in (out[0].split(",") + ["", ""])[:3])
                rec.update(device=name, driver=driver, memory=mem, count=len(out))
        except (OSError, subprocess.SubprocessError):
            pass

    def version(libs, fn):
        for lib in libs:
            try:
                f = getattr(ctypes.CDLL(lib), fn)
            except (OSError, AttributeError):
                continue
            if fn == "cudaRuntimeGetVersion":
                v = ctypes.c_int()
                return int(v.value) if f(ctypes.byref(v)) == 0 else None
            f.restype = ctypes.c_size_t
            return int(f())
        return None

    cuda = version(("libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"),
                   "cudaRuntimeGetVersion")
    rec["cuda_runtime"] = f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None
    cudnn = version(("libcudnn.so", "libcudnn.so.9", "libcudnn.so.8"), "cudnnGetVersion")
    rec["cudnn"] = (f"{cudnn // 10000}.{cudnn % 10000 // 100}.{cudnn % 100}" if cudnn and cudnn >= 90000
                    else (f"{cudnn // 1000}.{cudnn % 1000 // 100}.{cudnn % 100}" if cudnn else None))
    try:  # the installed version only; the backend itself lives in auditor/backends/tensorrt.py
        from importlib.metadata import PackageNotFoundError, version as dist_version

        for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
            try:
                rec["tensorrt"] = dist_version(dist)
                break
            except PackageNotFoundError:
                continue
    except ImportError:
        pass
    return rec


def hardware_record(session=None, threads: int | None = None) -> dict[str, Any]:
    """Everything a measurement depends on, read in this process."""
    import numpy

    return {"cpu": cpu_record(), "onnxruntime": onnxruntime_record(session, threads),
            "numpy": numpy.__version__, "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "host_cpu_model": _host_model_name()}


# -- the serving loop ------------------------------------------------------------------------

def write_message(out: BinaryIO, header: dict[str, Any], arrays: dict[str, Any] | None = None) -> None:
    import numpy as np

    arrays = arrays or {}
    header = dict(header, arrays=list(arrays))
    blob = json.dumps(header).encode("utf-8")
    out.write(struct.pack(">I", len(blob)) + blob)
    for name in arrays:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
        data = buf.getvalue()
        out.write(struct.pack(">Q", len(data)) + data)
    out.flush()


def _read_exact(inp: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left:
        b = inp.read(left)
        if not b:
            raise EOFError("the stream ended")
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def read_message(inp: BinaryIO, max_header: int = 1 << 20) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np

    (n,) = struct.unpack(">I", _read_exact(inp, 4))
    if n > max_header:
        raise ValueError(f"a message header of {n} bytes")
    header = json.loads(_read_exact(inp, n).decode("utf-8"))
    arrays = {}
    for name in header.get("arrays", []):
        (m,) = struct.unpack(">Q", _read_exact(inp, 8))
        arrays[name] = np.load(io.BytesIO(_read_exact(inp, m)), allow_pickle=False)
    return header, arrays


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text or type(e).__name__)[:300]


def serve(inp: BinaryIO, out: BinaryIO) -> int:
    import numpy as np

    session, names, types = None, [], {}
    while True:
        try:
            header, arrays = read_message(inp)
        except EOFError:
            return 0
        op = header.get("op")
        if op == "close":
            return 0
        if op == "open":
            try:
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.log_severity_level = 3
                for k, v in (header.get("session_config") or {}).items():
                    so.add_session_config_entry(str(k), str(v))
                threads = header.get("threads")
                if threads:
                    so.intra_op_num_threads = int(threads)
                    so.inter_op_num_threads = 1
                session = ort.InferenceSession(header["model"], sess_options=so,
                                               providers=header.get("providers") or ["CPUExecutionProvider"])
                wanted = (header.get("providers") or ["CPUExecutionProvider"])[0]
                used = session.get_providers()[0]
                if used != wanted:  # a silent fallback: the result would not be about the target
                    write_message(out, {"ok": False, "error": f"onnxruntime did not start {wanted} for "
                                        f"{os.path.basename(str(header['model']))} (it runs on {used})"})
                    return 1
                names = [o.name for o in session.get_outputs()]
                ins = [{"name": i.name, "type": i.type, "shape": [d if isinstance(d, int) else str(d)
                                                                   for d in i.shape]}
                       for i in session.get_inputs()]
                types = {i["name"]: _ORT_TYPES.get(i["type"], "float32") for i in ins}
                write_message(out, {"ok": True, "inputs": ins, "outputs": names,
                                    "hardware": hardware_record(session, threads)})
            except Exception as e:  # noqa: BLE001 - one line back to the parent
                write_message(out, {"ok": False, "error": f"onnxruntime cannot load "
                                                          f"{os.path.basename(str(header.get('model')))}: {_one_line(e)}"})
                return 1
        elif op == "run":
            if session is None:
                write_message(out, {"ok": False, "error": "no model is open"})
                continue
            try:
                feed = {k: np.ascontiguousarray(v, dtype=types.get(k, v.dtype)) for k, v in arrays.items()}
                res = session.run(None, feed)
                outs = {n: (r.astype(np.float32) if r.dtype == np.float16 else r) for n, r in zip(names, res)}
                write_message(out, {"ok": True}, outs)
            except Exception as e:  # noqa: BLE001
                write_message(out, {"ok": False, "error": f"onnxruntime: inference failed: {_one_line(e)}"})
        elif op == "hardware":
            write_message(out, {"ok": True, "hardware": hardware_record(session, header.get("threads"))})
        else:
            write_message(out, {"ok": False, "error": f"unknown request {op!r}"})


def main() -> int:
    if os.environ.get("WMAUDIT_ALLOW_ORT_TELEMETRY") != "1":  # the documented opt-in
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    # The protocol gets a private copy of stdout; fd 1 then points at stderr, so that anything a
    # library prints cannot corrupt a message.
    proto = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    return serve(inp, proto)


if __name__ == "__main__":
    sys.exit(main())

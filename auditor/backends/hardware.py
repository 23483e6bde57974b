"""The hardware record every result carries: where it was measured.

The record is read by the process that ran the model (``auditor/backends/child.py``
gives the fields and how each is read). A result that ran no model (extract,
scan, provenance) carries the record of the process that computed it. A result
that ran models on one target carries that target's record; on several targets,
one record per target under ``hardware.targets``, ``hardware`` itself then being
the record of the auditing process (``target`` = ``native``, ``ran_model`` false).
"""
from __future__ import annotations

import copy
import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def _native_base() -> dict[str, Any]:
    from auditor.backends.child import hardware_record

    return hardware_record()


def native_record(threads: int | None = None, providers=("CPUExecutionProvider",)) -> dict[str, Any]:
    """This process's record for a model run natively on onnxruntime's CPU provider."""
    from auditor.backends.targets import TARGETS, annotate

    rec = copy.deepcopy(_native_base())
    rec["onnxruntime"]["providers"] = list(providers)
    rec["onnxruntime"]["execution_provider"] = providers[0]
    rec["onnxruntime"]["intra_op_threads"] = int(threads) if threads else "default (one per core)"
    return annotate(rec, TARGETS["native"])


def process_record() -> dict[str, Any]:
    """The record of this process when it ran no model (no execution provider)."""
    from auditor.backends.targets import TARGETS, annotate

    rec = copy.deepcopy(_native_base())
    rec["onnxruntime"]["execution_provider"] = None
    rec["onnxruntime"]["intra_op_threads"] = None
    rec["ran_model"] = False
    return annotate(rec, TARGETS["native"])


def gpu_target_record(target) -> dict[str, Any]:
    """A GPU target run in this process (native TensorRT)."""
    from auditor.backends.targets import annotate

    rec = copy.deepcopy(_native_base())
    rec["onnxruntime"]["execution_provider"] = None
    return annotate(rec, target)


def combine(per_target: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``hardware`` for a result measured on targets: a single target's record is the record
    itself; several targets give this process's record with one record per target under
    ``targets``."""
    if len(per_target) == 1:
        return next(iter(per_target.values()))
    rec = process_record()
    rec["targets"] = per_target
    return rec


def summary(rec: dict[str, Any] | None) -> str:
    """One line for terminals and JUnit: CPU, microarchitecture, level, key features, onnxruntime."""
    if not rec:
        return "hardware not recorded"
    cpu = rec.get("cpu") or {}
    feats = cpu.get("features") or {}
    on = [f for f, v in feats.items() if v and f not in ("sse4_2", "avx", "f16c", "asimdhp", "fphp")]
    ort = rec.get("onnxruntime") or {}
    names = [n for n in dict.fromkeys((cpu.get("microarchitecture"), cpu.get("level"))) if n]
    parts = [f"{rec.get('target', '?')}:",
             cpu.get("model") or f"{cpu.get('arch') or '?'} CPU",
             f"({', '.join(names) or '?'})",
             "features " + (",".join(on) if on else "none of the kernel-selecting ones"),
             f"onnxruntime {ort.get('version') or '?'}" + (f" {ort['execution_provider']}"
                                                           if ort.get("execution_provider") else "")]
    if ort.get("session_config"):
        parts.append("session " + ",".join(f"{k}={v}" for k, v in ort["session_config"].items()))
    threads = ort.get("intra_op_threads")
    if isinstance(threads, int):
        parts.append(f"{threads} thread(s)")
    em = rec.get("emulated")
    if em:
        parts.append(f"[emulated by {em.get('emulator')} {em.get('version') or ''} -cpu {em.get('cpu')}]".replace("  ", " "))
    gpu = rec.get("gpu")
    if gpu and gpu.get("device"):
        parts.append(f"[GPU {gpu['device']}, driver {gpu.get('driver')}, CUDA {gpu.get('cuda_runtime')}, "
                     f"cuDNN {gpu.get('cudnn')}, TensorRT {gpu.get('tensorrt')}]")
    return " ".join(parts)


def measured_on_lines(doc: dict[str, Any]) -> list[str]:
    """'measured on ...' lines for a result document: one per target it ran on."""
    hw = doc.get("hardware") or {}
    per = hw.get("targets") or {hw.get("target", "native"): hw}
    return [f"{'computed' if rec.get('ran_model') is False else 'measured'} on {summary(rec)}"
            for rec in per.values()]


def brief(rec: dict[str, Any] | None = None) -> dict[str, Any]:
    """A compact record for per-line outputs (sweep lines): CPU, microarchitecture, level, the
    kernel-selecting features present, onnxruntime and numpy versions."""
    rec = rec or process_record()
    cpu = rec.get("cpu") or {}
    return {"cpu": cpu.get("model") or cpu.get("arch"), "arch": cpu.get("arch"),
            "microarchitecture": cpu.get("microarchitecture"), "level": cpu.get("level"),
            "features": [f for f, v in (cpu.get("features") or {}).items() if v],
            "onnxruntime": (rec.get("onnxruntime") or {}).get("version"), "numpy": rec.get("numpy")}

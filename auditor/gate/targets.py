"""The target axis of a survival grid: the attack x target matrix, and why one target is worse.

A white-box mark is read off the weights, so whether it survives an attack is
the same on every target; what the hardware changes is what the attacked model
computes. The matrix therefore holds, per attack and target, the mark's verdict
and the task's fidelity (SQNR, top-1 agreement, accuracy) on that target.

``fidelity_gaps`` explains a target whose fidelity is far below the best
target's for the same attack, in words a user can act on. The cause named with
remedies is the known one: on x86 with AVX2 and no VNNI (no AVX512-VNNI,
AVX-VNNI or AMX), onnxruntime's u8s8 int8 kernels multiply unsigned 8-bit
activations by signed 8-bit weights with ``vpmaddubsw``, which adds pairs of
products into 16-bit lanes that saturate (oneDNN documents this as the "nuances
of int8 computations"); the same file on a VNNI or Arm CPU accumulates in 32
bits, and the SSE4.1 kernels widen operands first. fp16 models on Arm CPUs with
FP16 arithmetic run in half precision. Other gaps are reported as measured,
with the facts that bear on them (i8mm kernels, emulation), without a guessed cause.
"""
from __future__ import annotations

from typing import Any

GAP_DB = 6.0  # a gap worth explaining: 6 dB is a factor of 2 in error amplitude
VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
REMEDIES = ("quantize:MODE:reduce-range (7-bit weights: pairs of products cannot saturate 16 bits)",
            "quantize:MODE:uint8-weights (QUInt8 weights: onnxruntime's u8u8 path)",
            "per-channel quantization (static-qdq-per-channel, static-qop-per-channel)",
            "the onnxruntime session option session.x64quantprecision=1 (slower kernels that do not saturate; "
            "measure it with --target TARGET+x64quantprecision)")


def _sqnr(d: dict[str, Any]) -> float | None:
    f = d.get("fidelity") or {}
    v = f.get("sqnr_db")
    return float(v) if isinstance(v, (int, float)) else None


def matrix(rows: list[dict[str, Any]], targets) -> dict[str, Any]:
    """{"targets": [...], "rows": [{"attack", "steps", "mark": verdict, "cells": {target: {...}}}]}."""
    out = []
    for r in rows:
        per = r.get("targets") or {targets[0]: r}
        cells = {}
        for t in targets:
            d = per.get(t, {})
            f = d.get("fidelity") or {}
            cells[t] = {"survived": r.get("verdict") == "detected", "usable": d.get("usable"),
                        "sqnr_db": f.get("sqnr_db"),
                        "top1_agreement": f.get("top1_agreement"), "accuracy": d.get("accuracy"),
                        "accuracy_drop": d.get("accuracy_drop")}
        out.append({"attack": r["name"], "steps": r.get("steps", ""), "mark": r.get("verdict"), "cells": cells})
    return {"targets": list(targets), "rows": out}


def _has_int8(steps: str) -> bool:
    return "quantize:" in steps or "int4" in steps


def _saturating_u8s8(rec: dict[str, Any] | None) -> bool:
    """x86 with AVX2 and no VNNI: onnxruntime's u8s8 kernels there use vpmaddubsw, whose 16-bit
    pair sums saturate. With VNNI (vpdpbusd) they accumulate in 32 bits; without AVX2 (SSE4.1)
    the kernels widen to 16 bits before multiplying (pmaddwd); Arm uses 32-bit dot products."""
    cpu = (rec or {}).get("cpu") or {}
    feats = cpu.get("features")
    if cpu.get("arch") not in ("x86_64", "AMD64") or not isinstance(feats, dict):
        return False
    if ((rec or {}).get("onnxruntime") or {}).get("session_config", {}).get("session.x64quantprecision") == "1":
        return False  # onnxruntime's precise x64 int8 kernels: no 16-bit pair sums
    return bool(feats.get("avx2")) and not any(feats.get(f) for f in VNNI_FEATURES)


def _half_arithmetic(rec: dict[str, Any] | None) -> bool:
    """Arm with FP16 vector arithmetic: onnxruntime runs fp16 nodes in half precision there (x86
    without AVX512-FP16 converts them to fp32)."""
    cpu = (rec or {}).get("cpu") or {}
    return cpu.get("arch") == "aarch64" and bool((cpu.get("features") or {}).get("asimdhp"))


def fidelity_gaps(rows, hardware: dict[str, dict[str, Any]], gap_db: float = GAP_DB) -> list[dict[str, Any]]:
    """Notes for (attack, target) cells whose SQNR is ``gap_db`` or more below the best target's.

    ``rows``: (attack name, steps, {target: {"fidelity": ...}}) triples; ``hardware``: each
    target's record (auditor.backends.hardware)."""
    notes = []
    for name, steps, per in rows:
        vals = {t: v for t, d in per.items() if (v := _sqnr(d)) is not None}
        if len(vals) < 2:
            continue
        best = max(vals, key=lambda t: vals[t])
        for t, v in vals.items():
            gap = vals[best] - v
            if t == best or gap < gap_db:
                continue
            note: dict[str, Any] = {"attack": name, "target": t, "sqnr_db": v, "best_target": best,
                                    "best_sqnr_db": vals[best], "gap_db": gap}
            if _has_int8(steps) and _saturating_u8s8(hardware.get(t)) and not _saturating_u8s8(hardware.get(best)):
                note["why"] = (f"{t} has AVX2 but no VNNI (AVX512-VNNI, AVX-VNNI or AMX): onnxruntime's u8s8 int8 "
                               f"kernels there add pairs of 8-bit products into 16-bit sums (vpmaddubsw) that can "
                               f"saturate, where {best} does not (32-bit dot products with VNNI or on Arm, operands "
                               f"widened to 16 bits before the multiply on SSE4.1 or with the session option "
                               f"session.x64quantprecision=1)")
                note["try"] = [r for r in REMEDIES if not ("per-channel quantization" in r and "per-channel" in steps)]
            elif "fp16" in steps and _half_arithmetic(hardware.get(t)) and not _half_arithmetic(hardware.get(best)):
                note["why"] = (f"{t} has FP16 vector arithmetic (asimdhp): onnxruntime computes the fp16 model's "
                               f"nodes in half precision there, where {best} converts them to fp32")
            else:
                note["why"] = (f"measured: {t} computes this attacked model {gap:.1f} dB less faithfully than {best}; "
                               f"no known kernel difference explains it")
                feats = ((hardware.get(t) or {}).get("cpu") or {}).get("features") or {}
                if feats.get("i8mm") and _has_int8(steps):
                    note["why"] += "; onnxruntime runs its i8mm int8 kernels on this CPU"
            if (hardware.get(t) or {}).get("emulated"):
                note["why"] += (f"; {t} is emulated ({hardware[t]['emulated'].get('emulator')}), so a fault of the "
                                f"emulator cannot be ruled out without the real CPU")
            notes.append(note)
    return notes


def gap_lines(notes: list[dict[str, Any]]) -> list[str]:
    """The notes as terminal lines."""
    lines = []
    for n in notes:
        lines.append(f"{n['attack']} on {n['target']}: SQNR {n['sqnr_db']:.1f} dB, {n['gap_db']:.1f} dB below "
                     f"{n['best_target']} ({n['best_sqnr_db']:.1f} dB). Why: {n['why']}.")
        for r in n.get("try", []):
            lines.append(f"    try {r}")
    return lines


def fidelity_on_targets(original, attacked, data, targets) -> tuple[dict[str, Any], dict[str, Any]]:
    """({target: fidelity of ``attacked`` against ``original`` on ``data``, plus both accuracies when
    the data has labels}, {target: hardware record}); both models run on each target."""
    from auditor.data.accuracy import accuracy_of, outputs
    from auditor.data.fidelity import compare

    per, hardware = {}, {}
    for t in targets:
        ref, _ = outputs(original, data, backend=t, with_hardware=True)
        got, hardware[t] = outputs(attacked, data, backend=t, with_hardware=True)
        d: dict[str, Any] = {"fidelity": compare(ref, got), "samples": data.n}
        if data.labels is not None:
            d["accuracy_original"] = accuracy_of(next(iter(ref.values())), data.labels)
            d["accuracy"] = accuracy_of(next(iter(got.values())), data.labels)
            d["accuracy_drop"] = d["accuracy_original"] - d["accuracy"]
        per[t] = d
    return per, hardware

"""What an attack costs the model: its outputs against the unattacked model's on the same inputs.

Label-free, so it works on any model and any data (also synthetic):

* **top-1 agreement** (classifier outputs: floating point, rank >= 2, last axis
  of 2 or more classes): the fraction of positions (examples, or example x
  sequence position) where the attacked model's argmax over the last axis
  equals the unattacked model's;
* **cosine similarity** of the flattened outputs, <ref, test> / (|ref| |test|);
* **SQNR in dB**, 20 log10(|ref| / |ref - test|) over the flattened outputs
  with both norms floored at the float64 machine epsilon, exactly as
  onnxruntime's quantization debugging defines it
  (``onnxruntime.quantization.qdq_loss_debug.compute_signal_to_quantization_noice_ratio``);
  identical outputs give 20 log10(|ref| / eps), a large finite number.

Per output, and ``worst`` over outputs (min agreement, min cosine, min SQNR),
which is what a gate holds to ``min_top1_agreement`` / ``min_sqnr_db``.
With labels, accuracy (auditor.data.accuracy) is measured as well.
"""
from __future__ import annotations

import math

import numpy as np

EPS = float(np.finfo(float).eps)


def is_classifier(out: np.ndarray) -> bool:
    """Outputs read as class scores: floating point, rank >= 2, at least two classes on the last axis."""
    return np.issubdtype(out.dtype, np.floating) and out.ndim >= 2 and out.shape[-1] >= 2


def top1_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    return float(np.mean(ref.argmax(axis=-1) == test.argmax(axis=-1)))


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(test, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """onnxruntime's compute_signal_to_quantization_noice_ratio (norms floored at eps)."""
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(test, np.float64).ravel()
    signal = max(float(np.linalg.norm(a)), EPS)
    noise = max(float(np.linalg.norm(a - b)), EPS)
    return 20.0 * math.log10(signal / noise)


def compare(ref: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict:
    """Per-output agreement / cosine / SQNR and the worst of each over outputs."""
    per = {}
    for name, r in ref.items():
        t = test.get(name)
        if t is None or t.shape != r.shape:
            per[name] = {"error": f"output {name!r} shape {None if t is None else list(t.shape)} "
                                  f"vs {list(r.shape)} unattacked"}
            continue
        d = {"cosine": round(cosine(r, t), 9), "sqnr_db": round(sqnr_db(r, t), 6), "shape": list(r.shape[1:])}
        if is_classifier(r):
            d["top1_agreement"] = top1_agreement(r, t)
        per[name] = d
    ok = [d for d in per.values() if "error" not in d]
    worst: dict = {}
    if ok:
        worst = {"cosine": min(d["cosine"] for d in ok), "sqnr_db": min(d["sqnr_db"] for d in ok)}
        agree = [d["top1_agreement"] for d in ok if "top1_agreement" in d]
        if agree:
            worst["top1_agreement"] = min(agree)
    if len(ok) != len(per):
        worst["error"] = "; ".join(d["error"] for d in per.values() if "error" in d)
    return {"outputs": per, **worst}

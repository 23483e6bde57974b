"""Model fingerprint: is a suspect ONNX file derived from the owner's model?

The owner keeps a fixed probe set. Both models are run on it and the features
of the same tensor are compared probe by probe: each unit is centred over the
probes and the score is the correlation of the two centred probe x unit
matrices (cosine of the flattened matrices). A model derived from the
reference (quantized, pruned, converted to fp16, fine-tuned for a while) keeps
its units where they were, so the score stays near 1; an independently trained
model of the same architecture learns its units in another order and with
other roles, so its score is near 0 even when it classifies as well.

The threshold (default 0.5) is a decision rule, not a p-value: the false
positive rate is measured on independently trained models (tests and
``bench/bench_phash.py`` report it). A suspect whose units were permuted on
purpose (function-preserving obfuscation) is not covered here: align it first.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from auditor.errors import AuditError
from auditor.phash import features as F

DEFAULT_THRESHOLD = 0.5


def probe_hash(features: np.ndarray) -> np.ndarray:
    """Probe x unit matrix centred per unit (the owner's fingerprint of a model at one tensor)."""
    f = np.asarray(features, np.float64)
    return f - f.mean(0)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two centred probe x unit matrices (0 when either is constant)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(np.sum(a * b) / (na * nb))


def fingerprint(suspect: str | os.PathLike, reference: str | os.PathLike, probes: np.ndarray, *,
                layer: str | None = None, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Compare ``suspect`` with ``reference`` on ``probes`` at ``layer``.

    Returns a dict: ``derived`` (bool), ``score``, ``threshold``, ``layer``,
    ``n_probes``, ``units``, ``per_probe`` (median and 5th percentile of the
    per-probe cosine of centred features) and ``reason`` when the tensors cannot
    be compared (different shapes: not derived)."""
    from auditor.attacks import load_model
    from auditor.results import file_sha256

    if not -1.0 <= threshold <= 1.0:
        raise AuditError(f"threshold must be in [-1, 1], got {threshold}")
    if len(probes) < 2:
        raise AuditError("the fingerprint needs at least 2 probe images")
    ref, sus = load_model(reference), load_model(suspect)
    fr = F.features(ref, probes, layer)
    fs = F.features(sus, probes, layer)
    out: dict[str, Any] = {"layer": layer, "threshold": float(threshold), "n_probes": int(len(probes)),
                           "reference": {"path": str(reference), "sha256": file_sha256(reference)},
                           "suspect": {"path": str(suspect), "sha256": file_sha256(suspect)},
                           "units": int(fr.shape[1])}
    if fr.shape != fs.shape:
        out.update({"derived": False, "score": None,
                    "reason": f"tensor shapes differ: reference {fr.shape[1]} values, suspect {fs.shape[1]}"})
        return out
    a, b = probe_hash(fr), probe_hash(fs)
    score = similarity(a, b)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    cos = np.sum(a[ok] * b[ok], axis=1) / (na[ok] * nb[ok]) if ok.any() else np.zeros(1)
    out.update({"derived": bool(score >= threshold), "score": score,
                "per_probe": {"median_cosine": float(np.median(cos)), "p05_cosine": float(np.quantile(cos, 0.05))}})
    return out

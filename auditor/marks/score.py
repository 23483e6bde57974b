"""Scoring one white-box mark: bits, BER, exact p-value and margins from its projections.

Below both ``auditor.marks.whitebox`` (extraction) and ``auditor.marks.evidence``
(the false-positive check scores random committed keys), so neither imports the other.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from auditor.marks import stats
from auditor.marks.keys import WhiteboxMark


HISTOGRAM_BINS = 20


def margin_histogram(signed: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Counts of the signed margins in equal-width bins spanning them and 0 (order-free: no bit revealed)."""
    v = np.asarray(signed, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"edges": [], "counts": []}
    lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def score(mark: WhiteboxMark, y: np.ndarray, alpha: float, m: int = 1,
          w: np.ndarray | None = None) -> dict[str, Any]:
    """Bits, BER, exact p and margins from the projections y (w: the reduced weight, for
    the normalised margins)."""
    bits = (y > 0).astype(np.uint8)
    T = int(mark.n_bits)
    k = int((bits == mark.bits).sum())
    signed = (2.0 * mark.bits.astype(np.float64) - 1.0) * y
    p = stats.binom_tail_half(T, k)
    p_corr = stats.bonferroni(p, m)
    best = stats.bonferroni(stats.min_achievable_p_half(T), m)
    dec = stats.decide(p_corr, best, alpha)
    absy = np.abs(y)
    if w is not None:
        norms = np.linalg.norm(mark.matrix(), axis=1) * float(np.linalg.norm(w))
        normalized = np.divide(signed, norms, out=np.zeros_like(signed), where=norms > 0)
    else:
        normalized = np.zeros_like(signed)
    return dict(
        normalized_margin_min=float(normalized.min()), normalized_margin_median=float(np.median(normalized)),
        margin_histogram=margin_histogram(signed),
        n_bits=T, matches=k, ber=(T - k) / T, p_value=p,
        log10_p=stats.log10_binom_tail_half(T, k),
        p_corrected=p_corr, alpha=alpha, verdict=dec.verdict, reason=dec.reason,
        margin_min=float(absy.min()), margin_median=float(np.median(absy)), margin_mean=float(absy.mean()),
        signed_margin_min=float(signed.min()), signed_margins=[float(v) for v in signed], wrong_bits=T - k,
        bits="".join("1" if b else "0" for b in bits))

"""Exact statistics behind every verdict.

White-box: under H0 (no mark, or a wrong key) each of the T extracted bits
matches the key by a fair coin, so the p-value of k matches is
P[Bin(T, 1/2) >= k], computed exactly with integers.
Trigger sets: P[Bin(n, p0) >= hits] for a null hit rate p0, computed in log
space. Multiple testing: Bonferroni over the m candidates that were tried.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_ALPHA = 1e-6

DETECTED = "detected"
NOT_DETECTED = "not detected"
INSUFFICIENT = "insufficient evidence"


def binom_tail_half(n: int, k: int) -> float:
    """Exact P[Bin(n, 1/2) >= k] (a float; may underflow to 0 only below 1e-308)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    num = sum(math.comb(n, i) for i in range(k, n + 1))
    # num / 2**n, exactly rounded via integer division in log space when huge
    return _ratio_to_float(num, 1 << n)


def log10_binom_tail_half(n: int, k: int) -> float:
    """log10 P[Bin(n, 1/2) >= k], exact to float precision even where p underflows."""
    if k <= 0:
        return 0.0
    if k > n:
        return float("-inf")
    num = sum(math.comb(n, i) for i in range(k, n + 1))
    return (_log10_int(num) - n * math.log10(2.0))


def binom_tail(n: int, k: int, p0: float) -> float:
    """P[Bin(n, p0) >= k] in log space (relative error ~1e-12)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p0 <= 0.0:
        return 0.0
    if p0 >= 1.0:
        return 1.0
    if p0 == 0.5:
        return binom_tail_half(n, k)
    return min(1.0, 10.0 ** log10_binom_tail(n, k, p0))


def log10_binom_tail(n: int, k: int, p0: float) -> float:
    if k <= 0:
        return 0.0
    if k > n or p0 <= 0.0:
        return float("-inf")
    if p0 >= 1.0:
        return 0.0
    lp, lq = math.log(p0), math.log1p(-p0)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        for i in range(k, n + 1)
    ]
    m = max(terms)
    return (m + math.log(sum(math.exp(t - m) for t in terms))) / math.log(10.0)


def derangements(n: int) -> int:
    """Number of permutations of n items without a fixed point (D(0) = 1, D(1) = 0)."""
    a, b = 1, 0
    if n == 0:
        return 1
    for i in range(2, n + 1):
        a, b = b, (i - 1) * (a + b)
    return b


def fixed_points_tail(n: int, m: int) -> float:
    """Exact P[X >= m] for X the number of positions where a uniformly random permutation
    of n items agrees with a fixed one (= its fixed points): sum_k C(n, k) D(n - k) / n!."""
    if m <= 0:
        return 1.0
    if m > n:
        return 0.0
    num = sum(math.comb(n, k) * derangements(n - k) for k in range(m, n + 1))
    return _ratio_to_float(num, math.factorial(n))


def log10_fixed_points_tail(n: int, m: int) -> float:
    """log10 of ``fixed_points_tail``, exact to float precision where p underflows."""
    if m <= 0:
        return 0.0
    if m > n:
        return float("-inf")
    num = sum(math.comb(n, k) * derangements(n - k) for k in range(m, n + 1))
    return _log10_int(num) - _log10_int(math.factorial(n))


def bonferroni(p: float, m: int) -> float:
    """Family-wise correction when the best of m candidates is reported."""
    return min(1.0, p * max(1, m))


def min_achievable_p_half(n: int) -> float:
    """The smallest p any n-bit extraction can reach (all bits match)."""
    return binom_tail_half(n, n)


@dataclass(frozen=True)
class Decision:
    verdict: str
    alpha: float
    reason: str


def decide(p_value: float, best_possible_p: float, alpha: float = DEFAULT_ALPHA) -> Decision:
    """detected when p < alpha; insufficient evidence when even a perfect result
    could not reach alpha (e.g. a 10-bit mark); not detected otherwise."""
    if best_possible_p >= alpha:
        return Decision(INSUFFICIENT, alpha,
                        f"even a perfect match gives p = {best_possible_p:.3g} >= {alpha:g}")
    if p_value < alpha:
        return Decision(DETECTED, alpha, f"p = {p_value:.6g} < {alpha:g}")
    return Decision(NOT_DETECTED, alpha, f"p = {p_value:.6g} >= {alpha:g}")


def exit_code(verdict: str) -> int:
    return 0 if verdict == DETECTED else 1


def _log10_int(x: int) -> float:
    if x <= 0:
        return float("-inf")
    shift = max(0, x.bit_length() - 60)
    return math.log10(x >> shift) + shift * math.log10(2.0)


def _ratio_to_float(num: int, den: int) -> float:
    try:
        return num / den
    except OverflowError:  # pragma: no cover - Python int division handles huge ints
        return 10.0 ** (_log10_int(num) - _log10_int(den))

"""Exact statistics behind every verdict.

White-box: under H0 (no mark, or a wrong key) each of the T extracted bits
matches the key by a fair coin, so the p-value of k matches is
P[Bin(T, 1/2) >= k], computed exactly with integers.
Trigger sets: P[Bin(n, p0) >= hits] for a null hit rate p0, computed in log
space. Multiple testing: Bonferroni over the m candidates that were tried.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

DEFAULT_ALPHA = 1e-6

DETECTED = "detected"
NOT_DETECTED = "not detected"
INSUFFICIENT = "insufficient evidence"
# The weight that should carry the mark was not read (its layer not located, or stored in a layout
# the reader does not understand): no statement about the mark at all, unlike NOT_DETECTED.
UNREADABLE = "could not read"


def binom_tail_half(n: int, k: int) -> float:
    """Exact P[Bin(n, 1/2) >= k] (a float; may underflow to 0 only below 1e-308)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    num = sum(math.comb(n, i) for i in range(k, n + 1))
    # num / 2**n, exactly rounded via integer division in log space when huge
    return _ratio_to_float(num, 1 << n)


@functools.lru_cache(maxsize=1 << 16)
def log10_binom_tail_half(n: int, k: int) -> float:
    """log10 P[Bin(n, 1/2) >= k], exact to float precision even where p underflows (cached: a scan
    asks for the same few (n, k) for every variant of every key)."""
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


def two_sided_binom_half(n: int, k: int) -> float:
    """Two-sided P-value of k successes in n fair coins: 2 min(P[X <= k], P[X >= k]), capped at 1.
    Exact integers up to n = 4000, scipy's binomial distribution above (used for assumption checks)."""
    n, k = int(n), int(k)
    if n <= 0:
        return 1.0
    lo = min(k, n - k)
    if n <= 4000:
        tail = binom_tail_half(n, n - lo)  # P[X >= n - lo] = P[X <= lo]
    else:
        from scipy.stats import binom

        tail = float(binom.cdf(lo, n, 0.5))
    return min(1.0, 2.0 * tail)


def rank_sum_tail(values, on) -> dict:
    """One-sided permutation p of the rank sum of ``values`` over the ``on`` positions.

    H0: the values are exchangeable over positions (every subset of size n_on equally
    likely to be the "on" set). Midranks for ties. Exact (dynamic programming over
    subsets of doubled midranks, counted in float64) when the work is small (table
    cells x n <= 3e8, about a second: a 10x10 logo takes 5e7); otherwise a bound: Bernstein's inequality
    for the mean of a sample drawn without replacement (valid by Hoeffding 1963,
    Theorem 4: without-replacement sums are dominated in convex order by
    with-replacement ones). Returns p, the method, and the smallest p the test can give."""
    import numpy as np
    from scipy.stats import rankdata

    v = np.asarray(values, np.float64).reshape(-1)
    mask = np.asarray(on, bool).reshape(-1)
    n, n_on = v.size, int(mask.sum())
    if n_on == 0 or n_on == n:
        return {"p_value": 1.0, "method": "none", "best_possible_p": 1.0, "n": n, "n_on": n_on,
                "detail": "the logo has no on- or no off-pixels: no rank test"}
    r2 = np.rint(2.0 * rankdata(v)).astype(np.int64)  # doubled midranks: integers
    obs = int(r2[mask].sum())
    total = int(r2.sum())
    small_on = n_on <= n - n_on
    j = n_on if small_on else n - n_on
    # P[S_on >= obs] = P[S_small >= obs] (small = on) or P[S_small <= total - obs] (small = off)
    log10_comb = (math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)) / math.log(10.0)
    best = 10.0 ** -log10_comb if log10_comb < 300 else 0.0
    top = int(np.sort(r2)[-j:].sum())
    if (j + 1) * (top + 1) * n <= 300_000_000:
        counts = np.zeros((j + 1, top + 1))
        counts[0, 0] = 1.0
        for r in r2:
            counts[1:, r:] += counts[:-1, : top + 1 - r].copy()
        row = counts[j]
        tail = row[obs:].sum() if small_on else row[: total - obs + 1].sum()
        p = float(min(1.0, tail / row.sum()))
        return {"p_value": max(p, best), "method": "exact", "best_possible_p": best, "n": n, "n_on": n_on,
                "detail": (f"exact permutation distribution of the rank sum over the {n_on} on-pixels of "
                           f"{n} (Wilcoxon-Mann-Whitney, midranks): no Monte Carlo; smallest possible "
                           f"p = 1/C({n},{j}) = {best:.3g}")}
    ranks = r2 / 2.0
    mu, var = float(ranks.mean()), float(ranks.var())
    mean_on = float(ranks[mask].mean())
    t = mean_on - mu
    if t <= 0:
        p = 1.0
    else:
        # the on-set is a without-replacement sample of size n_on; b bounds its upward deviation
        b = float(ranks.max()) - mu
        p = min(1.0, math.exp(-n_on * t * t / (2.0 * var + 2.0 * b * t / 3.0)))
    return {"p_value": p, "method": "bound", "best_possible_p": 0.0, "n": n, "n_on": n_on,
            "detail": (f"Bernstein bound for the mean rank of {n_on} on-pixels drawn without replacement "
                       f"from {n} (Hoeffding 1963, Thm 4); an upper bound on the exact permutation p")}


def _rank_sum_pmf(r2, j: int):
    """Distribution of the sum of j of the integers r2 drawn without replacement (index = sum)."""
    import numpy as np

    top = int(np.sort(r2)[-j:].sum()) if j else 0
    counts = np.zeros((j + 1, top + 1))
    counts[0, 0] = 1.0
    for r in r2:
        counts[1:, r:] += counts[:-1, : top + 1 - r].copy()
    row = counts[j]
    return row / row.sum()


def stratified_rank_sum_tail(values, on, strata) -> dict:
    """One-sided p of the sum over strata of the within-stratum rank sums of the ``on``
    positions (van Elteren's statistic), under H0: values exchangeable *within* each
    stratum. Exact: the per-stratum permutation distributions convolved."""
    import numpy as np
    from scipy.stats import rankdata

    v = np.asarray(values, np.float64).reshape(-1)
    mask = np.asarray(on, bool).reshape(-1)
    strata = np.asarray(strata).reshape(-1)
    pmf = np.ones(1)
    obs = 0
    log10_best = 0.0
    used = 0
    for s_ in np.unique(strata):
        ix = np.flatnonzero(strata == s_)
        j = int(mask[ix].sum())
        if j == 0 or j == ix.size:
            continue
        r2 = np.rint(2.0 * rankdata(v[ix])).astype(np.int64)
        obs += int(r2[mask[ix]].sum())
        pmf = np.convolve(pmf, _rank_sum_pmf(r2, j))
        log10_best -= math.log10(math.comb(ix.size, j))
        used += 1
    if used == 0:
        return {"p_value": 1.0, "best_possible_p": 1.0, "strata": 0, "detail": "no stratum has on- and off-pixels"}
    p = float(min(1.0, pmf[obs:].sum()))
    best = 10.0 ** log10_best
    return {"p_value": max(p, best), "best_possible_p": best, "strata": used,
            "detail": f"exact stratified rank-sum test over {used} strata (values exchangeable within each)"}
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
    """0 detected, 2 could not read (like an error: nothing was judged), 1 otherwise."""
    return 0 if verdict == DETECTED else 2 if verdict == UNREADABLE else 1


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

import math

import pytest
from scipy.stats import binom

from auditor.marks import stats


@pytest.mark.parametrize("n,k", [(10, 10), (10, 7), (64, 40), (256, 128), (256, 200), (256, 256), (1, 0), (1, 1)])
def test_binom_tail_half_matches_scipy(n, k):
    assert stats.binom_tail_half(n, k) == pytest.approx(binom.sf(k - 1, n, 0.5), rel=1e-12, abs=1e-300)


def test_perfect_256_bits():
    assert stats.binom_tail_half(256, 256) == pytest.approx(2.0 ** -256, rel=1e-15)
    assert stats.log10_binom_tail_half(256, 256) == pytest.approx(-256 * math.log10(2), abs=1e-12)


def test_log10_beyond_underflow():
    # 2^-2048 underflows a double; the log stays exact
    assert stats.log10_binom_tail_half(2048, 2048) == pytest.approx(-2048 * math.log10(2), abs=1e-9)


@pytest.mark.parametrize("n,k,p0", [(20, 5, 0.1), (100, 40, 0.1), (50, 50, 0.01), (30, 0, 0.2)])
def test_binom_tail_general(n, k, p0):
    assert stats.binom_tail(n, k, p0) == pytest.approx(binom.sf(k - 1, n, p0), rel=1e-9)


def test_decide_thresholds():
    assert stats.decide(1e-7, 1e-20).verdict == stats.DETECTED
    assert stats.decide(1e-6, 1e-20).verdict == stats.NOT_DETECTED
    # a 10-bit mark can never reach 1e-6: insufficient evidence, even when perfect
    best10 = stats.min_achievable_p_half(10)
    assert best10 == pytest.approx(1 / 1024)
    assert stats.decide(best10, best10).verdict == stats.INSUFFICIENT
    assert stats.exit_code(stats.DETECTED) == 0 and stats.exit_code(stats.INSUFFICIENT) == 1


def test_bonferroni():
    assert stats.bonferroni(1e-10, 5) == pytest.approx(5e-10)
    assert stats.bonferroni(0.5, 5) == 1.0


def test_rank_sum_tail_is_the_exact_permutation_distribution():
    """Brute force over every subset for small n (ties included); the bound above the exact value."""
    import itertools
    import math

    import numpy as np
    from scipy.stats import rankdata

    from auditor.marks import stats as st

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(4, 11))
        v = np.round(rng.random(n) * 4) / 4
        on = np.zeros(n, bool)
        on[rng.choice(n, int(rng.integers(1, n)), replace=False)] = True
        r = rankdata(v)
        obs, k = r[on].sum(), int(on.sum())
        exact = sum(r[list(c)].sum() >= obs - 1e-9 for c in itertools.combinations(range(n), k)) / math.comb(n, k)
        got = st.rank_sum_tail(v, on)
        assert got["method"] == "exact" and got["p_value"] == pytest.approx(exact, rel=1e-12)
    top = st.rank_sum_tail(np.arange(100.0), np.arange(100) >= 50)
    assert top["p_value"] == pytest.approx(1 / math.comb(100, 50)) == top["best_possible_p"]
    big = np.random.default_rng(1).random(2000)
    on = np.zeros(2000, bool)
    on[:1000] = True
    big[:1000] += 0.3
    b = st.rank_sum_tail(big, on)
    assert b["method"] == "bound" and 0 < b["p_value"] < 1e-30


def test_two_sided_binom_half():
    from auditor.marks import stats as st

    assert st.two_sided_binom_half(256, 0) == pytest.approx(2 * 2.0 ** -256)
    assert st.two_sided_binom_half(10, 5) == 1.0
    assert st.two_sided_binom_half(10000, 5000) == 1.0 and st.two_sided_binom_half(10000, 4700) < 1e-8


def test_stratified_rank_sum_is_exact_and_ignores_column_bias():
    import itertools
    import math

    import numpy as np
    from scipy.stats import rankdata

    from auditor.marks import stats as st

    rng = np.random.default_rng(3)
    v = rng.random(12)
    strata = np.arange(12) % 3
    on = np.zeros(12, bool)
    on[[0, 4, 5, 9]] = True
    # brute force: every choice of on-sets of the same sizes within each stratum
    per = []
    for s in range(3):
        ix = np.flatnonzero(strata == s)
        r = rankdata(v[ix])
        k = int(on[ix].sum())
        per.append([r[list(c)].sum() for c in itertools.combinations(range(ix.size), k)])
    obs = sum(rankdata(v[strata == s])[on[strata == s]].sum() for s in range(3))
    tot = [sum(t) for t in itertools.product(*per)]
    exact = sum(t >= obs - 1e-9 for t in tot) / len(tot)
    assert st.stratified_rank_sum_tail(v, on, strata)["p_value"] == pytest.approx(exact, rel=1e-12)
    # a column that is bright everywhere (class bias) and holds most on-pixels:
    # significant for the pixel test, not within columns
    v = rng.random(100)
    cols = np.arange(100) % 10
    v[cols == 3] += 5.0
    on = cols == 3
    on[[0, 11, 22]] = True
    assert st.rank_sum_tail(v, on)["p_value"] < 1e-4
    assert st.stratified_rank_sum_tail(v, on, cols)["p_value"] > 0.01

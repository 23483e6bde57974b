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

"""Visual-logo marks (Sakazawa et al. 2019): decoding, correlation, permutation p, PNGs."""
import math

import numpy as np
import pytest
from PIL import Image

from auditor.marks import blackbox as bb
from auditor.marks import keys
from auditor.marks import stats
from auditor.backends import open_runner


@pytest.fixture(scope="module")
def logo_fx(build_fixture):
    return build_fixture("bb-logo-wrn")


@pytest.fixture(scope="module")
def results(logo_fx):
    mark = bb.load_logo(keys.load_key(logo_fx / "key.json"))
    out = {}
    for name in ("marked", "unmarked"):
        with open_runner(logo_fx / f"{name}.onnx") as r:
            out[name] = bb.evaluate_logo(r, mark, n_perm=2000, seed=0)
    return out


def test_marked_logo_correlates_and_is_detected(results, logo_fx):
    res = results["marked"]
    per_k = {d["k"]: d for d in res["per_k"]}
    assert sorted(per_k) == [1, 3, 5, 10, 20]
    # measured on the fixture: r = 0.57 (k=1), 0.82 (k=10), 0.83 (k=20)
    assert per_k[10]["r"] >= 0.6, per_k[10]
    assert per_k[20]["r"] > per_k[1]["r"]
    assert per_k[10]["p_value"] == pytest.approx(1 / 2001)  # no permutation reached r
    # the verdict: exact permutation distribution of the rank sum of the logo's on-pixels
    # within class columns, far below alpha (it used to be 1/(10^6 + 1), at the Monte Carlo
    # resolution). Measured: 40 on-pixels, p = 5.3e-20 at k = 20 (13.3 decades below 1e-6);
    # unstratified over all pixels 3.5e-22.
    assert res["p_method"].startswith("exact stratified rank-sum") and res["n_pixels"] == 100
    on_per_col = (np.load(logo_fx / "logo.npy").reshape(-1) >= 0.5).reshape(10, 10).sum(axis=0)
    assert res["resolution_limit"] == pytest.approx(np.prod([1 / math.comb(10, int(c)) for c in on_per_col]))
    assert res["n_on"] == 40 and res["p_value"] < 1e-18 and res["margin_log10"] > 12
    assert res["pixel_rank_p"] < res["p_value"]
    assert res["verdict"] == stats.DETECTED
    assert res["n_perm"] == 2000 and res["permutation_p"] == pytest.approx(1 / 2001)


def test_unmarked_twin_gives_no_logo(results):
    res = results["unmarked"]
    per_k = {d["k"]: d for d in res["per_k"]}
    assert abs(per_k[10]["r"]) < 0.4, per_k[10]
    assert per_k[10]["p_value"] > 0.01
    # never detected: p = 0.11 measured; a twin trained elsewhere gives another p, far above alpha
    assert res["p_value"] > 1e-3 and res["verdict"] == stats.NOT_DETECTED
    assert res["stopped_early"]  # the sequential test stops after 10 exceedances


def test_decoded_pngs_equal_the_arrays(results, tmp_path):
    written = bb.write_logo_pngs(results["marked"]["maps"], tmp_path)
    assert sorted(written) == [1, 3, 5, 10, 20]
    for k, w in written.items():
        with Image.open(w["path"]) as im:
            assert im.mode == "L" and im.size == (10, 10)
            np.testing.assert_array_equal(np.asarray(im), w["image"])
        np.testing.assert_array_equal(w["image"], bb.logo_image(results["marked"]["maps"][k]))
        assert w["image"].min() == 0 and w["image"].max() == 255


def test_logo_targets_and_layout():
    logo = np.zeros((5, 5))
    logo[1, 1:4] = 1.0
    logo[4, 4] = 0.5
    t = bb.logo_targets(logo, 10)
    assert t.shape == (3, 10)  # 25 pixels / 10 outputs -> 3 groups, last one padded
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    np.testing.assert_allclose(t[0], np.r_[np.zeros(6), np.ones(3) / 3, 0])
    np.testing.assert_allclose(t[1], np.full(10, 0.1))  # an empty chunk is uniform
    np.testing.assert_allclose(t[2], np.r_[np.zeros(4), 1.0, np.zeros(5)])
    ring = bb.layout_map(bb.logo_targets(_ring(), 10), (10, 10))
    np.testing.assert_allclose(ring, _ring() / 4)  # four lit pixels per row


def _ring():
    from exporters.blackbox import RING_LOGO

    return RING_LOGO


def test_decode_sums_first_k_images_of_each_group():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=12)
    groups = np.array([0, 1, 2] * 4)  # interleaved on purpose
    maps = bb.decode_logo(probs, groups, (3, 4), 4, counts=(1, 2, 4, 5))
    assert sorted(maps) == [1, 2, 4]  # 5 exceeds the 4 images per group
    np.testing.assert_allclose(maps[2][1], probs[[1, 4]].sum(axis=0))
    np.testing.assert_allclose(maps[4].sum(axis=1), 4.0)


def test_permutation_p_is_seeded_and_bounded():
    rng = np.random.default_rng(3)
    t = rng.random(100)
    noisy = t + rng.normal(0, 2.0, 100)
    a = bb.permutation_p(noisy, t, n_perm=5000, seed=11)
    b = bb.permutation_p(noisy, t, n_perm=5000, seed=11)
    assert a == b
    exact = bb.permutation_p(t, t, n_perm=999, seed=0)
    assert exact["r"] == pytest.approx(1.0) and exact["p_value"] == pytest.approx(1 / 1000)
    assert exact["resolution_limit"] == pytest.approx(1 / 1000)
    unrelated = bb.permutation_p(rng.random(100), t, n_perm=100_000, seed=1)
    assert unrelated["stopped_early"] and unrelated["n_perm"] < 1000 and unrelated["p_value"] > 0.01


def test_permutation_p_calibrated_under_null():
    # Under H0 a level-0.05 test rejects ~5 % of the time.
    rng = np.random.default_rng(7)
    t = rng.random(100)
    ps = [bb.permutation_p(rng.random(100), t, n_perm=400, seed=i, stop_after=10)["p_value"] for i in range(200)]
    rate = np.mean(np.array(ps) <= 0.05)
    assert 0.01 <= rate <= 0.10, rate

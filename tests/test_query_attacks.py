"""Query-side attacks change key images exactly as specified."""
import io

import numpy as np
import pytest
from PIL import Image

from auditor.marks import blackbox as bb
from auditor.errors import AuditError
from auditor.attacks.query import apply_attack, parse_attack


def _pixels(n=4, c=1, seed=0):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, c, 28, 28))
    x[:, :, 6:22, 8:20] = rng.integers(80, 256, size=(n, c, 16, 12))
    return x


def test_parse_specs():
    assert parse_attack("jpeg:50").params == {"quality": 50}
    assert parse_attack("noise:0.1:7").params == {"sigma": 0.1, "seed": 7}
    assert parse_attack("shift:2,-1").params == {"dx": 2, "dy": -1}
    for bad, msg in (("jpeg:0", "quality"), ("blur:3", "unknown query attack"), ("noise:x", "bad query attack"),
                     ("resize:1.5", "fraction")):
        with pytest.raises(AuditError, match=msg):
            parse_attack(bad)


def test_jpeg_equals_pillow_round_trip_and_changes_pixels():
    x = _pixels()
    y = apply_attack("jpeg:30", x, (0, 255))
    buf = io.BytesIO()
    Image.fromarray(x[2, 0].astype(np.uint8), "L").save(buf, format="JPEG", quality=30)
    want = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float64)
    np.testing.assert_array_equal(y[2, 0], want)
    assert np.abs(y - x).mean() > 1.0
    assert np.abs(apply_attack("jpeg:95", x, (0, 255)) - x).mean() < np.abs(y - x).mean()


def test_jpeg_in_a_normalised_input_space_round_trips_through_pixels():
    pp = bb.Preprocess.from_json({"stored": "input", "scale": 1 / 255, "mean": [0.286], "std": [0.353],
                                  "pixel_range": [0, 255]})
    pixels = _pixels()
    stored = pp.from_pixels(pixels)
    np.testing.assert_allclose(pp.to_pixels(stored), pixels, atol=1e-9)
    attacked = pp.from_pixels(apply_attack("jpeg:50", pp.to_pixels(stored), (0, 255)))
    want = pp.from_pixels(apply_attack("jpeg:50", pixels, (0, 255)))
    np.testing.assert_allclose(attacked, want, atol=1e-9)


def test_noise_is_seeded_clipped_and_of_the_stated_sigma():
    x = np.full((50, 1, 28, 28), 127.5)
    a = apply_attack("noise:0.05", x, (0, 255), seed=3)
    b = apply_attack("noise:0.05", x, (0, 255), seed=3)
    c = apply_attack("noise:0.05", x, (0, 255), seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.std(a - x) == pytest.approx(0.05 * 255, rel=0.02)
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(apply_attack("noise:0.05:9", x, (0, 255), seed=0),
                                  apply_attack("noise:0.05", x, (0, 255), seed=9))


def test_shift_moves_content_by_whole_pixels():
    x = _pixels()
    y = apply_attack("shift:2,3", x, (0, 255))
    np.testing.assert_array_equal(y[:, :, 3:, 2:], x[:, :, :-3, :-2])
    assert (y[:, :, :3] == 0).all() and (y[:, :, :, :2] == 0).all()


def test_rotate_resize_crop_keep_shape_and_range():
    x = _pixels(c=3)
    for spec in ("rotate:10", "resize:0.5", "crop:0.8"):
        y = apply_attack(spec, x, (0, 255))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255
        assert np.abs(y - x).mean() > 0.5, spec
    np.testing.assert_allclose(apply_attack("rotate:0", x, (0, 255)), x, atol=1e-4)
    np.testing.assert_allclose(apply_attack("resize:1", x, (0, 255)), x, atol=1e-4)


def test_attacks_never_mutate_their_input():
    x = _pixels()
    before = x.copy()
    for spec in ("jpeg:50", "noise:0.1", "resize:0.5", "crop:0.9", "rotate:5", "shift:1"):
        apply_attack(spec, x, (0, 255))
    np.testing.assert_array_equal(x, before)


def test_query_attack_weakens_but_keeps_trigger_mark(build_fixture):
    from auditor.marks import keys
    from auditor.marks import stats
    from auditor.backends import open_runner

    fx = build_fixture("bb-trigger")
    t = bb.load_triggers(keys.load_key(fx / "key.json"))
    with open_runner(fx / "marked.onnx") as r:
        clean = bb.evaluate_triggers(r, t)
        noisy = bb.evaluate_triggers(r, t, attack="noise:0.2", attack_seed=1)
        again = bb.evaluate_triggers(r, t, attack="noise:0.2", attack_seed=1)
    assert noisy["hits"] == again["hits"]  # seeded
    assert noisy["hits"] < clean["hits"]
    assert noisy["verdict"] == stats.DETECTED

import json

import numpy as np
import pytest

from auditor.marks import keys
from auditor.errors import AuditError


def test_generator_is_documented_numpy_call():
    X = keys.generate_projection(7, 4, 6, scale=2.0)
    ref = 2.0 * np.random.default_rng(7).standard_normal((4, 6))
    assert np.array_equal(X, ref)


def test_reductions():
    w = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2)
    assert np.array_equal(keys.reduce_weight(w, "mean"), w.mean(axis=0).reshape(-1))
    assert np.array_equal(keys.reduce_weight(w, "flatten"), w.reshape(-1))
    assert keys.reduced_length((64, 32, 3, 3), "mean") == 288
    assert keys.reduced_length((64, 32, 3, 3), "flatten") == 18432
    with pytest.raises(AuditError):
        keys.reduce_weight(np.zeros(5), "mean")


def test_roundtrip_and_commitment(tmp_path):
    bits = np.random.default_rng(0).integers(0, 2, 256)
    m = keys.make_mark("conv2.weight", (64, 32, 3, 3), "mean", bits, seed=11)
    doc = keys.save_key(keys.Key(whitebox=[m]), tmp_path / "k.json")
    k = keys.load_key(tmp_path / "k.json")
    assert k.commitment == doc["commitment"]
    assert np.array_equal(k.whitebox[0].bits, bits)
    assert k.whitebox[0].matrix().shape == (256, 288)
    # tampering with any field breaks the commitment
    doc["whitebox"][0]["bits"] = "1" + doc["whitebox"][0]["bits"][1:] if doc["whitebox"][0]["bits"][0] == "0" \
        else "0" + doc["whitebox"][0]["bits"][1:]
    (tmp_path / "k.json").write_text(json.dumps(doc))
    with pytest.raises(AuditError, match="commitment"):
        keys.load_key(tmp_path / "k.json")


def test_sidecar_outside_folder_refused(tmp_path):
    (tmp_path / "X.npy").write_bytes(b"")
    d = tmp_path / "sub"
    d.mkdir()
    m = keys.make_mark("w", (4, 4), "flatten", np.ones(4), matrix_path="../X.npy")
    keys.save_key(keys.Key(whitebox=[m]), d / "k.json")
    k = keys.load_key(d / "k.json")
    with pytest.raises(AuditError, match="leaves the key's folder"):
        k.whitebox[0].matrix()


def test_sidecar_hash_checked(tmp_path):
    X = np.ones((4, 16))
    np.save(tmp_path / "X.npy", X)
    m = keys.make_mark("w", (4, 4), "flatten", np.ones(4), matrix_path="X.npy",
                       matrix_sha256=keys.sha256_file(tmp_path / "X.npy"))
    keys.save_key(keys.Key(whitebox=[m]), tmp_path / "k.json")
    assert keys.load_key(tmp_path / "k.json").whitebox[0].matrix().shape == (4, 16)
    np.save(tmp_path / "X.npy", X * 2)
    with pytest.raises(AuditError, match="sha256"):
        keys.load_key(tmp_path / "k.json").whitebox[0].matrix()


@pytest.mark.parametrize("doc,msg", [
    ({"format": "other"}, "format"),
    ({"format": "wmaudit-key/1", "whitebox": [{"param": "a", "shape": [2, 2], "reduce": "sum",
                                               "bits": "01", "projection": {"kind": "generator", "seed": 1}}]},
     "reduce"),
    ({"format": "wmaudit-key/1", "whitebox": [{"param": "a", "shape": [2, 2], "reduce": "mean",
                                               "bits": "0a", "projection": {"kind": "generator", "seed": 1}}]},
     "bits"),
])
def test_invalid_keys_are_one_line_errors(tmp_path, doc, msg):
    (tmp_path / "k.json").write_text(json.dumps(doc))
    with pytest.raises(AuditError) as e:
        keys.load_key(tmp_path / "k.json")
    assert "\n" not in str(e.value) and msg in str(e.value)


def test_not_json(tmp_path):
    (tmp_path / "k.json").write_text("{nope")
    with pytest.raises(AuditError, match="not valid JSON"):
        keys.load_key(tmp_path / "k.json")


def test_projection_into_a_reused_buffer_is_the_projection():
    """A generated projection written into a caller's buffer has exactly the values `matrix()` gives
    (the same generator stream), and a non-finite scale is refused."""
    import copy as _copy

    import numpy as np
    import pytest

    from auditor.errors import AuditError
    from auditor.marks.keys import make_mark

    m = make_mark("w", (16, 24, 3, 3), "mean", np.arange(32) % 2, seed=11)
    want = m.matrix().copy()
    m._X = None
    buf = np.full((32, 24 * 9), np.nan)
    got = m.projection_into(lambda shape: buf)
    assert got is buf and np.array_equal(got, want) and m._X is None
    bad = _copy.deepcopy(m)
    bad.projection = dict(bad.projection, scale=float("inf"))
    with pytest.raises(AuditError, match="finite"):
        bad.projection_into(lambda shape: buf)

"""Evidence that holds up: the fair-coin null checked on the key, the empirical
null for keys that fail the checks, committed vs uncommitted keys, forged keys,
and the false-positive count of committed keys on third-party files.

Third-party files: scripts/fetch_thirdparty.sh (docs/thirdparty.md); tests that
need them skip when the folder is missing.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from auditor.cli import main
from auditor.marks import stats

DATA = Path(os.environ.get("WMAUDIT_DATA", Path(__file__).resolve().parent.parent / "build" / "data"))
THIRDPARTY = DATA / "thirdparty"
MAGIKA = THIRDPARTY / "magika_v3_3.onnx"
# the one conv of magika (a tf2onnx/JAX byte classifier that carries no mark), torch layout
MAGIKA_CONV = (512, 256, 5, 1)


def _need(p: Path) -> Path:
    if not p.is_file():
        pytest.skip(f"{p} is missing: run `bash scripts/fetch_thirdparty.sh {p.parent}`")
    return p


def _direct_key(tmp_path: Path) -> Path:
    """yu4u/dnn-watermark's `direct` key: X[i] one-hot at np.random.randint(0, N) (seed 7),
    bits all zero (unbalanced, as the source documents' all-one signatures)."""
    T, N = 256, 256 * 5 * 1
    idx = np.random.RandomState(7).randint(0, N, T)
    X = np.zeros((T, N))
    X[np.arange(T), idx] = 1.0
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "bits.npy", np.zeros(T, np.uint8))
    key = tmp_path / "key.json"
    assert main(["key", "import", "--matrix", str(tmp_path / "X.npy"), "--bits", str(tmp_path / "bits.npy"),
                 "--param", "conv0.weight", "--shape", ",".join(map(str, MAGIKA_CONV)), "--reduce", "mean",
                 "-o", str(key)]) == 0
    return key


def test_one_hot_all_zero_key_is_no_longer_detected_on_an_unmarked_file(tmp_path, capsys):
    """Measured before this check: 171/256 matches, `VERDICT: DETECTED (p = 4.1e-08)`."""
    model = _need(MAGIKA)
    key = _direct_key(tmp_path)
    capsys.readouterr()
    rc = main(["extract", str(model), "--key", str(key), "--json"])
    doc = json.loads(capsys.readouterr().out)
    m = doc["result"]["marks"][0]
    assert m["matches"] == 171 and m["n_bits"] == 256
    # the fair-coin p it would have had, kept for the record and marked invalid
    assert m["null"]["fair_coin_p"] == pytest.approx(4.125212808397667e-08, rel=1e-9)
    assert m["null"]["kind"] == "empirical"
    checks = m["null"]["checks"]
    assert checks["rows"]["passed"] is False and checks["rows"]["sparse_rows"] == 256
    assert checks["bits"]["passed"] is False and checks["bits"]["ones"] == 0
    assert checks["independence"]["duplicate_rows"] > 0
    emp = m["null"]["empirical"]
    assert emp["n"] >= 99
    assert m["p_value"] == pytest.approx((1 + emp["exceed"]) / (1 + emp["n"]))
    assert m["p_value"] > 1e-3 and m["verdict"] != stats.DETECTED
    assert rc == 1
    assert m["evidence"]["kind"] == "uncommitted" and doc["evidence"]["kind"] == "uncommitted"
    rc = main(["extract", str(model), "--key", str(key)])
    out = capsys.readouterr().out
    assert rc == 1 and "VERDICT: DETECTED" not in out and "EVIDENCE: UNCOMMITTED" in out
    assert "empirical null" in out

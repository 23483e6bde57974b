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
    assert checks["bit_balance"]["passed"] is False and checks["bit_balance"]["ones"] == 0
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


# ---------------------------------------------------------------- committed keys
from auditor.marks import evidence, keys  # noqa: E402


def test_commit_seed_and_bits_follow_the_documented_derivation():
    import hashlib

    h = hashlib.sha256(b"wmaudit-commit/1\0ACME Vision\0tinycnn/conv2/1").digest()
    assert evidence.commit_seed("ACME Vision", "tinycnn/conv2/1") == int.from_bytes(h[:8], "big")
    hb = hashlib.sha256(b"wmaudit-bits/1\0ACME Vision\0tinycnn/conv2/1").digest()
    bits = np.random.default_rng(int.from_bytes(hb[:8], "big")).integers(0, 2, 256)
    assert np.array_equal(evidence.derive_bits("ACME Vision", "tinycnn/conv2/1", 256), bits)
    assert evidence.commit_seed("ACME Vision", "tinycnn/conv2/2") != evidence.commit_seed("ACME Vision", "tinycnn/conv2/1")


def test_key_new_verify_show_and_tampering(tmp_path, capsys):
    k = tmp_path / "key.json"
    args = ["key", "new", "--owner", "ACME Vision", "--nonce", "n1", "--date", "2026-01-15", "--param", "conv2.weight",
            "--shape", "16,8,3,3", "--reduce", "flatten", "--bits-count", "64", "-o", str(k)]
    assert main(args) == 0
    assert main(["key", "new", "--owner", "ACME Vision", "--nonce", "n2", "--date", "2026-01-15", "--param", "fc.weight",
                 "--shape", "10,784", "--reduce", "mean", "--id", "fc", "--append", "-o", str(k)]) == 0
    # same owner and nonce twice in one key: refused
    assert main(args[:-2] + ["--id", "again", "--append", "-o", str(k)]) == 2
    capsys.readouterr()
    assert main(["key", "verify", str(k), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["evidence"] for m in doc["whitebox"]] == ["committed", "committed"]
    key = keys.load_key(k)
    st = key.whitebox[0].extra["statement"]
    assert key.whitebox[0].projection["seed"] == evidence.commit_seed("ACME Vision", "n1")
    assert st["commitment"] == evidence.statement_commitment(st) and st["date"] == "2026-01-15"
    # old keys (no statement) still load and verify, as uncommitted
    assert main(["key", "verify", str(Path(_fixture_dir("attacks-tinycnn-marked")) / "key.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["whitebox"][0]["evidence"] == "uncommitted"
    # a statement whose bits were changed afterwards: verify refuses, extract calls it uncommitted
    m = key.whitebox[0]
    m.bits = 1 - m.bits
    keys.save_key(key, tmp_path / "tampered.json")
    assert main(["key", "verify", str(tmp_path / "tampered.json")]) == 2
    assert "bits are not derived" in capsys.readouterr().err
    c = evidence.classify_mark(keys.load_key(tmp_path / "tampered.json").whitebox[0])
    assert c["kind"] == "uncommitted" and "bits are not derived" in c["sentence"]
    # bad date: one line, exit 2, no key written
    capsys.readouterr()
    assert main(args[:7] + ["15/01/2026"] + args[8:-1] + [str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "15/01/2026" in err[0], err
    assert not (tmp_path / "x.json").exists()


def _fixture_dir(name):
    from fixtures.build import ensure

    return ensure(name)


def test_committed_fixture_detected_as_committed_evidence(build_fixture, capsys):
    d = build_fixture("evidence-tinycnn-committed")
    rc = main(["extract", str(d / "model.onnx"), "--key", str(d / "key.json"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    m = doc["result"]["marks"][0]
    assert rc == 0 and m["matches"] == 256 and m["null"]["kind"] == "fair-coin"
    assert m["p_value"] == pytest.approx(2.0 ** -256) and m["evidence"]["kind"] == "committed"
    assert doc["evidence"]["kind"] == "committed" and doc["result"]["evidence"]["kind"] == "committed"
    assert m["evidence"]["date"] == "2026-01-15"
    # the same committed key on the unmarked twin: not detected
    u = build_fixture("attacks-tinycnn-unmarked")
    rc = main(["extract", str(u / "model.onnx"), "--key", str(d / "key.json"), "--json"])
    m = json.loads(capsys.readouterr().out)["result"]["marks"][0]
    assert rc == 1 and 100 <= m["matches"] <= 156 and m["evidence"]["kind"] == "committed"


# ---------------------------------------------------------------- forged keys
def _unmarked_w(build_fixture):
    from auditor.read.weights import WeightStore

    u = build_fixture("attacks-tinycnn-unmarked")
    w = WeightStore.open(u / "model.onnx").array("conv2.weight").astype(np.float64)
    return u, keys.reduce_weight(w, "flatten")


def test_forged_key_is_detected_by_the_fair_coin_but_reported_uncommitted(build_fixture, tmp_path, capsys):
    """The ambiguity attack: Gaussian rows, each flipped so that sign(x_i . w) = b_i, on a model
    that never carried a mark. The checks on X cannot tell (rows stay dense and sign-symmetric);
    only the commitment can."""
    u, w = _unmarked_w(build_fixture)
    rng = np.random.default_rng(2026)
    T = 256
    b = rng.integers(0, 2, T).astype(np.uint8)
    X = rng.standard_normal((T, w.size))
    X *= (np.sign(X @ w) * (2.0 * b - 1.0))[:, None]
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "b.npy", b)
    k = tmp_path / "forged.json"
    assert main(["key", "import", "--matrix", str(tmp_path / "X.npy"), "--bits", str(tmp_path / "b.npy"),
                 "--param", "conv2.weight", "--shape", "16,8,3,3", "--reduce", "flatten", "-o", str(k)]) == 0
    capsys.readouterr()
    rc = main(["extract", str(u / "model.onnx"), "--key", str(k), "--json"])
    doc = json.loads(capsys.readouterr().out)
    m = doc["result"]["marks"][0]
    assert rc == 0 and m["matches"] == 256 and m["null"]["kind"] == "fair-coin"
    assert m["null"]["checks"]["rows"]["passed"] and m["null"]["checks"]["independence"]["passed"]
    assert m["evidence"]["kind"] == "uncommitted" and doc["evidence"]["kind"] == "uncommitted"
    main(["extract", str(u / "model.onnx"), "--key", str(k)])
    assert "EVIDENCE: UNCOMMITTED" in capsys.readouterr().out


def test_a_committed_key_cannot_be_fitted_after_the_fact(build_fixture, tmp_path):
    """With X and bits fixed by the statement's hash, fitting either one breaks the derivation,
    and trying statements only buys what chance gives: the best of 200 nonces is far from 1e-6."""
    from fixtures.evidence import committed_mark

    u, w = _unmarked_w(build_fixture)
    honest = committed_mark()
    assert evidence.classify_mark(honest)["kind"] == "committed"
    # 1. keep the statement and X, fit the bits: sign(X w)
    fitted = keys.make_mark(honest.param, honest.shape, honest.reduce, (honest.matrix() @ w > 0).astype(np.uint8),
                            seed=honest.projection["seed"], id=honest.id, extra=dict(honest.extra))
    c = evidence.classify_mark(fitted)
    assert c["kind"] == "uncommitted" and c["reasons"] == ["the bits are not derived from the statement's owner and nonce"]
    # 2. keep the statement and bits, fit X (rows flipped to the bits): a raw matrix
    X = honest.matrix() * (np.sign(honest.matrix() @ w) * (2.0 * honest.bits - 1.0))[:, None]
    np.save(tmp_path / "X.npy", X)
    forged = keys.make_mark(honest.param, honest.shape, honest.reduce, honest.bits, matrix_path="X.npy",
                            matrix_sha256=keys.sha256_file(tmp_path / "X.npy"), extra=dict(honest.extra))
    c = evidence.classify_mark(forged)
    assert c["kind"] == "uncommitted" and "the projection is not the documented generator" in c["reasons"]
    # 3. grind statements: 200 nonces, each a fresh committed key, on the unmarked weight
    best = 0
    for i in range(200):
        mk = evidence.committed_mark("Mallory", f"try-{i}", "2026-01-15", param="conv2.weight", shape=(16, 8, 3, 3),
                                     reduce="flatten", n_bits=256)
        best = max(best, int(((mk.matrix() @ w > 0).astype(np.uint8) == mk.bits).sum()))
    assert 140 <= best <= 160 and stats.binom_tail_half(256, best) > 1e-4


# ---------------------------------------------------------------- false positives
def test_no_committed_key_is_detected_on_third_party_files():
    """50 random committed keys x every third-party file (the full 1,000 keys:
    bench/bench_false_positives.py). Seeded: the counts are exact."""
    paths = evidence.default_null_corpus()
    if len(paths) < 5:
        pytest.skip(f"{THIRDPARTY} is missing: run `bash scripts/fetch_thirdparty.sh {THIRDPARTY}`")
    r = evidence.committed_false_positives(paths, 50)
    # a key never asks for more bits than its weight has coefficients: one file has only
    # 28 keys whose drawn reduction leaves a weight large enough for 256 bits
    assert r["pairs"] == 228 and r["detections"] == 0
    assert [f["pairs"] for f in r["files"]] == [50, 50, 28, 50, 50]
    # calibration: the fair coin is conservative on real weights (discrete binomial tail)
    assert r["p_le_0.05"] == 9 and r["p_le_0.01"] == 0
    assert r["min_p"] == pytest.approx(0.014254461953498946, rel=1e-9)


def test_structured_keys_fail_the_checks_and_generator_keys_pass():
    T, N = 256, 1280
    gen = keys.make_mark("w", (4, N), "mean", np.zeros(T, np.uint8), seed=3)
    c = evidence.null_checks(gen)
    assert c["fair_coin"] and c["checks"]["rows"]["by_construction"] and not c["checks"]["bit_balance"]["passed"]
    rs = np.random.RandomState(0)
    diff = np.zeros((T, N))
    diff[np.arange(T), rs.randint(0, N, T)] = 1.0
    diff[np.arange(T), rs.randint(0, N, T)] -= 1.0
    balanced = np.random.default_rng(0).integers(0, 2, T).astype(np.uint8)
    mk = keys.WhiteboxMark(id="w", param="w", shape=(4, N), reduce="mean", bits=balanced,
                           projection={"kind": "npy", "path": "X.npy"}, _X=diff)
    c = evidence.null_checks(mk)
    assert not c["fair_coin"] and c["checks"]["rows"]["sparse_rows"] == T and c["checks"]["bit_balance"]["passed"]
    # a dense imported Gaussian X with balanced bits passes every check
    mk._X = np.random.default_rng(1).standard_normal((T, N))
    c = evidence.null_checks(mk)
    assert c["fair_coin"] and c["checks"]["independence"]["duplicate_rows"] == 0


# ---------------------------------------------------------------- every output says which evidence
def test_robustness_query_and_report_say_which_evidence(build_fixture, tmp_path, capsys):
    d = build_fixture("evidence-tinycnn-committed")
    (tmp_path / "grid.toml").write_text('[[config]]\nname = "fp16"\nsteps = "fp16"\n')
    rc = main(["robustness", str(d / "model.onnx"), "--key", str(d / "key.json"), "--grid",
               str(tmp_path / "grid.toml"), "--heldout", "200", "--calibration-samples", "16", "--jobs", "1",
               "-o", str(tmp_path / "rob")])
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "rob" / "results.json").read_text())
    assert rc == 0 and doc["evidence"]["kind"] == "committed" and "evidence: committed" in out
    mk = doc["configs"][0]["marks"][0]
    assert mk["matches"] == 256 and mk["evidence"]["kind"] == "committed" and mk["null"]["kind"] == "fair-coin"
    assert main(["report", str(tmp_path / "rob" / "results.json"), "-o", str(tmp_path / "r.html")]) == 0
    assert "committed: committed evidence" in (tmp_path / "r.html").read_text()
    fx = build_fixture("bb-trigger")
    capsys.readouterr()
    assert main(["query", str(fx / "marked.onnx"), "--key", str(fx / "key.json")]) == 0
    assert "evidence UNCOMMITTED: uncommitted evidence" in capsys.readouterr().out
    assert main(["query", str(fx / "marked.onnx"), "--key", str(fx / "key.json"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)["evidence"]
    assert ev["kind"] == "uncommitted" and ev["marks"] == {}


def test_null_corpus_option(tmp_path, capsys):
    """--null-corpus replaces the default corpus; too few vectors: refused with the reason; bad path: exit 2."""
    model = _need(MAGIKA)
    key = _direct_key(tmp_path)
    capsys.readouterr()
    rc = main(["extract", str(model), "--key", str(key), "--null-corpus", str(model), "--json"])
    m = json.loads(capsys.readouterr().out)["result"]["marks"][0]
    # magika alone: its other weights give too few windows of 1,280 mean-reduced values
    emp = m["null"]["empirical"]
    assert rc == 1 and emp["refused"] and emp["n"] < 99 and m["verdict"] == stats.INSUFFICIENT
    assert m["reason"].startswith("empirical null") and "refused" in m["reason"]
    assert main(["extract", str(model), "--key", str(key), "--null-corpus", str(tmp_path / "nope")]) == 2
    assert "null corpus path not found" in capsys.readouterr().err


GATE_POLICY = """
format = "wmaudit-policy/1"
name = "committed evidence"
backends = ["ort-cpu"]
seed = 0
[thresholds]
max_p_value = 1e-6
max_ber = 0.05
min_margin = 0.0
max_accuracy_drop = 5.0
[accuracy]
samples = 200
seed = 0
[[attacks]]
id = "prune-30"
steps = "prune:0.3"
"""


def test_gate_says_which_evidence(build_fixture, tmp_path, capsys):
    d = build_fixture("evidence-tinycnn-committed")
    (tmp_path / "policy.toml").write_text(GATE_POLICY)
    rc = main(["gate", str(d / "model.onnx"), "--key", str(d / "key.json"), "--policy", str(tmp_path / "policy.toml"),
               "--junit", str(tmp_path / "g.xml"), "-o", str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "g.json").read_text())
    assert rc == 0 and doc["evidence"]["kind"] == "committed"
    assert "evidence:   committed (committed evidence" in out
    assert '<property name="evidence" value="committed"' in (tmp_path / "g.xml").read_text()


def test_scan_refuses_a_key_that_fails_the_fair_coin_checks(tmp_path):
    """scan pays for permutation searches under the fair-coin null; a `direct` one-hot key with
    all-zero bits has no such null, so scan refuses it (insufficient evidence, exit 1) instead of
    reporting the 171/256 that extract once called detected."""
    from auditor.forensics.scan import scan
    from auditor.marks.keys import load_key

    model = _need(MAGIKA)
    key = load_key(_direct_key(tmp_path))
    body = scan(model, [key])
    f = body["findings"][0]
    assert body["verdict"] == "insufficient evidence" and f["verdict"] == "insufficient evidence"
    assert f["null"] == {"kind": "refused", "failed_checks": "rows, bit_balance, independence"}
    assert f["evidence"]["kind"] == "uncommitted"
    assert main(["scan", str(model), "--key", str(tmp_path / "key.json")]) == 1

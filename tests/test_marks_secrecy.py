"""The key never leaves the key file: results carry counts, BER, p and margin statistics,
per-bit values only with --reveal-bits; scale-free margins; keys that cannot hold their bits
are refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from auditor.errors import AuditError
from auditor.gate.gate import judge_mark
from auditor.gate.policy import parse_policy
from auditor.marks.keys import check_capacity, load_key, make_mark
from auditor.report import html

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True, cwd=ROOT)


def _walk_keys(x):
    if isinstance(x, dict):
        for k, v in x.items():
            yield k
            yield from _walk_keys(v)
    elif isinstance(x, list):
        for v in x:
            yield from _walk_keys(v)


def test_extract_json_holds_no_per_bit_values_unless_revealed(build_fixture):
    d = build_fixture("cnn-small-mean")
    key = load_key(d / "key.json")
    r = _cli("extract", str(d / "model.onnx"), "--key", str(d / "key.json"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    names = set(_walk_keys(doc))
    assert "bits" not in names and "signed_margins" not in names
    assert doc["result"]["bits_revealed"] is False
    m = doc["result"]["marks"][0]
    assert m["matches"] == 256 and m["n_bits"] == 256 and m["wrong_bits"] == 0
    # the key's bit string appears nowhere in the output
    assert "".join(map(str, key.whitebox[0].bits)) not in r.stdout
    assert sum(m["margin_histogram"]["counts"]) == 256 and len(m["margin_histogram"]["edges"]) == 21
    assert 0.0 < m["normalized_margin_min"] <= m["normalized_margin_median"] <= 1.0

    r = _cli("extract", str(d / "model.onnx"), "--key", str(d / "key.json"), "--json", "--reveal-bits")
    doc = json.loads(r.stdout)
    m = doc["result"]["marks"][0]
    assert doc["result"]["bits_revealed"] is True
    assert m["bits"] == "".join(map(str, key.whitebox[0].bits)) and len(m["signed_margins"]) == 256
    assert min(m["signed_margins"]) == pytest.approx(m["signed_margin_min"])
    human = _cli("extract", str(d / "model.onnx"), "--key", str(d / "key.json"), "--reveal-bits").stdout
    assert "--reveal-bits" in human and "give the key away" in human


def test_normalized_margin_is_the_cosine_of_each_row_with_the_weight(build_fixture):
    from auditor.marks.keys import reduce_weight
    from auditor.marks.whitebox import extract
    from auditor.read.weights import WeightStore

    d = build_fixture("cnn-small-mean")
    key = load_key(d / "key.json")
    mk = key.whitebox[0]
    res = extract(d / "model.onnx", key).marks[0]
    w = reduce_weight(WeightStore.open(d / "model.onnx").array("features.conv2.weight"), "mean")
    X = mk.matrix()
    cos = (2.0 * mk.bits - 1) * (X @ w) / (np.linalg.norm(X, axis=1) * np.linalg.norm(w))
    assert res.normalized_margin_min == pytest.approx(cos.min(), rel=1e-6)
    assert res.normalized_margin_median == pytest.approx(np.median(cos), rel=1e-6)
    # scaling the weight (what BN folding does when all channels share one scale) changes the
    # margin in weight units, not the normalised one
    from auditor.marks.whitebox import score, project

    s = score(mk, project(mk, 3.0 * WeightStore.open(d / "model.onnx").array("features.conv2.weight")),
              1e-6, 1, 3.0 * w)
    assert s["margin_min"] == pytest.approx(3.0 * res.margin_min, rel=1e-6)
    assert s["normalized_margin_min"] == pytest.approx(res.normalized_margin_min, rel=1e-6)


def test_policy_min_normalized_margin():
    base = {"format": "wmaudit-policy/1", "name": "n", "backends": ["ort-cpu"], "thresholds": {"max_p_value": 1e-6,
                                                                     "min_normalized_margin": 0.02},
            "evidence": {"accuracy": False}, "attacks": [{"id": "fp16", "steps": "fp16"}]}
    pol = parse_policy(base)
    th = pol.thresholds_for("fp16")
    assert th["min_normalized_margin"] == 0.02
    mark = {"id": "m", "n_bits": 128, "matches": 128, "ber": 0.0, "p_value": 1e-39, "log10_p": -38.5,
            "margin_min": 3.0, "signed_margin_min": 3.0, "normalized_margin_min": 0.015,
            "location": {"weight": "w", "how": "name"}}
    req = judge_mark("fp16", mark, th)
    assert req.status == "fail" and "normalised margin min = 0.015 < min_normalized_margin 0.02" in req.message
    req = judge_mark("fp16", dict(mark, normalized_margin_min=0.03), th)
    assert req.status == "pass" and req.thresholds["min_normalized_margin"] == 0.02
    with pytest.raises(AuditError, match="min_normalized_margin"):
        parse_policy(dict(base, thresholds={"min_normalized_margin": 2.0}))


def test_report_histogram_from_bins_kept_at_extraction():
    doc = {"kind": "robustness", "baseline": {}, "configs": [{
        "name": "fp16", "steps": "fp16", "verdict": "detected", "marks": [{
            "id": "m", "n_bits": 128, "matches": 128, "ber": 0.0, "p_value": 1e-39, "log10_p": -38.5,
            "margin_min": 0.1, "margin_median": 0.5, "signed_margin_min": 0.1, "verdict": "detected",
            "margin_histogram": {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [3, 60, 50, 15]}}]}]}
    out = html.margin_histograms(doc)
    assert "128 values in 4 bins from 0 to 1" in out and "[0.25, 0.5): 60" in out


def test_depthwise_mean_key_is_refused_with_the_reason(tmp_path):
    with pytest.raises(AuditError, match="9 coefficients for 128 bits"):
        check_capacity("blocks.1.depthwise.weight", (96, 1, 3, 3), "mean", 128)
    check_capacity("blocks.1.depthwise.weight", (96, 1, 3, 3), "flatten", 128)  # 864 values: fine
    with pytest.raises(AuditError, match="9 coefficients"):
        make_mark("dw.weight", (96, 1, 3, 3), "mean", np.ones(128), seed=1)
    np.save(tmp_path / "bits.npy", np.random.default_rng(0).integers(0, 2, 128).astype(np.uint8))
    r = _cli("key", "import", "--seed", "1", "--bits", str(tmp_path / "bits.npy"), "--param", "dw.weight",
             "--shape", "96,1,3,3", "--reduce", "mean", "-o", str(tmp_path / "key.json"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "9 coefficients for 128 bits" in r.stderr and not (tmp_path / "key.json").exists()


def test_exporter_refuses_a_depthwise_mean_mark():
    torch = pytest.importorskip("torch")
    from exporters import arch
    from exporters import watermark as wm

    torch.manual_seed(0)
    model = arch.MobileNetS()
    spec = wm.MarkSpec(arch.DEPTHWISE_EXAMPLE, wm.random_bits(128, 0), "mean", seed=1)
    with pytest.raises(AuditError, match=r"\[96, 1, 3, 3\] with reduce=mean has 9 coefficients for 128 bits"):
        wm.UchidaRegularizer(model, [spec])

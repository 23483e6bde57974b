"""Keyed models under deployment int8, and tracing leaked keyed files to the issued key.

Every int8 mode of onnxruntime applied to the plain and to the keyed float model
(calibrated on plain / encrypted train images) on 300 seeded test images: the keyed
model's accuracy stays within 0.03 of the plain model's and their top-1 agreement
>= 0.9 (measured: 0.93-1.00). Tracing: every issued key (3 orthogonal, 1 permutation)
is named on its own leaked file after a different int8 mode (and 80 % pruning), with
49/49 block positions (Bonferroni p = 4 / 49! = 6.6e-63); the other keys have p > 1e-3.
"""
import json

import onnx
import pytest

from auditor.attacks.compose import compose
from auditor.cli import main
from auditor.data.calibration import Calibration
from auditor.data.inputs import from_arrays
from auditor.keyed import cipher, keys, trace, verify
from auditor.keyed import model as km
from auditor.keyed.inputs import read_data

INT8 = ("quantize:dynamic", "quantize:static-qdq", "quantize:static-qdq-per-channel", "quantize:static-qop",
        "quantize:static-qop-per-channel")


@pytest.fixture(scope="module")
def vit(build_fixture):
    return build_fixture("keyed-vit")


@pytest.fixture(scope="module")
def cal():
    return read_data("fashion-mnist:train", limit=64, seed=0).inputs


def test_every_int8_mode_keeps_parity_and_accuracy(vit, cal):
    key = keys.load(vit / "keys" / "client-a.json")
    plain = onnx.load(str(vit / "plain.onnx"))
    keyed = km.transform(plain, key)
    d = read_data("fashion-mnist:test", limit=300, seed=1)
    rows = verify.under_attacks(plain, keyed, key, d.inputs, d.labels, cal, attacks=INT8)
    assert [r["attack"] for r in rows] == list(INT8)
    for r in rows:
        assert r["samples"] == 300
        assert r["plain_accuracy"] > 0.6, r
        assert abs(r["keyed_minus_plain"]) <= 0.03, r
        assert r["parity"]["top1_agreement"] >= 0.9, r
        assert r["keyed_agreement_with_float"] >= 0.9, r
        t = r["paired_test"]
        assert (t["keyed_only_right"] - t["plain_only_right"]) / 300 == pytest.approx(r["keyed_minus_plain"])
        assert 0.0 < t["p_value"] <= 1.0


@pytest.mark.parametrize("client,step", [("client-a", "quantize:dynamic"), ("client-b", "quantize:static-qdq"),
                                         ("client-c", "quantize:static-qop-per-channel"),
                                         ("client-d", "quantize:static-qdq-per-channel"),
                                         ("client-b", "prune:0.8")])
def test_trace_names_the_issued_key_on_attacked_leaks(vit, cal, tmp_path, capsys, client, step):
    key = keys.load(vit / "keys" / f"{client}.json")
    plain = onnx.load(str(vit / "plain.onnx"))
    keyed = km.transform(plain, key)
    c = Calibration(from_arrays(keyed, cipher.encrypt(cal, key), source="encrypted", seed=0))
    leaked = tmp_path / "leaked.onnx"
    onnx.save_model(compose(keyed, step, c).model, str(leaked))
    rc = main(["keyed", "trace", str(leaked), "--plain", str(vit / "plain.onnx"), "--keys", str(vit / "keys"),
               "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["traced"]
    assert doc["client"] == {"file": f"{client}.json", "commitment": key.commitment, "client": client}
    best = doc["best"]
    assert best["block_agreements"] == 49 and best["p_corrected"] < 1e-60
    assert best["matrix_agreement"] > 0.9
    others = [k for k in doc["keys"] if k["file"] != f"{client}.json"]
    assert len(others) == 3 and all(k["p_value"] > 1e-3 for k in others)


def test_trace_no_issued_key_fits(vit, tmp_path, capsys):
    other = keys.parse(keys.generate(image_size=28, channels=1, block=4, seed=999))
    leaked = tmp_path / "leaked.onnx"
    onnx.save_model(km.transform(onnx.load(str(vit / "plain.onnx")), other), str(leaked))
    rc = main(["keyed", "trace", str(leaked), "--plain", str(vit / "plain.onnx"), "--keys", str(vit / "keys"),
               "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1 and doc["client"] is None and doc["best"]["p_corrected"] > 1e-6


def test_attacker_recovers_the_key_from_the_plain_model(vit):
    plain = onnx.load(str(vit / "plain.onnx"))
    for name in ("client-a", "client-d"):
        key = keys.load(vit / "keys" / f"{name}.json")
        rep = trace.recovery_report(trace.recover(plain, vit / f"torch-keyed-{name[-1]}.onnx", key), key)
        assert rep["block_positions_recovered"] == 49
        assert rep["matrix_rel_error_least_squares"] < 1e-4 and rep["matrix_rel_error_procrustes"] < 1e-4
        if key.variant == "permutation":
            assert rep["pixel_positions_recovered"] == 16

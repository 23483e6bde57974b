"""Models wmaudit did not make, through attack / robustness / gate on their own data.

Fixtures (fixtures/data.py): a digits CNN ([n, 1, 8, 8], independent Uchida mark, 64 bits,
mean reduction, torch's default dynamo export, key made by `wmaudit key import`), its
fixed-batch (4) export, and a two-input character CNN (input_ids + attention_mask, int64).
Numbers below were measured on these fixtures with the commands the tests run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from auditor.cli import main

P64 = 2.0 ** -64  # all 64 bits right: P[Bin(64, 1/2) >= 64]
ROOT = Path(__file__).resolve().parents[1]
GRID = """
[grid]
prune_rates = [0.0, 0.5]
quantize = ["none", "static-qdq-per-channel", "fp16"]
"""


@pytest.fixture(scope="module")
def digits(build_fixture):
    return build_fixture("data-digits-cnn")


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_attack_static_int8_calibrates_on_user_data(digits, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["attack", str(digits / "model.onnx"), "--quantize", "static-qdq-per-channel",
                 "--data", str(digits / "digits.npz"), "-o", str(out), "--json"]) == 0
    doc = _json(capsys)
    assert doc["calibration"]["source"] == "npz:digits.npz" and doc["calibration"]["samples"] == 256
    assert doc["calibration"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 8, 8]}]
    assert main(["extract", str(out), "--key", str(digits / "key.json"), "--json"]) == 0
    mk = _json(capsys)["result"]["marks"][0]
    assert (mk["matches"], mk["n_bits"], mk["ber"]) == (64, 64, 0.0)
    assert mk["p_value"] == pytest.approx(P64, rel=1e-9)
    # without --data the command asks for it instead of feeding 28x28 images
    assert main(["attack", str(digits / "model.onnx"), "--quantize", "static-qdq", "-o",
                 str(tmp_path / "no.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "give --data" in err and "\n" not in err and not (tmp_path / "no.onnx").exists()
    # a dynamic attack calibrates nothing, so no calibration source is recorded
    assert main(["attack", str(digits / "model.onnx"), "--quantize", "dynamic", "--data",
                 str(digits / "digits.npz"), "-o", str(tmp_path / "d.onnx"), "--json"]) == 0
    assert "calibration" not in _json(capsys)


def test_robustness_with_labels_on_digits(digits, tmp_path, capsys):
    (tmp_path / "grid.toml").write_text(GRID)
    code = main(["robustness", str(digits / "model.onnx"), "--key", str(digits / "key.json"), "--grid",
                 str(tmp_path / "grid.toml"), "--data", str(digits / "digits.npz"), "--jobs", "1",
                 "-o", str(tmp_path / "out")])
    assert code == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["evaluation"]["source"] == "npz:digits.npz" and doc["evaluation"]["samples"] == 360
    assert doc["evaluation"]["measures"] == ["accuracy", "fidelity"]
    assert doc["calibration"]["samples"] == 256
    base = doc["baseline"]
    assert base["accuracy"] == pytest.approx(350 / 360, abs=2 / 360)  # measured 0.9722
    by = {c["name"]: c for c in doc["configs"]}
    q = by["quantize:static-qdq-per-channel"]
    assert q["marks"][0]["ber"] == 0.0 and q["marks"][0]["p_corrected"] == pytest.approx(P64, rel=1e-9)
    assert q["marks"][0]["log10_p_corrected"] == pytest.approx(-64 * np.log10(2), abs=1e-9)
    assert abs(q["accuracy_drop"]) <= 2 / 360                      # measured 0
    assert q["fidelity"]["top1_agreement"] >= 0.985                # measured 0.994
    assert 20.0 <= q["fidelity"]["sqnr_db"] <= 32.0                # measured 25.6 dB
    f16 = by["fp16"]["fidelity"]
    assert f16["top1_agreement"] == 1.0 and f16["sqnr_db"] > 60    # measured 78.5 dB
    assert f16["cosine"] == pytest.approx(1.0, abs=1e-6)
    pr = by["prune:0.5:magnitude"]
    assert pr["marks"][0]["matches"] == 63 and pr["verdict"] == "detected"  # one bit flipped by pruning
    assert 0.95 <= pr["fidelity"]["top1_agreement"] <= 0.99        # measured 0.972
    assert 8.0 <= pr["fidelity"]["sqnr_db"] <= 13.0                # measured 10.4 dB


def test_gate_with_the_example_policy_on_digits(digits, tmp_path, capsys):
    out = tmp_path / "gate.json"
    code = main(["gate", str(digits / "model.onnx"), "--key", str(digits / "key.json"), "--policy",
                 str(ROOT / "examples" / "release-policy.toml"), "--data", str(digits / "digits.npz"),
                 "-o", str(out)])
    doc = json.loads(out.read_text())
    # 50 % pruning flips one of the 64 bits: the signed margin goes below min_margin = 0
    assert code == 1
    assert doc["failing"] == ["prune-50/whitebox/conv2.weight", "prune-50-then-int8/whitebox/conv2.weight"]
    req = {r["id"]: r for r in doc["requirements"]}
    assert req["int8-static-per-channel/whitebox/conv2.weight"]["measured"]["matches"] == 64
    assert abs(req["int8-static-per-channel/ort-cpu/accuracy"]["measured"]["accuracy_drop"]) <= 100 * 2 / 360
    assert req["prune-50/ort-cpu/accuracy"]["measured"]["accuracy_drop"] == pytest.approx(100 * 6 / 360, abs=0.6)
    fid = req["int8-static-per-channel/ort-cpu/fidelity"]
    assert fid["status"] == "pass" and fid["measured"]["top1_agreement"] >= 0.985
    assert fid["thresholds"] == {"min_top1_agreement": 0.95, "min_sqnr_db": 5.0}
    assert req["prune-50/ort-cpu/fidelity"]["thresholds"]["min_top1_agreement"] == 0.85
    assert doc["data"]["evaluation"]["source"] == "npz:digits.npz"
    assert doc["data"]["calibration"]["source"] == "npz:digits.npz"


def test_fixed_batch_export_calibrates_and_measures(digits, tmp_path, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\nquantize = ["static-qdq-per-channel"]\n')
    code = main(["robustness", str(digits / "model-b4.onnx"), "--key", str(digits / "key.json"), "--grid",
                 str(grid), "--data", str(digits / "digits.npz"), "--samples", "358", "--calibration-samples",
                 "30", "--jobs", "1", "-o", str(tmp_path / "out")])
    assert code == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    ev, cal = doc["evaluation"], doc["calibration"]
    assert (ev["samples"], ev["batch_size"], ev["dropped"], ev["padded"]) == (358, 4, 0, 2)
    assert ev["remainder"].startswith("padded")
    assert (cal["samples"], cal["batch_size"], cal["dropped"], cal["padded"]) == (28, 4, 2, 0)
    row = doc["configs"][0]
    assert row["marks"][0]["ber"] == 0.0 and row["fidelity"]["top1_agreement"] >= 0.98
    assert doc["baseline"]["accuracy"] == pytest.approx(0.972, abs=0.01)


def test_two_input_text_model_label_free(build_fixture, tmp_path, capsys):
    d = build_fixture("data-text-2input")
    with np.load(d / "text.npz") as z:
        np.savez(tmp_path / "nolabels.npz", input_ids=z["input_ids"], attention_mask=z["attention_mask"])
    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\nquantize = ["dynamic", "static-qdq", "fp16"]\n')
    code = main(["robustness", str(d / "model.onnx"), "--key", str(d / "key.json"), "--grid", str(grid),
                 "--data", str(tmp_path / "nolabels.npz"), "--jobs", "1", "-o", str(tmp_path / "out")])
    assert code == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["evaluation"]["labels"] is False and doc["evaluation"]["measures"] == ["fidelity"]
    assert [i["name"] for i in doc["evaluation"]["inputs"]] == ["input_ids", "attention_mask"]
    assert "accuracy" not in doc["baseline"]
    by = {c["name"]: c for c in doc["configs"]}
    for name, (agree, lo, hi) in {"quantize:dynamic": (0.98, 36, 50),     # measured 0.995, 42.8 dB
                                  "quantize:static-qdq": (0.98, 32, 44),  # measured 0.993, 37.6 dB
                                  "fp16": (1.0, 60, 100)}.items():        # measured 1.000, 74.2 dB
        f = by[name]["fidelity"]
        assert f["top1_agreement"] >= agree and lo <= f["sqnr_db"] <= hi, (name, f)
        assert f["cosine"] > 0.999 and "accuracy" not in by[name]
        assert by[name]["marks"][0]["ber"] == 0.0
        # int8 moves the margins little: the weight is dequantized with its own scale, not with the
        # product of the embedding's and the weight's scales that ConvInteger's output is multiplied by
        assert by[name]["marks"][0]["margin_min"] == pytest.approx(doc["baseline"]["marks"][0]["margin_min"],
                                                                   rel=0.05), name


@pytest.mark.parametrize("command", ["attack", "robustness", "gate"])
def test_bad_data_writes_nothing(digits, tmp_path, capsys, command):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((5, 1, 28, 28), np.float32))
    model, key = str(digits / "model.onnx"), str(digits / "key.json")
    out = tmp_path / "out"
    argv = {"attack": ["attack", model, "--quantize", "static-qdq", "--data", str(bad), "-o", str(out)],
            "robustness": ["robustness", model, "--key", key, "--data", str(bad), "-o", str(out)],
            "gate": ["gate", model, "--key", key, "--policy", str(ROOT / "examples" / "release-policy.toml"),
                     "--data", str(bad), "-o", str(out), "--junit", str(tmp_path / "j.xml")]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shape [5, 1, 28, 28] does not fit input 'x' [batch, 1, 8, 8]" in err[0]
    assert not out.exists() and not (tmp_path / "j.xml").exists()


def test_synthetic_is_flagged_everywhere(build_fixture, tmp_path, capsys):
    from auditor.report import html, terminal

    d = build_fixture("data-text-2input")
    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\nquantize = ["static-qdq"]\n')
    assert main(["robustness", str(d / "model.onnx"), "--key", str(d / "key.json"), "--grid", str(grid),
                 "--data", "synthetic", "--samples", "64", "--calibration-samples", "32", "--jobs", "1",
                 "-o", str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    for part in (doc["evaluation"], doc["calibration"]):
        assert part["synthetic"] is True and part["source"] == "synthetic" and "do not reflect" in part["caveat"]
    assert any("[synthetic" in n for n in doc["configs"][0]["notes"])
    assert "note: synthetic inputs" in terminal.render(doc) and "Synthetic data:" in html.render([doc])
    assert "note: synthetic inputs" in capsys.readouterr().out


def test_query_checks_key_images_against_the_model(digits, build_fixture, capsys):
    bb = build_fixture("bb-trigger")
    assert main(["query", str(digits / "model.onnx"), "--key", str(bb / "key.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "key trigger images: shape [1, 1, 28, 28] does not fit input 'x' [batch, 1, 8, 8]" in err[0]

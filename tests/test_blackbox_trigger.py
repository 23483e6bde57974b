"""Trigger-set marks queried on onnxruntime CPU: fp32, fp16 and int8 models."""
import math

import numpy as np
import pytest

from auditor.marks import blackbox as bb
from auditor.marks import keys
from auditor.marks import stats
from auditor.backends import label_agreement, open_runner
from auditor.errors import AuditError


@pytest.fixture(scope="module")
def trig(build_fixture):
    return build_fixture("bb-trigger")


@pytest.fixture(scope="module")
def variants(trig, tmp_path_factory):
    from fixtures.blackbox import calibration_images, fp16_variant, int8_variant

    d = tmp_path_factory.mktemp("trigger-variants")
    calib = calibration_images()
    out = {"fp32": trig / "marked.onnx", "unmarked": trig / "unmarked.onnx",
           "fp16": fp16_variant(trig / "marked.onnx", d / "marked-fp16.onnx"),
           "int8": int8_variant(trig / "marked.onnx", d / "marked-int8.onnx", calib),
           "int8-dynamic": int8_variant(trig / "marked.onnx", d / "marked-int8-dyn.onnx", mode="dynamic"),
           "unmarked-int8": int8_variant(trig / "unmarked.onnx", d / "unmarked-int8.onnx", calib)}
    return out


def _evaluate(model, key_path, **kw):
    key = keys.load_key(key_path)
    with open_runner(model, "ort-cpu") as r:
        return bb.evaluate_triggers(r, bb.load_triggers(key), **kw)


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8", "int8-dynamic"])
def test_marked_model_detected(trig, variants, variant):
    res = _evaluate(variants[variant], trig / "key.json")
    assert res["null_rate_source"]["source"] == "1/C"
    assert res["null_rate"] == pytest.approx(0.1)
    assert res["n"] == 100
    assert res["trigger_accuracy"] >= 0.7, res["trigger_accuracy"]  # measured 0.80-0.81
    assert res["p_value"] < 1e-6 and res["verdict"] == stats.DETECTED
    # the exact binomial tail, recomputed independently
    want = sum(math.comb(100, i) * 0.1 ** i * 0.9 ** (100 - i) for i in range(res["hits"], 101))
    assert res["p_value"] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("variant", ["unmarked", "unmarked-int8"])
def test_unmarked_twin_not_detected(trig, variants, variant):
    res = _evaluate(variants[variant], trig / "key.json")
    assert res["trigger_accuracy"] <= 0.2
    assert res["p_value"] > 1e-3 and res["verdict"] == stats.NOT_DETECTED


def test_null_rate_from_reference_model(trig):
    key = keys.load_key(trig / "key.json")
    triggers = bb.load_triggers(key)
    with open_runner(trig / "unmarked.onnx") as r:
        ref_hits = bb.trigger_hits(r, triggers)
    nr = bb.null_rate_from_references([ref_hits], 100, ["unmarked.onnx"])
    # Clopper-Pearson upper bound u: P[Bin(100, u) <= hits] = 0.05
    u = nr["value"]
    cdf = sum(math.comb(100, i) * u ** i * (1 - u) ** (100 - i) for i in range(ref_hits + 1))
    assert cdf == pytest.approx(0.05, abs=1e-9)
    assert nr["observed"] == ref_hits / 100 and u > nr["observed"]
    with open_runner(trig / "marked.onnx") as r:
        res = bb.evaluate_triggers(r, triggers, null_rate=nr)
    assert res["null_rate_source"]["source"] == "reference models: unmarked.onnx"
    assert res["null_rate"] == u
    assert res["verdict"] == stats.DETECTED


def test_clopper_pearson_zero_hits_closed_form():
    assert bb.clopper_pearson_upper(0, 50) == pytest.approx(1 - 0.05 ** (1 / 50), rel=1e-9)
    assert bb.clopper_pearson_upper(50, 50) == 1.0


def test_few_triggers_give_insufficient_evidence():
    res = bb.trigger_verdict(hits=5, n=5, p0=0.1)
    assert res["best_possible_p"] == pytest.approx(1e-5)
    assert res["verdict"] == stats.INSUFFICIENT
    assert bb.trigger_verdict(hits=7, n=7, p0=0.1)["verdict"] == stats.DETECTED


def test_cross_backend_label_agreement(trig, variants):
    key = keys.load_key(trig / "key.json")
    t = bb.load_triggers(key)
    x = t.preprocess.model_input(t.images)
    outs = {}
    for v in ("fp32", "fp16", "int8"):
        with open_runner(variants[v]) as r:
            outs[v] = r.infer_batches(x, batch_size=32)
    fp16 = label_agreement(outs["fp32"], outs["fp16"])
    int8 = label_agreement(outs["fp32"], outs["int8"])
    assert fp16["n"] == 100 and fp16["agreement"] >= 0.99, fp16
    assert int8["agreement"] >= 0.9, int8
    assert 0 < fp16["max_abs_diff"] < int8["max_abs_diff"]


def test_wrong_class_count_is_a_user_error(trig, tmp_path):
    key = keys.load_key(trig / "key.json")
    t = bb.load_triggers(key)
    t.num_classes = 12
    with open_runner(trig / "marked.onnx") as r, pytest.raises(AuditError, match="12"):
        bb.evaluate_triggers(r, t)


def test_tampered_sidecar_refused(trig, tmp_path):
    import shutil

    shutil.copy(trig / "key.json", tmp_path / "key.json")
    imgs = np.load(trig / "triggers.npy")
    imgs[0, 0, 0, 0] += 1
    np.save(tmp_path / "triggers.npy", imgs)
    with pytest.raises(AuditError, match="sha256"):
        bb.load_triggers(keys.load_key(tmp_path / "key.json"))

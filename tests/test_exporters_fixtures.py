"""White-box fixtures as the auditor sees them: marks read from the ONNX files."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from auditor.marks import keys
from auditor.read import layout
from auditor.marks import whitebox
from auditor.read.weights import WeightStore
from exporters import data

CNN = ["cnn-small-mean", "cnn-small-flatten", "cnn-small-legacy"]
SEQ = [f"seq-{c}-{e}" for c in ("lstm", "gru", "rnn") for e in ("dynamo", "legacy")]


def _load(folder):
    return (keys.load_key(folder / "key.json"), json.loads((folder / "manifest.json").read_text()),
            json.loads((folder / "info.json").read_text()))


def _torch_layout(folder, manifest, param):
    entry = manifest["params"][param]
    store = WeightStore.open(folder / "model.onnx")
    return layout.apply_transform(store.array(entry["onnx"]), entry["transform"])


@pytest.mark.parametrize("name", CNN + SEQ)
def test_marked_fixture_is_detected_with_zero_ber(build_fixture, name):
    folder = build_fixture(name)
    key, manifest, info = _load(folder)
    assert key.commitment == info["key_commitment"]
    assert {m.param for m in key.whitebox} == set(manifest["params"])
    assert all(m.n_bits == 256 for m in key.whitebox)
    for mark in key.whitebox:
        w = _torch_layout(folder, manifest, mark.param)
        assert list(w.shape) == list(mark.shape)
        bits = (mark.matrix() @ keys.reduce_weight(w, mark.reduce) > 0).astype(np.uint8)
        assert np.array_equal(bits, mark.bits), mark.id
        assert info["metrics"]["ber"][mark.id] == 0.0
    res = whitebox.extract(folder / "model.onnx", key, manifest=manifest)
    assert res.verdict == "detected"
    assert all(r.ber == 0.0 and r.matches == 256 for r in res.marks)
    assert res.p_value < 1e-60


def test_unmarked_twin_is_not_detected(build_fixture):
    folder = build_fixture("cnn-small-unmarked")
    key, manifest, info = _load(folder)
    marked_key, _, marked_info = _load(build_fixture("cnn-small-mean"))
    # Same mark (bits, X); only the BN anchors differ, as they come from each trained model.
    assert np.array_equal(key.whitebox[0].bits, marked_key.whitebox[0].bits)
    assert key.whitebox[0].projection == marked_key.whitebox[0].projection
    res = whitebox.extract(folder / "model.onnx", key, manifest=manifest)
    assert 0.35 < res.marks[0].ber < 0.65
    assert res.verdict != "detected"
    # The regulariser costs little: same training, test accuracy within 3 points.
    assert abs(info["metrics"]["test_accuracy"] - marked_info["metrics"]["test_accuracy"]) < 0.03


@pytest.mark.parametrize("pair", [("cnn-small-mean", "cnn-small-legacy")]
                         + [(f"seq-{c}-dynamo", f"seq-{c}-legacy") for c in ("lstm", "gru", "rnn")])
def test_both_exporters_carry_bit_identical_marked_tensors(build_fixture, pair):
    a, b = (build_fixture(n) for n in pair)
    key_a, man_a, _ = _load(a)
    key_b, man_b, _ = _load(b)
    assert man_a["exporter"]["name"] == "dynamo" and man_b["exporter"]["name"] == "legacy"
    for mark in key_a.whitebox:
        wa, wb = _torch_layout(a, man_a, mark.param), _torch_layout(b, man_b, mark.param)
        assert wa.dtype == np.float32 and np.array_equal(wa, wb), mark.param
    if pair[0].startswith("seq-") and not pair[0].startswith("seq-rnn"):
        assert man_a["params"]["rnn.weight_ih_l0"]["transform"] == "identity"
    if pair[1].startswith("seq-"):
        cell = pair[1].split("-")[1].upper()
        assert man_b["params"]["rnn.weight_hh_l0"]["transform"] == f"rnn:{cell}:R:dir=0"


@pytest.mark.parametrize("name", CNN + ["cnn-small-unmarked"])
def test_batchnorm_kept_and_anchors_equal_the_graph(build_fixture, name):
    folder = build_fixture(name)
    key, manifest, _ = _load(folder)
    model = onnx.load(str(folder / "model.onnx"))
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 3
    entry = manifest["params"]["features.conv2.weight"]
    assert entry["batchnorm_kept"] is True and manifest["exporter"]["keep_batchnorm"] is True
    store = WeightStore.open(folder / "model.onnx")
    bn = layout.following_batchnorm(store, entry["onnx"])
    anchors = key.whitebox[0].batchnorm
    for k in ("gamma", "beta", "running_mean", "running_var"):
        assert np.array_equal(np.asarray(anchors[k], dtype=np.float32), np.asarray(bn[k], dtype=np.float32)), k
    assert anchors["eps"] == pytest.approx(float(bn["eps"]), rel=1e-6)


@pytest.mark.parametrize("name", ["cnn-small-mean", "cnn-small-legacy"])
def test_onnx_accuracy_equals_the_recorded_torch_accuracy(build_fixture, name):
    folder = build_fixture(name)
    _, manifest, info = _load(folder)
    assert manifest["validation"]["max_abs_diff"] < 1e-4
    x, y = data.fashion("test", n=info["training"]["test_subset"], seed=info["training"]["subset_seed"])
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    pred = np.concatenate([sess.run(None, {"input": x[i:i + 500].numpy()})[0].argmax(1)
                           for i in range(0, len(y), 500)])
    acc = float((pred == y.numpy()).mean())
    assert abs(acc - info["metrics"]["test_accuracy"]) <= 1 / len(y)
    assert acc > 0.75


@pytest.mark.parametrize("name", SEQ)
def test_sequence_fixture_axes_and_task(build_fixture, name):
    folder = build_fixture(name)
    _, manifest, info = _load(folder)
    assert manifest["input_dims"][0] == "batch"
    if name == "seq-rnn-dynamo":
        # dynamo unrolls the Elman RNN for the example's 8 steps
        assert manifest["static_axes"] == ["time"] and manifest["input_dims"][1] == 8
    else:
        assert manifest["static_axes"] == [] and manifest["input_dims"][1] == "time"
        assert [20, 16] in [s[1:] for s in manifest["validation"]["input_shapes"]]
    assert info["metrics"]["test_mse"] < 1e-3

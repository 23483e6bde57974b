"""White-box marks read off onnxruntime-quantized files: the exporters' fixtures
(CNN, both reductions, both exporters; LSTM/GRU/RNN kernel and recurrent
weights) after dynamic int8 and static QDQ / QOperator quantization."""
import json

import numpy as np
import onnx
import pytest

from auditor.attacks.quantize import quantize
from auditor.attacks.simulate import simulate_int8
from auditor.data.calibration import Calibration
from auditor.data.inputs import bind, fashion_mnist, model_inputs
from auditor.cli import main
from auditor.marks.keys import load_key
from auditor.read.weights import WeightStore
from auditor.marks.whitebox import extract

CNN = ["cnn-small-mean", "cnn-small-flatten", "cnn-small-legacy"]
MODES = ["dynamic", "static-qdq", "static-qdq-per-channel", "static-qop", "static-qop-per-channel"]


@pytest.fixture(scope="module")
def cnn_calibration():
    return Calibration(fashion_mnist("calibration", 64, seed=0))


def _extract_model(model: onnx.ModelProto, key, tmp_path):
    path = tmp_path / "attacked.onnx"
    onnx.save(model, str(path))
    return extract(path, key), WeightStore.open(path)


@pytest.mark.parametrize("name", CNN)
@pytest.mark.parametrize("mode", MODES)
def test_cnn_mark_survives_ort_quantization(build_fixture, cnn_calibration, tmp_path, name, mode):
    d = build_fixture(name)
    key = load_key(d / "key.json")
    res = quantize(onnx.load(str(d / "model.onnx")), mode, cnn_calibration)
    out, store = _extract_model(res.model, key, tmp_path)
    m = out.marks[0]
    assert out.verdict == "detected"
    assert m.ber == 0.0 and m.p_value < 1e-30
    # the weight really was read from its quantized form
    assert m.location.quant is not None
    if mode.startswith("static-qop"):
        assert m.location.quant in ("QLinearConv", "QGemm")
    elif mode == "dynamic":
        assert m.location.quant == "ConvInteger"
    else:
        assert m.location.quant.startswith("qdq-per-" + ("channel" if mode.endswith("channel") else "tensor"))
    # margins on dequantized values stay close to the float model's (int8 keeps the bits,
    # the margin shows how much moved)
    ref = extract(d / "model.onnx", key).marks[0]
    assert m.margin_min == pytest.approx(ref.margin_min, rel=0.25)
    assert m.margin_min != ref.margin_min


@pytest.mark.parametrize("mode", ["dynamic", "static-qdq-per-channel", "static-qop"])
def test_unmarked_twin_stays_undetected(build_fixture, cnn_calibration, tmp_path, mode):
    d = build_fixture("cnn-small-unmarked")
    key = load_key(d / "key.json")
    res = quantize(onnx.load(str(d / "model.onnx")), mode, cnn_calibration)
    out, _ = _extract_model(res.model, key, tmp_path)
    assert out.verdict == "not detected" and out.exit_code == 1
    assert 0.35 < out.marks[0].ber < 0.65


def test_manifest_locates_the_parameter(build_fixture, capsys):
    d = build_fixture("cnn-small-mean")
    rc = main(["extract", str(d / "model.onnx"), "--key", str(d / "key.json"),
               "--manifest", str(d / "manifest.json"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert doc["result"]["marks"][0]["location"]["how"] == "manifest"
    assert doc["key_commitment"] == load_key(d / "key.json").commitment
    assert doc["model"]["sha256"].startswith("sha256:")


SEQ = [f"seq-{c}-{e}" for c in ("lstm", "gru", "rnn") for e in ("dynamo", "legacy")]


def _seq_calibration(d):
    m = onnx.load(str(d / "model.onnx"))
    dims = [x.dim_value or 4 for x in m.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal([32] + dims[1:]).astype(np.float32)
    return Calibration(bind({m.graph.input[0].name: x}, None, model_inputs(m), source="standard normal"))


@pytest.mark.parametrize("name", SEQ)
def test_seq_marks_float_and_int8(build_fixture, tmp_path, name):
    d = build_fixture(name)
    key = load_key(d / "key.json")
    assert {m.param for m in key.whitebox} == {"rnn.weight_ih_l0", "rnn.weight_hh_l0"}
    base = extract(d / "model.onnx", key)
    assert base.verdict == "detected"
    for m in base.marks:
        assert m.ber == 0.0 and m.p_value < 1e-30, m.param
    model = onnx.load(str(d / "model.onnx"))
    if any(n.op_type in ("GRU", "RNN") for n in model.graph.node):
        # onnxruntime never quantizes GRU / RNN nodes: simulated int8, labelled so
        res = simulate_int8(model)
        assert res.simulated
    else:  # LSTM (DynamicQuantizeLSTM), or an Elman RNN the exporter unrolled into MatMul
        res = quantize(model, "dynamic")
    out, _ = _extract_model(res.model, key, tmp_path)
    assert out.verdict == "detected"
    for m in out.marks:
        assert m.ber == 0.0 and m.p_value < 1e-30, m.param
    if "lstm" in name and any(n.op_type == "DynamicQuantizeLSTM" for n in res.model.graph.node):
        assert all(m.location.quant == "DynamicQuantizeLSTM" for m in out.marks)


def test_quantization_leaves_the_working_directory_clean(build_fixture, tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference dumps files into the working directory
    when it gives up (it does on unoptimised dynamo graphs): they must not land there."""
    import auditor.attacks.quantize as q

    d = build_fixture("cnn-small-mean")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(q, "fold_constant_subgraphs", lambda m: (m, 0))  # force that path
    out, notes = q.preprocess(onnx.load(str(d / "model.onnx")))
    assert any("symbolic shape inference failed" in n for n in notes)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["dynamic", "static-qdq-per-channel"])
def test_bn_folded_by_quant_pre_process_is_detected_and_undone(build_fixture, cnn_calibration, tmp_path, mode):
    """quant_pre_process's optimisation folds BatchNorm into the marked conv before
    quantizing (what a deployer gets without skip_optimization): the audit says so and,
    with the BN anchors the exporter stored in the key, recovers the mark."""
    d = build_fixture("cnn-small-mean")
    key = load_key(d / "key.json")
    assert key.whitebox[0].batchnorm is not None
    res = quantize(onnx.load(str(d / "model.onnx")), mode, cnn_calibration, keep_batchnorm=False)
    assert not any(n.op_type == "BatchNormalization" for n in res.model.graph.node)
    out, _ = _extract_model(res.model, key, tmp_path)
    m = out.marks[0]
    assert m.batchnorm["status"] == "folded"
    assert out.verdict == "detected" and m.ber == 0.0 and m.p_value < 1e-30
    # without the anchors the folding cannot be undone, and the audit says it cannot rule it out
    key.whitebox[0].batchnorm = None
    plain, _ = _extract_model(res.model, key, tmp_path)
    # a static QDQ / QOperator conv keeps the folded bias (probably-folded); dynamic mode's
    # ConvInteger shows nothing of it (unknown): both say what to give
    assert plain.marks[0].batchnorm["status"] in ("probably-folded", "unknown")
    assert "--reference" in plain.marks[0].batchnorm["detail"]
    assert plain.marks[0].signed_margin_min < m.signed_margin_min

"""Weights of onnxruntime-quantized models, dequantized back to float.

Each dequantized weight must equal the ONNX reference evaluator's
DequantizeLinear on the same stored integers / scales / zero points (read
here straight from the file by onnxruntime's naming), and every torch
parameter must be found in the quantized model within half a quantization
step of its float value.
"""
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

torch = pytest.importorskip("torch")
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static)

from auditor.read.layout import torch_views  # noqa: E402
from auditor.read.weights import WeightStore  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 6)    # on a 3-D input: MatMul
        self.fc2 = torch.nn.Linear(6, 4)   # on a 2-D input: Gemm

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        y = self.fc(y.unsqueeze(1).repeat(1, 2, 1))
        return self.fc2(y[:, 0])


class Seq(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.LSTM(6, 8, batch_first=True, bidirectional=True)

    def forward(self, x):
        return self.rnn(x)[0]


class Reader(CalibrationDataReader):
    def __init__(self, name, shape, n=4, seed=0):
        rng = np.random.default_rng(seed)
        self._it = iter([{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self._it, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("quant")
    net = Net()
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 8, 8))
    net.eval()
    seq = Seq().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(d / "net.onnx"), dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"])
        torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(d / "net_dynamo.onnx"), dynamo=True, optimize=False,
                          input_names=["x"], verbose=False)
        torch.onnx.export(seq, (torch.randn(2, 5, 6),), str(d / "seq.onnx"), dynamo=False, input_names=["x"])
    return {"net": net, "seq": seq, "dir": d}


def _quantize(models, form):
    d = models["dir"]
    out = d / f"{form}.onnx"
    if out.exists():
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form.startswith("dynamic"):
            src = d / ("seq.onnx" if "lstm" in form else "net.onnx")
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=form.endswith("per-channel"))
        elif form.startswith("dynamo-qdq"):
            # quant_pre_process trips on the new exporter's Constant(value_ints) nodes in onnxruntime
            # 1.31; dropping the stale value_info is enough for quantize_static.
            pre = d / "net_dynamo_pre.onnx"
            m = onnx.load(str(d / "net_dynamo.onnx"))
            del m.graph.value_info[:]
            onnx.save(m, str(pre))
            quantize_static(str(pre), str(out), Reader("x", (2, 3, 8, 8)), quant_format=QuantFormat.QDQ, per_channel=True)
        else:
            fmt = QuantFormat.QDQ if form.startswith("qdq") else QuantFormat.QOperator
            quantize_static(str(d / "net.onnx"), str(out), Reader("x", (2, 3, 8, 8)), quant_format=fmt,
                            per_channel=form.endswith("per-channel"), weight_type=QuantType.QInt8)
    return out


FORMS = ["dynamic", "dynamic-lstm", "dynamic-lstm-per-channel", "qdq-per-tensor", "qdq-per-channel",
         "qoperator-per-tensor", "qoperator-per-channel", "dynamo-qdq-per-channel"]


def _expected_axis(store, w):
    """Axis of per-channel scales by the consumer, from the operator specs."""
    op, node_name, _ = w.uses[0]
    node = store.node(node_name)
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        return 0
    if op in ("Gemm", "QGemm"):
        trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans else 1
    return 1  # MatMul family: per output column of B [K, N]


@pytest.mark.parametrize("form", FORMS)
def test_dequantized_weights_equal_reference_dequantizelinear(models, form):
    path = _quantize(models, form)
    full = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    store = WeightStore.open(path)
    quantized = [w for w in store.weights if w.quant]
    listed = {w.stored_name for w in store.weights}
    assert quantized, "no quantized weight found"
    checked = 0
    for w in quantized:
        assert not any(n.endswith(("_scale", "_zero_point")) for n in listed), "scales listed as weights"
        if w.stored_name != w.name + "_quantized" or w.name + "_scale" not in full:
            continue  # biases use their own naming
        q, s, z = full[w.stored_name], full[w.name + "_scale"], full[w.name + "_zero_point"]
        got = store.array(w.name)
        assert got.dtype == np.float32 and got.shape == q.shape
        if w.quant == "DynamicQuantizeLSTM":
            ref = np.stack([ReferenceEvaluator(helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], axis=1)).run(
                None, {"x": q[d], "s": s[d], "z": z[d]})[0] for d in range(q.shape[0])])
            assert s.shape == ((2, 32) if form.endswith("per-channel") else (2,))
        else:
            axis = _expected_axis(store, w)
            ref = ReferenceEvaluator(helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], axis=axis)).run(
                None, {"x": q, "s": s, "z": z})[0]
            if w.quant.startswith("qdq"):
                assert w.quant == ("qdq-per-tensor" if s.size == 1 else f"qdq-per-channel(axis={axis})")
        assert np.array_equal(got, ref), w.name
        checked += 1
    assert checked >= (2 if "lstm" in form else 3)


@pytest.mark.parametrize("form", FORMS)
def test_torch_parameters_found_within_half_a_step(models, form):
    path = _quantize(models, form)
    m = onnx.load(str(path))
    full = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    dq_scale = {n.input[0]: n.input[1] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    store = WeightStore.open(path)
    views = torch_views(store)
    model = models["seq"] if "lstm" in form else models["net"]
    params = {n: p.detach().numpy() for n, p in model.named_parameters() if "weight" in n and p.ndim >= 2}
    assert params
    expected_quant = {"dynamic": {"ConvInteger", "MatMulInteger"}, "dynamic-lstm": {"DynamicQuantizeLSTM"},
                      "dynamic-lstm-per-channel": {"DynamicQuantizeLSTM"}, "qoperator-per-tensor": {"QLinearConv", "QLinearMatMul", "QGemm"},
                      "qoperator-per-channel": {"QLinearConv", "QLinearMatMul", "QGemm"}}.get(form)
    for pname, t in params.items():
        cands = [v for v in views if v.shape == t.shape and v.weight.quant]
        errs = [float(np.abs(v.array() - t).max()) for v in cands]
        best = cands[int(np.argmin(errs))]
        # the scale by onnxruntime's naming, or the one its DequantizeLinear reads (a weight that
        # reached the quantizer as a constant activation, e.g. dynamo's Transpose of fc.weight)
        step = float(np.max(full.get(best.weight.name + "_scale", full.get(dq_scale.get(best.weight.stored_name)))))
        assert min(errs) <= 0.5 * step * (1 + 1e-5) + 1e-7, (pname, min(errs), step, best.transform)
        assert min(errs) > 0  # really quantized, not the float original
        if expected_quant:
            assert best.weight.quant in expected_quant
        if "lstm" in form:
            d = 1 if pname.endswith("_reverse") else 0
            assert best.transform == f"DynamicQuantizeLSTM:{'W' if 'ih' in pname else 'R'}:dir={d}"


@pytest.mark.parametrize("form", ["dynamic", "qdq-per-tensor", "qdq-per-channel", "qoperator-per-channel", "dynamo-qdq-per-channel"])
def test_batchnorm_after_quantized_conv_is_still_seen(models, form):
    """BN kept by the quantizer is found behind activation Q/DQ pairs or ConvInteger's rescaling."""
    from auditor.read.layout import following_batchnorm

    store = WeightStore.open(_quantize(models, form))
    conv = [v for v in torch_views(store) if v.kind == "conv"]
    assert len(conv) == 1
    bn = following_batchnorm(store, conv[0].weight.name)
    assert bn is not None
    net = models["net"]
    np.testing.assert_array_equal(bn["mean"], net.bn.running_mean.numpy())
    np.testing.assert_array_equal(bn["var"], net.bn.running_var.numpy())
    # gamma may itself be stored quantized (QDQ): equal within half a step
    np.testing.assert_allclose(bn["gamma"], net.bn.weight.detach().numpy(), atol=0.5 * float(np.max(np.abs(bn["gamma"]))) / 127 + 1e-7)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K", [96, 80])  # 80: the last 32-block is padded
def test_matmulnbits_4bit_equals_onnxruntime(tmp_path, symmetric, K):
    """MatMulNBits (4-bit, blockwise): fed the identity matrix, onnxruntime's own kernel
    returns the dequantized weight; ours must equal it."""
    import onnxruntime as ort
    from onnx import TensorProto
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(K)
    N = 40
    w = rng.standard_normal((K, N)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, N])],
                          [numpy_helper.from_array(w, "fc.weight")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    q = MatMulNBitsQuantizer(m, block_size=32, is_symmetric=symmetric)
    q.process()
    p = tmp_path / "nbits.onnx"
    onnx.save(q.model.model, str(p))
    assert [n.op_type for n in q.model.model.graph.node] == ["MatMulNBits"]
    store = WeightStore.open(p)
    assert len(store.weights) == 1
    wt = store.weights[0]
    assert wt.name == "fc.weight" and wt.quant == "MatMulNBits" and wt.shape == (K, N)
    got = store.array("fc.weight")
    ref = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": np.eye(K, dtype=np.float32)})[0]
    assert np.array_equal(got, ref)
    scales = numpy_helper.to_array(next(t for t in q.model.model.graph.initializer if t.name.endswith("_scales")))
    # per block: within one step |scale| of the float weight (symmetric 4-bit scales may be negative)
    step = np.repeat(np.abs(scales).reshape(N, -1), 32, axis=1)[:, :K].T
    assert np.all(np.abs(got - w) <= step * (1 + 1e-5) + 1e-7)
    # and it reads as torch Linear weight [N, K] through the transpose view
    v = next(v for v in torch_views(store) if v.transform == "transpose")
    assert v.kind == "linear" and v.shape == (N, K)

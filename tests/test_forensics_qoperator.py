"""Provenance (weights method) and scan's neuron cleaning on int8 files in onnxruntime's QOperator and
dynamic forms, as quantized and as saved by onnxruntime at ORT_ENABLE_EXTENDED / ORT_ENABLE_ALL (NHWC
QLinearConv in Transpose pairs, NhwcMaxPool; DynamicQuantizeMatMul; NCHWc MaxPool between ConvIntegers).

The residual CNN of arch-resnet (default.onnx, BatchNorm folded, marked; kept.onnx the reference) and
its independently trained twin (forensics-resnet-twin) are quantized with the project's own steps
(`quantize:static-qop`, `quantize:static-qop-per-channel`, `quantize:dynamic`, then `ort-optimize:LEVEL`)
in a module-scoped temporary folder. Measured (`python scripts/deployed_forms.py --qoperator`, table in
docs/deployed-forms.md): the marked model's float file log10 p -28.33, its per-tensor int8 forms -26.87
and per-channel ones -28.33 (as quantized and saved at both levels alike), every twin form 0.00. The
rewritten float graph is 0.008-0.019 (relative to the largest output) from the float model, and as
far from onnxruntime's int8 outputs as the float model is (0.02-0.25, per channel the largest).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from auditor.cli import main
from auditor.forensics import canon
from auditor.forensics.provenance import DEFAULT_ALPHA, provenance
from auditor.read import qop_plain
from auditor.read.weights import WeightStore

LOG_ALPHA = math.log10(DEFAULT_ALPHA)
MODES = ("static-qop", "static-qop-per-channel", "dynamic")
LEVELS = ("raw", "extended", "all")
# ... and a QDQ file saved by onnxruntime at EXTENDED / ALL: its Q/DQ pairs fused into QOperator nodes
QDQ = ("static-qdq-per-channel",)
FORMS = [(m, lv) for m in MODES for lv in LEVELS] + [(QDQ[0], "extended"), (QDQ[0], "all")]


def _calibration(res: Path):
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data

    return Calibration(load_data(str(res / "calib.npy"), res / "default.onnx", purpose="calibration",
                                 samples=64, seed=0))


def _forms(model: onnx.ModelProto, cal, out: Path, tag: str, modes=MODES, levels=LEVELS) -> dict:
    """{(mode, level): path} of `model` quantized by `mode`, then saved by onnxruntime at `level`."""
    from auditor.attacks.compose import compose

    files = {}
    for mode in modes:
        q = compose(model, f"quantize:{mode}", cal).model
        for level in levels:
            m = q if level == "raw" else compose(q, f"ort-optimize:{level}").model
            f = out / f"{tag}-{mode}-{level}.onnx"
            onnx.save(m, str(f))
            files[(mode, level)] = f
    return files


@pytest.fixture(scope="module")
def resnet(build_fixture, tmp_path_factory):
    from auditor.attacks import load_model

    res, twin = build_fixture("arch-resnet"), build_fixture("forensics-resnet-twin")
    out = tmp_path_factory.mktemp("qoperator")
    cal = _calibration(res)
    return {"reference": res / "kept.onnx", "float": {"marked": res / "default.onnx", "twin": twin / "model.onnx"},
            "marked": _forms(load_model(res / "default.onnx"), cal, out, "marked", modes=MODES + QDQ),
            "twin": _forms(load_model(twin / "model.onnx"), cal, out, "twin", modes=MODES + QDQ),
            "calibration": cal, "out": out}


def _ops(path: Path) -> set[str]:
    return {f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in onnx.load(str(path)).graph.node}


def test_the_forms_are_what_deployers_ship(resnet):
    """The files hold the int8 forms this module is about (and no float layer)."""
    ops = {k: _ops(p) for k, p in resnet["marked"].items()}
    for level in LEVELS:
        conv = "com.microsoft:QLinearConv" if level == "all" else "QLinearConv"
        assert {conv, "com.microsoft:QGemm"} <= ops[("static-qop", level)]
        assert "ConvInteger" in ops[("dynamic", level)]
        assert not {"Conv", "Gemm", "MatMul"} & (ops[("static-qop", level)] | ops[("dynamic", level)])
    assert {"com.microsoft:QLinearConv", "com.microsoft:NhwcMaxPool", "Transpose"} <= ops[("static-qop", "all")]
    assert "com.microsoft:QLinearAdd" in ops[("static-qop", "raw")]
    assert "com.microsoft:DynamicQuantizeMatMul" in ops[("dynamic", "extended")]
    assert "MatMulInteger" in ops[("dynamic", "raw")] and "DynamicQuantizeLinear" in ops[("dynamic", "raw")]
    assert "QLinearConv" in ops[("static-qdq-per-channel", "extended")]


@pytest.mark.parametrize("mode,level", FORMS)
def test_float_graph_computes_what_the_int8_file_computes(resnet, mode, level):
    """The float graph written from the int8 file (standard ONNX, no quantized op, no NHWC Transpose
    pair left) run in onnxruntime against (a) the original float model: within the weights' int8 error
    (measured 0.008-0.019 of the largest output; a graph missing the ReLUs folded into the output
    ranges is 14x off), and (b) onnxruntime running the int8 file: as close to it as the float model
    is (argmax and largest error; what the int8 kernels add, saturation included, depends on the CPU:
    measured 0.02-0.25 from the float model, argmax agreeing on 81-97 % of the inputs)."""
    import onnxruntime as ort

    x = np.load(str(resnet["reference"].parent / "calib.npy"))[:64].astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run(model, opts=None):
        s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})[0]

    for who in ("marked", "twin"):
        path = resnet[who][(mode, level)]
        gv = canon.GraphValues(WeightStore.open(path))
        assert gv.unread is None
        kinds = {n.op_type for n in gv.model.graph.node}
        assert not any(n.domain for n in gv.model.graph.node) and "Transpose" not in kinds
        assert not kinds & {"QLinearConv", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear"}
        plain = run(gv.model.SerializeToString(), so)
        flt = run(str(resnet["float"][who]))
        int8 = run(str(path))
        scale = float(np.abs(flt).max())
        assert float(np.abs(plain - flt).max()) / scale < 0.05, (who, mode, level)
        err_plain, err_float = (float(np.abs(a - int8).max()) / scale for a in (plain, flt))
        assert err_plain <= 1.25 * err_float + 0.02, (who, mode, level, err_plain, err_float)
        agree_plain, agree_float = ((a.argmax(1) == int8.argmax(1)).mean() for a in (plain, flt))
        assert agree_plain >= agree_float - 0.1, (who, mode, level, agree_plain, agree_float)


@pytest.mark.parametrize("mode,level", FORMS)
def test_provenance_marked_forms_derived_twin_forms_not(resnet, mode, level):
    ref = resnet["reference"]
    base = provenance(resnet["float"]["marked"], ref)
    res = provenance(resnet["marked"][(mode, level)], ref)
    assert res["verdict"] == "derived" and res["log10_p_combined"] < LOG_ALPHA, (mode, level, res["log10_p_combined"])
    assert len(res["layers"]) == len(base["layers"])
    twin = provenance(resnet["twin"][(mode, level)], ref)
    assert twin["verdict"] == "not derived" and twin["log10_p_combined"] > LOG_ALPHA, (mode, level)


def test_provenance_cli_on_a_qoperator_file(resnet, capsys):
    assert main(["provenance", str(resnet["marked"][("static-qop", "all")]), "--reference",
                 str(resnet["reference"])]) == 0
    assert "VERDICT: DERIVED" in capsys.readouterr().out
    assert main(["provenance", str(resnet["twin"][("dynamic", "extended")]), "--reference",
                 str(resnet["reference"])]) == 1
    assert "VERDICT: NOT DERIVED" in capsys.readouterr().out


def _undone(finding: dict) -> list[str]:
    """The neurons undone (dummy, clique, split: output side and input side) and the steps taken, with
    the node names as the float file had them (the quantizer and onnxruntime's optimizer append
    `_quant`, `_token_N`) and without the cosines (the int8 weights of two quantizers differ slightly)."""
    return [re.sub(r"median cosine [0-9.]+", "median cosine", re.sub(r"_quant(_token_\d+)?\b", "", u))
            for u in finding["undone"]]


@pytest.mark.parametrize("src,name,ref", [("kept", "dummy-4", False), ("kept", "all", False),
                                          ("kept", "all", True), ("twin", "all", True)])
def test_scan_on_qoperator_gives_the_qdq_finding(build_fixture, resnet, src, name, ref):
    """scan of an obfuscated residual CNN quantized QOperator (also saved at ORT_ENABLE_ALL) and
    dynamic: the verdict, matching bits and neurons undone (input side through the layer feeding the
    marked one included) of its QDQ quantization; the twin never detected."""
    from auditor.attacks import load_model
    from auditor.forensics.scan import scan
    from auditor.marks.keys import load_key

    res = build_fixture("arch-resnet")
    key, refs = [load_key(res / "key.json")], ([res / "kept.onnx"] if ref else [])
    m = load_model(build_fixture("forensics-resnet-obfuscated") / src / f"{name}.onnx")
    files = _forms(m, resnet["calibration"], resnet["out"], f"scan-{src}-{name}",
                   modes=("static-qdq", "static-qop", "dynamic"), levels=("raw", "all"))
    want = scan(files[("static-qdq", "raw")], key, references=refs)["findings"][0]
    if name == "all":   # the input-side cleaning (42 -> 32 channels of the stream read by the marked layer)
        assert any("input neurons" in u and "4 dummy and 2 clique removed" in u for u in want["undone"])
    for form in (("static-qop", "raw"), ("static-qop", "all"), ("dynamic", "raw"), ("dynamic", "all")):
        got = scan(files[form], key, references=refs)["findings"][0]
        assert got["verdict"] == want["verdict"] and got["matches"] == want["matches"], (form, got, want)
        assert _undone(got) == _undone(want), form
    if src == "twin":
        assert want["verdict"] == "not detected"
    elif name == "dummy-4":
        assert want["verdict"] == "detected"


def test_unknown_quantized_op_is_one_line(resnet, tmp_path, capsys):
    """A quantized op with no float meaning here (com.microsoft QLinearReduceMean in place of the
    ReduceMean before the classifier) is not guessed at: one line naming it, exit code 2."""
    m = onnx.load(str(resnet["marked"][("static-qop", "raw")]))
    nodes = list(m.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.op_type == "ReduceMean")
    dq, q = nodes[i - 1], nodes[i + 1]
    assert dq.op_type == "DequantizeLinear" and q.op_type == "QuantizeLinear"
    inits = {t.name: t for t in m.graph.initializer}
    axes = [int(a) for a in onnx.numpy_helper.to_array(inits[nodes[i].input[1]])]
    red = helper.make_node("QLinearReduceMean", [dq.input[0], dq.input[1], dq.input[2], q.input[1], q.input[2]],
                           [q.output[0]], name="qmean", domain="com.microsoft", axes=axes, keepdims=0)
    del m.graph.node[i - 1:i + 2]
    m.graph.node.insert(i - 1, red)
    bad = tmp_path / "qmean.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(Exception, match="QLinearReduceMean"):
        qop_plain.plain_model(m, WeightStore.open(bad))
    rc = main(["provenance", str(bad), "--reference", str(resnet["reference"])])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "QLinearReduceMean" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def mobilenet(build_fixture, tmp_path_factory):
    from auditor.attacks import load_model

    d = build_fixture("arch-mobilenet")
    out = tmp_path_factory.mktemp("qoperator-mobilenet")
    return d, _forms(load_model(d / "default.onnx"), _calibration(d), out, "mobilenet",
                     modes=("static-qop", "dynamic"), levels=("raw", "all"))


def test_mobilenet_depthwise_and_dynamic_linear_layer(mobilenet):
    """The depthwise MobileNet (ReLU6 as Clip, depthwise Convs; quantize_dynamic writes each Conv's bias
    as an Add after the rescale and the classifier's Gemm as MatMulInteger + Add): every QOperator and
    dynamic form derived with the float file's log10 p (measured -63.79 for each); in the float graph
    of the dynamic file each depthwise Conv holds its bias (the channel trace passes it), and the graph
    is within the weights' int8 error of the float model."""
    import onnxruntime as ort

    d, files = mobilenet
    base = provenance(d / "default.onnx", d / "kept.onnx")
    x = np.load(str(d / "calib.npy"))[:32].astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run(model, opts=None):
        s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x})[0]

    flt = run(str(d / "default.onnx"))
    for form, path in files.items():
        res = provenance(path, d / "kept.onnx")
        assert res["verdict"] == "derived" and res["log10_p_combined"] < LOG_ALPHA, form
        assert res["log10_p_combined"] == pytest.approx(base["log10_p_combined"], abs=3.0), form
        gv = canon.GraphValues(WeightStore.open(path))
        from auditor.read import channels as ch

        lays = ch.layers(gv.model, gv.graph)
        assert len(lays) == 6 and all(gv.flow(l).blocked is None for l in lays[:-1]), form
        if form[0] == "dynamic":
            depthwise = [n for n in gv.model.graph.node if n.op_type == "Conv" and
                         any(a.name == "group" and a.i > 1 for a in n.attribute)]
            assert depthwise and all(len(n.input) == 3 for n in depthwise), form
        plain = run(gv.model.SerializeToString(), so)
        assert float(np.abs(plain - flt).max()) / float(np.abs(flt).max()) < 0.05, form


def _branchy_cnn() -> onnx.ModelProto:
    """Conv -> ReLU -> two Convs (LeakyReLU, ReLU) -> Concat -> AveragePool -> Conv -> x * Sigmoid(x)
    -> GlobalAveragePool -> Flatten -> Gemm; 3x16x16 inputs, batch dimension free."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(0)
    inits = []

    def const(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def conv(x, y, o, i, name):
        w = rng.standard_normal((o, i, 3, 3)) * (2 / (i * 9)) ** 0.5
        b = rng.standard_normal(o) * 0.1
        return helper.make_node("Conv", [x, const(f"{name}.weight", w), const(f"{name}.bias", b)], [y],
                                pads=[1, 1, 1, 1], name=name)

    nodes = [conv("x", "a", 8, 3, "c1"), helper.make_node("Relu", ["a"], ["a1"]),
             conv("a1", "b", 8, 8, "c2a"), helper.make_node("LeakyRelu", ["b"], ["b1"], alpha=0.1),
             conv("a1", "c", 8, 8, "c2b"), helper.make_node("Relu", ["c"], ["c1"]),
             helper.make_node("Concat", ["b1", "c1"], ["cat"], axis=1),
             helper.make_node("AveragePool", ["cat"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             conv("p", "d", 16, 16, "c3"), helper.make_node("Sigmoid", ["d"], ["d1"]),
             helper.make_node("Mul", ["d", "d1"], ["d2"]),
             helper.make_node("GlobalAveragePool", ["d2"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", const("fc.weight", rng.standard_normal((10, 16)) * 0.3),
                                       const("fc.bias", np.zeros(10))], ["y"], transB=1)]
    shape = ["N", 3, 16, 16]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("level", ["raw", "all"])
def test_concat_pooling_and_gates_in_qoperator_and_nhwc(tmp_path, level):
    """QLinearLeakyRelu, QLinearConcat, QLinearAveragePool, QLinearSigmoid, QLinearMul,
    QLinearGlobalAveragePool, Flatten into QGemm (at ORT_ENABLE_ALL: NHWC QLinearConv and the channels-last
    pooling between Transposes): the float graph is within the int8 weights' error of the float model
    (measured 0.032 of the largest output) and the trace finds every layer's readers, the second Concat
    input at channel offset 8."""
    import onnxruntime as ort
    from auditor.attacks.compose import compose
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import bind, model_inputs
    from auditor.read import channels as ch

    m = _branchy_cnn()
    x = np.random.default_rng(1).standard_normal((32, 3, 16, 16)).astype(np.float32)
    cal = Calibration(bind({"x": x}, None, model_inputs(m), source="standard normal"))
    q = compose(m, "quantize:static-qop" + (",ort-optimize:all" if level == "all" else ""), cal).model
    path = tmp_path / "int8.onnx"
    onnx.save(q, str(path))
    ops = _ops(path)
    assert {"com.microsoft:QLinearConcat", "com.microsoft:QLinearLeakyRelu", "com.microsoft:QLinearSigmoid",
            "com.microsoft:QLinearMul", "com.microsoft:QLinearGlobalAveragePool",
            "com.microsoft:QLinearAveragePool"} <= ops
    if level == "all":
        assert "com.microsoft:QLinearConv" in ops and "Transpose" in ops
    gv = canon.GraphValues(WeightStore.open(path))
    assert gv.unread is None and not any(n.domain for n in gv.model.graph.node)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    flt = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    plain = ort.InferenceSession(gv.model.SerializeToString(), so,
                                 providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert float(np.abs(plain - flt).max()) / float(np.abs(flt).max()) < 0.1
    readers = {}
    for lay in ch.layers(gv.model, gv.graph):
        f = gv.flow(lay)
        readers[lay.weight] = sorted((c.layer.weight, c.offset) for c in f.consumers)
        if lay.op != "Gemm":
            assert f.blocked is None, (lay.name, f.blocked)
    w = {k.split(".weight")[0]: k for k in readers}
    assert readers[w["c1"]] == sorted([(w["c2a"], 0), (w["c2b"], 0)])
    assert readers[w["c2a"]] == [(w["c3"], 0)] and readers[w["c2b"]] == [(w["c3"], 8)]
    assert readers[w["c3"]] == [(w["fc"], 0)]

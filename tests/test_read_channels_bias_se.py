"""The channel trace through bias Adds and squeeze-excitation Muls (auditor.read.channels), the
obfuscation that rewrites them (auditor.attacks.obfuscate) and the forensics that undo it.

Hand-built graphs (onnx.helper) give the converter-style patterns: Conv without bias + Add of a
[1, C, 1, 1] constant, MatMul on [B, T, D] + Add of a [C] constant, a scalar Add, a
squeeze-excitation gate written with Gemm + Reshape, and the cases that must stay refused.
The torch exports are the fixtures channels-mlp (Linear on 3-D input = MatMul + Add) and
channels-se (a MobileNetV3-style SE block), both marked and with an unmarked twin.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from auditor.attacks.obfuscate import function_diff, obfuscate
from auditor.errors import AuditError
from auditor.read import channels as ch

ALL = "perm-in,perm-out,scale,split:2,dummy:2,clique:2"
ALONE = ["perm-out", "scale", "split:2", "dummy:2", "clique:2"]
REL = 1e-5


# ------------------------------------------------------------------ hand-built graphs
def _model(nodes, inits, x_shape, y_shape, name="m"):
    tensors = [numpy_helper.from_array(v if isinstance(v, np.ndarray) and v.dtype != np.float64 else
                                       np.asarray(v, np.float32), k) for k, v in inits.items()]
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def _w(rng, *shape):
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def conv_bias_add(bias_shape=(1, 8, 1, 1), scalar=False):
    """x [N,3,8,8] -> Conv(no bias) -> Add(const) -> Relu -> Conv -> Relu -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(1)
    b = np.float32(0.7) if scalar else _w(rng, *bias_shape)
    inits = {"w1": _w(rng, 8, 3, 3, 3), "b1": np.asarray(b, np.float32), "w2": _w(rng, 6, 8, 3, 3),
             "c2": _w(rng, 6), "w3": _w(rng, 4, 6), "c3": _w(rng, 4)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["h1", "b1"], ["a1"], name="bias1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "c2"], ["h2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "c3"], ["y"], name="head", transB=1)]
    return _model(nodes, inits, ["N", 3, 8, 8], ["N", 4])


def matmul_bias_add():
    """x [N,5,6] -> MatMul [6,8] -> Add [8] -> Relu -> MatMul [8,7] -> Add [7] -> Relu ->
    ReduceMean over T -> Gemm (a transformer-style MLP, channels on the last axis)."""
    rng = np.random.default_rng(2)
    inits = {"w1": _w(rng, 6, 8), "b1": _w(rng, 8), "w2": _w(rng, 8, 7), "b2": _w(rng, 7),
             "w3": _w(rng, 4, 7), "c3": _w(rng, 4), "axes": np.asarray([1], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Add", ["h1", "b1"], ["a1"], name="bias1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Add", ["b2", "h2"], ["a2"], name="bias2"),   # constant first
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("ReduceMean", ["r2", "axes"], ["m"], name="meanT", keepdims=0),
             helper.make_node("Gemm", ["m", "w3", "c3"], ["y"], name="head", transB=1)]
    return _model(nodes, inits, ["N", 5, 6], ["N", 4])


def se_gemm(reshape=True, gate_from_input=False):
    """x [N,2,6,6] -> Conv(8) -> Relu -> x * HardSigmoid(Gemm(Relu(Gemm(Flatten(GAP(x)))))) reshaped
    to [N,8,1,1] -> Conv(5) -> Relu -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(3)
    inits = {"w1": _w(rng, 8, 2, 3, 3), "c1": _w(rng, 8), "s1": _w(rng, 4, 8), "t1": _w(rng, 4),
             "s2": _w(rng, 8, 4), "t2": _w(rng, 8), "w2": _w(rng, 5, 8, 3, 3), "c2": _w(rng, 5),
             "w3": _w(rng, 3, 5), "c3": _w(rng, 3), "shape": np.asarray([-1, 8, 1, 1], np.int64),
             "axes": np.asarray([2, 3], np.int64)}
    src = "x" if gate_from_input else "r1"
    nodes = [helper.make_node("Conv", ["x", "w1", "c1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1")]
    if gate_from_input:   # a gate of the right shape, computed from another tensor
        inits["s1"] = _w(rng, 4, 2)
    nodes += [helper.make_node("GlobalAveragePool", [src], ["sq"], name="squeeze"),
              helper.make_node("Flatten", ["sq"], ["sqf"], name="sqflat"),
              helper.make_node("Gemm", ["sqf", "s1", "t1"], ["e1"], name="se_fc1", transB=1),
              helper.make_node("Relu", ["e1"], ["e1r"], name="se_relu"),
              helper.make_node("Gemm", ["e1r", "s2", "t2"], ["e2"], name="se_fc2", transB=1),
              helper.make_node("HardSigmoid", ["e2"], ["gs"], name="se_gate")]
    nodes.append(helper.make_node("Reshape", ["gs", "shape"], ["g"], name="se_reshape") if reshape else
                 helper.make_node("Unsqueeze", ["gs", "axes"], ["g"], name="se_unsqueeze"))
    nodes += [helper.make_node("Mul", ["g", "r1"], ["xs"], name="se_mul"),
              helper.make_node("Conv", ["xs", "w2", "c2"], ["h2"], name="conv2", pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "w3", "c3"], ["y"], name="head", transB=1)]
    return _model(nodes, inits, ["N", 2, 6, 6], ["N", 3])


def _dims(m):
    return {t.name: list(t.dims) for t in m.graph.initializer}


def _check(m, steps, layer, seed=0):
    r = obfuscate(m, steps, layer=layer, seed=seed)
    diff, scale = function_diff(m, r.model, seed=7)
    assert diff <= REL * scale, (steps, layer, diff, scale)
    return r


def test_trace_records_the_bias_add_on_its_writer():
    for m, bias, shape in ((conv_bias_add(), "b1", [1, 8, 1, 1]), (matmul_bias_add(), "b1", [8])):
        lay = ch.layers(m)[0]
        f = ch.trace(m, lay)
        assert f.blocked is None and f.channels == 8
        assert [b.const for b in f.writers[0].biases] == [bias] and f.writers[0].biases[0].name == "bias1"
        assert list(ch.constant_tensors(m)[bias].dims) == shape
    m = matmul_bias_add()
    f1, f2 = (ch.trace(m, lay) for lay in ch.layers(m)[:2])
    assert f1.last_axis and f2.last_axis and [c.layer.name for c in f1.consumers] == ["fc2"]
    assert [b.const for b in f2.writers[0].biases] == ["b2"] and [c.layer.name for c in f2.consumers] == ["head"]
    assert ch.producer(m, ch.layers(m)[1]).name == "fc1"


@pytest.mark.parametrize("build,bias,grown", [
    (conv_bias_add, "b1", [1, 14, 1, 1]),
    (lambda: conv_bias_add(scalar=True), "b1", [14, 1, 1]),       # a scalar becomes per-channel
    (lambda: conv_bias_add(bias_shape=(8, 1, 1)), "b1", [14, 1, 1]),
    (matmul_bias_add, "b1", [14])])
def test_bias_add_patterns_are_function_preserving(build, bias, grown):
    m = build()
    first, second = (lay.name for lay in ch.layers(m)[:2])
    for st in ALONE:
        r = _check(m, st, first)
        grow = 2 if ":" in st else 0
        d = _dims(r.model)
        want = list(grown)
        want[[i for i, v in enumerate(grown) if v == 14][0]] = 8 + grow
        assert d[bias] == want, (st, d[bias])
    r = _check(m, "perm-in", second)
    r = _check(m, "perm-out,scale,split:2,dummy:2,clique:2", first)
    d = _dims(r.model)
    assert d[bias] == grown
    conv = m.graph.node[0].op_type == "Conv"
    assert d["w1"] == ([14, 3, 3, 3] if conv else [6, 14]) and d["w2"] == ([6, 14, 3, 3] if conv else [14, 7])
    r = _check(m, ALL, second)    # perm-in and the input-side scale rewrite the first layer's bias Add
    assert r.params["done"][2]["input_side"] == "w1"
    d = _dims(r.model)
    assert d["w2"] == ([12, 8, 3, 3] if conv else [8, 13]) and d["w3"] == [4, 12 if conv else 13]
    if not conv:
        assert d["b2"] == [13]


def test_se_gate_written_with_gemm_is_rewritten():
    for reshape in (True, False):
        m = se_gemm(reshape)
        conv1, conv2 = (l for l in ch.layers(m) if l.op == "Conv")
        f = ch.trace(m, conv1)
        assert f.blocked is None and [g.layer.name for g in f.gates] == ["se_fc2"]
        assert sorted(c.layer.name for c in f.consumers) == ["conv2", "se_fc1"]
        assert ch.producer(m, conv2).name == "conv1"
        for st in ALONE:
            _check(m, st, "conv1")
        _check(m, "perm-in", "conv2")
        r = _check(m, "perm-out,scale,split:2,dummy:2,clique:2", "conv1")
        d = _dims(r.model)
        assert (d["w1"], d["c1"], d["s1"], d["s2"], d["t2"], d["w2"]) == (
            [14, 2, 3, 3], [14], [4, 14], [14, 4], [14], [5, 14, 3, 3])
        if reshape:   # the Reshape target holding C follows
            assert list(numpy_helper.to_array(ch.constant_tensors(r.model)["shape"])) == [-1, 14, 1, 1]
        _check(m, ALL, "conv2")


def _refusal(m, layer):
    f = ch.trace(m, next(l for l in ch.layers(m) if l.name == layer))
    assert f.blocked is not None and "\n" not in f.blocked
    with pytest.raises(AuditError, match="cannot obfuscate"):
        obfuscate(m, "perm-out", layer=layer)
    return f.blocked


def test_what_is_not_a_bias_or_a_gate_stays_refused():
    # a constant Add after the activation
    m = conv_bias_add()
    nodes = list(m.graph.node)
    nodes[1].input[:] = ["r1x", "b1"]
    nodes[2].input[:] = ["h1"]
    nodes[2].output[:] = ["r1x"]
    nodes[1].output[:] = ["r1"]
    nodes[1], nodes[2] = nodes[2], nodes[1]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    assert _refusal(m, "conv1") == ("channels of conv1 meet a constant in Add bias1 (a bias the trace does not "
                                    "rewrite: it is not directly after the layer)")
    assert ch.producer(m, next(l for l in ch.layers(m) if l.name == "conv2")) is None
    assert ch.producer(conv_bias_add(), ch.layers(conv_bias_add())[1]).name == "conv1"
    # one value per column, not per channel (W = C = 8: a shape check on sizes alone would pass it)
    assert _refusal(conv_bias_add(bias_shape=(1, 1, 1, 8)), "conv1") == (
        "channels of conv1 meet a constant in Add bias1 (a bias the trace does not rewrite: the constant "
        "[1, 1, 1, 8] does not broadcast one value per channel along axis 1 (8 channels))")
    # a constant Add after a Flatten
    m = conv_bias_add()
    nodes = list(m.graph.node)
    fl = next(n for n in nodes if n.op_type == "Flatten")
    fl.output[:] = ["f0"]
    nodes.insert(nodes.index(fl) + 1, helper.make_node("Add", ["f0", "k"], ["f"], name="shift"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.append(numpy_helper.from_array(np.ones(6, np.float32), "k"))
    assert _refusal(m, "conv2") == ("channels of conv2 meet a constant in Add shift (a bias the trace does not "
                                    "rewrite: it is not directly after the layer)")
    # ... and after a Flatten of the feature map (each channel a block of H*W features)
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["h1"], ["f0"], name="flat"),
             helper.make_node("Add", ["f0", "k"], ["f"], name="shift"),
             helper.make_node("Gemm", ["f", "w3"], ["y"], name="head", transB=1)]
    m = _model(nodes, {"w1": _w(rng, 4, 3, 3, 3), "k": _w(rng, 4 * 64), "w3": _w(rng, 2, 4 * 64)},
               ["N", 3, 8, 8], ["N", 2])
    assert _refusal(m, "conv1") == ("channels of conv1 meet a constant in Add shift (a bias the trace does not "
                                    "rewrite: after a Flatten/Concat)")
    # a gate of the right shape computed from another tensor
    assert _refusal(se_gemm(gate_from_input=True), "conv1") == (
        "channels of conv1 meet another branch in Mul se_mul (the gate is computed from another tensor)")


def test_last_axis_channels_are_refused_where_an_op_works_on_axis_1():
    m = matmul_bias_add()
    bn = helper.make_node("BatchNormalization", ["a1", "g", "be", "mu", "va"], ["n1"], name="bn")
    nodes = list(m.graph.node)
    nodes[2].input[:] = ["n1"]
    nodes.insert(2, bn)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    for k, v in (("g", 1.0), ("be", 0.0), ("mu", 0.0), ("va", 1.0)):   # BatchNorm over T (axis 1 = 5)
        m.graph.initializer.append(numpy_helper.from_array(np.full(5, v, np.float32), k))
    assert _refusal(m, "fc1") == ("the channels of fc1 are the last axis of a rank-3 tensor; BatchNormalization "
                                  "bn works on axis 1")
    # Flatten of [N, T, C] interleaves the channels (c + C t), not blocks of T
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Flatten", ["h1"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2"], ["y"], name="head", transB=1)]
    m = _model(nodes, {"w1": _w(rng, 6, 8), "w2": _w(rng, 4, 40)}, ["N", 5, 6], ["N", 4])
    assert _refusal(m, "fc1") == "the channels of fc1 are the last axis of a rank-3 tensor; Flatten flat works on axis 1"
    # a MatMul reading the last axis of a conv output reads columns, not channels
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("MatMul", ["h1", "w2"], ["y"], name="mm")]
    m = _model(nodes, {"w1": _w(rng, 4, 3, 3, 3), "w2": _w(rng, 8, 2)}, ["N", 3, 8, 8], ["N", 4, 8, 2])
    assert _refusal(m, "conv1") == ("MatMul mm reads the last axis of 'h1', which does not hold the channels "
                                    "of conv1")


def test_cli_refusal_is_one_line(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_bias_add(bias_shape=(1, 1, 1, 8)), str(p))
    r = subprocess.run([sys.executable, "-m", "auditor", "obfuscate", str(p), "--steps", "split:2", "--layer",
                        "conv1", "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not broadcast one value per channel" in r.stderr
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------ torch exports (fixtures)
@pytest.fixture(scope="module")
def fx(build_fixture):
    return {n: build_fixture(n) for n in ("channels-mlp", "channels-se")}


def _layers(m):
    return {l.node.name: l for l in ch.layers(m)}


def test_torch_mlp_export_traces_through_matmul_add(fx):
    m = onnx.load(str(fx["channels-mlp"] / "model.onnx"))
    lays = ch.layers(m)
    assert [l.op for l in lays] == ["MatMul", "MatMul", "MatMul", "Gemm"]
    flows = [ch.trace(m, l) for l in lays[:3]]
    assert [f.blocked for f in flows] == [None] * 3 and all(f.last_axis for f in flows)
    assert [[b.const for b in f.writers[0].biases] for f in flows] == [["fc1.bias"], ["fc2.bias"], ["fc3.bias"]]
    assert not flows[0].homogeneous and flows[1].homogeneous          # Gelu, then Relu
    assert ch.producer(m, lays[1]).node is lays[0].node


def test_torch_mlp_obfuscation(fx):
    m = onnx.load(str(fx["channels-mlp"] / "model.onnx"))
    fc1, fc2 = (l.node.name for l in ch.layers(m)[:2])
    for st in ["perm-out", "split:2", "dummy:2", "clique:2"]:
        _check(m, st, fc1)
    with pytest.raises(AuditError, match="non-homogeneous activation"):   # Gelu does not pass a scale
        obfuscate(m, "scale", layer=fc1)
    for st in ["perm-in", "perm-out", "scale", "split:2", "dummy:2", "clique:2"]:
        _check(m, st, fc2)
    r = _check(m, ALL, fc2)
    assert r.params["done"][2]["input_side"].startswith("not scaled: cannot scale")
    d = _dims(r.model)
    w1, w2, w3 = (l.weight for l in ch.layers(m)[:3])
    assert (d[w1], d["fc1.bias"], d[w2], d["fc2.bias"], d[w3]) == ([28, 64], [64], [64, 70], [70], [70, 32])
    # on real images too: identical classes, differences at float32 rounding
    import onnxruntime as ort

    from exporters import data

    x = data.fashion("test", n=64, seed=3)[0].numpy()
    run = lambda mm: ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"input": x})[0]
    a, b = run(m), run(r.model)
    assert np.abs(a - b).max() <= REL * np.abs(a).max() and (a.argmax(1) == b.argmax(1)).all()


def test_torch_se_obfuscation(fx):
    m = onnx.load(str(fx["channels-se"] / "model.onnx"))
    lay = _layers(m)
    by_w = {l.weight: n for n, l in lay.items()}
    f = ch.trace(m, lay[by_w["conv1.weight"]])
    assert f.blocked is None and [g.layer.weight for g in f.gates] == ["se.fc2.weight"]
    assert sorted(c.layer.weight for c in f.consumers) == ["conv2.weight", "se.fc1.weight"]
    assert ch.producer(m, lay[by_w["conv2.weight"]]).weight == "conv1.weight"
    # the excitation layer alone: rewritten only with the channels it gates
    f = ch.trace(m, lay[by_w["se.fc2.weight"]])
    assert f.blocked.startswith("channels of %s meet another branch in Mul " % by_w["se.fc2.weight"])
    assert f.blocked.endswith("(they are the gate of a squeeze-excitation block: rewritten with the channels it "
                              "gates, not alone)")
    for st in ALONE:
        _check(m, st, "conv1.weight")
    for st in ["perm-in", "scale"]:
        _check(m, st, "conv2.weight")
    r = _check(m, "perm-out,scale,split:2,dummy:2,clique:2", "conv1.weight")
    d = _dims(r.model)
    assert (d["conv1.weight"], d["bn1.weight"], d["se.fc1.weight"], d["se.fc2.weight"], d["se.fc2.bias"],
            d["conv2.weight"]) == ([22, 1, 3, 3], [22], [8, 22, 1, 1], [22, 8, 1, 1], [22], [32, 22, 3, 3])
    r = _check(m, ALL, "conv2.weight")
    assert r.params["done"][2]["input_side"] == "conv1.weight"    # through the SE Mul, FC1 columns / a


def test_effective_rows_include_the_bias_add(fx):
    """canon: the bias Add's constant is the layer's bias; split copies have equal effective rows."""
    from auditor.forensics import canon
    from auditor.read.weights import WeightStore

    m = onnx.load(str(fx["channels-mlp"] / "model.onnx"))
    fc2 = ch.layers(m)[1]
    gv = canon.GraphValues(WeightStore(m))
    eff = canon.effective_rows(gv, gv.flow(fc2))
    bias = numpy_helper.to_array(ch.constant_tensors(m)["fc2.bias"])
    assert eff.shape == (64, 65) and np.array_equal(eff[:, -1], bias.astype(np.float64))
    r = obfuscate(m, "split:3", layer=fc2.node.name, seed=4)
    gv = canon.GraphValues(WeightStore(r.model))
    lay = ch.layers(r.model)[1]
    g = canon.neuron_groups(gv, gv.flow(lay))
    assert (g.splits, g.dummies, g.cliques, len(g.keep)) == (3, 0, 0, 64)
    eff = canon.effective_rows(gv, gv.flow(lay))
    for mem in g.members:
        for j, _ in mem[1:]:
            assert np.allclose(eff[j, -1] / eff[mem[0][0], -1], eff[j, 0] / eff[mem[0][0], 0])


# ------------------------------------------------------------------ scan
def _scan(path, key, refs=()):
    from auditor.forensics.scan import scan
    from auditor.marks.keys import load_key

    return scan(path, [load_key(key)], references=refs)["findings"][0]


def _obfuscated(tmp_path, src, first, second, steps_second, name):
    m = onnx.load(str(src))
    r = obfuscate(m, "split:2,dummy:2,clique:2", layer=first, seed=3)
    r = obfuscate(r.model, steps_second, layer=second, seed=4)
    p = tmp_path / name
    onnx.save(r.model, str(p))
    return p


@pytest.mark.parametrize("perm_in", [False, True])
def test_scan_through_bias_adds(fx, tmp_path, perm_in):
    """fc1 (feeding the marked fc2) and fc2 obfuscated through their bias Adds. The 64-bit mean mark:
    neurons cleaned on both sides, output order irrelevant, per-row scales through ReLU leave the
    signs -> found without the reference; a permutation of fc2's 64 inputs would cost 64! = 10^89
    of the 64 bits' 10^-19.3, so it is not searched and only the reference finds the mark."""
    d = fx["channels-mlp"]
    m = onnx.load(str(d / "model.onnx"))
    fc1, fc2 = (l.node.name for l in ch.layers(m)[:2])
    steps = ("perm-in," if perm_in else "") + "perm-out,scale,split:2,dummy:2,clique:2"
    for src in ("model.onnx", "twin.onnx"):
        p = _obfuscated(tmp_path, d / src, fc1, fc2, steps, src)
        no_ref, ref = _scan(p, d / "key.json"), _scan(p, d / "key.json", (d / "model.onnx",))
        if src == "twin.onnx":
            for f in (no_ref, ref):
                assert f["verdict"] == "not detected", f  # the twin is never detected
            continue
        assert ref["verdict"] == "detected" and ref["matches"] == 64 and ref["p_corrected"] < 1e-6
        assert ref["found"]["source"] == "reference model.onnx"
        if perm_in:
            assert no_ref["verdict"] == "not detected"
            assert any("64!" in s for s in no_ref["not_searched"])
        else:
            assert no_ref["verdict"] == "detected" and no_ref["matches"] == 64 and no_ref["p_corrected"] < 1e-6
            assert "output neurons: 2 dummy and 2 clique removed, 2 split copies merged (70 -> 64)" in no_ref["undone"]
            assert ("input neurons (via %s): 2 dummy and 2 clique removed, 2 split copies merged (70 -> 64)" % fc1
                    in no_ref["undone"])


def test_scan_through_a_squeeze_excitation_block(fx, tmp_path):
    """conv1 (its output gated by the SE block) and the marked conv2 obfuscated with every step.
    The 128-bit mean mark: both sides cleaned through the SE Mul, the 16-channel input permutation
    fitted to the key and paid for (16! = 10^13.3 hypotheses) -> found without the reference too."""
    d = fx["channels-se"]
    for src in ("model.onnx", "twin.onnx"):
        p = _obfuscated(tmp_path, d / src, "conv1.weight", "conv2.weight", ALL, src)
        no_ref, ref = _scan(p, d / "key.json"), _scan(p, d / "key.json", (d / "model.onnx",))
        rc = subprocess.run([sys.executable, "-m", "auditor", "scan", str(p), "--key", str(d / "key.json"),
                             "--reference", str(d / "model.onnx")], capture_output=True, text=True).returncode
        assert rc == (0 if src == "model.onnx" else 1)     # the CLI: 0 found, 1 not found
        if src == "twin.onnx":
            for f in (no_ref, ref):
                assert f["verdict"] == "not detected", f  # the twin is never detected
            continue
        for f in (no_ref, ref):
            assert f["verdict"] == "detected" and f["matches"] == 128 and f["p_corrected"] < 1e-6, f
        assert "input permutation fitted to the key (16! tried)" in no_ref["undone"]
        assert ref["found"]["source"] == "reference model.onnx"
    p = _obfuscated(tmp_path, d / "model.onnx", "conv1.weight", "conv2.weight",
                    "perm-out,scale,split:2,dummy:2,clique:2", "noperm.onnx")
    f = _scan(p, d / "key.json")
    assert f["verdict"] == "detected" and f["matches"] == 128
    assert "input neurons (via node_Conv_36): 2 dummy and 2 clique removed, 2 split copies merged (22 -> 16)" in f["undone"]


def test_bias_add_through_qdq(tmp_path):
    """onnxruntime's static QDQ quantization puts Q/DQ between the MatMul and its bias Add and
    quantizes the bias: the trace still records it, canon reads it dequantized, obfuscate refuses
    to rewrite a quantized constant with one line."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from auditor.forensics import canon
    from auditor.read.weights import WeightStore

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": np.random.default_rng(i).standard_normal((2, 5, 6)).astype(np.float32)}
                            for i in range(4)])

        def get_next(self):
            return next(self.it, None)

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    m0 = matmul_bias_add()
    onnx.save(m0, str(src))
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ)
    m = onnx.load(str(dst))
    fc1 = ch.layers(m)[0]
    f = ch.trace(m, fc1)
    assert f.blocked is None and [b.name for b in f.writers[0].biases] == ["bias1"]
    gv = canon.GraphValues(WeightStore(m))
    b0 = numpy_helper.to_array(ch.constant_tensors(m0)["b1"])
    shift = canon.effective_rows(gv, gv.flow(fc1))[:, -1]
    assert shift.shape == (8,) and np.abs(shift - b0).max() <= np.abs(b0).max() / 100
    with pytest.raises(AuditError, match="^the bias constant of bias1 is not a plain constant"):
        obfuscate(m, "perm-out", layer="fc1")


def test_third_party_mobilenet_squeeze_layers_traced():
    """ppocr_cls.onnx (PaddlePaddle MobileNetV3): every bias is Add(conv, Reshape(1-D constant,
    [1, C, 1, 1])). The 9 squeeze layers of its SE blocks (`conv*_se_1`) are traced through that
    bias and obfuscated function-preservingly with every step (the reshaped constant and the
    Reshape target grow together); the 9 excitation layers (`conv*_se_2`) are refused alone, as
    gates (they are rewritten with the channels they gate)."""
    import os
    from pathlib import Path

    p = Path(os.environ.get("WMAUDIT_DATA", "build/data")) / "thirdparty" / "ppocr_cls.onnx"
    if not p.is_file():
        pytest.skip(f"{p} is missing: run `bash scripts/fetch_thirdparty.sh`")
    m = onnx.load(str(p))
    flows = {l.name: ch.trace(m, l) for l in ch.layers(m)}
    squeeze = {n for n, f in flows.items() if f.layer.weight.endswith("_se_1_weights")}
    excite = {n for n, f in flows.items() if f.layer.weight.endswith("_se_2_weights")}
    assert len(flows) == 43 and len(squeeze) == len(excite) == 9
    for n in squeeze:
        f = flows[n]
        assert f.blocked is None and [b.reshape.op_type for b in f.writers[0].biases] == ["Reshape"]
        assert [c.layer.name for c in f.consumers] == [next(e for e in excite if flows[e].layer.weight ==
                                                             f.layer.weight.replace("_se_1_", "_se_2_"))]
    for n in excite:
        assert "gate of a squeeze-excitation block" in flows[n].blocked
    b = flows["Conv@3"].writers[0].biases[0]
    C = flows["Conv@3"].channels
    r = _check(m, "perm-out,scale,split:2,dummy:2,clique:2", "Conv@3", seed=2)
    consts = ch.constant_tensors(r.model)
    assert list(consts[b.const].dims) == [C + 6]
    assert list(numpy_helper.to_array(consts[b.reshape.input[1]])) == [1, C + 6, 1, 1]


@pytest.mark.parametrize("name,layers", [("channels-mlp", 4), ("channels-se", 3)])   # to the classifier head
def test_provenance_through_bias_adds_and_se(fx, tmp_path, name, layers):
    """The chain to the marked layer is followed back through bias Adds and the SE Mul: the
    obfuscated marked model is derived (every layer's rows matched at r = 1), the twin not."""
    from auditor.forensics.provenance import provenance

    d = fx[name]
    m = onnx.load(str(d / "model.onnx"))
    first, second = ((l.node.name for l in ch.layers(m)[:2]) if name == "channels-mlp"
                     else ("conv1.weight", "conv2.weight"))
    for src in ("model.onnx", "twin.onnx"):
        p = _obfuscated(tmp_path, d / src, first, second, ALL, src)
        r = provenance(p, d / "model.onnx")
        assert len(r["layers"]) == layers
        if src == "model.onnx":
            assert r["verdict"] == "derived" and r["log10_p_combined"] < -12
        else:
            assert r["verdict"] == "not derived" and r["log10_p_combined"] > -3


def test_prune_filters_through_bias_adds_and_se(fx):
    """Structured pruning (not function-preserving) removes the filters with their bias Add
    entries and SE gate rows; the files still load and run in onnxruntime."""
    from auditor.attacks.obfuscate import remove_filters

    m = onnx.load(str(fx["channels-se"] / "model.onnx"))
    r = remove_filters(m, 3, layer="conv1.weight")
    d = _dims(r.model)
    assert (d["conv1.weight"], d["se.fc1.weight"], d["se.fc2.weight"], d["se.fc2.bias"], d["conv2.weight"]) == (
        [13, 1, 3, 3], [8, 13, 1, 1], [13, 8, 1, 1], [13], [32, 13, 3, 3])
    m = onnx.load(str(fx["channels-mlp"] / "model.onnx"))
    r = remove_filters(m, 3, layer=ch.layers(m)[0].node.name)
    assert _dims(r.model)["fc1.bias"] == [61]
    diff, scale = function_diff(m, r.model)     # runs in onnxruntime; the removed neurons are missed
    assert 0 < diff < scale

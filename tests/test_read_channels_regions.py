"""Activations written as several elementwise nodes (GELU as x * 0.5 * (1 + erf(x / sqrt 2)) or
its tanh form, hard-swish as x * relu6(x + 3) / 6, swish as x * sigmoid(x)): the channel trace
passes them as one per-channel, non-homogeneous op; obfuscation through them preserves the
function (a scale is refused), `producer` / `input_flow` walk back through them, and scan cleans
the marked layer's inputs through them."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from auditor.attacks.obfuscate import function_diff, obfuscate
from auditor.errors import AuditError
from auditor.read import channels as ch

REL = 1e-5


def _c(name, v):
    return numpy_helper.from_array(np.asarray(v, np.float32).reshape(()), name)


def gelu_erf(x, y, p):
    """y = x * 0.5 * (1 + erf(x / sqrt 2)), as torch's legacy exporter writes GELU."""
    nodes = [helper.make_node("Div", [x, f"{p}s2"], [f"{p}d"], name=f"{p}div"),
             helper.make_node("Erf", [f"{p}d"], [f"{p}e"], name=f"{p}erf"),
             helper.make_node("Add", [f"{p}e", f"{p}one"], [f"{p}a"], name=f"{p}add"),
             helper.make_node("Mul", [x, f"{p}a"], [f"{p}m"], name=f"{p}mul"),
             helper.make_node("Mul", [f"{p}m", f"{p}half"], [y], name=f"{p}mul2")]
    return nodes, [_c(f"{p}s2", math.sqrt(2.0)), _c(f"{p}one", 1.0), _c(f"{p}half", 0.5)]


def gelu_tanh(x, y, p):
    """y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    nodes = [helper.make_node("Pow", [x, f"{p}three"], [f"{p}x3"], name=f"{p}pow"),
             helper.make_node("Mul", [f"{p}x3", f"{p}k"], [f"{p}kx3"], name=f"{p}mk"),
             helper.make_node("Add", [x, f"{p}kx3"], [f"{p}in"], name=f"{p}add"),
             helper.make_node("Mul", [f"{p}in", f"{p}c"], [f"{p}cin"], name=f"{p}mc"),
             helper.make_node("Tanh", [f"{p}cin"], [f"{p}t"], name=f"{p}tanh"),
             helper.make_node("Add", [f"{p}t", f"{p}one"], [f"{p}t1"], name=f"{p}add1"),
             helper.make_node("Mul", [x, f"{p}t1"], [f"{p}m"], name=f"{p}mul"),
             helper.make_node("Mul", [f"{p}m", f"{p}half"], [y], name=f"{p}mul2")]
    return nodes, [_c(f"{p}three", 3.0), _c(f"{p}k", 0.044715), _c(f"{p}c", math.sqrt(2 / math.pi)),
                   _c(f"{p}one", 1.0), _c(f"{p}half", 0.5)]


def hard_swish(x, y, p):
    """y = x * clip(x + 3, 0, 6) / 6, as Paddle2ONNX writes hard-swish."""
    nodes = [helper.make_node("Add", [x, f"{p}three"], [f"{p}a"], name=f"{p}add"),
             helper.make_node("Clip", [f"{p}a", f"{p}zero", f"{p}six"], [f"{p}r"], name=f"{p}clip"),
             helper.make_node("Mul", [x, f"{p}r"], [f"{p}m"], name=f"{p}mul"),
             helper.make_node("Div", [f"{p}m", f"{p}six2"], [y], name=f"{p}div")]
    return nodes, [_c(f"{p}three", 3.0), _c(f"{p}zero", 0.0), _c(f"{p}six", 6.0), _c(f"{p}six2", 6.0)]


def swish(x, y, p):
    nodes = [helper.make_node("Sigmoid", [x], [f"{p}s"], name=f"{p}sig"),
             helper.make_node("Mul", [x, f"{p}s"], [y], name=f"{p}mul")]
    return nodes, []


ACTS = {"gelu-erf": gelu_erf, "gelu-tanh": gelu_tanh, "hard-swish": hard_swish, "swish": swish}


def conv_net(act):
    """x [N,3,8,8] -> conv1 (+bias) -> act -> conv2 -> act -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(2)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype(np.float32))  # noqa: E731
    inits = []
    for name, shape in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (6, 8, 3, 3)), ("b2", (6,)), ("w3", (4, 6)),
                        ("b3", (4,))):
        t = w(*shape)
        t.name = name
        inits.append(t)
    a1, c1 = ACTS[act]("h1", "r1", "a1_")
    a2, c2 = ACTS[act]("h2", "r2", "a2_")
    nodes = ([helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1])] + a1
             + [helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], name="conv2", pads=[1, 1, 1, 1])] + a2
             + [helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
                helper.make_node("Flatten", ["p"], ["f"], name="flat"),
                helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="head", transB=1)])
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits + c1 + c2)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("act", sorted(ACTS))
def test_activation_of_several_nodes_is_one_per_channel_op(act):
    m = conv_net(act)
    lays = {l.name: l for l in ch.layers(m)}
    f = ch.trace(m, lays["conv1"])
    assert f.blocked is None and [c.layer.name for c in f.consumers] == ["conv2"] and not f.homogeneous
    f2 = ch.trace(m, lays["conv2"])
    assert f2.blocked is None and [(c.layer.name, c.spatial) for c in f2.consumers] == [("head", 1)]
    # walking back: conv2 reads conv1's channels, head reads conv2's
    assert ch.producer(m, lays["conv2"]).name == "conv1" and ch.producer(m, lays["head"]).name == "conv2"
    assert ch.input_flow(m, lays["conv2"]).layer.name == "conv1"
    for layer in ("conv1", "conv2"):
        for steps in ("perm-out", "split:2", "dummy:2", "clique:2", "perm-out,split:2,dummy:2,clique:2"):
            r = obfuscate(m, steps, layer=f"w{layer[-1]}", seed=1)
            diff, scale = function_diff(m, r.model, seed=7)
            assert diff <= REL * scale, (act, layer, steps, diff, scale)
        with pytest.raises(AuditError, match="non-homogeneous"):
            obfuscate(m, "scale", layer=f"w{layer[-1]}", seed=1)
    r = obfuscate(m, "perm-in", layer="w2", seed=1)
    diff, scale = function_diff(m, r.model, seed=7)
    assert diff <= REL * scale
    dims = {t.name: list(t.dims) for t in obfuscate(m, "split:2,dummy:2,clique:2", layer="w1",
                                                    seed=1).model.graph.initializer}
    assert dims["w1"] == [14, 3, 3, 3] and dims["b1"] == [14] and dims["w2"] == [6, 14, 3, 3]
    # the scalar constants of the activation are shared by every channel: left as they are
    assert all(d == [] for k, d in dims.items() if k.startswith("a1_"))


def test_regions_that_are_not_one_activation_stop_the_trace():
    """A Mul by a non-scalar constant, or by another branch, is no per-channel activation."""
    m = conv_net("swish")
    # make the swish Mul read a per-channel constant instead of the sigmoid: x * c, c [1, 8, 1, 1]
    for n in m.graph.node:
        if n.name == "a1_mul":
            n.input[1] = "cvec"
    m.graph.initializer.append(numpy_helper.from_array(np.full((1, 8, 1, 1), 0.5, np.float32), "cvec"))
    f = ch.trace(m, ch.layers(m)[0])
    assert f.blocked is not None and "Mul" in f.blocked


def _decompose_gelu(path, out):
    """The same model with its Gelu node written as Div / Erf / Add / Mul / Mul."""
    m = onnx.load(str(path))
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Gelu":
            new, consts = gelu_erf(n.input[0], n.output[0], "g_")
            nodes.extend(new)
            m.graph.initializer.extend(consts)
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, str(out))
    return out


def test_scan_cleans_inputs_through_a_decomposed_gelu(build_fixture, tmp_path):
    """channels-mlp with its GELU written as five nodes (as opset < 20 exports write it): fc1 (split,
    dummy, clique) and the marked fc2 (perm-out, scale, split, dummy, clique) obfuscated; scan
    cleans fc2's inputs through the GELU and finds the 64-bit mark without the reference; the twin
    never."""
    from auditor.forensics.scan import scan
    from auditor.marks.keys import load_key

    d = build_fixture("channels-mlp")
    key = load_key(d / "key.json")
    for src in ("model.onnx", "twin.onnx"):
        p = _decompose_gelu(d / src, tmp_path / f"erf-{src}")
        m = onnx.load(str(p))
        assert "Gelu" not in {n.op_type for n in m.graph.node}
        diff, scale = function_diff(onnx.load(str(d / src)), m, seed=3)
        assert diff <= 1e-5 * scale
        fc1, fc2 = (l.node.name for l in ch.layers(m)[:2])
        r = obfuscate(m, "split:2,dummy:2,clique:2", layer=fc1, seed=3)
        r = obfuscate(r.model, "perm-out,scale,split:2,dummy:2,clique:2", layer=fc2, seed=4)
        q = tmp_path / f"obf-{src}"
        onnx.save(r.model, str(q))
        f = scan(q, [key])["findings"][0]
        if src == "twin.onnx":
            assert f["verdict"] == "not detected", f  # the twin is never detected
            continue
        assert f["verdict"] == "detected" and f["matches"] == 64 and f["p_corrected"] < 1e-6, f
        assert (f"input neurons (via {fc1}): 2 dummy and 2 clique removed, 2 split copies merged (70 -> 64)"
                in f["undone"]), f["undone"]


def test_third_party_mobilenetv3_hard_swish_blocks():
    """ppocr_cls.onnx writes hard-swish as Add / Clip / Mul / Div (with those passed, 32 of its 43
    layers trace: tests/test_read_channels_depthwise.py); obfuscating the stem and a layer inside a
    hard-swish block keeps the outputs."""
    import os
    from pathlib import Path

    p = Path(os.environ.get("WMAUDIT_DATA", "build/data")) / "thirdparty" / "ppocr_cls.onnx"
    if not p.is_file():
        pytest.skip(f"{p} is missing: run `bash scripts/fetch_thirdparty.sh`")
    m = onnx.load(str(p))
    for layer in ("conv1_weights", "conv6_expand_weights"):
        assert ch.trace(m, next(l for l in ch.layers(m) if l.weight == layer)).blocked is None
        r = obfuscate(m, "perm-out,split:2,dummy:2,clique:2", layer=layer, seed=1)
        assert r.params["max_abs_diff"] < 1e-6 * max(1.0, r.params["output_max_abs"]), layer

"""Depthwise convs (MobileNetV2/V3, EfficientNet blocks) in the channel trace, in `obfuscate`
and in `scan`'s cleaning.

Models: the arch-mobilenet fixture (MobileNetS: inverted residual blocks 1x1 expand -> BN ->
ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 project -> BN, a 128-bit flatten mark on the
pointwise blocks.1.project.weight; default = BN folded, kept = BN kept, twin unmarked); a
MobileNetS variant with a residual inverted block exported here both ways (untrained: the
function check and the shapes need no training); the third-party MobileNetV3 ppocr_cls.onnx.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from auditor.attacks import obfuscate as ob
from auditor.errors import AuditError
from auditor.read import channels as ch

EXPAND, DW, PROJECT = "blocks.1.expand.weight", "blocks.1.depthwise.weight", "blocks.1.project.weight"
ALL = "perm-out,split:2,dummy:2,clique:2"


@pytest.fixture(scope="module")
def mb(build_fixture):
    return build_fixture("arch-mobilenet")


def _load(d, name):
    return onnx.load(str(d / f"{name}.onnx"))


def _arrays(m):
    return {k: numpy_helper.to_array(v) for k, v in ch.constant_tensors(m).items()}


def _node(m, weight):
    return next(n for n in m.graph.node if len(n.input) > 1 and n.input[1] == weight)


def _group(n):
    return next(a.i for a in n.attribute if a.name == "group")


def _relu_instead_of_relu6(m):
    """The same graph with every Clip(0, 6) a Relu: positively homogeneous, so a scale may pass."""
    for n in m.graph.node:
        if n.op_type == "Clip":
            n.op_type = "Relu"
            del n.input[1:]
    return m


# ------------------------------------------------------------------ trace
@pytest.mark.parametrize("src", ["default", "kept"])
def test_trace_follows_depthwise_and_producer_walks_back(mb, src):
    m = _load(mb, src)
    flows = {l.weight: ch.trace(m, l) for l in ch.layers(m)}
    assert [w for w, f in flows.items() if not f.blocked] == [
        "stem.weight", "blocks.0.expand.weight", "blocks.0.project.weight", EXPAND, PROJECT]
    f = flows[EXPAND]
    assert [d.input[1] for d in f.depthwise] == [DW] and [c.layer.weight for c in f.consumers] == [PROJECT]
    assert f.channels == 96 and not f.homogeneous            # ReLU6 is Clip: not positively homogeneous
    assert len(f.batchnorms) == len(f.depthwise_batchnorms) == (1 if src == "kept" else 0)
    if src == "kept":
        assert f.batchnorms[0].input[1] == "blocks.1.bn_expand.weight"
        assert f.depthwise_batchnorms[0].input[1] == "blocks.1.bn_depthwise.weight"
    proj = next(l for l in ch.layers(m) if l.weight == PROJECT)
    assert ch.producer(m, proj).weight == EXPAND and ch.input_flow(m, proj).layer.weight == EXPAND


def _with_dw_weight(m, shape, group):
    """The fixture's graph with the blocks.1 depthwise weight replaced (trace only, not run)."""
    t = next(t for t in m.graph.initializer if t.name == DW)
    t.CopyFrom(numpy_helper.from_array(np.ones(shape, np.float32), DW))
    for a in _node(m, DW).attribute:
        if a.name == "group":
            a.i = group
    return m


def test_trace_refuses_other_grouped_convs(mb):
    def why(m):
        return ch.trace(m, next(l for l in ch.layers(m) if l.weight == EXPAND)).blocked

    assert why(_with_dw_weight(_load(mb, "default"), (96, 2, 3, 3), 48)) == (
        "grouped Conv node_Conv_145 (group 48, 2 input channels per group) mixes channels within its groups")
    assert why(_with_dw_weight(_load(mb, "default"), (192, 1, 3, 3), 96)) == (
        "depthwise Conv node_Conv_145 has channel multiplier 2 (only 1 is traced)")
    m = _load(mb, "default")
    n = _node(m, DW)
    n.input[1] = "dw_weight_input"          # the kernel is a graph input: not constant
    m.graph.input.append(onnx.helper.make_tensor_value_info("dw_weight_input", onnx.TensorProto.FLOAT, [96, 1, 3, 3]))
    assert why(m) == "depthwise Conv node_Conv_145 has a non-constant weight"
    proj = next(l for l in ch.layers(m) if l.weight == PROJECT)
    assert ch.producer(m, proj) is None and ch.input_flow(m, proj) is None


# ------------------------------------------------------------------ obfuscate
@pytest.mark.parametrize("src", ["default", "kept"])
@pytest.mark.parametrize("steps", ["perm-out", "perm-in", "split:2", "dummy:2", "clique:2", ALL])
def test_obfuscate_layer_feeding_a_depthwise_conv(mb, src, steps):
    m = _load(mb, src)
    r = ob.obfuscate(m, steps, layer=EXPAND, seed=4)
    p = r.params
    assert p["max_abs_diff"] < 1e-5 * p["output_max_abs"], p
    a = _arrays(r.model)
    C = 96 + {"split:2": 2, "dummy:2": 2, "clique:2": 2, ALL: 6}.get(steps, 0)
    assert a[EXPAND].shape == (C, 24, 1, 1) and a[DW].shape == (C, 1, 3, 3) and a[PROJECT].shape == (32, C, 1, 1)
    assert _group(_node(r.model, DW)) == C
    if src == "default":
        assert a[EXPAND + "_bias"].shape == a[DW + "_bias"].shape == (C,)
    else:
        for bn in ("bn_expand", "bn_depthwise"):
            for x in ("weight", "bias", "running_mean", "running_var"):
                assert a[f"blocks.1.{bn}.{x}"].shape == (C,)
    if steps == ALL:
        K = a[DW].reshape(C, -1)
        ks = {tuple(np.round(k, 6)) for k in K[96:98]}     # the split copies: kernels of kept channels
        assert all(any(np.array_equal(k, K[i]) for i in range(96)) for k in K[96:98]) and len(ks) == 2
        assert np.array_equal(K[100], K[101])               # the clique pair: one kernel
        assert not np.abs(a[PROJECT][:, 98:100]).any()       # dummies: zero outgoing columns


def test_scale_through_relu6_refused_and_through_relu_passes_the_depthwise_bias(mb):
    m = _load(mb, "default")
    with pytest.raises(AuditError, match=r"non-homogeneous activation \(Clip: a positive scale does not pass it\)"):
        ob.obfuscate(m, "scale", layer=EXPAND)
    # kept: the scale is absorbed by bn_expand before the ReLU6 (the depthwise conv is untouched)
    r = ob.obfuscate(_load(mb, "kept"), "scale", layer=EXPAND, seed=2)
    assert r.params["max_abs_diff"] < 1e-5 * r.params["output_max_abs"]
    before, after = _arrays(_load(mb, "kept")), _arrays(r.model)
    assert np.array_equal(before[DW], after[DW])
    assert np.array_equal(before["blocks.1.bn_depthwise.weight"], after["blocks.1.bn_depthwise.weight"])
    # ReLU instead of ReLU6, BN folded: the scale goes through the depthwise conv (bias times s)
    m = _relu_instead_of_relu6(_load(mb, "default"))
    r = ob.obfuscate(m, "scale", layer=EXPAND, seed=2)
    assert r.params["max_abs_diff"] < 1e-5 * r.params["output_max_abs"]
    before, after = _arrays(m), _arrays(r.model)
    s = after[EXPAND + "_bias"] / before[EXPAND + "_bias"]
    assert s.min() >= 0.25 - 1e-6 and s.max() <= 4 + 1e-6 and s.std() > 0.3
    np.testing.assert_allclose(after[DW + "_bias"], before[DW + "_bias"] * s, rtol=1e-5)
    assert np.array_equal(after[DW], before[DW])
    np.testing.assert_allclose(after[PROJECT] * s[None, :, None, None], before[PROJECT], rtol=1e-5)


def test_remove_filters_through_depthwise(mb):
    r = ob.remove_filters(_load(mb, "kept"), 6, layer=EXPAND)
    a = _arrays(r.model)
    assert a[DW].shape == (90, 1, 3, 3) and _group(_node(r.model, DW)) == 90 and a[PROJECT].shape == (32, 90, 1, 1)


# ------------------------------------------------------------------ residual inverted blocks, exported here
@pytest.fixture(scope="module")
def residual_exports(tmp_path_factory):
    import torch
    from torch import nn

    from exporters import arch

    torch.manual_seed(0)
    torch.set_num_threads(1)

    class DepthwiseFirst(nn.Module):   # EfficientNet's MBConv1 / MobileNetV1 block, residual: no expansion
        def __init__(self, c):
            super().__init__()
            self.depthwise = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
            self.bn_depthwise = nn.BatchNorm2d(c)
            self.project = nn.Conv2d(c, c, 1, bias=False)
            self.bn_project = nn.BatchNorm2d(c)

        def forward(self, x):
            return x + self.bn_project(self.project(nn.functional.relu(self.bn_depthwise(self.depthwise(x)))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, 2, 1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.blocks = nn.Sequential(arch.InvertedResidual(8, 8, 4, 1), DepthwiseFirst(8),
                                        arch.InvertedResidual(8, 16, 4, 2))
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = nn.functional.relu6(self.bn(self.stem(x)))
            return self.fc(self.blocks(x).mean(dim=(2, 3)))

    net = Net()
    for mod in net.modules():      # BatchNorms with non-trivial statistics (no training needed)
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.weight.data = torch.rand(c) + 0.5
            mod.bias.data = torch.randn(c) * 0.2
            mod.running_mean = torch.randn(c) * 0.2
            mod.running_var = torch.rand(c) + 0.5
    d = tmp_path_factory.mktemp("mbres")
    x = torch.randn(2, 1, 16, 16)
    return {"default": arch.export_default(net, [x], d / "default.onnx"),
            "kept": arch.export_kept(net, [x], d / "kept.onnx")}


@pytest.mark.parametrize("src", ["default", "kept"])
def test_residual_inverted_block(residual_exports, src):
    """blocks.0 (inverted residual) and blocks.1 (depthwise first, residual) add into one stream
    written by the stem, blocks.0.project and blocks.1.project; it is read by blocks.0.expand
    (feeding a depthwise conv), by blocks.1's depthwise conv after the Add (so by blocks.1.project)
    and by blocks.2.expand."""
    m = onnx.load(str(residual_exports[src]))
    flows = {l.weight: ch.trace(m, l) for l in ch.layers(m)}
    assert [w for w, f in flows.items() if not f.blocked] == [
        "stem.weight", "blocks.0.expand.weight", "blocks.0.project.weight", "blocks.1.project.weight",
        "blocks.2.expand.weight", "blocks.2.project.weight"]
    stream = flows["blocks.0.project.weight"]
    assert len(stream.residual) == 2 and {w.layer.weight for w in stream.writers} == {
        "blocks.0.project.weight", "blocks.1.project.weight", "stem.weight"}
    assert {c.layer.weight for c in stream.consumers} == {
        "blocks.0.expand.weight", "blocks.1.project.weight", "blocks.2.expand.weight"}
    assert [d.input[1] for d in stream.stream_depthwise] == ["blocks.1.depthwise.weight"]
    assert len(stream.stream_batchnorms) == (1 if src == "kept" else 0)    # blocks.1.bn_depthwise
    for e in ("blocks.0.expand.weight", "blocks.2.expand.weight"):
        assert len(flows[e].depthwise) == 1 and not flows[e].stream_depthwise
    for layer in ("blocks.0.expand.weight", "blocks.0.project.weight", "blocks.1.project.weight",
                  "blocks.2.expand.weight"):
        r = ob.obfuscate(m, "perm-in," + ALL, layer=layer, seed=5)
        assert r.params["max_abs_diff"] < 1e-5 * r.params["output_max_abs"], (layer, r.params)
    r = ob.obfuscate(m, ALL, seed=5)   # every traceable layer
    assert r.params["max_abs_diff"] < 1e-5 * r.params["output_max_abs"]
    assert len(r.params["layers"]) == 6
    a = _arrays(r.model)
    assert a["blocks.0.depthwise.weight"].shape == (32 + 6, 1, 3, 3)
    assert _group(_node(r.model, "blocks.0.depthwise.weight")) == 38
    # the stream (8 channels) was grown by the stem, blocks.0.project and blocks.1.project in turn
    assert a["blocks.1.depthwise.weight"].shape == (8 + 18, 1, 3, 3)
    assert a["blocks.1.project.weight"].shape == (26, 26, 1, 1)       # a writer and a reader of the stream
    assert _group(_node(r.model, "blocks.1.depthwise.weight")) == 26
    # a scale on the stream: absorbed by every writer's BatchNorm when kept; refused through the
    # ReLU6 after the stem when folded; with ReLU instead, it passes the blocks.1 depthwise conv
    # after the Add (bias times s, kernel unchanged)
    lay = "blocks.0.project.weight"
    if src == "kept":
        r = ob.obfuscate(m, "scale", layer=lay, seed=6)
        assert r.params["max_abs_diff"] < 1e-5 * r.params["output_max_abs"]
    else:
        with pytest.raises(AuditError, match=r"\(Clip: a positive scale does not pass it\)"):
            ob.obfuscate(m, "scale", layer=lay, seed=6)
        m = _relu_instead_of_relu6(m)
        r = ob.obfuscate(m, "scale", layer=lay, seed=6)
        assert r.params["max_abs_diff"] < 1e-5 * r.params["output_max_abs"]
        before, after = _arrays(m), _arrays(r.model)
        s = after[lay + "_bias"] / before[lay + "_bias"]
        assert s.std() > 0.3
        np.testing.assert_allclose(after["blocks.1.depthwise.weight_bias"],
                                   before["blocks.1.depthwise.weight_bias"] * s, rtol=1e-5)
        assert np.array_equal(after["blocks.1.depthwise.weight"], before["blocks.1.depthwise.weight"])


def test_stream_copies_need_equal_depthwise_kernels(residual_exports):
    """Split copies of a residual stream are one neuron only if the depthwise conv reading the
    stream after the Add has equal kernels for them."""
    from auditor.forensics import canon
    from auditor.read.weights import WeightStore

    m = ob.obfuscate(onnx.load(str(residual_exports["kept"])), "split:2,dummy:2", layer="blocks.0.project.weight",
                     seed=3).model

    def groups(model):
        gv = canon.GraphValues(WeightStore(model))
        g = canon.neuron_groups(gv, gv.flow(gv.layer_of_weight("blocks.0.project.weight")))
        return g.splits, g.dummies

    assert groups(m) == (2, 2)
    t = next(t for t in m.graph.initializer if t.name == "blocks.1.depthwise.weight")
    k = numpy_helper.to_array(t).copy()
    k[8, 0, 0, 0] *= 1.01
    t.CopyFrom(numpy_helper.from_array(k, t.name))
    assert groups(m) == (1, 2)


# ------------------------------------------------------------------ scan
def _scan(path, key, refs=()):
    from auditor.forensics.scan import scan
    from auditor.marks.keys import load_key

    return scan(path, [load_key(key)], references=refs)["findings"][0]


def _obfuscated(mb, src, steps, tmp_path):
    """The marked project conv's outputs, then the expand conv feeding its inputs through the
    depthwise conv (so the expand conv's new channels get columns in every project row)."""
    r = ob.obfuscate(_load(mb, src), steps, layer=PROJECT, seed=2)
    r = ob.obfuscate(r.model, steps, layer=EXPAND, seed=1)
    p = tmp_path / f"{src}.onnx"
    onnx.save(r.model, str(p))
    return p


@pytest.mark.parametrize("src", ["default", "kept"])
def test_scan_undoes_both_sides_through_the_depthwise_conv(mb, src, tmp_path):
    f = _scan(_obfuscated(mb, src, "split:2,dummy:2,clique:2", tmp_path), mb / "key.json")
    assert f["verdict"] == "detected" and f["matches"] == 128 and f["log10_p_corrected"] < -38, f
    assert f["undone"][:2] == ["output neurons: 2 dummy and 2 clique removed, 2 split copies merged (38 -> 32)",
                               "input neurons (via " + _node(_load(mb, src), EXPAND).name
                               + "): 2 dummy and 2 clique removed, 2 split copies merged (102 -> 96)"]


@pytest.mark.parametrize("src", ["default", "kept", "twin"])
def test_scan_with_reference_and_twin(mb, src, tmp_path):
    p = _obfuscated(mb, src, ALL, tmp_path)
    f = _scan(p, mb / "key.json", (mb / "kept.onnx",))
    if src == "twin":
        assert f["verdict"] == "not detected" and f["matches"] <= 90 and f["log10_p_corrected"] > -3, f
        assert _scan(p, mb / "key.json")["verdict"] == "not detected"
    else:
        # every bit read (p = 2^-128 = 10^-38.5), corrected for every variant tried (their count grows
        # with what the scan tries: 10^-37.9 with the column-norm variants)
        assert f["verdict"] == "detected" and f["matches"] == 128 and f["log10_p_corrected"] < -35, f


def test_split_copies_need_equal_depthwise_kernels(mb):
    """Two expand channels with equal rows are one neuron only if their depthwise kernels agree."""
    from auditor.forensics import canon
    from auditor.read.weights import WeightStore

    m = ob.obfuscate(_load(mb, "kept"), "split:2", layer=EXPAND, seed=3).model

    def splits(model):
        gv = canon.GraphValues(WeightStore(model))
        return canon.neuron_groups(gv, gv.flow(gv.layer_of_weight(EXPAND))).splits

    assert splits(m) == 2
    t = next(t for t in m.graph.initializer if t.name == DW)
    k = numpy_helper.to_array(t).copy()
    k[97, 0, 1, 1] *= 1.01
    t.CopyFrom(numpy_helper.from_array(k, DW))
    assert splits(m) == 1
    t2 = next(t for t in m.graph.initializer if t.name == "blocks.1.bn_depthwise.bias")
    b = numpy_helper.to_array(t2).copy()
    b[96] += 0.05
    t2.CopyFrom(numpy_helper.from_array(b, t2.name))
    assert splits(m) == 0


# ------------------------------------------------------------------ third party
def test_third_party_mobilenetv3_depthwise():
    """ppocr_cls.onnx (PaddlePaddle MobileNetV3, BN kept, ReLU and hard-swish blocks): 32 of its
    43 layers trace (11 with neither depthwise convs, bias Adds / SE gates nor activations written
    as several nodes followed). Every expansion conv traces through its depthwise conv (conv2's
    after an SE block's bias Adds, conv5-12's after a hard-swish written as Add / Clip / Mul / Div);
    an SE gate layer alone is refused (it moves with the channels it gates)."""
    p = Path(os.environ.get("WMAUDIT_DATA", "build/data")) / "thirdparty" / "ppocr_cls.onnx"
    if not p.is_file():
        pytest.skip(f"{p} is missing: run `bash scripts/fetch_thirdparty.sh`")
    m = onnx.load(str(p))
    flows = {l.weight: ch.trace(m, l) for l in ch.layers(m)}
    traced = [w for w, f in flows.items() if not f.blocked]
    assert len(flows) == 43 and len(traced) == 32
    assert [w for w in traced if flows[w].depthwise] == [f"conv{i}_expand_weights" for i in range(2, 13)]
    assert not any(flows[w].stream_depthwise for w in traced)
    dw_name = flows["conv3_expand_weights"].depthwise[0].name
    for steps, after in (("perm-out,scale,split:3,dummy:2,clique:4", 24 + 9), ("perm-in", 24)):
        r = ob.obfuscate(m, steps, layer="conv3_expand_weights", seed=1)
        assert r.params["max_abs_diff"] < 1e-6 * max(1.0, r.params["output_max_abs"]), steps
        assert _group(next(n for n in r.model.graph.node if n.name == dw_name)) == after

"""Provenance (weights method) and scan's neuron cleaning on the files onnxruntime saves at
ORT_ENABLE_ALL: the NCHWc nodes (Conv with fused Sum and activation, ReorderInput / ReorderOutput,
the NCHWc pooling ops) are traced as the plain NCHW graph they compute (auditor.read.nchwc_plain),
and give the verdicts the original files give: derived for the marked model's saved forms against
the marked reference, not derived for independently trained twins; the same bits and the same
neurons undone by scan."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from auditor.cli import main
from auditor.forensics.provenance import DEFAULT_ALPHA, provenance
from auditor.read import blocked, nchwc_plain
from auditor.read.weights import WeightStore
from fixtures.deploy import ort_save

LOG_ALPHA = math.log10(DEFAULT_ALPHA)

# (suspect, reference, derived): BatchNorm folded by onnxruntime, residual streams (Sum fused into the
# NCHWc Conv), depthwise Convs, an obfuscated stream of 42 channels (padded to 48 for block 8),
# independently trained twins
CASES = [
    ("arch-resnet/default.onnx", "arch-resnet/kept.onnx", True),
    ("arch-mobilenet/default.onnx", "arch-mobilenet/kept.onnx", True),
    ("forensics-resnet-obfuscated/default/all.onnx", "arch-resnet/kept.onnx", True),
    ("forensics-resnet-obfuscated/kept/dummy-4.onnx", "arch-resnet/kept.onnx", True),
    ("forensics-resnet-twin/model.onnx", "arch-resnet/kept.onnx", False),
    ("forensics-resnet-obfuscated/twin/all.onnx", "arch-resnet/kept.onnx", False),
]


def _fixture_file(build_fixture, rel: str) -> Path:
    name, rest = rel.split("/", 1)
    return build_fixture(name) / rest


@pytest.fixture(scope="module")
def saved(build_fixture, tmp_path_factory):
    """Each suspect saved by this machine's onnxruntime at ORT_ENABLE_ALL."""
    out = tmp_path_factory.mktemp("all")
    files = {}
    for rel, _, _ in CASES:
        files[rel] = ort_save(_fixture_file(build_fixture, rel), out / (rel.replace("/", "_")), "all")
    return files


def _nchwc_convs(path: Path) -> int:
    return sum(1 for n in onnx.load(str(path)).graph.node if n.domain == blocked.NCHWC_DOMAIN and n.op_type == "Conv")


@pytest.mark.parametrize("rel", [c[0] for c in CASES])
def test_plain_graph_computes_what_the_nchwc_file_computes(saved, rel):
    """One block-size reading's plain graph (standard ONNX only, padding dropped) gives onnxruntime's
    outputs of the ORT_ENABLE_ALL file within 1e-4."""
    import onnxruntime as ort

    path = saved[rel]
    assert _nchwc_convs(path) > 0
    store = WeightStore.open(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 2 for d in inp.shape]).astype(np.float32)
    want = sess.run(None, {inp.name: x})[0]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    diffs = []
    for b in nchwc_plain.readings(store):
        try:
            m, _, _ = nchwc_plain.plain_model(store, b)
        except Exception:
            continue  # a reading the padding rules out
        assert not any(n.domain == blocked.NCHWC_DOMAIN for n in m.graph.node)
        got = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {inp.name: x})[0]
        diffs.append(float(np.abs(got - want).max()))
    assert diffs and min(diffs) <= 1e-4


@pytest.mark.parametrize("rel,ref,derived", CASES)
def test_provenance_on_the_all_file_gives_the_original_verdict(build_fixture, saved, rel, ref, derived):
    reference = _fixture_file(build_fixture, ref)
    orig = provenance(_fixture_file(build_fixture, rel), reference)
    res = provenance(saved[rel], reference)
    assert (orig["log10_p_combined"] < LOG_ALPHA) == derived
    assert (res["log10_p_combined"] < LOG_ALPHA) == derived
    assert res["verdict"] == orig["verdict"] == ("derived" if derived else "not derived")
    assert len(res["layers"]) == len(orig["layers"])


@pytest.mark.parametrize("name", ["nchwc8.onnx", "nchwc16.onnx", "all.onnx"])
def test_provenance_on_block_8_and_16_files(build_fixture, name):
    """The digits CNN's NCHWc files, block 16 included (built for AVX-512 whatever this CPU is): derived
    from the exporter's file with the p of the exporter's file against itself."""
    d, src = build_fixture("deploy-digits-nchwc"), build_fixture("data-digits-cnn")
    base = provenance(src / "model.onnx", src / "model.onnx")
    res = provenance(d / name, src / "model.onnx")
    assert res["verdict"] == "derived" and res["log10_p_combined"] < LOG_ALPHA
    assert res["log10_p_combined"] == pytest.approx(base["log10_p_combined"] + math.log10(res.get("nchwc_readings", 1)))


def test_reference_saved_at_all_too(build_fixture, saved):
    """Both files ORT_ENABLE_ALL: the readings of both are tried and paid for."""
    rel = "arch-resnet/default.onnx"
    res = provenance(saved[rel], saved[rel])
    assert res["verdict"] == "derived" and res["nchwc_readings"] >= 2
    twin = provenance(saved["forensics-resnet-twin/model.onnx"], saved[rel])
    assert twin["verdict"] == "not derived" and twin["log10_p_combined"] > LOG_ALPHA


def test_unread_nchwc_conv_is_one_line(build_fixture, capsys):
    d, src = build_fixture("deploy-digits-nchwc"), build_fixture("data-digits-cnn")
    rc = main(["provenance", str(d / "unknown-block.onnx"), "--reference", str(src / "model.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not read" in err and "Traceback" not in err


@pytest.mark.parametrize("name,ref", [("dummy-4", False), ("clique-4", True), ("all", True)])
def test_scan_cleans_the_same_neurons_in_the_all_file(build_fixture, tmp_path, name, ref):
    """scan on the ORT_ENABLE_ALL file of an obfuscated residual CNN (a stream of 36 / 42 channels:
    NCHWc pads it): the same finding as on the original (verdict, bits, neurons undone)."""
    from auditor.forensics.scan import scan
    from auditor.marks.keys import load_key

    res = build_fixture("arch-resnet")
    key, refs = [load_key(res / "key.json")], ([res / "kept.onnx"] if ref else [])
    for src in ("default", "twin"):
        if src == "twin" and not ref:
            continue
        orig = build_fixture("forensics-resnet-obfuscated") / src / f"{name}.onnx"
        saved = ort_save(orig, tmp_path / f"{src}-{name}.onnx", "all")
        assert _nchwc_convs(saved) > 0
        a = scan(orig, key, references=refs)["findings"][0]
        b = scan(saved, key, references=refs)["findings"][0]
        assert a["verdict"] == b["verdict"] and a["matches"] == b["matches"], (src, name, a, b)
        if src == "twin":
            assert b["verdict"] == "not detected"
        elif ref:
            assert b["verdict"] == "detected" and b["log10_p_corrected"] < -30
        undone = " ".join(b["undone"])
        want = {"dummy-4": "4 dummy and 0 clique removed", "clique-4": "0 dummy and 4 clique removed",
                "all": "4 dummy and 2 clique removed"}[name]
        assert want in undone and want in " ".join(a["undone"])


def test_provenance_cli_on_the_all_file(build_fixture, saved, capsys):
    res = build_fixture("arch-resnet")
    assert main(["provenance", str(saved["arch-resnet/default.onnx"]), "--reference", str(res / "kept.onnx")]) == 0
    out = capsys.readouterr().out
    assert "VERDICT: DERIVED" in out and "NCHWc block-size readings" in out


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_nchwc_pooling_upsample_and_fused_activations(tmp_path, mode):
    """Conv + LeakyRelu / Sigmoid / Relu (fused as NCHWc activations), AveragePool, an integer Resize
    (NCHWc Upsample), GlobalMaxPool, 24 channels (padded for block 16): the plain graph has no NCHWc
    node left and computes onnxruntime's outputs of the ORT_ENABLE_ALL file within 1e-4."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = []

    def const(name, a):
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def conv(x, y, o, i, name):
        return helper.make_node("Conv", [x, const(f"{name}.weight", (rng.standard_normal((o, i, 3, 3)) * 0.2).astype(np.float32)),
                                         const(f"{name}.bias", rng.standard_normal(o).astype(np.float32))], [y],
                                pads=[1, 1, 1, 1], name=name)

    resize = {"nearest": dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
              "linear": dict(mode="linear", coordinate_transformation_mode="asymmetric")}[mode]
    nodes = [conv("x", "a", 16, 3, "c1"), helper.make_node("LeakyRelu", ["a"], ["a1"], alpha=0.1),
             helper.make_node("AveragePool", ["a1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             conv("p", "b", 16, 16, "c2"), helper.make_node("Sigmoid", ["b"], ["b1"]),
             helper.make_node("Resize", ["b1", "", const("scales", np.array([1, 1, 2, 2], np.float32))], ["u"], **resize),
             conv("u", "c", 24, 16, "c3"), helper.make_node("Relu", ["c"], ["c1o"]),
             helper.make_node("GlobalMaxPool", ["c1o"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", const("fc.weight", rng.standard_normal((10, 24)).astype(np.float32)),
                                       const("fc.bias", np.zeros(10, np.float32))], ["y"], transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(tmp_path / "m.onnx"))
    path = ort_save(tmp_path / "m.onnx", tmp_path / "all.onnx", "all")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node if n.domain == blocked.NCHWC_DOMAIN}
    assert {"Conv", "AveragePool", "Upsample", "GlobalMaxPool"} <= ops
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    store = WeightStore.open(path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    diffs = []
    for b in nchwc_plain.readings(store):
        m, _, _ = nchwc_plain.plain_model(store, b)
        assert not any(n.domain == blocked.NCHWC_DOMAIN for n in m.graph.node)
        got = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        diffs.append(float(np.abs(got - want).max()))
    assert diffs and min(diffs) <= 1e-4

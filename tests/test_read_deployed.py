"""The files deployers ship (onnxruntime's saved optimized graphs at every level, NCHWc in block 8
and 16, the ORT format, simplifiers), read with the same bits and p as the exporter's file; layouts
the reader does not understand give "could not read", never "not detected"."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from auditor.attacks import load_model, save
from auditor.attacks.compose import compose, parse_steps
from auditor.cli import main
from auditor.errors import AuditError
from auditor.marks import stats
from auditor.marks.keys import load_key
from auditor.marks.whitebox import extract
from auditor.read import blocked
from auditor.read.layout import torch_views
from auditor.read.weights import WeightStore
from fixtures.deploy import mlas_reorder, ort_save

LEVELS = ("ort-optimize:basic", "ort-optimize:extended", "ort-optimize:all", "ort-format", "ort-format:all",
          "simplify", "simplify:onnxsim", "ort-optimize:all,ort-format", "prune:0.3,ort-optimize:all",
          "ort-optimize:extended,ort-format:all")


def _extract_after(model: Path, key: Path, steps: str, reference: Path | None = None):
    if not steps:
        return extract(model, load_key(key), reference=reference)
    res = compose(load_model(model), steps)
    with tempfile.TemporaryDirectory() as tmp:
        return extract(save(res.model, Path(tmp) / "m.onnx"), load_key(key), reference=reference)


def _conv_weights(path: Path) -> dict[str, np.ndarray]:
    """Conv weights in torch layout by the torch name their layer gives (name or bias-name alias)."""
    store = WeightStore.open(path)
    out = {}
    for v in torch_views(store):
        if v.kind == "conv" and v.transform == "identity":
            for n in (v.weight.name, *v.weight.aliases):
                if n.endswith(".weight"):
                    out[n] = v.array()
    return out


def test_mlas_loops_and_reader_match_onnxruntime_bytes(build_fixture):
    """The fixture's element-by-element MLAS loops and auditor.read.blocked give the bytes onnxruntime
    wrote (this machine's block size), and reading them back gives the exporter's weights."""
    d = build_fixture("deploy-digits-nchwc")
    ext = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(d / "extended.onnx")).graph.initializer}
    m = onnx.load(str(d / "all.onnx"))
    stored = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    convs = [n for n in m.graph.node if n.domain == blocked.NCHWC_DOMAIN and n.op_type == "Conv"]
    assert len(convs) == 2
    block = 8 if stored[convs[0].input[1]].shape[0] == 8 else 16  # conv1 has 8 output channels
    for node, torch_name in zip(convs, ("conv1.weight", "conv2.weight")):
        w = ext[torch_name]
        order = blocked.filter_order(w.shape[1], w.shape[0], 1, block)
        s = stored[node.input[1]]
        assert np.array_equal(mlas_reorder(w, block, order), s)
        assert np.array_equal(blocked.block_weight(w, block, order), s)
        assert np.array_equal(blocked.unblock_weight(s, block, order, w.shape[0]), w)


def test_nchwc_block_8_and_16_read_identical_weights(build_fixture):
    d = build_fixture("deploy-digits-nchwc")
    ext = _conv_weights(d / "extended.onnx")
    b8, b16 = _conv_weights(d / "nchwc8.onnx"), _conv_weights(d / "nchwc16.onnx")
    assert np.array_equal(b8["conv2.weight"], ext["conv2.weight"])
    assert np.array_equal(b16["conv2.weight"], ext["conv2.weight"])
    store16 = WeightStore.open(d / "nchwc16.onnx")
    layouts = sorted(w.layout for w in store16.weights if w.layout and len(w.shape) == 4)
    # block 16 pads conv1's 8 output channels to 16; the reader drops the padding
    assert layouts == ["nchwc(block=16,OIHWBo)", "nchwc(block=16,OIHWBo,16->8 channels)"]
    conv1 = next(w for w in store16.weights if w.layout and w.shape == (8, 1, 3, 3))
    assert np.array_equal(store16.array(conv1.name), numpy_helper.to_array(
        next(t for t in onnx.load(str(d / "extended.onnx")).graph.initializer if t.name == "conv1.weight")))
    assert store16.unreadable == []


@pytest.mark.parametrize("name", ["extended.onnx", "all.onnx", "nchwc8.onnx", "nchwc16.onnx"])
def test_digits_saved_forms_same_bits_and_p(build_fixture, name):
    d = build_fixture("deploy-digits-nchwc")
    src = build_fixture("data-digits-cnn")
    base = extract(src / "model.onnx", load_key(src / "key.json")).marks[0]
    m = extract(d / name, load_key(d / "key.json")).marks[0]
    assert m.verdict == stats.DETECTED and m.matches == base.matches == m.n_bits
    assert m.p_value == base.p_value and m.p_corrected == base.p_corrected
    assert m.location.how == "name"


@pytest.mark.parametrize("steps", LEVELS)
def test_digits_deployment_steps_same_bits_and_p(build_fixture, steps):
    src = build_fixture("data-digits-cnn")
    base = extract(src / "model.onnx", load_key(src / "key.json")).marks[0]
    m = _extract_after(src / "model.onnx", src / "key.json", steps).marks[0]
    assert m.verdict == stats.DETECTED, (steps, m.reason)
    if not steps.startswith("prune"):
        assert m.matches == base.matches and m.p_value == base.p_value and m.p_corrected == base.p_corrected


@pytest.mark.parametrize("steps", ["ort-optimize:extended", "ort-optimize:all", "ort-format:all", "simplify"])
def test_mobilenet_depthwise_saved_forms_twin_never(build_fixture, steps):
    """MobileNetV2-style blocks (BatchNorm folded by onnxruntime, depthwise NCHWc, 24 channels): the
    mark is read with the exporter's bits and p; the unmarked twin is never detected."""
    d = build_fixture("arch-mobilenet")
    base = {m.id: m for m in extract(d / "default.onnx", load_key(d / "key.json")).marks}
    res = _extract_after(d / "default.onnx", d / "key.json", steps)
    assert res.verdict == stats.DETECTED
    for m in res.marks:
        assert m.matches == base[m.id].matches and m.p_value == base[m.id].p_value, (steps, m.id)
    twin = _extract_after(d / "twin.onnx", d / "key.json", steps)
    assert twin.verdict == stats.NOT_DETECTED
    for m in twin.marks:
        assert m.p_corrected > 1e-4, (steps, m.id)


def test_resnet_all_level_both_block_sizes_paid_for(build_fixture):
    """Every channel count of the residual CNN is a multiple of 16: the file does not tell block 8
    from 16, both readings are candidates and the p-value is corrected for the two."""
    d = build_fixture("arch-resnet")
    base = extract(d / "default.onnx", load_key(d / "key.json"), reference=d / "kept.onnx").marks[0]
    m = _extract_after(d / "default.onnx", d / "key.json", "ort-optimize:all", reference=d / "kept.onnx").marks[0]
    assert m.verdict == stats.DETECTED and m.matches == base.matches and m.p_value == base.p_value
    assert m.location.candidates == 2 and m.p_corrected == pytest.approx(2 * base.p_value, rel=1e-12)


def test_unknown_blocked_layout_could_not_read(build_fixture, capsys):
    d = build_fixture("deploy-digits-nchwc")
    res = extract(d / "unknown-block.onnx", load_key(d / "key.json"))
    assert res.verdict == stats.UNREADABLE and res.exit_code == 2
    assert res.marks[0].ber is None and "block_size" in res.marks[0].reason
    rc = main(["extract", str(d / "unknown-block.onnx"), "--key", str(d / "key.json")])
    out = capsys.readouterr()
    assert rc == 2 and "COULD NOT READ" in out.out and "not detected" not in out.out.lower()
    assert "Traceback" not in out.err


def test_missing_layer_could_not_read(build_fixture, tmp_path, capsys):
    """A key whose layer is not in the file: could not read (exit 2), not 'not detected' with BER 1."""
    d = build_fixture("data-digits-cnn")
    key = tmp_path / "key.json"
    # mean reduction over 32 output channels leaves the key's 72 coefficients; no [32, 8, 3, 3] tensor exists
    rc = main(["key", "import", "--matrix", str(d / "X.npy"), "--bits", str(d / "bits.npy"), "--param",
               "conv9.weight", "--shape", "32,8,3,3", "--reduce", "mean", "-o", str(key)])
    assert rc == 0
    capsys.readouterr()
    rc = main(["extract", str(d / "model.onnx"), "--key", str(key), "--json"])
    import json

    doc = json.loads(capsys.readouterr().out)
    m = doc["result"]["marks"][0]
    assert rc == 2 and m["verdict"] == "could not read" and m["ber"] is None
    assert "could not be located" in m["reason"] and doc["result"]["verdict"] == "could not read"


def test_ort_format_inspect_and_extract_cli(build_fixture, tmp_path, capsys):
    d = build_fixture("deploy-digits-nchwc")
    src = build_fixture("data-digits-cnn")
    for level in ("basic", "all"):
        ort = ort_save(src / "model.onnx", tmp_path / f"model-{level}.ort", level, ort_format=True)
        assert ort.read_bytes()[4:8] == b"ORTM"
        assert main(["inspect", str(ort)]) == 0
        assert main(["extract", str(ort), "--key", str(d / "key.json")]) == 0
        out = capsys.readouterr().out
        assert "64/64 match" in out and "DETECTED" in out


def test_damaged_ort_file_is_one_line_error(build_fixture, tmp_path, capsys):
    src = build_fixture("data-digits-cnn")
    ort = ort_save(src / "model.onnx", tmp_path / "m.ort", "basic", ort_format=True)
    bad = tmp_path / "bad.ort"
    data = bytearray(ort.read_bytes())
    bad.write_bytes(bytes(data[:64]))
    rc = main(["inspect", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_deployment_steps_parse():
    assert [str(s) for s in parse_steps("quantize:dynamic,ort-optimize:all,ort-format")] == \
        ["quantize:dynamic", "ort-optimize:all", "ort-format"]
    for bad in ("ort-optimize", "ort-optimize:max", "ort-format:x", "simplify:foo", "transformers-optimize:int8"):
        with pytest.raises(AuditError):
            parse_steps(bad)


@pytest.mark.parametrize("name", ["fused.onnx", "fused-fp16.onnx"])
@pytest.mark.parametrize("which", ["query", "value"])
def test_packed_qkv_attention_read_from_its_slice(build_fixture, name, which):
    """onnxruntime's transformer optimizer packs Q, K, V into com.microsoft Attention's weight
    [32, 96]: the mark on the query (value) projection is read from its columns, with the bits and
    p of the exporter's file; the twin's fused file never shows it."""
    d = build_fixture("deploy-bert-attention")
    key = load_key(d / f"key-{which}.json")
    base = extract(d / "model.onnx", key).marks[0]
    m = extract(d / name, key).marks[0]
    assert m.verdict == stats.DETECTED and m.matches == base.matches and m.p_value == base.p_value
    want = {"query": "qkv-slice:q:0:32", "value": "qkv-slice:v:64:96"}[which]
    assert m.location.transform == want
    twin = extract(d / "twin-fused.onnx", key)
    assert twin.verdict == stats.NOT_DETECTED and twin.marks[0].p_corrected > 1e-4


@pytest.mark.parametrize("name", ["arch-vit", "arch-bert"])
@pytest.mark.parametrize("steps", ["transformers-optimize", "transformers-optimize:fp16"])
def test_transformer_optimizer_on_vit_and_bert(build_fixture, name, steps):
    d = build_fixture(name)
    base = {m.id: m for m in extract(d / "default.onnx", load_key(d / "key.json")).marks}
    res = _extract_after(d / "default.onnx", d / "key.json", steps)
    assert res.verdict == stats.DETECTED
    for m in res.marks:
        assert m.matches == base[m.id].matches and m.p_value == base[m.id].p_value, (name, steps, m.id)
    assert _extract_after(d / "twin.onnx", d / "key.json", steps).verdict == stats.NOT_DETECTED


def test_packed_matmul_split_into_multiheadattention(tmp_path):
    """A projection packed into one MatMul [in, 3 x hidden], split in three into com.microsoft
    MultiHeadAttention: onnxruntime's output equals attention computed from the separate Q, K, V
    weights, and the reader gives each of them back from its columns."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    D, N, S = 8, 2, 5
    rng = np.random.default_rng(0)
    Wq, Wk, Wv = (rng.standard_normal((D, D)).astype(np.float32) for _ in range(3))
    packed = np.concatenate([Wq.T, Wk.T, Wv.T], axis=1)
    g = helper.make_graph([
        helper.make_node("MatMul", ["x", "W"], ["qkv"]),
        helper.make_node("Split", ["qkv"], ["q", "k", "v"], axis=-1, num_outputs=3),
        helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=N)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, S, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, S, D])], [numpy_helper.from_array(packed, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    onnx.save(m, str(tmp_path / "m.onnx"))
    x = rng.standard_normal((1, S, D)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    q, k, v = (x[0] @ W.T for W in (Wq, Wk, Wv))
    heads = []
    for h in range(N):
        sl = slice(h * D // N, (h + 1) * D // N)
        a = q[:, sl] @ k[:, sl].T / np.sqrt(D // N)
        a = np.exp(a - a.max(1, keepdims=True))
        heads.append((a / a.sum(1, keepdims=True)) @ v[:, sl])
    assert np.allclose(y[0], np.concatenate(heads, 1), atol=1e-4)
    views = {v.transform: v for v in torch_views(WeightStore.open(tmp_path / "m.onnx"))}
    for part, W in zip("qkv", (Wq, Wk, Wv)):
        i = "qkv".index(part)
        assert np.array_equal(views[f"qkv-slice:{part}:{i * D}:{(i + 1) * D}"].array(), W)


def test_scan_sweep_gate_report_say_could_not_read(build_fixture, tmp_path, capsys):
    """The unknown blocked layout is a distinct state everywhere: scan (exit 2), sweep lines, the gate's
    requirement, the report's headline; a .ort file in a corpus is swept like an .onnx file."""
    import json

    from auditor.gate.gate import UNREADABLE, judge_mark
    from auditor.report.html import render

    d = build_fixture("deploy-digits-nchwc")
    src = build_fixture("data-digits-cnn")
    assert main(["scan", str(d / "unknown-block.onnx"), "--key", str(d / "key.json"), "--json",
                 "-o", str(tmp_path / "scan.json")]) == 2
    body = json.loads(capsys.readouterr().out)["result"]
    assert body["verdict"] == "could not read" and body["findings"][0]["verdict"] == "could not read"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "unknown.onnx").write_bytes((d / "unknown-block.onnx").read_bytes())
    ort_save(src / "model.onnx", corpus / "model.ort", "all", ort_format=True)
    assert main(["sweep", str(corpus), "--key", str(d / "key.json"), "-o", str(tmp_path / "s.jsonl")]) == 0
    lines = {Path(r["file"]).name: r for r in map(json.loads, (tmp_path / "s.jsonl").read_text().splitlines())}
    assert lines["unknown.onnx"]["verdict"] == "could not read"
    assert lines["model.ort"]["verdict"] == "detected"
    mark = extract(d / "unknown-block.onnx", load_key(d / "key.json")).marks[0].to_json()
    req = judge_mark("as-shipped", mark, {"max_p_value": 1e-6, "max_ber": 0.1})
    assert req.status == UNREADABLE and "could not be read" in req.reasons[0]
    html = render([json.loads((tmp_path / "scan.json").read_text())])
    assert "COULD NOT READ" in html


@pytest.mark.parametrize("steps", ["ort-optimize:basic", "ort-optimize:all", "ort-format"])
def test_reference_file_names_the_weight_the_optimizer_renamed_nothing(build_fixture, steps):
    """onnxruntime drops the exporter's node metadata (the ViT's Linear weights were found through it),
    so alone the optimized file is searched by shape and pays for its candidates; with the owner's
    file as --reference the weight keeps its tensor name and is located without a search: the same
    bits and the same p as the exporter's file."""
    d = build_fixture("arch-vit")
    base = {m.id: m for m in extract(d / "default.onnx", load_key(d / "key.json")).marks}
    alone = _extract_after(d / "default.onnx", d / "key.json", steps)
    assert alone.verdict == stats.DETECTED and any(m.location.candidates > 1 for m in alone.marks)
    res = _extract_after(d / "default.onnx", d / "key.json", steps, reference=d / "default.onnx")
    for m in res.marks:
        assert m.location.how == "reference-name" and m.location.candidates == 1
        assert m.matches == base[m.id].matches and m.p_corrected == base[m.id].p_corrected
    twin = _extract_after(d / "twin.onnx", d / "key.json", steps, reference=d / "default.onnx")
    assert twin.verdict == stats.NOT_DETECTED


@pytest.mark.parametrize("name", ["arch-bert", "arch-mobilenet"])
@pytest.mark.parametrize("quant", ["quantize:dynamic",
                                   pytest.param("quantize:static-qdq-per-channel", marks=pytest.mark.slow)])
def test_quantize_then_optimize_or_convert(build_fixture, name, quant):
    """Quantize, then save onnxruntime's optimized graph or the ORT format: the fused quantized forms
    (com.microsoft MatMulIntegerToFloat / DynamicQuantizeMatMul, QLinearConv, ConvInteger) are read
    with the bits and p of the quantized file; the twin is never detected."""
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data

    d = build_fixture(name)
    data = d / "calib.npz" if (d / "calib.npz").is_file() else d / "calib.npy"
    cal = Calibration(load_data(str(data), d / "default.onnx", purpose="calibration", samples=64, seed=0))
    key = load_key(d / "key.json")

    def read(model: str, steps: str):
        res = compose(load_model(d / model), steps, cal)
        with tempfile.TemporaryDirectory() as tmp:
            return extract(save(res.model, Path(tmp) / "m.onnx"), key)

    base = {m.id: m for m in read("default.onnx", quant).marks}
    for post in ("ort-optimize:extended", "ort-optimize:all", "ort-format"):
        res = read("default.onnx", f"{quant},{post}")
        assert res.verdict == stats.DETECTED, (post, [(m.id, m.verdict, m.reason) for m in res.marks])
        for m in res.marks:
            assert m.matches == base[m.id].matches and m.p_value == base[m.id].p_value, (post, m.id)
    assert read("twin.onnx", f"{quant},ort-optimize:all").verdict == stats.NOT_DETECTED


def _aliased_ort(path: Path, n: int = 2000) -> Path:
    """A hostile .ort written with onnxruntime's own flatbuffers builders: n initializers that all
    point at one 64 KiB raw-data vector (n x 64 KiB asked for by a 170 KB file)."""
    import importlib

    import flatbuffers

    fbs = "onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs"
    T, G, M, S, O = (importlib.import_module(f"{fbs}.{m}") for m in
                     ("Tensor", "Graph", "Model", "InferenceSession", "OperatorSetId"))
    b = flatbuffers.Builder(1024)
    raw = b.CreateByteVector(bytes(1 << 16))
    tensors = []
    for i in range(n):
        name = b.CreateString(f"t{i}")
        T.TensorStartDimsVector(b, 1)
        b.PrependInt64(1 << 14)
        dims = b.EndVector()
        T.TensorStart(b)
        T.TensorAddName(b, name)
        T.TensorAddDims(b, dims)
        T.TensorAddDataType(b, 1)
        T.TensorAddRawData(b, raw)
        tensors.append(T.TensorEnd(b))
    G.GraphStartInitializersVector(b, len(tensors))
    for t in reversed(tensors):
        b.PrependUOffsetTRelative(t)
    inits = b.EndVector()
    G.GraphStart(b)
    G.GraphAddInitializers(b, inits)
    g = G.GraphEnd(b)
    dom = b.CreateString("")
    O.OperatorSetIdStart(b)
    O.OperatorSetIdAddDomain(b, dom)
    O.OperatorSetIdAddVersion(b, 17)
    op = O.OperatorSetIdEnd(b)
    M.ModelStartOpsetImportVector(b, 1)
    b.PrependUOffsetTRelative(op)
    ops = b.EndVector()
    M.ModelStart(b)
    M.ModelAddIrVersion(b, 8)
    M.ModelAddOpsetImport(b, ops)
    M.ModelAddGraph(b, g)
    m = M.ModelEnd(b)
    ver = b.CreateString("5")
    S.InferenceSessionStart(b)
    S.InferenceSessionAddOrtVersion(b, ver)
    S.InferenceSessionAddModel(b, m)
    b.Finish(S.InferenceSessionEnd(b), file_identifier=b"ORTM")
    path.write_bytes(bytes(b.Output()))
    return path


def test_ort_file_with_shared_offsets_refused(tmp_path, capsys):
    bad = _aliased_ort(tmp_path / "aliased.ort")
    assert bad.stat().st_size < 200_000
    rc = main(["inspect", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "more data than the file holds" in err and "Traceback" not in err
    ok = _aliased_ort(tmp_path / "few.ort", n=2)  # two 64 KiB tensors sharing bytes: still over the file's size
    assert main(["inspect", str(ok)]) == 2


FORMS = ("ort-optimize:basic", "ort-optimize:extended", "ort-optimize:all", "ort-format", "ort-format:all",
         "simplify", "simplify:onnxsim")


@pytest.mark.parametrize("name", ["arch-mobilenet", "arch-resnet", "arch-vit", "arch-bert"])
def test_every_saved_form_of_every_architecture(build_fixture, name):
    """Conv nets with BatchNorm (residual, depthwise blocks), a ViT and a BERT-style encoder: every
    saved optimization level, the ORT format and both simplifiers give the exporter's bits and p;
    where a form took away what named the weight, the corrected p pays for the candidates searched
    and no more; the twins are never detected."""
    d = build_fixture(name)
    ref = d / "kept.onnx" if name == "arch-resnet" else None  # BatchNorm anchors for the mean-reduced mark
    base = {m.id: m for m in extract(d / "default.onnx", load_key(d / "key.json"), reference=ref).marks}
    for steps in FORMS:
        res = _extract_after(d / "default.onnx", d / "key.json", steps, reference=ref)
        assert res.verdict == stats.DETECTED, (name, steps)
        for m in res.marks:
            b = base[m.id]
            assert m.matches == b.matches and m.p_value == b.p_value, (name, steps, m.id)
            assert m.p_corrected == pytest.approx(min(1.0, b.p_value * m.location.candidates), rel=1e-12)
        twin = _extract_after(d / "twin.onnx", d / "key.json", steps, reference=ref)
        assert twin.verdict == stats.NOT_DETECTED, (name, steps)
        assert all(m.p_corrected > 1e-4 for m in twin.marks), (name, steps)


def test_fused_gemm_weight_read_in_torch_layout(tmp_path):
    """Gemm(transB=1) + Relu saved at ORT_ENABLE_EXTENDED becomes com.microsoft FusedGemm: its weight
    is read as the Linear weight [out, in] (identity view, kind linear), equal to the original."""
    from onnx import TensorProto, helper

    from auditor.attacks.runtime import ort_optimize

    W = np.random.default_rng(1).standard_normal((6, 10)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["h"], transB=1),
                           helper.make_node("Relu", ["h"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
                          [numpy_helper.from_array(W, "fc.weight"), numpy_helper.from_array(np.zeros(6, np.float32), "fc.bias")])
    m = ort_optimize(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), "extended").model
    assert [n.op_type for n in m.graph.node] == ["FusedGemm"]
    onnx.save(m, str(tmp_path / "m.onnx"))
    views = [v for v in torch_views(WeightStore.open(tmp_path / "m.onnx")) if v.weight.name == "fc.weight"]
    ident = next(v for v in views if v.transform == "identity")
    assert ident.kind == "linear" and np.array_equal(ident.array(), W)


def test_onnxruntime_converter_fixed_and_runtime_optimized(build_fixture, tmp_path, capsys):
    """onnxruntime's own converter (python -m onnxruntime.tools.convert_onnx_models_to_ort), both
    optimization styles: the fixed-optimized .ort and the runtime-optimized .ort carry the mark."""
    import shutil
    import subprocess

    src = build_fixture("data-digits-cnn")
    shutil.copy(src / "model.onnx", tmp_path / "model.onnx")
    r = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(tmp_path / "model.onnx"),
                        "--optimization_style", "Fixed", "Runtime"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("model.ort", "model.with_runtime_opt.ort"):
        assert main(["extract", str(tmp_path / name), "--key", str(src / "key.json")]) == 0
        out = capsys.readouterr().out
        assert "64/64 match" in out and "by name" in out


def test_hand_built_block8_file_runs_like_onnxruntimes_own(build_fixture):
    """The fixture's NCHWc graph built for block 8 (the construction that also makes block 16) gives,
    in onnxruntime on this machine, the outputs of onnxruntime's own ORT_ENABLE_ALL file."""
    import onnxruntime as ort

    d = build_fixture("deploy-digits-nchwc")
    x = np.load(d / "digits.npz")
    feeds = {k: x[k][:64] for k in x.files if k != "y"}
    own = ort.InferenceSession(str(d / "all.onnx"), providers=["CPUExecutionProvider"])
    if any(t.dims[0] == 16 for t in onnx.load(str(d / "all.onnx")).graph.initializer if len(t.dims) == 4
           and t.dims[1] == 1):
        pytest.skip("this CPU's onnxruntime blocks in 16 (AVX-512): the block-8 graph is not its own")
    built = ort.InferenceSession(str(d / "nchwc8.onnx"), providers=["CPUExecutionProvider"])
    assert np.allclose(built.run(None, feeds)[0], own.run(None, feeds)[0], rtol=0, atol=1e-5)

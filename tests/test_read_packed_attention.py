"""MultiHeadAttention's per-head packed inputs, as onnxruntime's UNet attention fusion writes them
(packed QKV [B, L, N, 3, H] for self attention, packed KV [B, L, N, 2, H] for cross attention): a mark
on the query, key or value projection is read from its part of the packed weight, with the exporter's
bits and p, in float, float16 and int8; a packed input whose Reshape the reader cannot interpret gives
"could not read", never "not detected"."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from auditor.attacks import load_model, save
from auditor.attacks.compose import compose
from auditor.cli import main
from auditor.marks import stats
from auditor.marks.keys import load_key
from auditor.marks.whitebox import extract
from auditor.read.layout import torch_views
from auditor.read.weights import WeightStore

FIX = "deploy-packed-attention"
KEYS = {"attn1-to_q": "qkv-heads:q:4x3x8", "attn1-to_k": "qkv-heads:k:4x3x8", "attn1-to_v": "qkv-heads:v:4x3x8",
        "attn2-to_k": "qkv-heads:k:4x2x8", "attn2-to_v": "qkv-heads:v:4x2x8"}


def _mha_reference():
    """com.microsoft MultiHeadAttention from its documentation (packed QKV query [B, L, N, 3, H] with
    key and value empty; packed KV key [B, L, N, 2, H] with value empty; scale 1 / sqrt(H); no mask,
    no bias), in float64, for onnx's reference evaluator: onnxruntime 1.32 runs these forms on CUDA
    only ("Packed QKV of shape (B, L, N, 3, H) not implemented for CPU")."""
    from onnx.reference.op_run import OpRun

    class MultiHeadAttention(OpRun):
        op_domain = "com.microsoft"

        def _run(self, query, key=None, value=None, *rest, num_heads=None, **kw):
            B, L = query.shape[:2]
            if query.ndim == 5:
                q, k, v = (query[:, :, :, i, :] for i in range(3))
            elif key is not None and key.ndim == 5:
                k, v = key[:, :, :, 0, :], key[:, :, :, 1, :]
                q = query.reshape(B, L, key.shape[2], key.shape[4])
            else:
                q, k, v = (t.reshape(B, t.shape[1], num_heads, -1) for t in (query, key, value))
            q, k, v = (np.transpose(t, (0, 2, 1, 3)).astype(np.float64) for t in (q, k, v))
            s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            return (np.transpose(p @ v, (0, 2, 1, 3)).reshape(B, L, -1).astype(query.dtype),)

    return MultiHeadAttention


def test_onnxruntime_fusion_packs_per_head_and_preserves_the_function(build_fixture):
    """The fixture's packed file is onnxruntime's own fusion: one MultiHeadAttention with a packed QKV
    query from a MatMul [32, 96] reshaped to [0, 0, 4, 3, 8], one with a packed KV key [32, 64] ->
    [0, 0, 4, 2, 8]; it computes the unfused network (onnxruntime) within 1e-4."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    d = build_fixture(FIX)
    m = onnx.load(str(d / "packed.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    mha = [n for n in m.graph.node if n.op_type == "MultiHeadAttention"]
    assert [len([i for i in n.input if i]) for n in mha] == [1, 2]
    shapes = sorted(inits[n.input[1]].tolist() for n in m.graph.node if n.op_type == "Reshape"
                    and n.input[1] in inits and len(inits[n.input[1]]) == 5)
    assert shapes == [[0, 0, 4, 2, 8], [0, 0, 4, 3, 8]]
    x = np.load(d / "digits.npz")["img"][:64]
    want = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"img": x})[0]
    got = ReferenceEvaluator(m, new_ops=[_mha_reference()]).run(None, {"img": x})[0]
    assert np.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("key", sorted(KEYS))
@pytest.mark.parametrize("name", ["packed.onnx", "packed-fp16.onnx"])
def test_mark_read_from_its_part_of_the_packed_weight(build_fixture, key, name):
    d = build_fixture(FIX)
    k = load_key(d / f"key-{key}.json")
    base = extract(d / "model.onnx", k).marks[0]
    assert base.verdict == stats.DETECTED
    m = extract(d / name, k).marks[0]
    assert m.verdict == stats.DETECTED and m.matches == base.matches and m.p_value == base.p_value
    assert m.location.transform == KEYS[key]
    twin = extract(d / "twin-packed.onnx", k)
    assert twin.verdict == stats.NOT_DETECTED and twin.marks[0].p_corrected > 1e-4


def _qdq_packed_weights(src: Path, dst: Path) -> None:
    """The packed weights stored int8 per column (symmetric, zero point 0) behind a DequantizeLinear,
    as onnxruntime's QDQ quantizer writes a MatMul weight per channel."""
    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.input[1].startswith("MatMul_"):
            w = numpy_helper.to_array(inits[n.input[1]])
            scale = (np.abs(w).max(0) / 127.0).astype(np.float32)
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            base = n.input[1]
            inits[base].CopyFrom(numpy_helper.from_array(q, base + "_quantized"))
            m.graph.initializer.extend([numpy_helper.from_array(scale, base + "_scale"),
                                        numpy_helper.from_array(np.zeros_like(q[0]), base + "_zero_point")])
            nodes.append(helper.make_node("DequantizeLinear", [base + "_quantized", base + "_scale", base + "_zero_point"],
                                          [base + "_dq"], name=base + "_DequantizeLinear", axis=1))
            n.input[1] = base + "_dq"
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, str(dst))


@pytest.mark.parametrize("form", ["quantize:dynamic", "qdq-per-channel"])
def test_int8_packed_weight(build_fixture, tmp_path, form):
    """int8: onnxruntime's dynamic quantization (MatMulInteger -> Cast -> scale Mul -> Reshape) and a
    per-column Q/DQ weight: each projection's mark is read from its part; the twin's never."""
    d = build_fixture(FIX)
    for src, marked in (("packed.onnx", True), ("twin-packed.onnx", False)):
        out = tmp_path / f"int8-{src}"
        if form == "qdq-per-channel":
            _qdq_packed_weights(d / src, out)
        else:
            save(compose(load_model(d / src), form).model, out)
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert ("MatMulInteger" if form == "quantize:dynamic" else "DequantizeLinear") in ops
        for key, transform in KEYS.items():
            res = extract(out, load_key(d / f"key-{key}.json"))
            if marked:
                m = res.marks[0]
                assert res.verdict == stats.DETECTED and m.p_corrected < 1e-9, (form, key)
                assert m.location.transform == transform
            else:
                assert res.verdict == stats.NOT_DETECTED, (form, key)


def _packed_graph(shape_input: str, bias: bool, shape_value=None):
    D, N, S = 8, 2, 5
    H = D // N
    rng = np.random.default_rng(0)
    Wq, Wk, Wv = (rng.standard_normal((D, D)).astype(np.float32) for _ in range(3))
    bq, bk, bv = (rng.standard_normal(D).astype(np.float32) for _ in range(3))
    # the fusion's layout: np.dstack of the [C, N, H] views, i.e. columns (head, part, h)
    W = np.dstack([Wq.T.reshape(D, N, H), Wk.T.reshape(D, N, H), Wv.T.reshape(D, N, H)]).reshape(D, N * 3 * H)
    b = np.stack([bq.reshape(N, H), bk.reshape(N, H), bv.reshape(N, H)], axis=1).reshape(-1)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="MatMul_QKV")]
    inits = [numpy_helper.from_array(W, "W")]
    if bias:
        nodes.append(helper.make_node("Add", ["y", "b"], ["yb"], name="Add_QKV_bias"))
        inits.append(numpy_helper.from_array(b, "b"))
    nodes += [helper.make_node("Reshape", ["yb" if bias else "y", shape_input], ["p"], name="Reshape_QKV"),
              helper.make_node("MultiHeadAttention", ["p"], ["o"], name="MHA", domain="com.microsoft", num_heads=N)]
    if shape_value is not None:
        inits.append(numpy_helper.from_array(np.array(shape_value, np.int64), shape_input))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", S, D])],
                          [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["B", S, D])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    return m, (Wq, Wk, Wv), (bq, bk, bv)


def test_packed_weight_and_bias_views_are_the_projections(tmp_path):
    """Written as FusionAttentionUnet interleaves the weights (np.dstack, columns (head, part, h)), with
    a packed bias added before the Reshape: the views give each Linear's weight and bias exactly, and
    the reference semantics of the packed node equal attention of the separate projections."""
    from onnx.reference import ReferenceEvaluator

    m, Ws, bs = _packed_graph("shape", True, [0, 0, 2, 3, 4])
    onnx.save(m, str(tmp_path / "m.onnx"))
    views = {(v.weight.name, v.transform): v for v in torch_views(WeightStore.open(tmp_path / "m.onnx"))}
    for part, W, b in zip("qkv", Ws, bs):
        assert np.array_equal(views[("W", f"qkv-heads:{part}:2x3x4")].array(), W)
        assert np.array_equal(views[("b", f"qkv-heads:{part}:2x3x4")].array(), b)
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    got = ReferenceEvaluator(m, new_ops=[_mha_reference()]).run(None, {"x": x})[0]
    q, k, v = (x @ W.T + b for W, b in zip(Ws, bs))
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        a = q[..., sl] @ np.swapaxes(k[..., sl], -1, -2) / 2.0
        a = np.exp(a - a.max(-1, keepdims=True))
        heads.append((a / a.sum(-1, keepdims=True)) @ v[..., sl])
    assert np.allclose(got, np.concatenate(heads, -1), atol=1e-5)


@pytest.mark.parametrize("case", ["runtime-shape", "heads-disagree", "part-axis-moved"])
def test_reshape_not_interpreted_is_could_not_read(build_fixture, tmp_path, capsys, case):
    """The fixture's packed file with its QKV Reshape changed into one the reader cannot interpret:
    the marks on the self-attention projections are "could not read" (exit 2 for extract), never
    "not detected"."""
    d = build_fixture(FIX)
    m = onnx.load(str(d / "packed.onnx"))
    rs = next(n for n in m.graph.node if n.op_type == "Reshape" and n.input[1].startswith("MatMul_QKV"))
    init = next(t for t in m.graph.initializer if t.name == rs.input[1])
    if case == "runtime-shape":
        m.graph.initializer.append(numpy_helper.from_array(np.array([4, 3, 8], np.int64), "tail"))
        m.graph.node.insert(0, helper.make_node("Concat", ["xs", "tail"], ["rt_shape"], name="Concat", axis=0))
        m.graph.node.insert(0, helper.make_node("Shape", ["ln1_in_shape_src"], ["xs"], name="Shape", start=0, end=2))
        m.graph.node.insert(0, helper.make_node("Identity", ["img"], ["ln1_in_shape_src"], name="Identity_src"))
        rs.input[1] = "rt_shape"
    elif case == "heads-disagree":
        init.CopyFrom(numpy_helper.from_array(np.array([0, 0, 2, 3, 16], np.int64), init.name))
    else:
        init.CopyFrom(numpy_helper.from_array(np.array([0, 0, 3, 4, 8], np.int64), init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    for key in ("attn1-to_q", "attn1-to_k", "attn1-to_v"):
        res = extract(bad, load_key(d / f"key-{key}.json"))
        assert res.verdict == stats.UNREADABLE and res.marks[0].ber is None, (case, key)
        assert "MultiHeadAttention" in res.marks[0].reason
    capsys.readouterr()
    assert main(["extract", str(bad), "--key", str(d / "key-attn1-to_q.json")]) == 2
    out = capsys.readouterr()
    assert "COULD NOT READ" in out.out and "Traceback" not in out.err


def test_unet_optimizer_writes_the_packed_forms_and_they_are_read(build_fixture, tmp_path):
    """The deployer's command, `optimize_model(..., model_type="unet")` (which also fuses
    SkipLayerNormalization): the packed QKV and KV forms, every projection's mark read with the
    unfused file's bits and p, the twin's never."""
    from onnxruntime.transformers import optimizer

    d = build_fixture(FIX)
    for src, marked in (("model.onnx", True), ("twin.onnx", False)):
        opt = optimizer.optimize_model(str(d / src), model_type="unet", num_heads=4, hidden_size=32, opt_level=0)
        mha = [n for n in opt.model.graph.node if n.op_type == "MultiHeadAttention"]
        assert sorted(len([i for i in n.input if i]) for n in mha) == [1, 2]
        out = tmp_path / f"unet-{src}"
        opt.save_model_to_file(str(out))
        for key, transform in KEYS.items():
            k = load_key(d / f"key-{key}.json")
            res = extract(out, k)
            if marked:
                base = extract(d / "model.onnx", k).marks[0]
                m = res.marks[0]
                assert m.verdict == stats.DETECTED and m.matches == base.matches and m.p_value == base.p_value
                assert m.location.transform == transform
            else:
                assert res.verdict == stats.NOT_DETECTED

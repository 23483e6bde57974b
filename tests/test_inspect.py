"""`wmaudit inspect`: the facts it reports about a model, human and JSON, and its exit codes."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from auditor.cli import main


@pytest.fixture
def model_path(tmp_path):
    """Conv (8x3x3x3, external data) -> Flatten -> Gemm (transB=0, weight in a Constant node),
    plus a DequantizeLinear-quantized MatMul weight and a small bias."""
    rng = np.random.default_rng(0)
    conv_w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    fc_w = rng.standard_normal((8 * 4 * 4, 10)).astype(np.float32)   # [K, N]: torch shape 10x128
    q = rng.integers(-127, 128, size=(10, 16)).astype(np.int8)
    inits = [numpy_helper.from_array(conv_w, "conv.weight"), numpy_helper.from_array(np.zeros(8, np.float32), "conv.bias"),
             numpy_helper.from_array(q, "head.weight_quantized"),
             numpy_helper.from_array(np.array(0.02, np.float32), "head.weight_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "head.weight_zero_point")]
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
        helper.make_node("Constant", [], ["fc.w"], name="fc_const", value=numpy_helper.from_array(fc_w, "fc.w")),
        helper.make_node("Gemm", ["f", "fc.w"], ["h"], name="fc"),
        helper.make_node("DequantizeLinear", ["head.weight_quantized", "head.weight_scale", "head.weight_zero_point"], ["head.weight"], name="dq"),
        helper.make_node("MatMul", ["h", "head.weight"], ["y"], name="head"),
    ]
    g = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=10,
                          producer_name="handmade", producer_version="1.2")
    p = tmp_path / "net.onnx"
    onnx.save_model(m, p, save_as_external_data=True, location="net.onnx.data", size_threshold=512)
    return p


def test_inspect_json(model_path, capsys):
    assert main(["inspect", str(model_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "wmaudit-result/1" and doc["kind"] == "inspect"
    assert doc["model"]["sha256"].startswith("sha256:")
    assert doc["producer"] == {"name": "handmade", "version": "1.2"}
    assert doc["ir_version"] == 10 and doc["opsets"] == {"ai.onnx": 19}
    assert doc["nodes"]["total"] == 6
    assert doc["nodes"]["by_op"] == {"Constant": 1, "Conv": 1, "DequantizeLinear": 1, "Flatten": 1, "Gemm": 1, "MatMul": 1}
    size = (model_path.parent / "net.onnx.data").stat().st_size
    assert doc["external_data"] == [{"location": "net.onnx.data", "bytes": size}]
    w = {x["name"]: x for x in doc["weights"]}
    assert set(w) == {"conv.weight", "conv.bias", "fc.w", "head.weight"}  # scale / zero point are not weights
    assert w["conv.weight"]["location"] == "external:net.onnx.data" and w["conv.weight"]["params"] == 216
    assert w["conv.bias"]["location"] == "initializer"
    assert w["fc.w"]["location"] == "constant-node" and w["fc.w"]["shape"] == [128, 10]
    assert w["head.weight"]["quant"] == "qdq-per-tensor" and w["head.weight"]["stored_dtype"] == "int8"
    assert w["head.weight"]["stored_name"] == "head.weight_quantized"
    assert doc["total_params"] == 216 + 8 + 1280 + 160
    cands = {(c["weight"], c["transform"]): c for c in doc["candidates"]}
    assert set(cands) == {("conv.weight", "identity"), ("fc.w", "transpose"), ("head.weight", "transpose")}
    assert cands[("fc.w", "transpose")]["torch_shape"] == [10, 128] and cands[("fc.w", "transpose")]["kind"] == "linear"
    assert cands[("head.weight", "transpose")]["torch_shape"] == [16, 10]
    assert cands[("conv.weight", "identity")]["kind"] == "conv"


def test_inspect_human(model_path, capsys):
    assert main(["inspect", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "handmade 1.2" in out and "IR version 10" in out and "net.onnx.data" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("head.weight "))
    assert "qdq-per-tensor" in line and "int8" in line and "160" in line
    assert "10x128" in out  # the Gemm weight in torch layout


def test_inspect_bad_inputs_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.onnx")]) == 2
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 64)
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("wmaudit inspect: error:") for e in err)


def test_inspect_refuses_external_data_outside_folder(tmp_path, capsys):
    inner = tmp_path / "m"
    inner.mkdir()
    w = np.ones((4, 4), np.float32)
    (tmp_path / "w.bin").write_bytes(w.tobytes())
    t = numpy_helper.from_array(w, "W")
    onnx.external_data_helper.set_external_data(t, "../w.bin", 0, w.nbytes)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [t])
    p = inner / "m.onnx"
    p.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10).SerializeToString())
    assert main(["inspect", str(p), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "outside the model's folder" in captured.err

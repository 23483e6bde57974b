"""fp16: library warnings summarised in the notes (not printed), and int->float Casts that run."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from auditor.cli import main


def _model(path):
    """y = Cast(mask, float) * w + b, with w / b holding values outside float16's range."""
    w = np.array([1e-9, 2.0, -1e-9, 3.0], np.float32)
    b = np.array([1e5, 0.0, -1e5, 0.0], np.float32)
    g = helper.make_graph(
        [helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["m", "w"], ["p"]), helper.make_node("Add", ["p", "b"], ["y"])],
        "g", [helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.save(m, str(path))


def test_fp16_is_quiet_and_runs(tmp_path, capfd, monkeypatch):
    import onnxruntime as ort

    monkeypatch.delenv("WMAUDIT_DEBUG", raising=False)
    _model(tmp_path / "m.onnx")
    assert main(["attack", str(tmp_path / "m.onnx"), "--quantize", "fp16", "-o", str(tmp_path / "h.onnx"),
                 "--json"]) == 0
    out, err = capfd.readouterr()
    assert err == ""  # onnxconverter_common warns once per clamped extreme: 4 here, none printed
    notes = json.loads(out)["notes"]
    assert any("4 tensor extremes outside the float16 range" in n for n in notes)
    assert any("1 Cast node(s) to float retargeted to float16" in n for n in notes)
    y = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"mask": np.array([[1, 1, 0, 1]], np.int64)})[0]
    # 1e5 clamps to 1e4 (onnxconverter_common's max_finite_val); 2 and 3 are exact in float16
    np.testing.assert_allclose(y, [[1e4, 2.0, -1e4, 3.0]], rtol=1e-3)

"""onnxruntime runners: batching, input casting, availability errors."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from auditor.backends.targets import resolve
from auditor.backends import BACKENDS, availability, label_agreement, open_runner
from auditor.errors import AuditError


def _linear_model(path, batch, dtype=TensorProto.FLOAT, seed=0):
    """y = x @ W + b with a fixed (int) or symbolic (str) batch dimension."""
    rng = np.random.default_rng(seed)
    np_t = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    W = numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np_t), "W")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np_t), "b")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear", [helper.make_tensor_value_info("x", dtype, [batch, 6])],
        [helper.make_tensor_value_info("y", dtype, [batch, 4])], [W, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10  # onnxruntime 1.31 rejects the IR version make_model writes
    onnx.save(m, str(path))
    return numpy_helper.to_array(W).astype(np.float64), numpy_helper.to_array(b).astype(np.float64)


def test_batched_equals_one_by_one_on_a_trained_cnn(build_fixture):
    fx = build_fixture("bb-trigger")
    x = np.load(fx / "triggers.npy")[:23]
    with open_runner(fx / "marked.onnx", "ort-cpu") as r:
        batched = r.infer_batches(x, batch_size=8)
        single = np.concatenate([r.infer({"input": x[i:i + 1]})["logits"] for i in range(len(x))])
    assert batched.shape == (23, 10)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_fixed_batch_model_is_fed_in_its_batch_size(tmp_path):
    W, b = _linear_model(tmp_path / "fixed.onnx", batch=4)
    x = np.random.default_rng(1).standard_normal((10, 6)).astype(np.float32)
    with open_runner(tmp_path / "fixed.onnx") as r:
        assert r.fixed_batch() == 4
        y = r.infer_batches(x, batch_size=3)  # 3 is overridden by the model's fixed 4
    np.testing.assert_allclose(y, x @ W + b, rtol=1e-5, atol=1e-5)


def test_fp16_model_inputs_are_cast_and_outputs_returned_as_float32(tmp_path):
    W, b = _linear_model(tmp_path / "half.onnx", batch="N", dtype=TensorProto.FLOAT16)
    x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
    with open_runner(tmp_path / "half.onnx") as r:
        y = r.infer_batches(x, batch_size=2)
        assert r.describe()["inputs"][0]["dtype"] == "float16"
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float16).astype(np.float64) @ W + b, rtol=2e-2, atol=2e-2)


def test_unknown_and_unavailable_backends_are_user_errors(tmp_path):
    _linear_model(tmp_path / "m.onnx", batch="N")
    with pytest.raises(AuditError, match="unknown target 'onnx-magic' \\(known: native, "):
        open_runner(tmp_path / "m.onnx", "onnx-magic")
    for name in BACKENDS:
        ok, why = availability(name)
        if not ok:
            with pytest.raises(AuditError, match=f"target {resolve(name).name} is not available: "):
                open_runner(tmp_path / "m.onnx", name)
    assert availability("ort-cpu") == (True, "")


def test_missing_and_corrupt_models_are_user_errors(tmp_path):
    with pytest.raises(AuditError, match="model not found"):
        with open_runner(tmp_path / "absent.onnx"):
            pass
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(AuditError, match="cannot load junk.onnx"):
        with open_runner(tmp_path / "junk.onnx"):
            pass


def test_label_agreement_counts():
    a = np.array([[1, 0], [0, 1], [1, 0]], float)
    b = np.array([[1, 0], [1, 0], [2, 0]], float)
    got = label_agreement(a, b)
    assert got["agree"] == 2 and got["n"] == 3 and got["agreement"] == pytest.approx(2 / 3)
    assert got["max_abs_diff"] == 1.0


@pytest.mark.gpu
def test_cuda_ep_agrees_with_cpu(build_fixture):
    fx = build_fixture("bb-trigger")
    x = np.load(fx / "triggers.npy")
    with open_runner(fx / "marked.onnx", "ort-cpu") as cpu, open_runner(fx / "marked.onnx", "ort-cuda") as gpu:
        agree = label_agreement(cpu.infer_batches(x, 32), gpu.infer_batches(x, 32))
    assert agree["agreement"] >= 0.99 and agree["max_abs_diff"] < 1e-2

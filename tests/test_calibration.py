"""Calibration: real data, seeded subsets, ranges computed once and equal to onnxruntime's own."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from auditor.attacks import quantize
from auditor.data.calibration import Calibration, DatasetReader
from auditor.data.inputs import InputSpec, bind, fashion_mnist, load_data
from auditor.errors import AuditError


def test_reader_serves_every_sample_in_batches_and_rewinds():
    x = np.arange(70 * 3, dtype=np.float32).reshape(70, 3)
    r = DatasetReader(bind({"input": x}, None, [InputSpec("input", np.dtype(np.float32), ("N", 3))], source="t"))
    batches = list(r)
    assert [len(b["input"]) for b in batches] == [32, 32, 6]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), x)
    assert r.get_next() is None
    r.rewind()
    np.testing.assert_array_equal(r.get_next()["input"], x[:32])
    from onnxruntime.quantization import CalibrationDataReader

    assert isinstance(r, CalibrationDataReader)


def test_subsets_are_seeded(build_fixture, tmp_path):
    a, b, c = (fashion_mnist("calibration", 50, seed=s) for s in (1, 1, 2))
    assert a.digest == b.digest != c.digest and a.inputs["input"].shape == (50, 1, 28, 28)
    assert a.source == "fashion-mnist:train"
    model = build_fixture("attacks-tinycnn-marked") / "model.onnx"
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((300, 1, 28, 28)).astype(np.float32))
    d = load_data(str(tmp_path / "x.npy"), model, purpose="calibration", samples=100, seed=3)
    assert d.inputs["input"].shape == (100, 1, 28, 28)
    assert d.digest == load_data(str(tmp_path / "x.npy"), model, samples=100, seed=3).digest
    with pytest.raises(AuditError):
        load_data("imagenet", model)
    with pytest.raises(AuditError):
        load_data(str(tmp_path / "missing.npy"), model)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_cached_ranges_give_onnxruntimes_own_model(build_fixture, tmp_path, method):
    """quantize_static through our cache == quantize_static with the reader and no cache, byte for byte."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from auditor.data.calibration import ort_method

    model = onnx.load(str(build_fixture("attacks-tinycnn-marked") / "model.onnx"))
    cal = Calibration(fashion_mnist("calibration", 64, seed=0))
    r1 = quantize.quantize(model, "static-qdq-per-channel", cal, method=method)
    r2 = quantize.quantize(model, "static-qop", cal, method=method)  # same float model: reuse
    assert (cal.computed, cal.reused) == (1, 1)
    pre, _ = quantize.preprocess(model)
    onnx.save_model(pre, str(tmp_path / "pre.onnx"))
    quantize_static(str(tmp_path / "pre.onnx"), str(tmp_path / "direct.onnx"),
                    DatasetReader(cal.data), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=ort_method(method))
    direct = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "direct.onnx")).graph.initializer}
    ours = {i.name: numpy_helper.to_array(i) for i in r1.model.graph.initializer}
    assert direct.keys() == ours.keys()
    for k in direct:
        np.testing.assert_array_equal(ours[k], direct[k], err_msg=k)
    assert any(n.op_type == "QLinearConv" for n in r2.model.graph.node)

"""Native TensorRT runner (skipped where TensorRT / a GPU is absent) and the import rule."""
import re
from pathlib import Path

import numpy as np
import pytest

from auditor.backends import availability, label_agreement, open_runner

ROOT = Path(__file__).resolve().parent.parent


def test_tensorrt_is_imported_in_one_module_only_and_lazily():
    hits = []
    for f in (ROOT / "auditor").rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.match(r"\s*(import tensorrt|from tensorrt\b)", line):
                hits.append((f.relative_to(ROOT).as_posix(), i, line))
    assert hits, "the TensorRT backend lost its imports"
    assert {h[0] for h in hits} == {"auditor/backends/tensorrt.py"}
    assert all(h[2].startswith((" ", "\t")) for h in hits), "tensorrt must be imported inside functions"


def test_unavailable_tensorrt_explains_why():
    ok, why = availability("tensorrt")
    if ok:
        pytest.skip("TensorRT is usable here")
    assert why and ("tensorrt" in why or "CUDA" in why or "cuda" in why)


@pytest.fixture(scope="module")
def trigger_models(build_fixture, tmp_path_factory):
    from fixtures.blackbox import calibration_images, fp16_variant, int8_variant

    fx = build_fixture("bb-trigger")
    d = tmp_path_factory.mktemp("trt")
    return fx, {"fp32": fx / "marked.onnx",
                "fp16": fp16_variant(fx / "marked.onnx", d / "fp16.onnx"),
                "int8": int8_variant(fx / "marked.onnx", d / "int8.onnx", calibration_images())}


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8"])
def test_native_tensorrt_agrees_with_onnxruntime_cpu(trigger_models, variant):
    from auditor.marks import blackbox as bb
    from auditor.marks import keys
    from auditor.marks import stats

    fx, models = trigger_models
    t = bb.load_triggers(keys.load_key(fx / "key.json"))
    x = t.preprocess.model_input(t.images)
    with open_runner(models[variant], "ort-cpu") as cpu, open_runner(models[variant], "tensorrt") as trt:
        a = cpu.infer_batches(x, 32)
        b = trt.infer_batches(x, 32)
        one = np.concatenate([trt.infer({"input": x[i:i + 1]})["logits"] for i in range(5)])
        res = bb.evaluate_triggers(trt, t)
    agree = label_agreement(a, b)
    assert agree["agreement"] >= 0.97, agree
    np.testing.assert_allclose(one, b[:5], rtol=1e-2, atol=1e-2)
    assert res["verdict"] == stats.DETECTED


@pytest.mark.gpu
@pytest.mark.trt
def test_ort_tensorrt_ep_agrees_with_cpu(trigger_models):
    if not availability("ort-trt")[0]:
        pytest.skip("onnxruntime has no TensorrtExecutionProvider")
    fx, models = trigger_models
    x = np.load(fx / "triggers.npy")
    with open_runner(models["fp32"], "ort-cpu") as cpu, open_runner(models["fp32"], "ort-trt") as trt:
        agree = label_agreement(cpu.infer_batches(x, 32), trt.infer_batches(x, 32))
    assert agree["agreement"] >= 0.99, agree

"""Fidelity measures against hand-computed values and onnxruntime's own SQNR."""
from __future__ import annotations

import math

import numpy as np
import pytest

from auditor.data import fidelity


def test_hand_computed_values():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    test = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    assert fidelity.top1_agreement(ref, test) == 0.5
    # a = (1, 0, 0, 1), b = (1, 0, 1, 0): <a, b> = 1, |a| |b| = 2
    assert fidelity.cosine(ref, test) == pytest.approx(0.5, abs=1e-12)
    # |a| = sqrt 2, |a - b| = |(0, 0, -1, 1)| = sqrt 2: 0 dB
    assert fidelity.sqnr_db(ref, test) == pytest.approx(0.0, abs=1e-12)
    # |(3, 4)| = 5, |(0, -0.5)| = 0.5: 20 log10(10) = 20 dB
    assert fidelity.sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 4.5])) == pytest.approx(20.0, abs=1e-12)
    # identical outputs: the noise norm is floored at the float64 epsilon, as onnxruntime does
    assert fidelity.sqnr_db(np.array([3.0, 4.0]), np.array([3.0, 4.0])) == pytest.approx(
        20 * math.log10(5 / np.finfo(float).eps), abs=1e-9)
    assert fidelity.cosine(np.zeros(3), np.zeros(3)) == 1.0 and fidelity.cosine(np.zeros(3), np.ones(3)) == 0.0


def test_sqnr_is_onnxruntimes_definition():
    from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio as ort_sqnr

    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.1, 1.0):
        a = rng.standard_normal((50, 10)).astype(np.float32)
        b = a + scale * rng.standard_normal(a.shape).astype(np.float32)
        # the same formula; onnxruntime sums in the arrays' float32, we in float64
        assert fidelity.sqnr_db(a, b) == pytest.approx(ort_sqnr(a, b), abs=1e-4)
    assert fidelity.sqnr_db(a, a) == pytest.approx(ort_sqnr(a, a), rel=1e-9)


def test_compare_classifier_regression_and_several_outputs():
    ref = {"logits": np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 3.0, 0.0], [0.0, 0.0, 1.0]]),
           "value": np.array([[1.0], [2.0], [3.0], [4.0]])}
    test = {"logits": np.array([[2.0, 1.0, 0.0], [0.0, 2.5, 2.0], [1.0, 3.0, 0.0], [0.0, 0.0, 1.0]]),
            "value": np.array([[1.0], [2.0], [3.0], [5.0]])}
    c = fidelity.compare(ref, test)
    assert c["outputs"]["logits"]["top1_agreement"] == 0.75
    assert "top1_agreement" not in c["outputs"]["value"]  # one column: regression, no classes
    # value: |ref| = sqrt 30, |diff| = 1 -> 20 log10 sqrt 30 = 10 log10 30
    assert c["outputs"]["value"]["sqnr_db"] == pytest.approx(10 * math.log10(30), abs=1e-6)
    # logits: |ref|^2 = 5+5+10+1 = 21, |diff|^2 = 1.5^2 = 2.25
    assert c["outputs"]["logits"]["sqnr_db"] == pytest.approx(10 * math.log10(21 / 2.25), abs=1e-6)
    assert c["top1_agreement"] == 0.75
    assert c["sqnr_db"] == pytest.approx(min(10 * math.log10(30), 10 * math.log10(21 / 2.25)), abs=1e-6)
    # sequences [N, T, C]: agreement over every (example, position)
    seq_ref = np.zeros((2, 3, 4))
    seq_ref[..., 0] = 1.0
    seq_test = seq_ref.copy()
    seq_test[1, 2, 3] = 5.0
    assert fidelity.compare({"y": seq_ref}, {"y": seq_test})["top1_agreement"] == pytest.approx(5 / 6)

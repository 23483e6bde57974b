"""Torch-side attacks on the tiny marked CNN: fine-tuning and QAT, audited from the ONNX re-export."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from auditor.marks import stats  # noqa: E402
from auditor.marks import keys


def _marked_net(build_fixture):
    """Rebuild the fixture's torch weights from its ONNX file (same architecture)."""
    import onnx
    from onnx import numpy_helper

    from fixtures.attacks import _net

    d = build_fixture("attacks-tinycnn-marked")
    net = _net()
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(d / "model.onnx")).graph.initializer}
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in inits.items()})
    return net.eval(), keys.load_key(d / "key.json")


def _log10_p(net, key):
    mark = key.whitebox[0]
    w = dict(net.named_parameters())["conv2.weight"].detach().numpy()
    z = mark.matrix() @ keys.reduce_weight(w, mark.reduce)
    k = int(((z > 0).astype(np.uint8) == mark.bits).sum())
    return stats.log10_binom_tail_half(mark.n_bits, k), float(np.abs(z).min())


def test_fine_tune_and_qat_keep_the_mark_and_do_not_mutate(build_fixture, tmp_path):
    from exporters import attacks, data

    torch.set_num_threads(1)
    net, key = _marked_net(build_fixture)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = data.fashion("train", n=2000, seed=11)
    ft = attacks.fine_tune(net, x, y, epochs=1, seed=0)
    q = attacks.qat(net, x, y, epochs=1, seed=0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert not torch.equal(ft.conv2.weight, net.conv2.weight)
    assert attacks.on_int8_grid(q.conv2.weight) and not attacks.on_int8_grid(net.conv2.weight)
    for m in (ft, q):
        lp, _ = _log10_p(m, key)
        assert lp < -30
    # the QAT model exported and quantized by onnxruntime: the mark is read from int8 weights
    import onnx

    from auditor.attacks import quantize
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import fashion_mnist
    from fixtures.attacks import _export

    _export(q, tmp_path)
    r = quantize.quantize(onnx.load(str(tmp_path / "model.onnx")), "static-qdq-per-channel",
                          Calibration(fashion_mnist("calibration", 32)))
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in r.model.graph.initializer}
    w8 = inits["conv2.weight_quantized"].astype(np.float32) * inits["conv2.weight_scale"][:, None, None, None]
    np.testing.assert_allclose(w8, q.conv2.weight.detach().numpy(), rtol=0, atol=1e-6)  # QAT grid = ORT grid

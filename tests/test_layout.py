"""ONNX layout -> torch layout: RNN gate order against the ONNX reference semantics,
Linear as MatMul / Gemm, Conv followed (or not) by BatchNormalization."""
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

torch = pytest.importorskip("torch")

from auditor.read.layout import following_batchnorm, torch_views, views_of  # noqa: E402
from auditor.read.weights import WeightStore  # noqa: E402

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_rnn_views_reproduce_onnx_reference_semantics_in_torch(tmp_path, kind):
    """Random W/R/B in an ONNX RNN node, run by onnx's reference evaluator; a torch
    module loaded from our views must give the same outputs in both directions."""
    rng = np.random.default_rng(7)
    D, H, I, T, B = 2, 5, 3, 4, 2
    G = GATES[kind]
    W = rng.standard_normal((D, G * H, I)).astype(np.float32) * 0.5
    R = rng.standard_normal((D, G * H, H)).astype(np.float32) * 0.5
    Bias = rng.standard_normal((D, 2 * G * H)).astype(np.float32) * 0.5
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    attrs = {"hidden_size": H, "direction": "bidirectional"}
    if kind == "GRU":
        attrs["linear_before_reset"] = 1  # torch's GRU applies the reset gate after the matmul
    node = helper.make_node(kind, ["X", "W", "R", "B"], ["Y"], name="rnn", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [T, B, I])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R"), numpy_helper.from_array(Bias, "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    p = tmp_path / "rnn.onnx"
    onnx.save(m, p)
    y_onnx = ReferenceEvaluator(m).run(None, {"X": x})[0]  # [T, D, B, H]

    store = WeightStore.open(p)
    views = {v.transform: v for v in torch_views(store)}
    mod = getattr(torch.nn, kind)(I, H, bidirectional=True)
    with torch.no_grad():
        for d, suffix in ((0, "_l0"), (1, "_l0_reverse")):
            for tag, pname in (("W", "weight_ih"), ("R", "weight_hh"), ("Bih", "bias_ih"), ("Bhh", "bias_hh")):
                v = views[f"rnn:{kind}:{tag}:dir={d}"]
                assert v.direction == d and v.shape == tuple(getattr(mod, pname + suffix).shape)
                getattr(mod, pname + suffix).copy_(torch.from_numpy(v.array()))
        y_torch = mod(torch.from_numpy(x))[0].numpy()  # [T, B, D*H]
    y_ref = np.concatenate([y_onnx[:, 0], y_onnx[:, 1]], axis=-1)
    np.testing.assert_allclose(y_torch, y_ref, rtol=1e-5, atol=1e-5)


def test_gemm_and_matmul_views(tmp_path):
    rng = np.random.default_rng(0)
    wt = rng.standard_normal((4, 6)).astype(np.float32)   # torch Linear weight [out, in]
    inits = [numpy_helper.from_array(wt, "fc_t"), numpy_helper.from_array(wt.T.copy(), "fc_n"),
             numpy_helper.from_array(wt.T.copy(), "mm")]
    nodes = [helper.make_node("Gemm", ["x", "fc_t"], ["a"], name="g1", transB=1),
             helper.make_node("Gemm", ["x", "fc_n"], ["b"], name="g2"),
             helper.make_node("MatMul", ["x", "mm"], ["c"], name="m1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "abc"], inits)
    p = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), p)
    store = WeightStore.open(p)
    for name, transform in (("fc_t", "identity"), ("fc_n", "transpose"), ("mm", "transpose")):
        vs = {v.transform: v for v in views_of(store, store.get(name))}
        assert set(vs) == {"identity", "transpose"}  # every 2-D weight gets both
        assert vs[transform].kind == "linear" and vs[transform].shape == (4, 6)
        assert np.array_equal(vs[transform].array(), wt)


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(y.unsqueeze(1).repeat(1, 3, 1))  # Linear on a 3-D input


@pytest.fixture(scope="module")
def convbn(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = ConvBN()
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, 8, 8) * 2 + 0.5)  # non-trivial running statistics
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.2, 0.2)
    m.eval()
    d = tmp_path_factory.mktemp("convbn")
    x = (torch.randn(1, 3, 8, 8),)
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths["legacy"] = d / "legacy.onnx"
        torch.onnx.export(m, x, str(paths["legacy"]), dynamo=False, training=torch.onnx.TrainingMode.PRESERVE)
        paths["dynamo"] = d / "dynamo.onnx"
        torch.onnx.export(m, x, str(paths["dynamo"]), dynamo=True, optimize=False, verbose=False)
        paths["dynamo-optimized"] = d / "dynamo_opt.onnx"
        torch.onnx.export(m, x, str(paths["dynamo-optimized"]), dynamo=True, optimize=True, verbose=False)
    return m, paths


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_conv_bn_kept_and_linear_3d(convbn, exporter):
    m, paths = convbn
    store = WeightStore.open(paths[exporter])
    views = torch_views(store)
    conv = [v for v in views if v.kind == "conv"]
    assert len(conv) == 1 and np.array_equal(conv[0].array(), m.conv.weight.detach().numpy())
    bn = following_batchnorm(store, conv[0].weight.name)
    assert bn is not None
    for key, t in (("scale", m.bn.weight), ("bias", m.bn.bias), ("mean", m.bn.running_mean), ("var", m.bn.running_var)):
        assert np.array_equal(bn[key], t.detach().numpy()), key
    assert bn["eps"] == pytest.approx(m.bn.eps)
    # Linear on 3-D input: MatMul with a transposed weight, found as a `transpose` linear view
    fc = [v for v in views if v.kind == "linear" and v.transform == "transpose"]
    assert len(fc) == 1 and np.array_equal(fc[0].array(), m.fc.weight.detach().numpy())
    if exporter == "dynamo":  # fc.weight -> Transpose -> MatMul: the named source is the Linear weight
        named = next(v for v in views if v.weight.name == "fc.weight" and v.transform == "identity")
        assert named.kind == "linear" and np.array_equal(named.array(), m.fc.weight.detach().numpy())


def test_conv_bn_folded_by_optimizer(convbn):
    m, paths = convbn
    store = WeightStore.open(paths["dynamo-optimized"])
    conv = [v for v in torch_views(store) if v.kind == "conv"]
    assert len(conv) == 1
    assert following_batchnorm(store, conv[0].weight.name) is None
    w = m.conv.weight.detach().numpy()
    got = conv[0].array()
    assert not np.allclose(got, w, atol=1e-3)  # BN folded in: the raw weight is gone
    k = (m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)).detach().numpy()
    np.testing.assert_allclose(got, w * k[:, None, None, None], rtol=1e-5, atol=1e-6)

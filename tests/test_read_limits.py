"""Limits and onnx's external-data rules, checked before any tensor is read."""
import os
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from auditor.errors import AuditError
from auditor.read.graph import open_model
from auditor.read.weights import WeightStore
from fixtures import hostile


def _write(tmp_path, model, name="model.onnx"):
    p = tmp_path / name
    p.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return p


def _refused(path, pattern):
    with pytest.raises(AuditError, match=pattern) as e:
        WeightStore.open(path)
    assert "\n" not in str(e.value)


def test_fifo_and_device_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.onnx")
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(AuditError, open_model, tmp_path / "model.onnx")))
    t.start()
    t.join(10)
    assert done and "FIFO" in str(done[0].value)
    d = tmp_path / "dev"
    d.mkdir()
    os.symlink("/dev/zero", d / "model.onnx")
    _refused(d / "model.onnx", "device file")
    (tmp_path / "x.onnx").mkdir()
    _refused(tmp_path / "x.onnx", "directory")


@pytest.mark.parametrize("loc,make,pattern", [
    ("w.bin", lambda d, out: os.mkfifo(d / "w.bin"), "FIFO"),
    ("w.bin", lambda d, out: (d / "w.bin").mkdir(), "directory"),
    ("w.bin", lambda d, out: os.link(out, d / "w.bin"), "2 hard links"),
    ("w.bin", lambda d, out: os.symlink("/dev/zero", d / "w.bin"), "symbolic link"),
    ("sub/w.bin", lambda d, out: os.symlink(out.parent, d / "sub"), "symbolic link"),
    ("/dev/zero", lambda d, out: None, "absolute"),
    ("../outside.bin", lambda d, out: None, r"'\.\.'"),
])
def test_external_data_follows_onnx_rules(tmp_path, loc, make, pattern):
    out = tmp_path / "outside.bin"
    out.write_bytes(hostile.base_weights()["conv.weight"].tobytes())
    d = tmp_path / "case"
    d.mkdir()
    make(d, out)
    _refused(_write(d, hostile._external_model(loc)), pattern)
    assert out.stat().st_nlink <= 2


@pytest.mark.parametrize("offset,length,pattern", [(0, 2 ** 40, "length"), (10 ** 12, 288, "needs bytes"),
                                                   (1, 288, "needs bytes"), (0, 287, "length")])
def test_external_ranges(tmp_path, offset, length, pattern):
    (tmp_path / "w.bin").write_bytes(hostile.base_weights()["conv.weight"].tobytes())
    _refused(_write(tmp_path, hostile._external_model("w.bin", offset=offset, length=length)), pattern)


def test_declared_sizes_against_bytes(tmp_path):
    base = hostile.base_model()
    for dims, pattern in [([-1, 1, 3, 3], "negative dimension"), ([2 ** 62, 1, 3, 3], "over the limit"),
                          ([8, 1, 3], "raw data")]:
        m = hostile._with_init(base, "conv.weight", lambda t, d=dims: (t.ClearField("dims"), t.dims.extend(d)))
        _refused(_write(tmp_path, m), pattern)
    m = hostile._with_init(base, "conv.weight", lambda t: setattr(t, "data_type", 999))
    _refused(_write(tmp_path, m), "unknown element type 999")


def test_structure(tmp_path):
    nodes = hostile.base_nodes()
    nodes[1] = helper.make_node("Add", ["c", "f"], ["r"], name="relu")
    _refused(_write(tmp_path, hostile.make_model(nodes=nodes)), "cycle")
    nodes = hostile.base_nodes()
    nodes[2] = helper.make_node("GlobalAveragePool", ["ghost"], ["p"])
    _refused(_write(tmp_path, hostile.make_model(nodes=nodes)), "nothing defines")
    m = hostile.base_model()
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "conv.weight"))
    _refused(_write(tmp_path, m), "defined twice")
    m = hostile.base_model()
    del m.opset_import[:]
    _refused(_write(tmp_path, m), "no opset_import")
    _refused(_write(tmp_path, hostile._if_nest(200)), "nested|ONNX model")
    assert len(WeightStore.open(_write(tmp_path, hostile._if_nest(20))).model.graph.node) == 1
    os.environ["WMAUDIT_MAX_DEPTH"] = "10"
    try:
        _refused(_write(tmp_path, hostile._if_nest(12)), "nested more than 10 deep")
        assert WeightStore.open(_write(tmp_path, hostile._if_nest(10))).model.graph.node  # exactly 10 levels
    finally:
        del os.environ["WMAUDIT_MAX_DEPTH"]
    # the default limit is the deepest the protobuf reader parses: 32 levels of subgraphs read, 33 refused
    assert WeightStore.open(_write(tmp_path, hostile._if_nest(31))).model.graph.node
    assert WeightStore.open(_write(tmp_path, hostile._if_nest(32))).model.graph.node
    _refused(_write(tmp_path, hostile._if_nest(33)), "nested deeper than the protobuf reader allows")


def test_node_limit_is_linear(tmp_path, monkeypatch):
    import time

    chain = [helper.make_node("Identity", ["input" if i == 0 else f"t{i - 1}"], [f"t{i}"]) for i in range(50_000)]
    m = hostile.make_model(nodes=chain, inits=[], outputs=[helper.make_tensor_value_info("t49999", TensorProto.FLOAT, None)])
    p = _write(tmp_path, m)
    from auditor.read import limits

    model = onnx.load(p)
    t0 = time.process_time()  # CPU time: a loaded machine does not make it fail
    limits.check_model(model, tmp_path)
    assert time.process_time() - t0 < 5
    monkeypatch.setenv("WMAUDIT_MAX_NODES", "10000")
    _refused(p, "more than 10000 nodes")


@pytest.mark.parametrize("kw,pattern", [
    ({"scale": np.zeros(8, np.float32)}, "not finite and positive"),
    ({"scale": np.full(8, np.nan, np.float32)}, "not finite and positive"),
    ({"zp": np.zeros(8, np.uint8)}, "zero.point.* is uint8"),
    ({"axis": 5}, "axis 5 is out of range"),
    ({"scale": np.full(9, 0.02, np.float32), "zp": np.zeros(9, np.int8)}, "9 scales for 8 channels"),
])
def test_quantization_parameters(tmp_path, kw, pattern):
    _refused(_write(tmp_path, hostile._qdq_model(**kw)), pattern)


def test_matmulnbits_attributes(tmp_path):
    _refused(_write(tmp_path, hostile._nbits_model(K=64, b_shape=[10, 1, 8], s_len=10)), "need")
    _refused(_write(tmp_path, hostile._nbits_model(block=7)), "power of two")
    store = WeightStore.open(_write(tmp_path, hostile._nbits_model()))
    assert store.array("fc.weight").shape == (8, 10)


def test_nan_weights_are_flagged(tmp_path):
    w = hostile.base_weights()
    w["conv.weight"].flat[3] = np.nan
    m = hostile.make_model(inits=[numpy_helper.from_array(v, k) for k, v in w.items()])
    store = WeightStore.open(_write(tmp_path, m))
    with pytest.raises(AuditError, match="1 NaN and 0 infinite values of 72"):
        store.array("conv.weight")


def test_constant_folding_is_bounded(tmp_path):
    from onnx import helper as h

    w = hostile.base_weights()
    nodes = hostile.base_nodes()[:4] + [h.make_node("ConstantOfShape", ["shape"], ["big"]),
                                        h.make_node("Mul", ["big", "fc.weight"], ["bw"]),
                                        h.make_node("Gemm", ["f", "bw", "fc.bias"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()] + [
        numpy_helper.from_array(np.array([10 ** 6, 10 ** 6], np.int64), "shape")]
    store = WeightStore.open(_write(tmp_path, hostile.make_model(nodes=nodes, inits=inits)))
    assert "bw" not in store  # a constant that cannot be computed within the limit is not a weight
    with pytest.raises(AuditError, match="would hold 1000000000000 values, over the folding limit"):
        store.constant("big")


def test_invalid_utf8_names(tmp_path):
    data = hostile.base_model().SerializeToString().replace(b"relu", b"r\xffl\xfe")
    _refused(_write(tmp_path, data), "not valid UTF-8|ONNX model")

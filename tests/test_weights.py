"""WeightStore on graphs we did not write (the ONNX backend node test cases) and on
hand-built graphs: Constant nodes, If subgraphs, constant Slice/Concat chains,
external data read one tensor at a time."""
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import auditor.read.graph as graph_mod
from auditor.errors import AuditError
from auditor.read.weights import WeightStore


@pytest.fixture(scope="module")
def cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {c.name: c for c in collect_testcases(None)}


def as_initializers(case, names, path):
    """The test case's model with the named graph inputs turned into initializers
    holding the case's own input data (how the weights ship in a deployed model)."""
    m = onnx.ModelProto()
    m.CopyFrom(case.model)
    inputs = case.data_sets[0][0]
    keep = []
    for vi, val in zip(list(m.graph.input), inputs):
        if vi.name in names:
            if isinstance(val, TensorProto):
                t = TensorProto()
                t.CopyFrom(val)
                t.name = vi.name
            else:
                t = numpy_helper.from_array(np.asarray(val), vi.name)
            m.graph.initializer.append(t)
        else:
            keep.append(vi)
    del m.graph.input[:]
    m.graph.input.extend(keep)
    onnx.save(m, path)
    feeds = {vi.name: val for vi, val in zip(case.model.graph.input, inputs) if vi.name not in names}
    return path, feeds, case.data_sets[0][1]


def as_array(val):
    return numpy_helper.to_array(val) if isinstance(val, TensorProto) else np.asarray(val)


def dq_reference(x, scale, zp, axis, block_size=0):
    """The ONNX reference evaluator's DequantizeLinear (independent of auditor code)."""
    attrs = {"axis": axis}
    if block_size:
        attrs["block_size"] = block_size
    node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    return ReferenceEvaluator(node).run(None, {"x": x, "s": scale, "z": zp})[0]


# --------------------------------------------------------------------- quantized forms


def test_qlinearconv_weight_dequantized_and_consistent_with_expected_output(cases, tmp_path):
    case = cases["test_qlinearconv"]
    names = {"w", "w_scale", "w_zero_point", "x_scale", "x_zero_point", "y_scale", "y_zero_point"}
    path, feeds, expected = as_initializers(case, names, tmp_path / "m.onnx")
    store = WeightStore.open(path)
    assert [w.name for w in store.weights] == ["w"]  # scales / zero points are not weights
    w = store.get("w")
    assert w.quant == "QLinearConv" and w.stored_dtype == "uint8" and w.uses == [("QLinearConv", store.weights[0].uses[0][1], 3)]
    data = dict(zip([i.name for i in case.model.graph.input], case.data_sets[0][0]))
    ref = dq_reference(data["w"], data["w_scale"], data["w_zero_point"], 0)
    assert np.array_equal(store.array("w"), ref)
    # Float conv on dequantized tensors, requantized, gives the case's own output (within one step).
    xf = dq_reference(data["x"], data["x_scale"], data["x_zero_point"], 1)
    y = ReferenceEvaluator(helper.make_node("Conv", ["x", "w"], ["y"])).run(None, {"x": xf, "w": store.array("w")})[0]
    yq = np.clip(np.rint(y / data["y_scale"]) + data["y_zero_point"], 0, 255)
    assert np.abs(yq - expected[0].astype(np.float64)).max() <= 1


@pytest.mark.parametrize("name", ["test_qlinearmatmul_2D_int8_float32", "test_qlinearmatmul_3D_uint8_float32"])
def test_qlinearmatmul_b_dequantized(cases, tmp_path, name):
    case = cases[name]
    names = {"b", "b_scale", "b_zero_point", "a_scale", "a_zero_point", "y_scale", "y_zero_point"}
    path, feeds, expected = as_initializers(case, names, tmp_path / "m.onnx")
    store = WeightStore.open(path)
    assert [w.name for w in store.weights] == ["b"]
    w = store.get("b")
    assert w.quant == "QLinearMatMul"
    data = dict(zip([i.name for i in case.model.graph.input], case.data_sets[0][0]))
    ref = dq_reference(data["b"], data["b_scale"], data["b_zero_point"], 1)
    assert np.array_equal(store.array("b"), ref)
    af = dq_reference(data["a"], data["a_scale"], data["a_zero_point"], 1)
    y = np.matmul(af.astype(np.float64), store.array("b").astype(np.float64))
    lo, hi = (-128, 127) if data["y_zero_point"].dtype == np.int8 else (0, 255)
    yq = np.clip(np.rint(y / data["y_scale"]) + data["y_zero_point"], lo, hi)
    assert np.abs(yq - expected[0].astype(np.float64)).max() <= 1


def test_convinteger_weight_minus_per_channel_zero_point(cases, tmp_path):
    """No float scale exists in this graph: the weight is (w - w_zero_point) per output channel,
    and convolving with it reproduces the case's integer output exactly."""
    case = cases["test_convinteger_with_padding"]
    path, feeds, expected = as_initializers(case, {"w", "w_zero_points"}, tmp_path / "m.onnx")
    store = WeightStore.open(path)
    assert [w.name for w in store.weights] == ["w"]
    assert store.get("w").quant == "ConvInteger"
    data = dict(zip([i.name for i in case.model.graph.input], case.data_sets[0][0]))
    ref = data["w"].astype(np.float32) - data["w_zero_points"].astype(np.float32).reshape(-1, 1, 1, 1)
    assert np.array_equal(store.array("w"), ref)
    x = data["x"].astype(np.float32) - np.float32(data["x_zero_point"])
    y = ReferenceEvaluator(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])).run(None, {"x": x, "w": store.array("w")})[0]
    assert np.array_equal(y, expected[0].astype(np.float32))


def test_matmulinteger_weight(cases, tmp_path):
    case = cases["test_matmulinteger"]
    path, feeds, expected = as_initializers(case, {"B", "b_zero_point"}, tmp_path / "m.onnx")
    store = WeightStore.open(path)
    assert [w.name for w in store.weights] == ["B"] and store.get("B").quant == "MatMulInteger"
    data = dict(zip([i.name for i in case.model.graph.input], case.data_sets[0][0]))
    a = data["A"].astype(np.float64) - data["a_zero_point"].astype(np.float64)
    assert np.array_equal(a @ store.array("B"), expected[0].astype(np.float64))


@pytest.mark.parametrize("name,axis,label", [
    ("test_dequantizelinear", 1, "qdq-per-tensor"),
    ("test_dequantizelinear_axis", 1, "qdq-per-channel(axis=1)"),
    ("test_dequantizelinear_int4", 0, "qdq-per-tensor"),
    ("test_dequantizelinear_int16", 1, "qdq-per-tensor"),
    ("test_dequantizelinear_blocked", 1, "qdq-blocked(axis=1,block=2)"),
])
def test_dequantizelinear_weights_equal_expected_outputs(cases, tmp_path, name, axis, label):
    case = cases[name]
    names = {i.name for i in case.model.graph.input}
    path, _, expected = as_initializers(case, names, tmp_path / "m.onnx")
    store = WeightStore.open(path)
    assert [w.name for w in store.weights] == ["x"]
    w = store.get("x")
    assert w.quant == label and w.location == "initializer"
    assert np.array_equal(store.array("x"), np.asarray(expected[0], dtype=np.float32))


# --------------------------------------------------------------------- where weights live


def test_if_subgraph_constants_with_zero_initializers(cases, tmp_path):
    case = cases["test_if"]
    p = tmp_path / "if.onnx"
    onnx.save(case.model, p)
    store = WeightStore.open(p)
    assert len(store.model.graph.initializer) == 0
    by = {w.name: w for w in store.weights}
    assert set(by) == {"then_out", "else_out"}
    assert all(w.location.startswith("subgraph:") for w in by.values())
    assert np.array_equal(store.array("then_out"), np.array([1, 2, 3, 4, 5], np.float32))
    assert np.array_equal(store.array("else_out"), np.array([5, 4, 3, 2, 1], np.float32))


def _model(nodes, inits, inputs, outputs, opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def test_weights_in_constant_nodes_and_if_initializers(tmp_path):
    """0 graph initializers: weights in Constant nodes (value, value_floats) and in
    initializers of an If branch; the model still runs in onnxruntime."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((4, 3)).astype(np.float32)
    w2 = rng.standard_normal((3, 2)).astype(np.float32)
    bias = [0.5, -1.5]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "W2"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 2])],
                               [numpy_helper.from_array(w2, "W2")])
    else_g = helper.make_graph([helper.make_node("MatMul", ["h", "W2e"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 2])],
                               [numpy_helper.from_array(-w2, "W2e")])
    nodes = [
        helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(w1, "W1")),
        helper.make_node("Constant", [], ["B"], value_floats=bias),
        helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "cond")),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["z", "B"], ["y"]),
    ]
    m = _model(nodes, [], [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    store = WeightStore.open(p)
    by = {w.name: w for w in store.weights}
    assert set(by) == {"W1", "B", "W2", "W2e"}  # the bool condition is not a weight
    assert by["W1"].location == "constant-node" and by["W1"].uses == [("MatMul", "fc1", 1)]
    assert by["W2"].location == "subgraph:branch" and by["W2e"].location == "subgraph:branch"
    assert np.array_equal(store.array("W1"), w1) and np.array_equal(store.array("W2e"), -w2)
    assert np.array_equal(store.array("B"), np.array(bias, np.float32))
    # the store's arrays reproduce onnxruntime's output
    xv = rng.standard_normal((1, 4)).astype(np.float32)
    got = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
    np.testing.assert_allclose(xv @ store.array("W1") @ store.array("W2") + store.array("B"), got, rtol=1e-5, atol=1e-6)


def test_weight_built_by_slice_concat_transpose_is_folded(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal((2, 4)).astype(np.float32)
    i64 = lambda v, n: numpy_helper.from_array(np.array(v, np.int64), n)  # noqa: E731
    inits = [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "Bp"), i64([1], "s"), i64([5], "e"), i64([0], "ax")]
    nodes = [
        helper.make_node("Slice", ["A", "s", "e", "ax"], ["a_mid"]),
        helper.make_node("Concat", ["a_mid", "Bp"], ["ab"], axis=0),
        helper.make_node("Transpose", ["ab"], ["W"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
    ]
    m = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])])
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    store = WeightStore.open(p)
    by = {w.name: w for w in store.weights}
    # sources and the folded result; the intermediates (a_mid, ab) and int64 bounds are not weights
    assert set(by) == {"A", "Bp", "W"}
    assert by["W"].location == "folded:Transpose" and by["W"].shape == (4, 6) and by["W"].uses == [("MatMul", "mm", 1)]
    assert np.array_equal(store.array("W"), np.concatenate([a[1:5], b]).T)


def test_external_data_reads_only_the_asked_tensor(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    big = rng.standard_normal((256, 512)).astype(np.float32)
    small = rng.standard_normal((32, 16)).astype(np.float16)
    inits = [numpy_helper.from_array(big, "big"), numpy_helper.from_array(small, "small")]
    nodes = [helper.make_node("Cast", ["small"], ["s32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "big"], ["h"]), helper.make_node("MatMul", ["h", "s32"], ["y"])]
    m = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])])
    p = tmp_path / "m.onnx"
    onnx.save_model(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    reads = []
    real = graph_mod._read_exact
    monkeypatch.setattr(graph_mod, "_read_exact", lambda path, off, n, name, *rest: reads.append((name, off, n)) or real(path, off, n, name, *rest))
    store = WeightStore.open(p)
    assert reads == []  # opening reads no tensor data
    by = {w.name: w for w in store.weights}
    assert by["big"].location == "external:m.onnx.data" and by["small"].stored_dtype == "float16"
    got = store.array("small")
    assert got.dtype == np.float32 and np.array_equal(got, small.astype(np.float32))
    assert [r[0] for r in reads] == ["small"] and reads[0][2] == small.nbytes
    assert np.array_equal(store.array("big"), big)


def test_unknown_weight_name_is_an_audit_error(tmp_path):
    m = _model([helper.make_node("Identity", ["x"], ["y"])], [],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    store = WeightStore.open(p)
    assert store.weights == []
    with pytest.raises(AuditError, match="no weight named"):
        store.array("conv.weight")


def test_opening_does_not_mutate_a_given_model(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [numpy_helper.from_array(w, "W")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    before = m.SerializeToString()
    store = WeightStore(m)
    assert np.array_equal(store.array("W"), w)
    assert m.SerializeToString() == before


def test_nested_subgraphs_and_unevaluable_constants(tmp_path):
    """A weight two If levels deep is found; a constant chain the reference evaluator
    rejects (Reshape to an impossible shape) is left out without failing the store."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    inner = helper.make_graph([helper.make_node("Constant", [], ["deep"], value=numpy_helper.from_array(w, "deep"))],
                              "inner", [], [helper.make_tensor_value_info("deep", TensorProto.FLOAT, [2, 3])])
    inner_else = helper.make_graph([helper.make_node("Constant", [], ["flat"], value_floats=[1.0] * 6),
                                    helper.make_node("Reshape", ["flat", "shp"], ["flat2"])],
                                   "inner_else", [], [helper.make_tensor_value_info("flat2", TensorProto.FLOAT, [2, 3])])
    outer_then = helper.make_graph([helper.make_node("If", ["c"], ["o"], name="inner_if", then_branch=inner, else_branch=inner_else)],
                                   "outer_then", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2, 3])])
    outer_else = helper.make_graph([helper.make_node("Identity", ["bad"], ["o2"])], "outer_else", [],
                                   [helper.make_tensor_value_info("o2", TensorProto.FLOAT, None)])
    a = np.ones((6, 4), np.float32)
    nodes = [helper.make_node("Reshape", ["A", "bad_shape"], ["bad"], name="bad_reshape"),
             helper.make_node("If", ["c"], ["y"], name="outer_if", then_branch=outer_then, else_branch=outer_else)]
    inits = [numpy_helper.from_array(a, "A"), numpy_helper.from_array(np.array([5, 5], np.int64), "bad_shape"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "shp")]
    m = _model(nodes, inits, [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    p = tmp_path / "nested.onnx"
    onnx.save(m, p)
    store = WeightStore.open(p)
    by = {w.name: w for w in store.weights}
    assert by["deep"].location == "subgraph:inner_if" and np.array_equal(store.array("deep"), w)
    assert by["flat"].location == "subgraph:inner_if"
    # its Reshape is a branch output (no consumer): folded and listed
    assert by["flat2"].location == "folded:Reshape" and np.array_equal(store.array("flat2"), np.ones((2, 3), np.float32))
    assert "A" in by and "bad" not in by  # Reshape 24 -> 25 elements cannot be evaluated: left out


def test_kept_arrays_are_read_once_read_only_and_prefetch_errors_are_the_weights_own(tmp_path, monkeypatch):
    """keep_arrays: every weight read from the file once however often it is asked for, returned
    read-only (callers share it); with prefetch a background thread reads them, and a weight that
    cannot be judged (NaN) raises its AuditError when asked for, as without prefetch."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((128, 64)).astype(np.float32)
    b = rng.standard_normal((64, 32)).astype(np.float32)
    b[3, 4] = np.nan
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])]
    m = _model(nodes, [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])])
    p = tmp_path / "m.onnx"
    onnx.save_model(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
                    size_threshold=0)
    reads = []
    real = graph_mod._read_exact
    monkeypatch.setattr(graph_mod, "_read_exact", lambda path, off, n, name, *rest: reads.append(name) or real(path, off, n, name, *rest))
    for prefetch in (False, True):
        reads.clear()
        store = WeightStore.open(p)
        store.keep_arrays(prefetch=prefetch)
        got = [store.array("A") for _ in range(3)]
        assert all(g is got[0] for g in got) and np.array_equal(got[0], a) and not got[0].flags.writeable
        for _ in range(2):
            with pytest.raises(AuditError, match="'B' holds 1 NaN"):
                store.array("B")
        assert reads.count("A") == 1
    plain = WeightStore.open(p)
    assert plain.array("A").flags.writeable and plain.array("A") is not plain.array("A")


def test_stopping_the_prefetch_cancels_reads_not_started(tmp_path, monkeypatch):
    """A scan that fails (or ends) early does not wait for the rest of the file: the reads the
    prefetch thread has not started are cancelled, and a weight asked for afterwards is read then."""
    import threading

    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(6)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"W{i}"], [f"h{i}"]) for i in range(6)]
    m = _model(nodes, [numpy_helper.from_array(a, f"W{i}") for i, a in enumerate(arrays)],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
               [helper.make_tensor_value_info("h5", TensorProto.FLOAT, [1, 64])])
    p = tmp_path / "m.onnx"
    onnx.save_model(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="m.onnx.data",
                    size_threshold=0)
    gate, reads = threading.Event(), []
    real = graph_mod._read_exact

    def slow(path, off, n, name, *rest):
        reads.append(name)
        gate.wait(10)   # the first read holds the thread until the prefetch is stopped
        return real(path, off, n, name, *rest)

    monkeypatch.setattr(graph_mod, "_read_exact", slow)
    store = WeightStore.open(p)
    store.keep_arrays(prefetch=True)
    store.stop_prefetch()
    gate.set()
    assert np.array_equal(store.array("W3"), arrays[3])
    assert "W3" in reads and set(reads) <= {"W0", "W3"}   # at most the read already running, and W3

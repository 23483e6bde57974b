"""Deployment attacks: the mark survives, numbers match onnxruntime, sparsity is exact, inputs untouched."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from auditor.marks import keys
from auditor.marks import stats
from auditor.data.accuracy import accuracy, predict
from auditor.attacks import compose, precision, prune, quantize, simulate
from auditor.data.calibration import Calibration
from auditor.data.inputs import fashion_mnist
from auditor.errors import AuditError
from auditor.read.weights import WeightStore

MARKED, UNMARKED = "attacks-tinycnn-marked", "attacks-tinycnn-unmarked"
SURVIVES = ["quantize:dynamic", "quantize:static-qdq", "quantize:static-qdq-per-channel",
            "quantize:static-qop", "quantize:static-qop-per-channel", "fp16", "prune:0.8",
            "prune:0.8:global", "prune:0.8,quantize:dynamic", "prune:0.8,quantize:static-qdq-per-channel",
            "prune:0.8,quantize:static-qop"]


@pytest.fixture(scope="module")
def models(build_fixture):
    out = {}
    for name in (MARKED, UNMARKED):
        d = build_fixture(name)
        out[name] = (onnx.load(str(d / "model.onnx")), keys.load_key(d / "key.json"))
    return out


@pytest.fixture(scope="module")
def calibration():
    return Calibration(fashion_mnist("calibration", 128, seed=0))


@pytest.fixture(scope="module")
def heldout():
    return fashion_mnist("evaluation", 1000, seed=0)


def read_mark(model: onnx.ModelProto, key, tmp_path) -> dict:
    """The mark read through auditor.read.weights (dequantized float, ONNX layout = torch layout for Conv)."""
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    mark = key.whitebox[0]
    store = WeightStore.open(path)
    hits = [w for w in store.weights if tuple(w.shape) == tuple(mark.shape)]
    assert len(hits) == 1
    z = mark.matrix() @ keys.reduce_weight(store.array(hits[0].name), mark.reduce)
    k = int(((z > 0).astype(np.uint8) == mark.bits).sum())
    return {"ber": 1 - k / mark.n_bits, "log10_p": stats.log10_binom_tail_half(mark.n_bits, k),
            "margin_min": float(np.abs(z).min()), "quant": hits[0].quant, "dtype": hits[0].stored_dtype}


@pytest.mark.parametrize("steps", SURVIVES)
def test_256_bit_mark_survives(models, calibration, steps, tmp_path):
    model, key = models[MARKED]
    r = compose.compose(model, steps, calibration)
    got = read_mark(r.model, key, tmp_path)
    assert got["log10_p"] < -30, (steps, got)
    assert not r.simulated
    if "quantize" in steps:
        assert got["dtype"] in ("int8", "uint8") and got["quant"] is not None
        if "prune" not in steps:
            assert got["margin_min"] > 0.5  # int8 alone keeps the margins of this mark (min 2.86 before)
    if steps == "fp16":
        assert got["dtype"] == "float16"


@pytest.mark.parametrize("steps", SURVIVES + ["prune:0.95", "prune:0.5:random", "prune:0.5:l1-filter"])
def test_unmarked_model_stays_not_detected(models, calibration, steps, tmp_path):
    model, key = models[UNMARKED]
    got = read_mark(compose.compose(model, steps, calibration).model, key, tmp_path)
    assert got["log10_p"] > np.log10(stats.DEFAULT_ALPHA), (steps, got)


def test_int8_keeps_task_accuracy(models, calibration, heldout):
    model, _ = models[MARKED]
    base = accuracy(model, heldout)
    assert base > 0.80
    for mode in ("dynamic", "static-qdq-per-channel", "static-qop"):
        q = quantize.quantize(model, mode, calibration).model
        assert abs(accuracy(q, heldout) - base) < 0.02, mode


def test_qdq_weights_equal_onnxruntime_dequantization(models, calibration, tmp_path):
    """Each DequantizeLinear of a weight, run alone in onnxruntime and the reference evaluator,
    equals (q - zero_point) * scale and the float weight auditor.read.weights reads back."""
    import onnxruntime as ort

    model, _ = models[MARKED]
    for mode in ("static-qdq", "static-qdq-per-channel"):
        q = quantize.quantize(model, mode, calibration).model
        onnx.save_model(q, str(tmp_path / "q.onnx"))
        store = WeightStore.open(tmp_path / "q.onnx")
        inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
        checked = 0
        for node in q.graph.node:
            if node.op_type != "DequantizeLinear" or inits.get(node.input[0]) is None or inits[node.input[0]].ndim < 2:
                continue
            x, s, zp = (inits[n] for n in node.input[:3])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            single = helper.make_model(
                helper.make_graph([helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["y"], axis=axis)], "dq",
                                  [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(x, "x"), numpy_helper.from_array(s, "s"),
                                   numpy_helper.from_array(zp, "zp")]),
                opset_imports=[helper.make_opsetid("", 19)], ir_version=10)
            y_ort = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
            y_ref = ReferenceEvaluator(single).run(None, {})[0]
            shape = [1] * x.ndim
            if s.ndim:
                shape[axis] = -1
            y_np = (x.astype(np.float32) - zp.astype(np.float32).reshape(shape)) * s.reshape(shape)
            # one rounding of (q - zp) * scale: numpy paths agree exactly, onnxruntime's kernel (its own
            # SIMD code per CPU) within one unit in the last place
            np.testing.assert_array_equal(y_ref, y_np.astype(np.float32))
            np.testing.assert_array_max_ulp(y_ort, y_ref, maxulp=1)
            orig = node.input[0].removesuffix("_quantized")
            np.testing.assert_array_max_ulp(store.array(orig), y_ref, maxulp=1)
            float_w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == orig))
            step = s.reshape(shape) if s.ndim else s
            assert np.all(np.abs(y_ort - float_w) <= step / 2 + 1e-7)  # round-to-nearest on the int8 grid
            checked += 1
        assert checked == 3, mode  # conv1, conv2, fc


@pytest.mark.parametrize("mode", ["magnitude", "random"])
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.8, 0.95])
def test_pruning_sparsity_is_exact_per_layer(models, mode, rate, heldout):
    model, _ = models[MARKED]
    r = prune.prune(model, rate, mode=mode, seed=3)
    inits = {i.name: numpy_helper.to_array(i) for i in r.model.graph.initializer}
    assert set(r.params["layers"]) == {"conv1.weight", "conv2.weight", "fc.weight"}  # biases untouched
    for name, info in r.params["layers"].items():
        w = inits[name]
        assert int((w == 0).sum()) == prune.count(rate, w.size) == info["pruned"]
    for name in ("conv1.bias", "conv2.bias", "fc.bias"):
        np.testing.assert_array_equal(inits[name], numpy_helper.to_array(
            next(i for i in model.graph.initializer if i.name == name)))
    logits = predict(r.model, fashion_mnist("evaluation", 64, seed=0))
    assert logits.shape == (64, 10) and np.isfinite(logits).all()


def test_magnitude_pruning_removes_the_smallest(models):
    model, _ = models[MARKED]
    w0 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "conv2.weight"))
    w1 = numpy_helper.to_array(next(i for i in prune.prune(model, 0.6).model.graph.initializer
                                    if i.name == "conv2.weight"))
    kept, gone = np.abs(w0[w1 != 0]), np.abs(w0[w1 == 0])
    assert gone.max() <= kept.min()
    np.testing.assert_array_equal(w1[w1 != 0], w0[w1 != 0])


def test_global_pruning_is_exact_in_total(models):
    model, _ = models[MARKED]
    r = prune.prune(model, 0.8, mode="global")
    total = sum(v["size"] for v in r.params["layers"].values())
    zeros = sum(int((numpy_helper.to_array(i) == 0).sum()) for i in r.model.graph.initializer
                if i.name in r.params["layers"])
    assert zeros == prune.count(0.8, total) == 7251
    # one threshold: every pruned |w| <= every kept |w| across layers
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in r.model.graph.initializer}
    gone = np.concatenate([np.abs(before[n][after[n] == 0]) for n in r.params["layers"]])
    kept = np.concatenate([np.abs(before[n][after[n] != 0]) for n in r.params["layers"]])
    assert gone.max() <= kept.min()


@pytest.mark.parametrize("mode,axis", [("l1-filter", 0), ("l1-channel", 1)])
def test_structured_pruning_zeroes_whole_channels(models, mode, axis):
    model, _ = models[MARKED]
    r = prune.prune(model, 0.5, mode=mode)
    w0 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "conv2.weight"))
    w = numpy_helper.to_array(next(i for i in r.model.graph.initializer if i.name == "conv2.weight"))
    other = tuple(a for a in range(4) if a != axis)
    dead = np.all(w == 0, axis=other)
    assert int(dead.sum()) == prune.count(0.5, w.shape[axis])
    norms = np.abs(w0).sum(axis=other)
    assert norms[dead].max() <= norms[~dead].min()
    np.testing.assert_array_equal(np.compress(~dead, w, axis), np.compress(~dead, w0, axis))
    # fc (Gemm, transB=1): filters are rows, channels are columns
    fc = numpy_helper.to_array(next(i for i in r.model.graph.initializer if i.name == "fc.weight"))
    assert int(np.all(fc == 0, axis=1 - axis).sum()) == prune.count(0.5, fc.shape[axis])


@pytest.mark.parametrize("mode", ["magnitude", "global", "l1-filter"])
def test_pruning_an_int8_qdq_file_zeroes_dequantized_values(models, calibration, mode, tmp_path):
    """int8 then pruning: a QDQ per-channel file is pruned in its dequantized weights (each pruned
    entry set to its zero point, so it dequantizes to exactly 0); the kept integers are untouched, the
    pruned ones are the smallest dequantized magnitudes (whole filters of least L1 norm), and
    onnxruntime runs the file."""
    model, _ = models[MARKED]
    q = quantize.quantize(model, "static-qdq-per-channel", calibration).model
    r = prune.prune(q, 0.5, mode=mode)
    assert set(r.params["quantized_layers_pruned"]) == set(r.params["layers"]) and len(r.params["layers"]) == 3
    ints0 = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    ints1 = {i.name: numpy_helper.to_array(i) for i in r.model.graph.initializer}
    for tag, m in (("q", q), ("p", r.model)):
        onnx.save_model(m, str(tmp_path / f"{tag}.onnx"))
    s0, s1 = WeightStore.open(tmp_path / "q.onnx"), WeightStore.open(tmp_path / "p.onnx")
    deq = {w.name: (s0.array(w.name), s1.array(w.name)) for w in s0.weights
           if w.quant is not None and len(w.shape) >= 2}          # (the int32 biases are not pruned)
    assert len(deq) == 3
    z0 = {n: int((a == 0).sum()) for n, (a, b) in deq.items()}
    z1 = {n: int((b == 0).sum()) for n, (a, b) in deq.items()}
    for name in r.params["layers"]:
        a0, a1 = ints0[name], ints1[name]
        changed = a1 != a0
        assert a1.dtype == a0.dtype and not np.any(a1[changed])     # set to the zero point (0: symmetric int8)
    for w0, w1 in deq.values():
        np.testing.assert_array_equal(w1[w1 != 0], w0[w1 != 0])    # what is kept dequantizes as before
    if mode == "magnitude":
        for n, (w0, w1) in deq.items():
            assert z1[n] == max(prune.count(0.5, w0.size), z0[n])
            assert np.abs(w0[w1 == 0]).max() <= np.abs(w0[w1 != 0]).min()
    elif mode == "global":
        total = sum(a.size for a, _ in deq.values())
        assert prune.count(0.5, total) <= sum(z1.values()) <= prune.count(0.5, total) + sum(z0.values())
    else:
        for w0, w1 in deq.values():   # conv [O, I, k, k] and Gemm [out, in] (transB=1): filters on axis 0
            dead = np.all(w1.reshape(w1.shape[0], -1) == 0, axis=1)
            assert dead.sum() >= prune.count(0.5, w1.shape[0])
    logits = predict(r.model, fashion_mnist("evaluation", 64, seed=0))
    assert logits.shape == (64, 10) and np.isfinite(logits).all()


def test_pruning_leaves_4_bit_qdq_weights_alone():
    """A 4-bit weight behind a DequantizeLinear is not pruned (written back it would change type
    against its zero point): one clear refusal, nothing rewritten."""
    w = helper.make_tensor("w_q", onnx.TensorProto.INT4, [4, 2, 3, 3],
                           np.random.default_rng(0).integers(-7, 8, 72).tolist())
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
                           helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 8, 8])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [w, numpy_helper.from_array(np.full(4, 0.1, np.float32), "w_s"),
                           helper.make_tensor("w_z", onnx.TensorProto.INT4, [4], [0, 0, 0, 0])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    with pytest.raises(AuditError, match="4-bit") as e:
        prune.prune(m, 0.5)
    assert "\n" not in str(e.value) and "prune before quantizing" in str(e.value)


def test_pruning_refuses_bad_rates_and_quantized_models(models, calibration):
    model, _ = models[MARKED]
    for bad in (-0.1, 1.0, "x"):
        with pytest.raises(AuditError):
            prune.prune(model, bad)
    q = quantize.quantize(model, "static-qop", calibration).model  # every weight is int8
    with pytest.raises(AuditError, match="prune before quantizing"):
        prune.prune(q, 0.5)


ATTACKS = [
    lambda m, c: quantize.quantize(m, "dynamic"),
    lambda m, c: quantize.quantize(m, "static-qdq-per-channel", c),
    lambda m, c: quantize.quantize(m, "static-qop", c, reduce_range=True, weight_type="uint8"),
    lambda m, c: precision.to_fp16(m),
    lambda m, c: precision.to_int4(m),
    lambda m, c: prune.prune(m, 0.7, mode="global"),
    lambda m, c: prune.prune(m, 0.7, mode="l1-channel"),
    lambda m, c: simulate.simulate_int8(m, names=["conv2.weight"]),
    lambda m, c: compose.compose(m, "prune:0.5:random,quantize:static-qdq", c),
]


@pytest.mark.parametrize("attack", range(len(ATTACKS)))
def test_attacks_do_not_mutate_their_input(models, calibration, attack):
    model, _ = models[MARKED]
    before = model.SerializeToString(deterministic=True)
    r = ATTACKS[attack](model, calibration)
    assert model.SerializeToString(deterministic=True) == before
    assert r.model is not model and r.model.ir_version <= 10


def _gru_model(seed=0, hidden=8, inp=5):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((1, 3 * hidden, inp)).astype(np.float32) * 0.3
    R = rng.standard_normal((1, 3 * hidden, hidden)).astype(np.float32) * 0.3
    g = helper.make_graph(
        [helper.make_node("GRU", ["x", "W", "R"], ["y", "h"], hidden_size=hidden)], "gru",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 2, inp])],
        [helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(R, "R")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_simulated_gru_int8_equals_spec_quantize_dequantize():
    import onnxruntime as ort

    m = _gru_model()
    assert simulate.rnn_weight_names(m) == ["W", "R"]
    for gran in ("per-tensor", "per-channel"):
        r = simulate.simulate_int8(m, granularity=gran)
        assert r.simulated and "simulated" in r.notes[0]
        for name in ("W", "R"):
            w = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == name))
            got = numpy_helper.to_array(next(i for i in r.model.graph.initializer if i.name == name))
            if gran == "per-tensor":
                s = np.float32(np.abs(w).max() / np.float32(127))
                qdq = helper.make_graph(
                    [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"]),
                     helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq", [],
                    [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                    [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(s, np.float32), "s"),
                     numpy_helper.from_array(np.array(0, np.int8), "z")])
                ref = ReferenceEvaluator(helper.make_model(qdq, opset_imports=[helper.make_opsetid("", 19)],
                                                           ir_version=10)).run(None, {})[0]
                np.testing.assert_array_equal(got, ref)
            else:
                for row in range(w.shape[1]):
                    s = np.abs(w[0, row]).max() / np.float32(127)
                    assert np.all(np.abs(got[0, row] - w[0, row]) <= s / 2 * (1 + 1e-6))
                    assert len(np.unique(np.round(got[0, row] / s))) <= 255
            assert not np.array_equal(got, w)
        x = np.random.default_rng(1).standard_normal((4, 2, 5)).astype(np.float32)
        h0 = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
        h1 = ort.InferenceSession(r.model.SerializeToString()).run(None, {"x": x})[0]
        assert 0 < np.abs(h0 - h1).max() < 0.05


def test_int4_quantizes_matmul_weights():
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    B = rng.standard_normal((64, 32)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "B"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 64])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(B, "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    r = precision.to_int4(m, block_size=32)
    assert [n.op_type for n in r.model.graph.node] == ["MatMulNBits"]
    x = rng.standard_normal((3, 64)).astype(np.float32)
    y = ort.InferenceSession(r.model.SerializeToString()).run(None, {"x": x})[0]
    err = np.abs(y - x @ B).max() / np.abs(x @ B).max()
    assert 0 < err < 0.15  # 4-bit weights: visible but bounded error


def test_compose_order_and_errors(models, calibration):
    model, _ = models[MARKED]
    r = compose.compose(model, "prune:0.5,quantize:static-qdq", calibration)
    assert r.params["order"] == ["prune:0.5", "quantize:static-qdq"]
    assert r.params["steps"][0]["mode"] == "magnitude" and r.params["steps"][1]["mode"] == "static-qdq"
    for bad in ("", "prune", "prune:x", "prune:0.5:nope", "quantize:int3", "fp16:1", "shrink:2"):
        with pytest.raises(AuditError):
            compose.parse_steps(bad)
    with pytest.raises(AuditError, match="calibration"):
        quantize.quantize(model, "static-qdq", None)


def test_batchnorm_folding_is_opt_in(calibration):
    """quant_pre_process folds BatchNorm unless skip_optimization: default keeps it, and says so."""
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])], "convbn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 28, 28])],
        [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "g"),
         numpy_helper.from_array(np.zeros(4, np.float32), "b"), numpy_helper.from_array(np.zeros(4, np.float32), "m"),
         numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "v")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    kept, notes = quantize.preprocess(m)
    assert [n.op_type for n in kept.graph.node].count("BatchNormalization") == 1 and "kept" in notes[-1]
    folded, notes = quantize.preprocess(m, keep_batchnorm=False)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    assert "1 of 1 BatchNormalization folded" in notes[-1]

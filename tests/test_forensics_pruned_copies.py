"""Split copies in a magnitude-pruned layer (auditor.forensics.canon.pruned_copy_pairs): pruning zeroes
the entries of each row below one threshold, so a copy scaled by 0.3 loses entries its 0.7 twin keeps
and the two stop being parallel. They are merged again; rows that merely share a support pattern, or
that are proportional where both keep entries but hold large entries the other lacks, are not."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from auditor.attacks.prune import prune
from auditor.forensics import canon
from auditor.read import channels as ch
from auditor.read.weights import WeightStore

IN, K = 4, 3          # conv A reads 4 channels with 3x3 kernels: rows of 36 entries


def _pair_model(W1: np.ndarray, b1: np.ndarray, W2: np.ndarray) -> onnx.ModelProto:
    """x -> Conv A (W1, b1) -> Relu -> Conv B (W2, 1x1): A's output channels are B's input channels."""
    inits = [numpy_helper.from_array(W1.astype(np.float32), "A.weight"),
             numpy_helper.from_array(b1.astype(np.float32), "A.bias"),
             numpy_helper.from_array(W2.astype(np.float32), "B.weight")]
    nodes = [helper.make_node("Conv", ["x", "A.weight", "A.bias"], ["a"], name="A", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "B.weight"], ["y"], name="B")]
    g = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, IN, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, W2.shape[0], 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _groups(model: onnx.ModelProto, tmp_path):
    """(neuron groups of B's input channels through A, the cleaning of B, A's stored weight)."""
    p = tmp_path / "m.onnx"
    onnx.save(model, str(p))
    gv = canon.GraphValues(WeightStore.open(p))
    lay = next(l for l in ch.layers(gv.model, gv.graph) if l.name == "B")
    pflow = gv.input_flow(lay)
    assert pflow is not None and pflow.layer.name == "A" and not pflow.blocked
    return canon.neuron_groups(gv, pflow), canon.clean(gv, lay), gv.value("A.weight")


def _layer(seed: int = 0):
    """A with 12 channels: 8 random, channel 0 split into copies scaled 0.3 (channel 0) and 0.7
    (channel 8), B reading both with channel 0's column (0.3 relu(z) + 0.7 relu(z) = relu(z)); channels
    9 / 10 share one support pattern (40 % zeros, entries 1-3 in size, same signs) without being
    proportional; channel 11 is twice channel 9 where 9 is non-zero, with entries of size 1.5 where 9 is
    zero (0.75 once scaled to 9: over 4 times the threshold pruning leaves in this layer)."""
    rng = np.random.default_rng(seed)
    N = IN * K * K
    base = rng.standard_normal((8, N))
    bias = rng.standard_normal(8) * 0.5
    zeros = rng.random(N) < 0.4
    sign = np.where(rng.random(N) < 0.5, -1.0, 1.0)
    p = np.where(zeros, 0.0, sign * rng.uniform(1.0, 3.0, N))
    q = np.where(zeros, 0.0, sign * rng.uniform(1.0, 3.0, N))
    big = np.where(zeros, 1.5 * sign, 2.0 * p)
    rows = np.concatenate([0.3 * base[:1], base[1:], 0.7 * base[:1], p[None], q[None], big[None]])
    b1 = np.concatenate([0.3 * bias[:1], bias[1:], 0.7 * bias[:1], [0.2, 0.3, 0.4]])
    W2 = rng.standard_normal((6, 12, 1, 1))
    W2[:, 8] = W2[:, 0]
    return rows.reshape(12, IN, K, K), b1, W2


def test_split_copies_merged_after_magnitude_pruning(tmp_path):
    W1, b1, W2 = _layer()
    src = _pair_model(W1, b1, W2)
    # before pruning: the 0.3 / 0.7 copies are exactly parallel, the layer is not taken as pruned
    g0, _, A0 = _groups(src, tmp_path)
    assert canon.pruned_threshold(A0.reshape(12, -1)) is None
    assert [[j for j, _ in m] for m in g0.members if len(m) > 1] == [[0, 8]]

    pruned = prune(src, 0.2).model      # auditor.attacks' magnitude pruning, per layer
    g, cl, A = _groups(pruned, tmp_path)
    Af = A.reshape(12, -1)
    assert abs(float((Af == 0).mean()) - 0.2) < 0.01
    # the copies are no longer parallel: the 0.3 copy lost entries the 0.7 copy keeps
    E = np.concatenate([Af, b1[:, None]], axis=1)
    U = E / np.linalg.norm(E, axis=1, keepdims=True)
    assert float(U[0] @ U[8]) < canon.COS_EQUAL
    assert int(((Af[0] == 0) & (Af[8] != 0)).sum()) >= 2 and int(((Af[8] == 0) & (Af[0] != 0)).sum()) == 0
    theta = canon.pruned_threshold(Af)
    kept = np.abs(Af[Af != 0])
    assert theta == float(kept.min())      # float weights: the smallest kept |w|
    # merged, with the factor of the entries both keep; the look-alikes are not
    multi = [m for m in g.members if len(m) > 1]
    assert [[j for j, _ in m] for m in multi] == [[0, 8]], multi
    assert abs(multi[0][1][1] - 0.7 / 0.3) < 1e-5
    assert g.splits == 1 and g.dummies == 0 and g.cliques == 0 and len(g.keep) == 11
    assert any(u.startswith("input neurons (via A)") and "1 split copies merged (12 -> 11)" in u for u in cl.undone)
    # B's columns of the copies (pruned too) summed with the copies' factor: relu(0.7 z) = 0.7 / 0.3 relu(0.3 z)
    Bp = numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "B.weight")).astype(np.float64)
    merged = cl.weight[:, g.keep.index(0)]
    assert np.allclose(merged.reshape(-1), (Bp[:, 0] + 0.7 / 0.3 * Bp[:, 8]).reshape(-1), rtol=1e-5, atol=1e-6)
    # the verification alone, on every pair of the layer: the same single pair
    allp = list(itertools.combinations(range(12), 2))
    got = canon.pruned_copy_pairs(Af, np.ones(12), b1, theta, False, canon.COS_EQUAL, candidates=allp)
    assert list(got) == [(0, 8)] and abs(got[(0, 8)] - 0.7 / 0.3) < 1e-5
    # pairs 9/10 and 9/11 are rejected for the reasons they were built for
    a, b, c = Af[9], Af[10], Af[11]
    assert np.array_equal(a != 0, b != 0)
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) < 0.99       # same support, not proportional
    both = (a != 0) & (c != 0)
    assert np.allclose(c[both], 2.0 * a[both]) and np.abs(c[(a == 0) & (c != 0)]).min() / 2.0 > 4 * theta


def test_pruned_copy_search_finds_what_every_pair_finds(tmp_path):
    """The masked-level search misses no pair the verification accepts: a layer of 160 rows, 40 of
    them scaled copies (ratios 0.1-10, groups of 2-4) of other rows, pruned by 30 %."""
    rng = np.random.default_rng(3)
    C, N = 160, IN * K * K
    W = rng.standard_normal((C, N)) * rng.uniform(0.5, 2.0, (C, 1))
    b = rng.standard_normal(C) * 0.3
    src = rng.choice(120, size=40, replace=True)
    for k, s in enumerate(src):
        t = float(np.exp(rng.uniform(np.log(0.1), np.log(10.0))))
        W[120 + k], b[120 + k] = W[s] * t, b[s] * t
    W2 = rng.standard_normal((4, C, 1, 1))
    model = prune(_pair_model(W.reshape(C, IN, K, K), b, W2), 0.3).model
    p = tmp_path / "m.onnx"
    onnx.save(model, str(p))
    A = canon.GraphValues(WeightStore.open(p)).value("A.weight").reshape(C, -1)
    theta = canon.pruned_threshold(A)
    assert theta is not None
    f = np.ones(C)
    found = canon.pruned_copy_pairs(A, f, b, theta, False, canon.COS_EQUAL)
    every = canon.pruned_copy_pairs(A, f, b, theta, False, canon.COS_EQUAL,
                                    candidates=list(itertools.combinations(range(C), 2)))
    assert found == every
    # every planted copy whose smaller row keeps enough entries is found (directly or through its source)
    want = {(int(min(s, 120 + k)), int(max(s, 120 + k))) for k, s in enumerate(src)}
    assert len(want & set(found)) >= 30 and not {(i, j) for i, j in found if i < 120 and j < 120}


def test_a_dense_layer_is_told_apart_by_a_sample_and_a_pruned_one_never():
    """The sample before the exact count: a dense layer (no zeros, or fewer than a quarter of the
    pruned share) is rejected by it; a layer holding the pruned share of zeros, wherever they are
    (spread, or packed in a block of rows), is never rejected by it, and the exact count decides."""
    import numpy as np

    from auditor.forensics import canon

    rng = np.random.default_rng(4)
    W = rng.standard_normal((512, 300)).astype(np.float32)
    assert not canon._may_be_pruned(W) and canon.pruned_threshold(W) is None
    for layout in ("spread", "rows"):
        P = W.copy()
        if layout == "spread":
            P[np.abs(P) < np.quantile(np.abs(P), canon.PRUNED_SHARE)] = 0.0
        else:
            P[:int(canon.PRUNED_SHARE * 512) + 1, ::2] = -0.0
            P[:int(canon.PRUNED_SHARE * 512) + 1, 1::2] = 0.0
            P[0, 0] = 1.0           # (not a dead row: the share counts over live rows)
        assert canon._may_be_pruned(P), layout
    P = W.copy()
    P[np.abs(P) < np.quantile(np.abs(P), 0.2)] = 0.0
    assert canon.pruned_threshold(P) is not None

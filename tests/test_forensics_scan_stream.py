"""The scan walks the file: memory bounded by a few weights, a file that changes under it refused,
and the copy search exact and never quadratic on degenerate layers."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from auditor.errors import AuditError
from auditor.marks.evidence import committed_mark
from auditor.marks.keys import Key, load_key, save_key


def _chain(out: Path, n: int, side: int, marked: int, zero=(), seed: int = 0) -> tuple[Path, Path]:
    """x @ W0 @ ... @ W{n-1} (float32 [side, side], one external data file), a committed 64-bit
    `mean` mark written into W{marked} (the minimal-norm change giving every bit a margin of 3 sd),
    the layers in `zero` all zeros. Returns (model, key)."""
    rng = np.random.default_rng(seed)
    mark = committed_mark("stream test", f"chain-{n}-{side}", "2026-12-06", param=f"W{marked}", shape=(side, side),
                          reduce="mean", n_bits=64)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "model.onnx.data"
    inits, nodes, off = [], [], 0
    with open(data, "wb") as f:
        for i in range(n):
            W = np.zeros((side, side)) if i in zero else rng.standard_normal((side, side))   # [in, out]
            if i == marked:
                X = mark.matrix()
                y = X @ W.mean(axis=1)
                W = W + (X.T @ np.linalg.solve(X @ X.T, (2.0 * mark.bits - 1.0) * 3.0 * float(y.std()) - y))[:, None]
            b = W.astype(np.float32).tobytes()
            f.write(b)
            t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[side, side])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(off)), ("length", str(len(b)))):
                e = t.external_data.add()
                e.key, e.value = k, v
            off += len(b)
            inits.append(t)
            nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"W{i}"], [f"h{i}"]))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                          [helper.make_tensor_value_info(f"h{n - 1}", TensorProto.FLOAT, [1, side])], inits)
    model = out / "model.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(model))
    key = out / "key.json"
    save_key(Key([mark], model={"name": "chain"}), key)
    return model, key


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return _chain(tmp_path_factory.mktemp("chain"), 60, 128, marked=20)


def test_scan_holds_a_few_weights_not_the_file(chain):
    from auditor.forensics.scan import LOOKAHEAD, scan

    model, key = chain
    r = scan(model, [load_key(key)])
    f = r["findings"][0]
    assert f["verdict"] == "detected" and f["matches"] == 64 and f["found"]["weight"] == "W20"
    t = r["tried"]
    file_bytes = (model.parent / "model.onnx.data").stat().st_size
    largest = 128 * 128 * 4
    # the layer, what its cleaning reads (the layer feeding it, LOOKAHEAD - 2 layers on) over the last
    # two steps, and the weights read ahead (LOOKAHEAD): a bound in weights, whatever the file's length
    assert t["peak_weight_bytes_held"] <= (2 * LOOKAHEAD + 2) * largest
    assert t["peak_weight_bytes_held"] < file_bytes / 3
    assert t["weight_views_read"] == t["weight_views"] == 120   # every square weight read both ways


def test_scan_says_what_it_read_and_held(chain, capsys):
    import re

    from auditor.cli import main

    model, key = chain
    assert main(["scan", str(model), "--key", str(key)]) == 0
    out = capsys.readouterr().out
    m = re.search(r"read (\d+) of (\d+) weight views .* at most ([\d.]+) MiB of weights held at once", out)
    assert m and m.group(1) == m.group(2) == "120", out
    assert 0 < float(m.group(3)) * 2 ** 20 < (model.parent / "model.onnx.data").stat().st_size / 3


def test_scan_streaming_matches_holding_every_weight(chain):
    """The walk gives what holding every weight gives (the reference path keeps them all)."""
    from auditor.forensics import canon
    from auditor.forensics.scan import _reduce, candidates, mark_variants, scan
    from auditor.read.weights import WeightStore

    model, key = chain
    k = load_key(key)
    r = scan(model, [k])
    store = WeightStore.open(model)
    gv = canon.GraphValues(store)
    m = k.whitebox[0]
    vs = mark_variants(m, candidates(store, gv), gv, [])
    Y = m.matrix() @ np.stack([_reduce(m, v) for v in vs], axis=1)
    best = int(((Y > 0) == m.bits[:, None].astype(bool)).sum(axis=0).max())
    assert r["tried"]["variants"] == len(vs)
    assert r["findings"][0]["matches"] == best == 64
    store.stop_prefetch()


def _cut_during(monkeypatch, action):
    """Run `action` once the scan has opened the model (before its walk reads the weights)."""
    import auditor.forensics.scan as scanmod

    orig = scanmod._walk

    def walk(*a, **k):
        action()
        return orig(*a, **k)

    monkeypatch.setattr(scanmod, "_walk", walk)


def test_scan_refuses_a_file_truncated_while_it_is_scanned(tmp_path, monkeypatch, capsys):
    from auditor.cli import main

    model, key = _chain(tmp_path / "m", 12, 64, marked=6)
    data = model.parent / "model.onnx.data"
    _cut_during(monkeypatch, lambda: os.truncate(data, data.stat().st_size // 2))
    rc = main(["scan", str(model), "--key", str(key), "-o", str(tmp_path / "out.json")])
    err = capsys.readouterr().err.strip().splitlines()
    # the read checks the file's size before reading a tensor and counts what the read returned
    assert rc == 2 and len(err) == 1 and "model.onnx.data" in err[0], err
    assert "tensor needs bytes" in err[0] or "ends after" in err[0], err
    assert "Traceback" not in err[0] and not (tmp_path / "out.json").exists()


def test_scan_refuses_a_file_rewritten_while_it_is_scanned(tmp_path, monkeypatch):
    from auditor.forensics.scan import scan

    model, key = _chain(tmp_path / "m", 12, 64, marked=6)
    data = model.parent / "model.onnx.data"

    def rewrite():
        b = bytearray(data.read_bytes())
        b[:4] = bytes(4)
        data.write_bytes(bytes(b))                  # same size, other bytes
        st = data.stat()
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))

    _cut_during(monkeypatch, rewrite)
    with pytest.raises(AuditError, match="changed while it was scanned"):
        scan(model, [load_key(key)])


def test_scan_reads_past_an_all_zero_layer(tmp_path):
    """A layer of zeros: every row has norm 0, none copies another (the copy search left them out
    instead of comparing every pair), and the mark elsewhere is found."""
    from auditor.forensics.scan import scan

    model, key = _chain(tmp_path / "m", 6, 1024, marked=1, zero=(3,))
    f = scan(model, [load_key(key)])["findings"][0]
    assert f["verdict"] == "detected" and f["matches"] == 64


def test_copy_search_is_exact():
    """The gridded copy search finds exactly the pairs a comparison of every pair finds."""
    from auditor.forensics import canon

    rng = np.random.default_rng(5)
    for C, N in ((200, 12), (300, 48)):
        U = rng.standard_normal((C, N))
        U[5], U[10], U[40] = U[7] * 3.0, U[3], U[41] + 1e-7
        U[60:70] = U[59]                       # a clique of eleven copies
        U /= np.linalg.norm(U, axis=1, keepdims=True)
        dummy = np.zeros(C, bool)
        dummy[[7, 100]] = True
        got = canon.copy_pairs(U, dummy)
        G, want = U @ U.T, {}
        for i, j in itertools.combinations(range(C), 2):
            if not dummy[i] and not dummy[j] and G[i, j] >= canon.COS_EQUAL:
                want.setdefault(i, set()).add(j)
                want.setdefault(j, set()).add(i)
        assert got == want and 3 in got and 40 in got and len(got[60]) == 10 and 5 not in got


def test_scan_reads_each_weight_once(chain, monkeypatch):
    """The walk keeps the weights it will visit next and the neuron analysis of the layers either
    side, so no weight is read twice (a square weight is visited as two views, one read)."""
    from auditor.forensics.scan import scan
    from auditor.read.weights import WeightStore

    model, key = chain
    reads: list[str] = []
    orig = WeightStore._read

    def counted(self, w):
        reads.append(w.name)
        return orig(self, w)

    monkeypatch.setattr(WeightStore, "_read", counted)
    f = scan(model, [load_key(key)])["findings"][0]
    assert f["verdict"] == "detected" and f["matches"] == 64
    assert sorted(reads) == sorted(f"W{i}" for i in range(60))


@pytest.mark.parametrize("shape,transposed", [((1024, 700), False), ((700, 1024), True), ((600, 16, 3, 3), False),
                                              ((1000, 3), False), ((100, 50), False)])
def test_mean_over_outputs_is_the_float64_mean(shape, transposed):
    """The blocked float32 sums stay within the bound every float32 summation order meets
    (MEAN_BLOCK - 1 roundings of the sum of magnitudes), on any CPU's BLAS; small weights take
    numpy's float64 mean."""
    from auditor.forensics.scan import MEAN_BLOCK, mean_over_outputs

    rng = np.random.default_rng(3)
    W = (rng.standard_normal(shape) + 0.25).astype(np.float32)
    if transposed:
        W = np.ascontiguousarray(W.T).T        # the torch view of a MatMul weight: F-ordered
    got = mean_over_outputs(W)
    want = W.astype(np.float64).mean(axis=0).reshape(-1)
    bound = (MEAN_BLOCK - 1) * 2.0 ** -24 * np.abs(W.astype(np.float64)).mean(axis=0).reshape(-1) + 1e-12
    assert got.dtype == np.float64 and got.shape == want.shape
    assert np.all(np.abs(got - want) <= bound)

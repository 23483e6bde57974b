"""Forensics: obfuscation as an attack, scanning obfuscated files, provenance.

Fixtures (fixtures/forensics.py): the marked SmallCNNs (cnn-small-mean / -flatten) and an
independently trained twin (seed 1) obfuscated on features.conv2.weight with every step
alone and all together, then BN-folded and int8; descendants (fine-tuned, 50 % pruned,
int8, both); twins from seeds 1 and 2; a model carrying two owners' marks.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from auditor.marks.keys import load_key

OB_FILES = ["perm-in", "perm-out", "scale", "split-4", "dummy-4", "clique-4", "all", "all-bnfold", "all-int8"]
QUICK = ["perm-in", "all", "all-int8"]
# Without the reference, input-side scales are canonicalised through the feeding layer's
# BatchNorm gamma; once that BatchNorm is folded (all-bnfold, all-int8) they are not recoverable.
# every obfuscation, BatchNorm folded or not: the folded input scales are canonicalised by the marked
# layer's own column norms (256/256; the feeding layer's row norms alone gave 231/256, at alpha's edge)
NO_REF_RECOVERABLE = ["perm-in", "perm-out", "scale", "split-4", "dummy-4", "clique-4", "all", "all-bnfold",
                      "all-int8"]
DERIVED = ["finetuned", "pruned50", "int8", "pruned50-int8"]


def _wmaudit(*args):
    r = subprocess.run([sys.executable, "-m", "auditor", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def fx(build_fixture):
    return {n: build_fixture(n) for n in ("cnn-small-mean", "cnn-small-flatten", "forensics-twin-seed1",
                                          "forensics-obfuscated", "forensics-derived")}


# ------------------------------------------------------------------ obfuscate
def test_obfuscate_is_function_preserving_on_real_images(fx):
    """Every obfuscated file computes what its source computes: max |diff| on 256 Fashion-MNIST
    test images below 1e-4 and identical predicted classes."""
    import onnxruntime as ort

    from auditor.data import datasets

    x, _ = datasets.fashion_mnist("test")
    x = (x[:256].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    run = lambda p: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]  # noqa: E731
    y0 = run(fx["cnn-small-mean"] / "model.onnx")
    info = json.loads((fx["forensics-obfuscated"] / "info.json").read_text())
    for name in OB_FILES[:7]:
        y = run(fx["forensics-obfuscated"] / "mean" / f"{name}.onnx")
        assert float(np.abs(y - y0).max()) < 1e-4, name
        assert (y.argmax(1) == y0.argmax(1)).all(), name
        assert info["files"][f"mean/{name}"]["max_abs_diff"] < 1e-4
    m = onnx.load(str(fx["forensics-obfuscated"] / "mean" / "all.onnx"))
    w = {t.name: list(t.dims) for t in m.graph.initializer}
    assert w["features.conv2.weight"] == [32 + 4 + 4 + 2, 32, 3, 3]   # split:4, dummy:4, clique:2


def test_obfuscate_in_compose_and_refusals(fx, tmp_path):
    from auditor.attacks import load_model
    from auditor.attacks.compose import compose, parse_steps
    from auditor.errors import AuditError

    from auditor.gate.policy import check_steps

    assert check_steps("obfuscate:perm-in+perm-out,quantize:dynamic", "t") == "obfuscate:perm-in+perm-out,quantize:dynamic"
    steps = parse_steps("obfuscate:perm-in+split:3,prune:0.1")
    assert [str(s) for s in steps] == ["obfuscate:perm-in+split:3", "prune:0.1"]
    m = load_model(fx["cnn-small-mean"] / "model.onnx")
    r = compose(m, "obfuscate:perm-out+split:3", obfuscate_layer="features.conv3.weight", obfuscate_seed=2)
    dims = {t.name: list(t.dims) for t in r.model.graph.initializer}
    assert dims["features.conv3.weight"] == [67, 32, 3, 3]
    assert dims["classifier.fc1.weight"] == [600, 67 * 49]          # through MaxPool and Reshape
    assert r.params["steps"][0]["max_abs_diff"] < 1e-4
    with pytest.raises(AuditError, match="unknown obfuscation step"):
        parse_steps("obfuscate:perm-sideways")
    rc, out, err = _wmaudit("obfuscate", fx["cnn-small-mean"] / "model.onnx", "--steps", "split:4",
                            "--layer", "nope", "-o", tmp_path / "x.onnx")
    assert rc == 2 and err.count("\n") == 1 and "no Conv/Gemm/MatMul" in err
    assert not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------ scan
def _scan(path, keys, refs=()):
    from auditor.forensics.scan import scan

    return scan(path, [load_key(k) for k in keys], references=refs)


@pytest.mark.parametrize("name", ["perm-in", "scale", "all"])
def test_scan_finds_mark_in_obfuscated_files_without_reference(fx, name):
    key = fx["cnn-small-mean"] / "key.json"
    r = _scan(fx["forensics-obfuscated"] / "mean" / f"{name}.onnx", [key])
    f = r["findings"][0]
    assert f["verdict"] == "detected" and f["matches"] >= 250 and f["log10_p_corrected"] < -30, f
    # every weight of rank >= 2 is a view considered; only those that could fit the mark's shape
    # (here the marked conv and the other conv of its input width) are read and become candidates
    t = r["tried"]
    assert t["weight_views"] >= 7 and 1 <= t["candidate_tensors"] <= t["weight_views_read"] < t["weight_views"]


def test_scan_bn_folded_obfuscation_without_the_reference(fx):
    """All steps, then BatchNorm folded and int8: the input-side scales hide in the folded
    weights; without the reference they are canonicalised, not undone (the output says so): the
    marked layer's columns over their own norms (the feeding layer's row norms alone gave 231/256,
    at alpha's edge once the 32! input permutation is paid for) read the mark; with the reference
    it is exact."""
    key, ref = fx["cnn-small-mean"] / "key.json", fx["cnn-small-mean"] / "model.onnx"
    path = fx["forensics-obfuscated"] / "mean" / "all-int8.onnx"
    r = _scan(path, [key])
    assert any("input channels" in c and "own norms" in c for c in r["cannot_recover"])
    f = r["findings"][0]
    assert f["verdict"] == "detected" and f["matches"] >= 240 and f["log10_p_corrected"] < -15, f.get("matches")
    assert "input scales canonicalised: columns over their own norms" in f["undone"]
    f = _scan(path, [key], (ref,))["findings"][0]
    assert f["verdict"] == "detected" and f["matches"] == 256 and f["found"]["source"].startswith("reference")


@pytest.mark.parametrize("name", QUICK)
def test_scan_flatten_mark_with_reference(fx, name):
    """A flatten mark needs both permutations undone: with the owner's model it is found exactly."""
    key = fx["cnn-small-flatten"] / "key.json"
    ref = fx["cnn-small-flatten"] / "model.onnx"
    path = fx["forensics-obfuscated"] / "flatten" / f"{name}.onnx"
    f = _scan(path, [key], refs=(ref,))["findings"][0]
    assert f["verdict"] == "detected" and f["matches"] >= 250, f
    assert f["found"]["source"].startswith("reference") or "anchors" in " ".join(f["undone"])


@pytest.mark.parametrize("name", QUICK)
def test_scan_never_detects_in_unmarked_twin(fx, name):
    keys = [fx["cnn-small-mean"] / "key.json", fx["cnn-small-flatten"] / "key.json"]
    refs = (fx["cnn-small-mean"] / "model.onnx",)
    r = _scan(fx["forensics-obfuscated"] / "twin" / f"{name}.onnx", keys, refs)
    assert r["detected"] == 0
    for f in r["findings"]:
        assert f["verdict"] == "not detected" and f["log10_p_corrected"] > -3, f  # ~0 measured; alpha 1e-6


def test_scan_reports_several_marks_in_one_file(build_fixture, fx):
    d = build_fixture("forensics-two-marks")
    rc, out, err = _wmaudit("scan", d / "model.onnx", "--keys", d, "--key", fx["cnn-small-mean"] / "key.json",
                            "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "wmaudit-result/1" and doc["kind"] == "scan"
    res = doc["result"]
    assert res["tried"]["keys"] == 3 and res["detected"] == 2
    by = {f["key_commitment"]: f for f in res["findings"]}
    for k in ("keyA.json", "keyB.json"):
        f = by[load_key(d / k).commitment]
        assert f["verdict"] == "detected" and f["matches"] == 256
    assert by[load_key(fx["cnn-small-mean"] / "key.json").commitment]["verdict"] == "not detected"
    bits = json.loads((d / "keyA.json").read_text())["whitebox"][0]["bits"]
    assert bits not in out                                        # never the key's bits


def test_scan_result_is_deterministic(fx):
    from auditor import results

    path = fx["forensics-obfuscated"] / "mean" / "all-int8.onnx"
    keys = [fx["cnn-small-mean"] / "key.json"]
    refs = (fx["cnn-small-mean"] / "model.onnx",)
    assert results.dumps(_scan(path, keys, refs)) == results.dumps(_scan(path, keys, refs))


def test_scan_exit_codes(fx, tmp_path):
    key = fx["cnn-small-mean"] / "key.json"
    rc, _, _ = _wmaudit("scan", fx["forensics-twin-seed1"] / "model.onnx", "--key", key)
    assert rc == 1
    rc, _, err = _wmaudit("scan", tmp_path / "missing.onnx", "--key", key)
    assert rc == 2 and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("src,name", [(s, n) for s in ("mean", "flatten", "twin") for n in OB_FILES])
def test_scan_full_grid(fx, src, name):
    """Every obfuscated file: marked ones detected with the reference (mean also without), twins never."""
    keysrc = "cnn-small-flatten" if src == "flatten" else "cnn-small-mean"
    key, ref = fx[keysrc] / "key.json", fx[keysrc] / "model.onnx"
    path = fx["forensics-obfuscated"] / src / f"{name}.onnx"
    with_ref = _scan(path, [key], (ref,))["findings"][0]
    no_ref = _scan(path, [key])["findings"][0]
    if src == "twin":
        assert with_ref["verdict"] != "detected" and no_ref["verdict"] != "detected"
    else:
        assert with_ref["verdict"] == "detected"
        if src == "mean":
            assert (no_ref["verdict"] == "detected") == (name in NO_REF_RECOVERABLE)


# ------------------------------------------------------------------ provenance
def _prov(path, ref, **kw):
    from auditor.forensics.provenance import provenance

    return provenance(path, ref, **kw)


@pytest.mark.parametrize("name", ["int8", "pruned50-int8", "finetuned"])
def test_provenance_derived_descendants(fx, name):
    r = _prov(fx["forensics-derived"] / f"{name}.onnx", fx["cnn-small-mean"] / "model.onnx")
    assert r["verdict"] == "derived" and r["log10_p_combined"] < -100, r["log10_p_combined"]
    assert len(r["layers"]) == 5


def test_provenance_obfuscated_derived_and_twins_not(fx):
    ref = fx["cnn-small-mean"] / "model.onnx"
    nulls = (fx["forensics-twin-seed1"] / "model.onnx",)   # seed 2 joins in the slow tests
    r = _prov(fx["forensics-obfuscated"] / "mean" / "all-int8.onnx", ref, null_models=nulls)
    assert r["verdict"] == "derived"
    assert r["calibration"]["false_positives"] == 0 and r["calibration"]["min_log10_p"] > -2
    t = _prov(fx["forensics-obfuscated"] / "twin" / "all.onnx", ref)
    assert t["verdict"] == "not derived" and t["log10_p_combined"] > -2
    # an independent model's weights do not settle the matching: the activations on probe inputs do
    assert any(l["matching"].startswith("activations") for l in t["layers"])
    assert all(l["matching"] != "activations on probe inputs" for l in r["layers"])


def test_provenance_cli(fx):
    rc, out, err = _wmaudit("provenance", fx["forensics-twin-seed1"] / "model.onnx",
                            "--reference", fx["cnn-small-mean"] / "model.onnx", "--json")
    assert rc == 1, err
    doc = json.loads(out)
    assert doc["kind"] == "provenance" and doc["result"]["verdict"] == "not derived"


@pytest.mark.slow
@pytest.mark.parametrize("path", [f"forensics-derived/{n}.onnx" for n in DERIVED]
                         + [f"forensics-obfuscated/mean/{n}.onnx" for n in OB_FILES]
                         + [f"forensics-obfuscated/twin/{n}.onnx" for n in OB_FILES]
                         + ["forensics-twin-seed1/model.onnx", "forensics-twin-seed2/model.onnx"])
def test_provenance_full(fx, build_fixture, path):
    name, rest = path.split("/", 1)
    r = _prov(build_fixture(name) / rest, fx["cnn-small-mean"] / "model.onnx",
              null_models=(build_fixture("forensics-twin-seed2") / "model.onnx",))
    assert r["calibration"]["false_positives"] == 0
    expect = "not derived" if ("twin" in path) else "derived"
    assert r["verdict"] == expect


# ------------------------------------------------------------------ report
def test_html_report_renders_scan_and_provenance(fx, tmp_path):
    key = fx["cnn-small-mean"] / "key.json"
    a, b = tmp_path / "scan.json", tmp_path / "prov.json"
    rc, _, err = _wmaudit("scan", fx["forensics-obfuscated"] / "mean" / "all.onnx", "--key", key, "-o", a)
    assert rc == 0, err
    rc, _, err = _wmaudit("provenance", fx["forensics-derived"] / "int8.onnx",
                          "--reference", fx["cnn-small-mean"] / "model.onnx", "-o", b)
    assert rc == 0, err
    rc, _, err = _wmaudit("report", a, b, "-o", tmp_path / "r.html")
    assert rc == 0, err
    html = (tmp_path / "r.html").read_text()
    assert "Forensic scan" in html and "input permutation fitted" in html
    assert "Model provenance test" in html and "derived" in html and "classifier.fc1.weight" in html


# ------------------------------------------------------------------ foreign files
def random_keys_for(path, n: int, seed: int, bits: int = 64):
    """n random generator keys whose marks have the shapes of the file's conv / linear / RNN weights
    (mean and flatten alternately): keys fixed without looking at the values."""
    from auditor.marks.keys import Key, make_mark, reduced_length
    from auditor.read.layout import torch_views
    from auditor.read.weights import WeightStore

    views = [v for v in torch_views(WeightStore.open(path))
             if len(v.shape) >= 2 and v.kind in ("conv", "linear", "rnn") and int(np.prod(v.shape)) >= 64]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        v = views[i % len(views)]
        red = "mean" if (i // len(views)) % 2 == 0 else "flatten"
        if reduced_length(v.shape, red) < bits:  # a key never has more bits than coefficients
            red = "flatten"
        mk = make_mark(f"w{i}", v.shape, red, rng.integers(0, 2, bits), seed=int(rng.integers(1 << 31)), id=f"r{i}")
        k = Key([mk], model={"name": "random", "index": i})
        k.commitment = k.to_json()["commitment"]
        out.append(k)
    return out


@pytest.mark.parametrize("name", ["ppocr_cls", "silero_vad"])
def test_scan_third_party_files_random_keys_never_detected(name):
    """Files nobody marked, 20 random keys of their own weights' shapes each: 0 detections
    (the full count, 1,000 keys over all five files, is in bench/bench_scan.py)."""
    import os
    from pathlib import Path

    from auditor.forensics.scan import scan

    p = Path(os.environ.get("WMAUDIT_DATA", "build/data")) / "thirdparty" / f"{name}.onnx"
    if not p.is_file():
        pytest.skip(f"{p} is missing: run `make data`")
    r = scan(p, random_keys_for(p, 20, seed=1))
    assert r["detected"] == 0 and len(r["findings"]) == 20
    assert all(f.get("log10_p_corrected", 0.0) > -6 for f in r["findings"])


def test_scan_every_layer_split_and_dummy_then_int8(fx, tmp_path):
    """Dummy neurons on consecutive layers feed each other (a dummy's column is non-zero only
    into the next layer's dummies): still removed, and the mark read without the reference
    after int8."""
    from auditor.attacks import load_model
    from auditor.attacks.compose import compose
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import load_data

    m = load_model(fx["cnn-small-mean"] / "model.onnx")
    r = compose(m, "obfuscate:split:4+dummy:4,quantize:static-qdq-per-channel",
                Calibration(load_data("fashion-mnist", m, purpose="calibration", samples=64, seed=0)),
                obfuscate_seed=3)
    onnx.save_model(r.model, str(tmp_path / "q.onnx"))
    f = _scan(tmp_path / "q.onnx", [fx["cnn-small-mean"] / "key.json"])["findings"][0]
    assert f["verdict"] == "detected" and f["matches"] == 256
    assert any("4 dummy" in u and "(40 -> 32)" in u for u in f["undone"]) and f["found"]["quant"]


def test_filters_removed_by_structured_pruning(fx, tmp_path):
    """4 of 32 filters of the marked conv removed (shape [28, 32, 3, 3]), then permuted: the mean
    mark is read without the reference (the mean over the remaining rows), the flatten mark with
    it (the missing reference rows zero-filled), and provenance still says derived."""
    from auditor.attacks import load_model
    from auditor.attacks.compose import compose
    from auditor.forensics.provenance import provenance

    for mark in ("mean", "flatten"):
        src = fx[f"cnn-small-{mark}"]
        r = compose(load_model(src / "model.onnx"), "prune-filters:4,obfuscate:perm-in+perm-out",
                    obfuscate_layer="features.conv2.weight", obfuscate_seed=4)
        path = tmp_path / f"{mark}.onnx"
        onnx.save_model(r.model, str(path))
        refs = () if mark == "mean" else (src / "model.onnx",)
        f = _scan(path, [src / "key.json"], refs)["findings"][0]
        assert f["verdict"] == "detected" and f["found"]["shape_in_file"] == [28, 32, 3, 3], f
    p = provenance(tmp_path / "mean.onnx", fx["cnn-small-mean"] / "model.onnx")
    assert p["verdict"] == "derived"
    conv2 = next(l for l in p["layers"] if l["weight"] == "features.conv2.weight")
    assert conv2["unmatched"] == 4 and conv2["rows_above_rho0"] == 28


def test_copy_pairs_equal_brute_force_in_high_dimension():
    """The pruned search for copied neurons finds exactly the pairs a full Gram matrix finds,
    also for wide layers (N = 1024), where one random direction separates nothing."""
    from auditor.forensics import canon

    rng = np.random.default_rng(3)
    for C, N in [(64, 9), (300, 128), (1500, 1024)]:
        rows = rng.standard_normal((C, N))
        rows[5], rows[11], rows[40] = rows[7] * 2.0, rows[12] * 0.5, rows[12] * 3.0
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        dummy = np.zeros(C, bool)
        dummy[40] = True
        G = unit @ unit.T
        brute = {(i, j) for i in range(C) for j in range(C)
                 if i != j and not dummy[i] and not dummy[j] and G[i, j] >= canon.COS_EQUAL}
        found = {(i, j) for i, js in canon.copy_pairs(unit, dummy).items() for j in js}
        assert found == brute == {(5, 7), (7, 5), (11, 12), (12, 11)}


def test_outgoing_norms_and_rows_equal_the_built_columns(fx):
    """The cleaning measures outgoing columns by sums of squares (no copy of the next layer's
    weight) and builds columns only for a few rows: both equal the full column matrix, on files
    with dummy neurons in consecutive layers (whose columns are restricted to live outputs)."""
    from auditor.forensics import canon
    from auditor.read import channels as ch
    from auditor.read.weights import WeightStore

    checked = 0
    for name in ("all", "dummy-4", "split-4"):
        store = WeightStore.open(fx["forensics-obfuscated"] / "mean" / f"{name}.onnx")
        store.keep_arrays(prefetch=True)
        gv = canon.GraphValues(store)
        for lay in ch.layers(gv.model, gv.graph):
            flow = gv.flow(lay)
            if flow.blocked:
                continue
            full = canon.outgoing(gv, flow)
            assert np.allclose(canon.outgoing_norms(gv, flow), np.linalg.norm(full, axis=1), rtol=1e-5, atol=1e-7)
            rows = [flow.channels - 1, 0, flow.channels // 2]
            assert np.array_equal(canon.outgoing(gv, flow, rows=rows), full[rows])
            live = canon.live_outputs(gv, lay, 2)
            checked += 1
            if name == "dummy-4" and live is not None:
                assert int((~live).sum()) in (0, 4)
    assert checked >= 9

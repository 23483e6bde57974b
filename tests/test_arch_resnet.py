"""The ResNet report: a residual CNN marked on a late conv (128 bits, mean) by a key without
BatchNorm anchors, exported with torch's default settings (BatchNorm folded, no manifest).

Fixture ``arch-resnet`` (fixtures/arch.py): 32x32 Fashion-MNIST, torchvision's
zero_init_residual, training seed 1, where the folded per-channel scales of the BN after
the marked conv scatter the mean-reduced weights: without the owner's BN the folded export
reads chance-level bits (50/128 measured on an AVX2 CPU; the count depends on the training
run, the claim "not detected without the reference" does not).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from auditor.data.calibration import Calibration
from auditor.data.inputs import load_data
from auditor.gate.gate import gate_document
from auditor.gate.policy import load_policy
from auditor.gate.robustness import Config, Grid, run_grid
from auditor.marks.keys import load_key
from auditor.marks.whitebox import extract

ROOT = Path(__file__).resolve().parent.parent
ATTACKS = ("quantize:dynamic", "quantize:static-qdq", "quantize:static-qdq-per-channel", "quantize:static-qop",
           "fp16", "prune:0.5")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "auditor", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def resnet(build_fixture):
    return build_fixture("arch-resnet")


def _folded_scale_balance(kept: Path, bn: str = "layer2.1.bn2") -> float:
    """sum s / sum |s| of the folded scales s = gamma / sqrt(var + eps) of the BN after the marked conv."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(kept))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    node = next(n for n in m.graph.node if n.op_type == "BatchNormalization" and n.input[1] == f"{bn}.weight")
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    s = inits[node.input[1]] / np.sqrt(inits[node.input[4]] + eps)
    return float(s.sum() / np.abs(s).sum())


def test_folded_export_without_reference_is_not_detected_and_says_what_to_give(resnet):
    # the fixture's premise (fixtures/arch.py): the folded scales nearly cancel in the mean over
    # filters (-0.009 measured), so the folded weights do not carry the mark; a training run that
    # does not give this would read it without the reference, and this line says why first
    balance = _folded_scale_balance(resnet / "kept.onnx")
    assert abs(balance) < 0.05, f"fixture premise broken: sum s / sum |s| = {balance:.3f} (fixtures/arch.py)"
    m = extract(resnet / "default.onnx", load_key(resnet / "key.json")).marks[0]
    assert m.n_bits == 128 and m.verdict == "not detected" and m.p_value > 1e-3
    assert m.location.how == "name" and m.location.weight == "layer2.1.conv2.weight"
    assert m.batchnorm["status"] == "probably-folded"
    assert any("FuseBatchNormIntoConv" in e for e in m.batchnorm["evidence"])
    assert any("layer2.1.conv2.weight_bias" in e for e in m.batchnorm["evidence"])
    assert any("--reference" in n and "--anchors-from" in n for n in m.notes)


def test_reference_undoes_the_folding(resnet):
    key = load_key(resnet / "key.json")
    folded = extract(resnet / "default.onnx", key, reference=resnet / "kept.onnx").marks[0]
    kept = extract(resnet / "kept.onnx", key).marks[0]
    assert folded.batchnorm["status"] == "folded" and kept.batchnorm["status"] == "kept"
    assert folded.matches == kept.matches == 128 and folded.p_value < 1e-38
    # the folding undone gives the owner's weights back (float rounding aside)
    assert folded.margin_min == pytest.approx(kept.margin_min, rel=1e-4)
    assert folded.normalized_margin_min == pytest.approx(kept.normalized_margin_min, rel=1e-4)
    assert 0.0 < kept.normalized_margin_min < kept.normalized_margin_median < 1.0


def test_twin_never_detected_even_with_reference(resnet):
    m = extract(resnet / "twin.onnx", load_key(resnet / "key.json"), reference=resnet / "kept.onnx").marks[0]
    assert m.verdict == "not detected" and m.p_value > 1e-3 and 0.3 < m.ber < 0.7


def test_key_import_anchors_from_makes_the_reference_unnecessary(resnet, tmp_path):
    key = load_key(resnet / "key.json")
    mk = key.whitebox[0]
    np.save(tmp_path / "bits.npy", mk.bits)
    np.save(tmp_path / "X.npy", mk.matrix())
    r = _cli("key", "import", "--matrix", str(tmp_path / "X.npy"), "--bits", str(tmp_path / "bits.npy"),
             "--param", mk.param, "--shape", ",".join(map(str, mk.shape)), "--reduce", "mean",
             "--anchors-from", str(resnet / "kept.onnx"), "-o", str(tmp_path / "key.json"))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "key.json").read_text())
    bn = doc["whitebox"][0]["batchnorm"]
    assert len(bn["gamma"]) == len(bn["running_var"]) == 32 and bn["eps"] == pytest.approx(1e-5)
    assert doc["whitebox"][0]["imported"]["anchors_from"]["model"] == "kept.onnx"
    r = _cli("extract", str(resnet / "default.onnx"), "--key", str(tmp_path / "key.json"), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["result"]["marks"][0]
    assert m["matches"] == 128 and m["batchnorm"]["status"] == "folded"
    assert m["batchnorm"]["anchors_from"] == "anchors stored in the key"
    # the folded model has no BN to take anchors from: one line, exit 2, no key written
    r = _cli("key", "import", "--matrix", str(tmp_path / "X.npy"), "--bits", str(tmp_path / "bits.npy"),
             "--param", mk.param, "--shape", ",".join(map(str, mk.shape)), "--reduce", "mean",
             "--anchors-from", str(resnet / "default.onnx"), "-o", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "BatchNorm" in r.stderr
    assert not (tmp_path / "bad.json").exists()


@pytest.fixture(scope="module")
def grid_docs(resnet):
    key = load_key(resnet / "key.json")
    grid = Grid(tuple(Config(a, a) for a in ATTACKS))
    cal = Calibration(load_data(str(resnet / "calib.npy"), resnet / "default.onnx", purpose="calibration",
                                samples=64, seed=0))
    with_ref = run_grid(resnet / "default.onnx", key, grid, cal, jobs=1, progress=False,
                        reference=resnet / "kept.onnx")
    without = run_grid(resnet / "default.onnx", key, Grid((Config("quantize:static-qdq", "quantize:static-qdq"),)),
                       cal, jobs=1, progress=False)
    return with_ref, without


def test_robustness_with_reference_detects_through_every_attack(grid_docs):
    doc, _ = grid_docs
    assert doc["summary"]["all_survived"] and doc["summary"]["survived"] == len(ATTACKS)
    assert doc["reference"]["path"].endswith("kept.onnx")
    for row in [doc["baseline"]] + doc["configs"]:
        mk = row["marks"][0]
        assert mk["batchnorm"] == "folded", row.get("name")
        assert mk["ber"] <= 0.02 and mk["p_value"] < 1e-30, (row.get("name"), mk["ber"])
        assert mk["normalized_margin_min"] > -0.01
        # no per-bit values in the grid's JSON
        assert "signed_margins" not in mk and "bits" not in mk
        assert sum(mk["margin_histogram"]["counts"]) == 128


def test_robustness_without_reference_reports_not_detected(grid_docs):
    _, doc = grid_docs
    mk = doc["configs"][0]["marks"][0]
    assert not doc["summary"]["all_survived"] and mk["batchnorm"] == "probably-folded"
    assert mk["p_value"] > 1e-3 and mk["ber"] > 0.3  # chance level (0.61 measured)


POLICY = """
format = "wmaudit-policy/1"
name = "resnet"
backends = ["ort-cpu"]
[thresholds]
max_p_value = 1e-6
max_ber = 0.05
min_normalized_margin = 0.0
[evidence]
accuracy = false
[calibration]
data = "{calib}"
samples = 64
[[attacks]]
id = "int8-qdq-per-channel"
steps = "quantize:static-qdq-per-channel"
[[attacks]]
id = "int8-folding-bn"
steps = "quantize:static-qdq"
options = {{ keep_batchnorm = false }}
[[attacks]]
id = "fp16"
steps = "fp16"
"""


@pytest.fixture(scope="module")
def policy(resnet, tmp_path_factory):
    # data a policy names lies next to it (paths leaving the policy's folder are refused)
    d = tmp_path_factory.mktemp("resnet-gate")
    shutil.copyfile(resnet / "calib.npy", d / "calib.npy")
    p = d / "policy.toml"
    p.write_text(POLICY.format(calib="calib.npy"))
    return p


@pytest.fixture(scope="module")
def gate_with_reference(resnet, policy):
    return gate_document(resnet / "default.onnx", load_key(resnet / "key.json"), load_policy(policy),
                         policy_path=policy, reference=resnet / "kept.onnx")


def test_gate_on_default_export_passes_with_reference_fails_without(resnet, policy, gate_with_reference):
    key, pol = load_key(resnet / "key.json"), load_policy(policy)
    ok = gate_with_reference
    assert ok["verdict"] == "pass" and ok["summary"]["requirements"] == 4
    assert all(r["measured"]["batchnorm"] == "folded" for r in ok["requirements"])
    assert ok["reference"]["path"].endswith("kept.onnx")
    bad = gate_document(resnet / "default.onnx", key, pol, policy_path=policy)
    assert bad["verdict"] == "fail"
    assert all("--reference" in r["message"] for r in bad["requirements"])
    twin = gate_document(resnet / "twin.onnx", key, pol, policy_path=policy, reference=resnet / "kept.onnx")
    assert twin["summary"]["passed"] == 0
    for doc in (ok, bad, twin):  # the key's bits never leave the key file
        for cell in doc["attacks"]:
            for m in cell["whitebox"]["marks"]:
                assert "bits" not in m and "signed_margins" not in m


def test_gate_keep_batchnorm_false_undone_with_the_unattacked_model(resnet, policy):
    """The BN-kept model, a key without anchors: the attack that folds BN is undone with the
    BN the gate still sees in the unattacked model."""
    doc = gate_document(resnet / "kept.onnx", load_key(resnet / "key.json"), load_policy(policy),
                        policy_path=policy)
    assert doc["verdict"] == "pass"
    status = {r["attack"]: r["measured"]["batchnorm"] for r in doc["requirements"]}
    assert status["original"] == "kept" and status["int8-folding-bn"] == "folded"
    folded = next(r for r in doc["requirements"] if r["attack"] == "int8-folding-bn")
    assert folded["measured"]["ber"] == 0.0


def test_gate_report_shows_the_reference(resnet, gate_with_reference):
    from auditor.report import html, terminal

    doc = gate_with_reference
    text = terminal.render_gate(doc)
    assert f"reference:  {resnet / 'kept.onnx'}" in text and "BN folded" in text
    page = html.provenance(doc)
    assert "reference (BN folding undone)" in page and doc["reference"]["sha256"] in page


def test_cli_robustness_and_gate_take_the_reference(resnet, tmp_path):
    (tmp_path / "grid.toml").write_text('[grid]\nquantize = ["dynamic", "fp16"]\n')
    r = _cli("robustness", str(resnet / "default.onnx"), "--key", str(resnet / "key.json"), "--grid",
             str(tmp_path / "grid.toml"), "--data", str(resnet / "calib.npy"), "--no-accuracy", "--jobs", "1",
             "--reference", str(resnet / "kept.onnx"), "-o", str(tmp_path / "grid"))
    assert r.returncode == 0, r.stderr
    assert "survived 2/2" in r.stdout and "(BN folded)" in r.stdout and "reference " in r.stdout
    doc = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert [row["marks"][0]["matches"] for row in doc["configs"]] == [128, 128]
    r = _cli("robustness", str(resnet / "default.onnx"), "--key", str(resnet / "key.json"), "--grid",
             str(tmp_path / "grid.toml"), "--data", str(resnet / "calib.npy"), "--no-accuracy", "--jobs", "1",
             "-o", str(tmp_path / "grid2"))
    assert r.returncode == 1 and "survived 0/2" in r.stdout and "--reference" in r.stdout
    (tmp_path / "p.toml").write_text('format = "wmaudit-policy/1"\nname = "fp16"\nbackends = ["ort-cpu"]\n'
                                     '[evidence]\naccuracy = false\n[[attacks]]\nid = "fp16"\nsteps = "fp16"\n')
    r = _cli("gate", str(resnet / "default.onnx"), "--key", str(resnet / "key.json"), "--policy",
             str(tmp_path / "p.toml"), "--reference", str(resnet / "kept.onnx"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summary"] == {"requirements": 2, "passed": 2, "failed": 0, "errors": 0}
    r = _cli("gate", str(resnet / "default.onnx"), "--key", str(resnet / "key.json"), "--policy",
             str(tmp_path / "p.toml"), "--reference", str(tmp_path / "missing.onnx"))
    assert r.returncode == 2 and "reference model not found" in r.stderr

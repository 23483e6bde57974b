"""The release gate with black-box evidence: a trigger-set key on the marked model
and its unmarked twin, through real attacks on onnxruntime CPU."""
import json

import pytest

from auditor.cli import main

POLICY = """
format = "wmaudit-policy/1"
name = "black-box release"
backends = ["ort-cpu"]
seed = 0
[thresholds]
max_p_value = 1e-6
max_accuracy_drop = 3.0
[evidence]
whitebox = "none"
blackbox = "required"
accuracy = true
[accuracy]
samples = 500
seed = 0
[calibration]
data = "fashion-mnist"
samples = 64
seed = 0
[[attacks]]
id = "int8"
steps = "quantize:static-qdq-per-channel"
[[attacks]]
id = "fp16"
steps = "fp16"
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    p = tmp_path_factory.mktemp("policy") / "bb.toml"
    p.write_text(POLICY)
    return p


def _gate(model, key, policy, out, capsys):
    rc = main(["gate", str(model), "--key", str(key), "--policy", str(policy), "--json", "-o", str(out)])
    capsys.readouterr()
    return rc, json.loads(out.read_text())


def test_trigger_evidence_passes_on_the_marked_model(build_fixture, policy, tmp_path, capsys):
    d = build_fixture("bb-trigger")
    rc, doc = _gate(d / "marked.onnx", d / "key.json", policy, tmp_path / "g.json", capsys)
    assert rc == 0
    reqs = {r["id"]: r for r in doc["requirements"]}
    assert set(reqs) >= {"original/ort-cpu/triggers", "int8/ort-cpu/triggers", "fp16/ort-cpu/triggers"}
    for rid in ("original/ort-cpu/triggers", "int8/ort-cpu/triggers", "fp16/ort-cpu/triggers"):
        assert reqs[rid]["status"] == "pass"
        assert reqs[rid]["measured"]["p_value"] < 1e-30


def test_trigger_evidence_fails_on_the_unmarked_twin(build_fixture, policy, tmp_path, capsys):
    d = build_fixture("bb-trigger")
    rc, doc = _gate(d / "unmarked.onnx", d / "key.json", policy, tmp_path / "g.json", capsys)
    assert rc == 1
    failed = sorted(r["id"] for r in doc["requirements"] if r["status"] == "fail")
    assert failed == ["fp16/ort-cpu/triggers", "int8/ort-cpu/triggers", "original/ort-cpu/triggers"]

"""The release gate on real marked / unmarked CNNs: a passing policy exits 0, a failing one
exits 1 listing exactly the failing requirements with their numbers, the JUnit XML validates
against the CI schema, and two runs give the same JSON apart from `created`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
XSD = Path(__file__).resolve().parent / "junit.xsd"


def _fixture_names():
    """A marked Fashion-MNIST CNN (256-bit Uchida mark on conv2) and its unmarked twin.

    The attack fixtures are used because static quantization of the dynamo-exported
    cnn-small-* files does not yet go through quant_pre_process."""
    return "attacks-tinycnn-marked", "attacks-tinycnn-unmarked"


MARKED, UNMARKED = _fixture_names()

PASSING = """
format = "wmaudit-policy/1"
name = "survives int8 and pruning"
backends = ["ort-cpu"]
seed = 0
[thresholds]
max_p_value = 1e-6
max_ber = 0.05
min_margin = 0.0
max_accuracy_drop = 3.0
[accuracy]
samples = 500
seed = 0
[calibration]
samples = 64
seed = 0
[[attacks]]
id = "int8-static-per-channel"
steps = "quantize:static-qdq-per-channel"
[[attacks]]
id = "prune-30"
steps = "prune:0.3"
"""

# The same model and attacks, plus one no deployment should survive: 95 % of every weight zeroed.
FAILING_ON_MARKED = PASSING + """
[[attacks]]
id = "prune-95"
steps = "prune:0.95"
"""


def _run_gate(model_dir: Path, policy: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "auditor", "gate", str(model_dir / "model.onnx"), "--key", str(model_dir / "key.json"),
         "--policy", str(policy), "--junit", str(out.with_suffix(".xml")), "-o", str(out), *extra],
        capture_output=True, text=True, cwd=ROOT, env={**__import__("os").environ, "CI": "true"})


def _validate_junit(path: Path):
    xmlschema = pytest.importorskip("xmlschema", reason="xmlschema validates the JUnit XML (dev extra)")
    schema = xmlschema.XMLSchema(str(XSD))
    schema.validate(str(path))  # raises with the offending element when invalid
    import xml.etree.ElementTree as ET

    return ET.parse(path).getroot()


@pytest.fixture(scope="module")
def gate_runs(build_fixture, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    marked, unmarked = build_fixture(MARKED), build_fixture(UNMARKED)
    (tmp / "pass.toml").write_text(PASSING)
    (tmp / "fail.toml").write_text(FAILING_ON_MARKED)
    runs = {
        "pass": _run_gate(marked, tmp / "pass.toml", tmp / "pass.json"),
        "pass-again": _run_gate(marked, tmp / "pass.toml", tmp / "pass-again.json"),
        "unmarked": _run_gate(unmarked, tmp / "pass.toml", tmp / "unmarked.json"),
        "fail": _run_gate(marked, tmp / "fail.toml", tmp / "fail.json"),
    }
    docs = {k: json.loads((tmp / f"{k}.json").read_text()) for k in runs if (tmp / f"{k}.json").exists()}
    return tmp, runs, docs


def test_passing_policy_exits_0(gate_runs):
    tmp, runs, docs = gate_runs
    r = runs["pass"]
    assert r.returncode == 0, r.stdout + r.stderr
    doc = docs["pass"]
    assert doc["kind"] == "gate" and doc["verdict"] == "pass" and doc["failing"] == []
    ids = [q["id"] for q in doc["requirements"]]
    marks = [m["id"] for m in doc["attacks"][0]["whitebox"]["marks"]]
    # one white-box requirement per (model, mark), one accuracy requirement per attacked model
    for attack in ("original", "int8-static-per-channel", "prune-30"):
        for m in marks:
            assert f"{attack}/whitebox/{m}" in ids
    assert "int8-static-per-channel/ort-cpu/accuracy" in ids and "prune-30/ort-cpu/accuracy" in ids
    for q in doc["requirements"]:
        assert q["status"] == "pass"
        if q["evidence"] == "whitebox":
            assert q["measured"]["p_value"] < 1e-6
            assert q["measured"]["ber"] <= 0.05
            assert q["measured"]["signed_margin_min"] >= 0.0
        else:
            assert q["measured"]["accuracy_drop"] <= 3.0
            assert q["measured"]["samples"] == 500
    # the int8 model really is quantized: the mark was read from dequantized int8 weights
    int8 = next(c for c in doc["attacks"] if c["id"] == "int8-static-per-channel")
    assert all(m["location"]["quant"] for m in int8["whitebox"]["marks"])
    assert int8["model_sha256"].startswith("sha256:")
    assert "GATE PASS" in r.stdout


def test_unmarked_model_fails_every_whitebox_requirement(gate_runs):
    tmp, runs, docs = gate_runs
    r = runs["unmarked"]
    assert r.returncode == 1, r.stdout + r.stderr
    doc = docs["unmarked"]
    wb = [q for q in doc["requirements"] if q["evidence"] == "whitebox"]
    assert wb and all(q["status"] == "fail" for q in wb)
    for q in wb:
        assert q["measured"]["p_value"] >= 1e-6
        assert any(reason.startswith("p = ") and ">= max_p_value 1e-06" in reason for reason in q["reasons"])
    # accuracy is a property of the network, not of the mark: those requirements still pass
    assert all(q["status"] == "pass" for q in doc["requirements"] if q["evidence"] == "accuracy")
    assert sorted(doc["failing"]) == sorted(q["id"] for q in wb)
    # every failing requirement is listed on stderr, one line each
    listed = [line for line in r.stderr.splitlines() if line.startswith("FAILED ")]
    assert sorted(line[len("FAILED "):].split(": ", 1)[0] for line in listed) == sorted(doc["failing"])


def test_failing_policy_lists_exactly_the_failing_requirement(gate_runs):
    tmp, runs, docs = gate_runs
    r = runs["fail"]
    assert r.returncode == 1, r.stdout + r.stderr
    doc = docs["fail"]
    acc = next(q for q in doc["requirements"] if q["id"] == "prune-95/ort-cpu/accuracy")
    assert acc["status"] == "fail"
    assert acc["measured"]["accuracy_drop"] > 3.0
    assert "points > max_accuracy_drop 3" in acc["message"]
    # the requirements the passing policy met are still met: only prune-95 evidence fails
    assert all(f.startswith("prune-95/") for f in doc["failing"])
    assert "prune-95/ort-cpu/accuracy" in doc["failing"]


def test_junit_validates_and_carries_the_numbers(gate_runs):
    tmp, runs, docs = gate_runs
    for name in ("pass", "fail", "unmarked"):
        root = _validate_junit(tmp / f"{name}.xml")
        doc = docs[name]
        suites = root.findall("testsuite")
        assert len(suites) == 1
        cases = suites[0].findall("testcase")
        assert [c.get("name") for c in cases] == [q["id"] for q in doc["requirements"]]
        failures = [c for c in cases if c.find("failure") is not None]
        assert int(suites[0].get("failures")) == len(failures) == doc["summary"]["failed"]
        assert int(suites[0].get("tests")) == len(doc["requirements"])
        for c in failures:
            q = next(q for q in doc["requirements"] if q["id"] == c.get("name"))
            assert c.find("failure").get("message") == q["message"]
            assert f"measured.p_value: {json.dumps(q['measured'].get('p_value'))}" in c.find("failure").text \
                or "measured.accuracy_drop" in c.find("failure").text
    # the schema is strict enough to fail: a testcase without a name is refused
    import xmlschema

    broken = (tmp / "fail.xml").read_text().replace("<testcase classname=", "<testcase nom=", 1)
    assert not xmlschema.XMLSchema(str(XSD)).is_valid(broken)
    props = {p.get("name"): p.get("value") for p in _validate_junit(tmp / "pass.xml").iter("property")}
    assert props["model.sha256"] == docs["pass"]["model"]["sha256"]
    assert props["key_commitment"] == docs["pass"]["key_commitment"]


def test_two_runs_identical_apart_from_created(gate_runs):
    tmp, runs, docs = gate_runs
    a, b = dict(docs["pass"]), dict(docs["pass-again"])
    assert a.pop("created") and b.pop("created")
    # the command names the output files, which differ between the two runs by design
    a.pop("command"), b.pop("command")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    xa = (tmp / "pass.xml").read_text().replace("pass.json", "X").replace("pass.xml", "Y")
    xb = (tmp / "pass-again.xml").read_text().replace("pass-again.json", "X").replace("pass-again.xml", "Y")
    assert xa == xb


def test_unavailable_backend_is_an_error_requirement(build_fixture, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here: the backend would run")
    policy = tmp_path / "cuda.toml"
    policy.write_text(PASSING.replace('backends = ["ort-cpu"]', 'backends = ["ort-cpu", "ort-cuda"]')
                      .replace('[[attacks]]\nid = "int8-static-per-channel"\nsteps = "quantize:static-qdq-per-channel"\n', ""))
    r = _run_gate(build_fixture(MARKED), policy, tmp_path / "cuda.json")
    assert r.returncode == 1, r.stderr
    doc = json.loads((tmp_path / "cuda.json").read_text())
    err = {q["id"]: q for q in doc["requirements"] if q["status"] == "error"}
    assert set(err) == {"original/ort-cuda/accuracy", "prune-30/ort-cuda/accuracy"}
    assert all("ort-cuda is not available" in q["message"] for q in err.values())
    assert doc["summary"]["errors"] == 2 and doc["summary"]["failed"] == 0
    root = _validate_junit(tmp_path / "cuda.xml")
    assert int(root.find("testsuite").get("errors")) == 2

"""The target axis: attack, robustness, query and gate on several targets (the emulated lane).

Every int8 fidelity claim here is a floor the claim needs (the attacked model stays
faithful on each target), never a value one processor's arithmetic happens to give:
the same static int8 file measures about 40 dB with VNNI or on Arm and 20-26 dB on
AVX2 without VNNI (docs/hardware.md).
"""
import json

import pytest

from auditor.attacks.compose import parse_steps
from auditor.gate.targets import REMEDIES, fidelity_gaps, matrix

from targets_helpers import needs as _needs, wmaudit as _wmaudit

DIGITS = "data-digits-cnn"
TRIGGER = "bb-trigger"


def _record(arch, **features):
    keys = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if arch == "x86_64" else ("asimd",)
    return {"cpu": {"arch": arch, "features": {k: bool(features.get(k)) for k in keys}}}


def test_fidelity_gap_is_explained_only_where_the_kernel_difference_applies():
    avx2 = _record("x86_64", avx2=True, fma=True)
    vnni = _record("x86_64", avx2=True, avx512f=True, avx512_vnni=True)
    arm = _record("aarch64", asimd=True)
    rows = [("int8", "quantize:static-qdq", {"native": {"fidelity": {"sqnr_db": 39.0}},
                                              "x86-64-v3": {"fidelity": {"sqnr_db": 21.0}}}),
            ("fp16", "fp16", {"native": {"fidelity": {"sqnr_db": 80.0}}, "x86-64-v3": {"fidelity": {"sqnr_db": 60.0}}}),
            ("close", "quantize:static-qdq", {"native": {"fidelity": {"sqnr_db": 39.0}},
                                               "x86-64-v3": {"fidelity": {"sqnr_db": 35.0}}})]
    notes = fidelity_gaps(rows, {"native": vnni, "x86-64-v3": avx2})
    by = {n["attack"]: n for n in notes}
    assert set(by) == {"int8", "fp16"}  # a 4 dB gap is not worth a note
    assert by["int8"]["target"] == "x86-64-v3" and by["int8"]["gap_db"] == pytest.approx(18.0)
    assert "no VNNI" in by["int8"]["why"] and by["int8"]["try"] == [r for r in REMEDIES]
    assert "try" not in by["fp16"] and "no known kernel difference" in by["fp16"]["why"]
    # two CPUs without VNNI: the gap is not blamed on VNNI
    assert "try" not in fidelity_gaps(rows[:1], {"native": avx2, "x86-64-v3": avx2})[0]
    # SSE4.1 kernels (no AVX2) widen before multiplying: an AVX2 cell is explained against them
    sse = _record("x86_64")
    assert "vpmaddubsw" in fidelity_gaps(rows[:1], {"native": sse, "x86-64-v3": avx2})[0]["why"]
    # Arm accumulates in 32 bits: the AVX2 cell is explained against it
    assert "no VNNI" in fidelity_gaps(rows[:1], {"native": arm, "x86-64-v3": avx2})[0]["why"]
    # fp16 on Arm with FP16 arithmetic runs in half precision
    half = {"cpu": {"arch": "aarch64", "features": {"asimd": True, "asimdhp": True}}}
    fp16 = fidelity_gaps(rows[1:2], {"native": vnni, "x86-64-v3": half})[0]
    assert "half precision" in fp16["why"] and "try" not in fp16
    m = matrix([{"name": "int8", "steps": "quantize:static-qdq", "verdict": "detected", "targets": rows[0][2]}],
               ("native", "x86-64-v3"))
    assert m["rows"][0]["cells"]["x86-64-v3"]["sqnr_db"] == 21.0 and m["rows"][0]["cells"]["native"]["survived"]


def test_remedy_qualifiers_parse_and_reach_the_quantizer():
    st = parse_steps("quantize:static-qdq-per-channel:reduce-range,quantize:dynamic:uint8-weights")
    assert [s.args for s in st] == [("static-qdq-per-channel", "reduce-range"), ("dynamic", "uint8-weights")]
    with pytest.raises(Exception, match="qualifier must be one of reduce-range, uint8-weights"):
        parse_steps("quantize:dynamic:fast")


def test_robustness_rows_are_attack_by_target(build_fixture, tmp_path):
    _needs("x86-64-v3")
    fx = build_fixture(DIGITS)
    grid = tmp_path / "grid.toml"
    grid.write_text('[grid]\nprune_rates = [0.0, 0.5]\nquantize = ["none", "dynamic"]\n')
    r = _wmaudit("robustness", fx / "model.onnx", "--key", fx / "key.json", "--data", fx / "digits.npz",
                 "--grid", grid, "--samples", 200, "--target", "native", "--target", "x86-64-v3",
                 "-o", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["targets"] == ["native", "x86-64-v3"]
    m = doc["matrix"]
    assert [row["attack"] for row in m["rows"]] == [c["name"] for c in doc["configs"]]
    for row, cfg in zip(m["rows"], doc["configs"]):
        assert row["mark"] == cfg["verdict"] == "detected"
        for t in ("native", "x86-64-v3"):
            cell = cfg["targets"][t]
            assert cell["accuracy"] >= 0.85 and cell["fidelity"]["top1_agreement"] >= 0.9
            assert row["cells"][t]["top1_agreement"] == cell["fidelity"]["top1_agreement"]
    assert set(doc["hardware"]["targets"]) == {"native", "x86-64-v3"}
    assert doc["hardware"]["targets"]["x86-64-v3"]["emulated"]["emulator"] == "qemu-x86_64"


def test_query_detects_the_trigger_set_on_every_target(build_fixture):
    _needs("x86-64-v3")
    fx = build_fixture(TRIGGER)
    r = _wmaudit("query", fx / "marked.onnx", "--key", fx / "key.json", "--target", "native",
                 "--target", "x86-64-v3", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verdict"]["verdict"] == "detected"
    for t in ("native", "x86-64-v3"):
        assert doc["targets"][t]["verdict"]["verdict"] == "detected"
        assert doc["targets"][t]["triggers"]["p_value"] < 1e-6
    assert doc["hardware"]["targets"]["x86-64-v3"]["cpu"]["microarchitecture"] == "haswell"
    r = _wmaudit("query", fx / "unmarked.onnx", "--key", fx / "key.json", "--target", "x86-64-v3", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["verdict"]["verdict"] != "detected"


def test_gate_with_targets_and_per_target_thresholds(build_fixture, tmp_path):
    _needs("x86-64-v3")
    fx = build_fixture(DIGITS)
    policy = tmp_path / "policy.toml"
    policy.write_text(f'''format = "wmaudit-policy/1"
name = "two CPUs"
targets = ["native", "x86-64-v3"]
[thresholds]
max_p_value = 1e-6
min_top1_agreement = 0.95
[target_thresholds.x86-64-v3]
min_top1_agreement = 0.9
[data]
source = "digits.npz"
[accuracy]
samples = 200
[[attacks]]
id = "int8-dynamic"
steps = "quantize:dynamic"
''')
    (tmp_path / "digits.npz").write_bytes((fx / "digits.npz").read_bytes())
    r = _wmaudit("gate", fx / "model.onnx", "--key", fx / "key.json", "--policy", policy, "--json",
                 "--junit", tmp_path / "junit.xml")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    doc = json.loads(r.stdout)
    ids = {q["id"]: q for q in doc["requirements"]}
    assert ids["int8-dynamic/native/fidelity"]["thresholds"]["min_top1_agreement"] == 0.95
    assert ids["int8-dynamic/x86-64-v3/fidelity"]["thresholds"]["min_top1_agreement"] == 0.9
    assert doc["matrix"]["targets"] == ["native", "x86-64-v3"]
    assert all(c == "pass" for row in doc["matrix"]["rows"] for c in row["cells"].values())
    junit = (tmp_path / "junit.xml").read_text()
    assert 'name="hardware.x86-64-v3.emulated" value="qemu-x86_64' in junit
    assert 'name="hardware.native.microarchitecture"' in junit

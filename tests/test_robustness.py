"""Survival grid and the attack / robustness commands, end to end through the CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from auditor.cli import main
from auditor.errors import AuditError
from auditor.gate.robustness import default_grid, grid_from_dict, load_grid

MARKED, UNMARKED = "attacks-tinycnn-marked", "attacks-tinycnn-unmarked"

GRID = """
[grid]
prune_rates = [0.0, 0.8]
quantize = ["none", "static-qdq"]

[[config]]
name = "fp16"
steps = "fp16"
"""


def _run_grid(build_fixture, tmp_path, name, out, jobs=2):
    d = build_fixture(name)
    (tmp_path / "grid.toml").write_text(GRID)
    code = main(["robustness", str(d / "model.onnx"), "--key", str(d / "key.json"), "--grid",
                 str(tmp_path / "grid.toml"), "--samples", "500", "--calibration-samples", "64",
                 "--jobs", str(jobs), "-o", str(out), "--save-models"])
    return code, json.loads((out / "results.json").read_text())


def test_grid_survives_and_is_deterministic(build_fixture, tmp_path, capsys):
    code1, doc1 = _run_grid(build_fixture, tmp_path, MARKED, tmp_path / "a", jobs=2)
    code2, doc2 = _run_grid(build_fixture, tmp_path, MARKED, tmp_path / "b", jobs=1)
    assert code1 == code2 == 0
    for d in (doc1, doc2):
        d.pop("created")
        d.pop("command")
    assert json.dumps(doc1, sort_keys=True) == json.dumps(doc2, sort_keys=True)
    names = [c["name"] for c in doc1["configs"]]
    assert names == ["prune:0.8:magnitude", "quantize:static-qdq", "prune:0.8:magnitude,quantize:static-qdq", "fp16"]
    s = doc1["summary"]
    assert {k: s[k] for k in ("configs", "broken", "calibrated_models", "baseline_detected", "all_survived")} == {
        "configs": 4, "broken": [], "calibrated_models": 2, "baseline_detected": True, "all_survived": True}
    # survival counts the configs that left the model usable; the others are listed, not counted
    assert s["survived"] == s["usable"] == 4 - len(s["model_broken"])
    assert all(c["survived"] for c in doc1["configs"])
    base = doc1["baseline"]
    assert base["marks"][0]["ber"] == 0.0 and base["accuracy"] > 0.8
    by = {c["name"]: c for c in doc1["configs"]}
    assert by["quantize:static-qdq"]["marks"][0]["log10_p"] < -30
    assert abs(by["quantize:static-qdq"]["accuracy_drop"]) < 0.02
    assert by["prune:0.8:magnitude"]["params"]["steps"][0]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert by["prune:0.8:magnitude,quantize:static-qdq"]["marks"][0]["ber"] < 0.1
    assert sorted(p.name for p in (tmp_path / "a" / "models").iterdir()) == sorted(
        n.replace(":", "_").replace(",", "_") + ".onnx" for n in names)


def test_unmarked_model_is_not_detected_under_any_config(build_fixture, tmp_path):
    code, doc = _run_grid(build_fixture, tmp_path, UNMARKED, tmp_path / "u", jobs=1)
    assert code == 1
    assert not doc["summary"]["baseline_detected"] and doc["summary"]["survived"] == 0
    assert all(c["marks"][0]["p_value"] > 1e-6 for c in doc["configs"])


def test_grid_parsing(tmp_path):
    g = default_grid()
    assert len(g.configs) == 23 and all(c.steps for c in g.configs)
    assert len(load_grid("examples/grid.toml").configs) == 25
    for bad in ({"grid": {"prune_rates": [1.2]}}, {"grid": {"quantize": ["int3"]}},
                {"config": [{"name": "x"}]}, {"config": [{"steps": "shrink:1"}]}, {},
                {"grid": {"calibration": "mse"}}):
        with pytest.raises(AuditError):
            grid_from_dict(bad)
    (tmp_path / "g.toml").write_text("[grid\n")
    with pytest.raises(AuditError, match="TOML"):
        load_grid(tmp_path / "g.toml")


def test_attack_command(build_fixture, tmp_path, capsys):
    d = build_fixture(MARKED)
    out = tmp_path / "o" / "pruned-int8.onnx"
    code = main(["attack", str(d / "model.onnx"), "--prune", "0.6", "--prune-mode", "global",
                 "--quantize", "static-qdq-per-channel", "--calibration-samples", "32", "-o", str(out), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "attack" and doc["steps"] == "prune:0.6:global,quantize:static-qdq-per-channel"
    assert doc["params"]["steps"][0]["sparsity"] == pytest.approx(0.6, abs=1e-4)
    m = onnx.load(str(out))
    assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) > 0
    qs = [numpy_helper.to_array(i) for i in m.graph.initializer
          if i.name in ("conv1.weight_quantized", "conv2.weight_quantized", "fc.weight_quantized")]
    assert len(qs) == 3 and all(q.dtype == np.int8 for q in qs)
    # symmetric int8 keeps a pruned zero at 0 (zero point 0); a few tiny weights may round to 0 too
    zeros = sum(int((q == 0).sum()) for q in qs)
    assert 5438 <= zeros < 5438 + 200  # round(0.6 * 9064) = 5438
    assert list(out.parent.iterdir()) == [out]  # atomic: no temp file left behind


@pytest.mark.parametrize("argv", [
    ["--prune", "1.5"], ["--quantize", "int3"], [], ["--prune", "0.5", "--order", "prune"],
    ["--quantize", "static-qdq", "--data", "missing.npy"]])
def test_attack_command_bad_input_exits_2(build_fixture, tmp_path, argv, capsys):
    d = build_fixture(MARKED)
    out = tmp_path / "x.onnx"
    try:
        code = main(["attack", str(d / "model.onnx"), *argv, "-o", str(out)])
    except SystemExit as e:  # argparse errors
        code = e.code
    assert code == 2 and not out.exists()
    assert "Traceback" not in capsys.readouterr().err


def test_robustness_command_bad_input_exits_2(tmp_path, capsys):
    assert main(["robustness", str(tmp_path / "none.onnx"), "--key", "k.json", "-o", str(tmp_path)]) == 2
    assert "model not found" in capsys.readouterr().err

"""Release policy parsing: the example parses to the documented values; every kind of
malformed policy is refused with one line naming the problem, and the CLI exits 2."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from auditor.errors import AuditError
from auditor.gate.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "release-policy.toml"

GOOD = """
format = "wmaudit-policy/1"
name = "t"
backends = ["ort-cpu"]
[thresholds]
max_p_value = 1e-6
max_accuracy_drop = 2.0
[[attacks]]
id = "prune-50"
steps = "prune:0.5"
"""


def _write(tmp_path, text, name="policy.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_example_policy_parses_to_documented_values():
    p = load_policy(EXAMPLE)
    assert p.name == "release"
    assert p.targets == ("native",)
    assert p.thresholds == {"max_p_value": 1e-6, "max_ber": 0.05, "min_margin": 0.0, "min_normalized_margin": 0.0,
                            "max_accuracy_drop": 2.0, "min_top1_agreement": 0.95, "min_sqnr_db": 5.0}
    assert p.thresholds_for("prune-50")["min_top1_agreement"] == 0.85
    assert (p.data_source, p.data_labels, p.calibration_data) == (None, None, None)
    assert [a.id for a in p.attacks] == ["int8-static-per-channel", "prune-50", "prune-50-then-int8",
                                         "ort-optimized", "int8-then-ort-format"]
    assert [a.steps for a in p.attacks] == ["quantize:static-qdq-per-channel", "prune:0.5",
                                            "prune:0.5,quantize:static-qdq-per-channel", "ort-optimize:all",
                                            "quantize:static-qdq-per-channel,ort-format"]
    assert p.attacks[0].options == {"calibration_method": "minmax"}
    # per-attack override on top of the global thresholds
    assert p.thresholds_for("prune-50-then-int8")["max_accuracy_drop"] == 3.0
    assert p.thresholds_for("prune-50")["max_accuracy_drop"] == 3.0
    assert (p.whitebox, p.blackbox, p.accuracy) == ("all-marks", "if-key-has", True)
    assert (p.accuracy_samples, p.calibration_samples) == (1000, 128)


def test_minimal_policy_defaults(tmp_path):
    p = load_policy(_write(tmp_path, GOOD))
    assert p.seed == 0 and p.whitebox == "all-marks" and p.accuracy is True
    assert p.to_json()["attacks"] == [{"id": "prune-50", "steps": "prune:0.5", "options": {}, "thresholds": {}}]


def test_steps_as_array_are_joined(tmp_path):
    p = load_policy(_write(tmp_path, GOOD.replace('steps = "prune:0.5"',
                                                  'steps = ["prune:0.3:random", "quantize:dynamic"]')))
    assert p.attacks[0].steps == "prune:0.3:random,quantize:dynamic"


BAD = [
    # (replace old -> new in GOOD, expected fragment of the message)
    ('steps = "prune:0.5"', 'steps = "quantise:dynamic"', "unknown attack step 'quantise:dynamic'"),
    ('steps = "prune:0.5"', 'steps = "quantize:int3"', "attacks[0].steps"),
    ('steps = "prune:0.5"', 'steps = "prune:half"', "is not a number"),
    ('max_p_value = 1e-6', 'max_p_value = "1e-6"', "'thresholds.max_p_value' must be a number, got string"),
    ('max_p_value = 1e-6', 'max_p_value = 0', "'thresholds.max_p_value' must be a number in (0, 1]"),
    ('max_p_value = 1e-6', 'max_ber = 1.5', "'thresholds.max_ber' must be a number in [0, 1]"),
    ('max_p_value = 1e-6', 'max_pvalue = 1e-6', "unknown field 'thresholds.max_pvalue'"),
    ('backends = ["ort-cpu"]', '', "missing field 'targets'"),
    ('backends = ["ort-cpu"]', 'targets = ["native"]\nbackends = ["ort-cpu"]', "'targets' or its old name 'backends', not both"),
    ('backends = ["ort-cpu"]', 'targets = ["native", "ort-cpu"]', "'targets' names a target twice"),
    ('backends = ["ort-cpu"]', 'targets = ["native"]\n[target_thresholds.aarch64]\nmin_sqnr_db = 10',
     "'target_thresholds.aarch64' names a target the policy does not run on"),
    ('backends = ["ort-cpu"]', 'targets = ["native"]\n[target_thresholds.native]\nmax_ber = 2',
     "'target_thresholds.native.max_ber' must be a number in [0, 1]"),
    ('backends = ["ort-cpu"]', 'backends = ["onnxruntime"]', "unknown target 'onnxruntime' in 'backends'"),
    ('backends = ["ort-cpu"]', 'backends = "ort-cpu"', "'backends' must be an array, got string"),
    ('backends = ["ort-cpu"]', 'backends = []', "'backends' must name at least one target"),
    ('format = "wmaudit-policy/1"', 'format = "wmaudit-policy/2"', "'format' must be \"wmaudit-policy/1\""),
    ('name = "t"', 'name = "t"\nseed = true', "'seed' must be an integer, got boolean"),
    ('id = "prune-50"', '', "missing field 'attacks[0].id'"),
    ('id = "prune-50"', 'id = "original"', "reserved for the unattacked model"),
    ('id = "prune-50"', 'id = "a b"', "'attacks[0].id' must be"),
    ('steps = "prune:0.5"', 'steps = "prune:0.5"\noptions = { prune_sead = 1 }',
     "unknown field 'attacks[0].options.prune_sead'"),
    ('steps = "prune:0.5"', 'steps = "prune:0.5"\noptions = { prune_seed = "1" }',
     "'attacks[0].options.prune_seed' must be an integer, got string"),
    ('steps = "prune:0.5"', 'steps = "prune:0.5"\n[evidence]\nwhitebox = "some"', "'evidence.whitebox' must be one of"),
    ('max_p_value = 1e-6', 'max_p_value = 1e-6\n[thresholds]', "not valid TOML"),
]


@pytest.mark.parametrize("old,new,fragment", BAD)
def test_malformed_policy_is_one_line_error(tmp_path, old, new, fragment):
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(AuditError) as e:
        load_policy(path)
    msg = str(e.value)
    assert fragment in msg, msg
    assert "\n" not in msg and msg.startswith(f"policy {path}")


def test_duplicate_attack_ids(tmp_path):
    with pytest.raises(AuditError, match="'attacks\\[1\\].id' 'prune-50' is used twice"):
        load_policy(_write(tmp_path, GOOD + '[[attacks]]\nid = "prune-50"\nsteps = "prune:0.7"\n'))


def test_accuracy_evidence_needs_a_threshold(tmp_path):
    text = GOOD.replace("max_accuracy_drop = 2.0", "") + "[evidence]\naccuracy = true\n"
    with pytest.raises(AuditError, match="none of 'thresholds.max_accuracy_drop', 'thresholds.min_top1_agreement', 'thresholds.min_sqnr_db' is set"):
        load_policy(_write(tmp_path, text))


def test_missing_policy_file(tmp_path):
    with pytest.raises(AuditError, match="policy file not found"):
        load_policy(tmp_path / "nope.toml")


def test_cli_malformed_policy_exit_2_one_line(tmp_path):
    bad = _write(tmp_path, GOOD.replace('steps = "prune:0.5"', 'steps = "shrink:0.5"'))
    # the policy is checked before the model or key is touched
    r = subprocess.run([sys.executable, "-m", "auditor", "gate", str(tmp_path / "m.onnx"), "--key",
                        str(tmp_path / "k.json"), "--policy", str(bad), "--junit", str(tmp_path / "j.xml")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "unknown attack step 'shrink:0.5'" in lines[0] and lines[0].startswith("wmaudit gate: error: policy ")
    assert not (tmp_path / "j.xml").exists()  # no partial output


def test_data_table_and_fidelity_thresholds(tmp_path):
    text = GOOD.replace("max_accuracy_drop = 2.0", "min_top1_agreement = 0.9\nmin_sqnr_db = 12.5") + (
        '[data]\nsource = "held/x.npz"\nlabels = "held/y.npy"\npreprocess = "size=32x32,layout=nchw"\n')
    p = load_policy(_write(tmp_path, text))
    assert p.accuracy and p.thresholds["min_sqnr_db"] == 12.5 and p.thresholds["min_top1_agreement"] == 0.9
    assert p.data_source == str(tmp_path / "held" / "x.npz") and p.data_labels == str(tmp_path / "held" / "y.npy")
    assert load_policy(_write(tmp_path, text.replace("held/x.npz", "synthetic"))).data_source == "synthetic"
    for bad, msg in (("min_top1_agreement = 0.9", "'thresholds.min_top1_agreement' must be a number in [0, 1]"),
                     ('source = "held/x.npz"', "unknown field 'data.sorce'"),
                     ('preprocess = "size=32x32,layout=nchw"', "--preprocess: bad value 'layout=chw'")):
        repl = {"min_top1_agreement = 0.9": "min_top1_agreement = 1.5",
                'source = "held/x.npz"': 'sorce = "held/x.npz"',
                'preprocess = "size=32x32,layout=nchw"': 'preprocess = "size=32x32,layout=chw"'}[bad]
        with pytest.raises(AuditError, match=re.escape(msg)):
            load_policy(_write(tmp_path, text.replace(bad, repl)))


def test_policy_record_lists_data_settings_only_where_they_apply(tmp_path):
    no_task = GOOD.replace("max_accuracy_drop = 2.0", "")
    doc = load_policy(_write(tmp_path, no_task)).to_json()
    assert not {"accuracy", "calibration", "data"} & set(doc)  # pruning only, no task measured
    doc = load_policy(_write(tmp_path, GOOD.replace('"prune:0.5"', '"quantize:static-qdq"'))).to_json()
    assert doc["accuracy"] == {"samples": 1000, "seed": 0} and doc["calibration"] == {"samples": 128, "seed": 0}


def test_targets_and_per_target_thresholds(tmp_path):
    """`targets` replaces `backends` (kept as its old name); per-target thresholds apply between
    the global ones and an attack's own."""
    text = GOOD.replace('backends = ["ort-cpu"]', 'targets = ["native", "x86-64-v3"]').replace(
        "[[attacks]]", "[target_thresholds.x86-64-v3]\nmax_accuracy_drop = 5.0\nmax_ber = 0.1\n[[attacks]]")
    p = load_policy(_write(tmp_path, text + 'thresholds = {max_ber = 0.2}\n'))
    assert p.targets == ("native", "x86-64-v3")
    assert p.thresholds_for("prune-50", "native")["max_accuracy_drop"] == 2.0
    assert p.thresholds_for("prune-50", "x86-64-v3")["max_accuracy_drop"] == 5.0
    assert p.thresholds_for("prune-50", "x86-64-v3")["max_ber"] == 0.2  # the attack's own wins
    assert p.to_json()["targets"] == ["native", "x86-64-v3"]
    assert p.to_json()["target_thresholds"] == {"x86-64-v3": {"max_accuracy_drop": 5.0, "max_ber": 0.1}}
    old = load_policy(_write(tmp_path, GOOD))
    assert old.targets == ("ort-cpu",) and old.to_json()["targets"] == ["ort-cpu"]

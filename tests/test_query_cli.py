"""`wmaudit query`: verdicts, exit codes, JSON envelope, PNG output, errors."""
import json

import numpy as np
import pytest
from PIL import Image

from auditor.cli import main


def _run(capsys, *argv):
    rc = main(["query", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_trigger_json_and_exit_codes(build_fixture, capsys):
    fx = build_fixture("bb-trigger")
    rc, out, _ = _run(capsys, fx / "marked.onnx", "--key", fx / "key.json", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["exit_code"] == 0
    assert doc["schema"] == "wmaudit-result/1" and doc["kind"] == "query"
    assert doc["key_commitment"].startswith("sha256:") and doc["model"]["sha256"].startswith("sha256:")
    assert doc["triggers"]["verdict"] == "detected" and doc["triggers"]["null_rate_source"]["source"] == "1/C"
    assert doc["verdict"]["verdict"] == "detected" and doc["backend"] == doc["target"] == "native"
    hw = doc["hardware"]  # read by the process that ran the model
    assert hw["target"] == "native" and hw["emulated"] is None
    assert hw["onnxruntime"]["execution_provider"] == "CPUExecutionProvider"
    assert hw["onnxruntime"]["version"] == __import__("onnxruntime").__version__
    rc, out, _ = _run(capsys, fx / "unmarked.onnx", "--key", fx / "key.json", "--json")
    assert rc == 1 and json.loads(out)["verdict"]["verdict"] == "not detected"


def test_reference_null_rate_is_named(build_fixture, capsys):
    fx = build_fixture("bb-trigger")
    rc, out, _ = _run(capsys, fx / "marked.onnx", "--key", fx / "key.json", "--reference", fx / "unmarked.onnx",
                      "--json", "--query-attack", "jpeg:50")
    doc = json.loads(out)
    assert rc == 0
    nr = doc["triggers"]["null_rate_source"]
    assert nr["source"] == "reference models: unmarked.onnx" and nr["trials"] == 100
    assert doc["triggers"]["null_rate"] == nr["value"] and doc["query_attack"] == "jpeg:50"


def test_logo_pngs_match_json(build_fixture, capsys, tmp_path):
    fx = build_fixture("bb-logo-wrn")
    rc, out, _ = _run(capsys, fx / "marked.onnx", "--key", fx / "key.json", "--json", "--logo-out", tmp_path,
                      "--permutations", "500")
    doc = json.loads(out)
    assert rc == 0 and doc["logo"]["verdict"] == "detected"
    assert sorted(doc["logo"]["png"], key=int) == ["1", "3", "5", "10", "20"]
    for k, path in doc["logo"]["png"].items():
        m = np.array(doc["logo"]["decoded"][k])
        with Image.open(path) as im:
            img = np.asarray(im)
        # the PNG is the decoded map scaled to 0..255
        want = np.round((m - m.min()) / (m.max() - m.min()) * 255)
        assert np.abs(img.astype(int) - want).max() <= 1


def test_human_output(build_fixture, capsys):
    fx = build_fixture("bb-trigger")
    rc, out, _ = _run(capsys, fx / "marked.onnx", "--key", fx / "key.json")
    assert rc == 0 and "triggers" in out and "DETECTED" in out


@pytest.mark.parametrize("extra,msg", [
    (["--backend", "tensorrt"], "target tensorrt is not available"),
    (["--query-attack", "blur:2"], "unknown query attack"),
    (["--reference", "/nonexistent/ref.onnx"], "reference model not found"),
])
def test_user_errors_exit_2(build_fixture, capsys, extra, msg):
    fx = build_fixture("bb-trigger")
    if "tensorrt" in extra:
        import importlib.util
        if importlib.util.find_spec("tensorrt") is not None:
            pytest.skip("TensorRT is installed here")
    rc, out, err = _run(capsys, fx / "marked.onnx", "--key", fx / "key.json", *extra)
    assert rc == 2 and msg in err and "Traceback" not in err and out == ""


def test_key_without_blackbox_section_is_an_error(build_fixture, capsys, tmp_path):
    from auditor.marks import keys

    fx = build_fixture("bb-trigger")
    keys.save_key(keys.Key(whitebox=[]), tmp_path / "key.json")
    rc, _, err = _run(capsys, fx / "marked.onnx", "--key", tmp_path / "key.json")
    assert rc == 2 and "no black-box section" in err

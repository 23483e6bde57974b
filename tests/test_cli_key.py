import json
import subprocess
import sys

import numpy as np
import pytest

from auditor.cli import main
from auditor.marks.keys import load_key


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.fixture
def material(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((32, 288))
    bits = rng.integers(0, 2, 32).astype(np.uint8)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "XT.npy", X.T)
    np.save(tmp_path / "bits.npy", bits)
    return tmp_path, X, bits


def test_import_matrix(material):
    d, X, bits = material
    out = d / "keys" / "k.json"
    rc = run_cli("key", "import", "--matrix", d / "X.npy", "--bits", d / "bits.npy", "--param", "conv2.weight",
                 "--shape", "64,32,3,3", "--reduce", "mean", "-o", out)
    assert rc == 0
    k = load_key(out)
    assert np.array_equal(k.whitebox[0].matrix(), X)
    assert np.array_equal(k.whitebox[0].bits, bits)
    # the sidecar lives beside the key, referenced relatively
    assert not k.whitebox[0].projection["path"].startswith("/")


def test_import_transposed(material):
    d, X, bits = material
    out = d / "k.json"
    assert run_cli("key", "import", "--matrix", d / "XT.npy", "--transposed", "--bits", d / "bits.npy",
                   "--param", "conv2.weight", "--shape", "64,32,3,3", "--reduce", "mean", "-o", out) == 0
    assert np.array_equal(load_key(out).whitebox[0].matrix(), X)


def test_import_wrong_orientation_hints(material, capsys):
    d, X, bits = material
    rc = run_cli("key", "import", "--matrix", d / "XT.npy", "--bits", d / "bits.npy", "--param", "c.weight",
                 "--shape", "64,32,3,3", "--reduce", "mean", "-o", d / "k.json")
    err = capsys.readouterr().err
    assert rc == 2 and "--transposed" in err and err.count("\n") == 1
    assert not (d / "k.json").exists()


def test_import_seed_and_append(material):
    d, X, bits = material
    out = d / "k.json"
    assert run_cli("key", "import", "--seed", "5", "--bits", d / "bits.npy", "--param", "a.weight",
                   "--shape", "64,32,3,3", "--reduce", "mean", "-o", out) == 0
    assert run_cli("key", "import", "--seed", "6", "--bits", d / "bits.npy", "--param", "b.weight",
                   "--shape", "16,18", "--reduce", "flatten", "--append", "-o", out) == 0
    k = load_key(out)
    assert [m.param for m in k.whitebox] == ["a.weight", "b.weight"]
    assert np.array_equal(k.whitebox[0].matrix(), np.random.default_rng(5).standard_normal((32, 288)))


@pytest.mark.parametrize("bad,msg", [
    (["--shape", "64,x,3"], "--shape"),
    (["--shape", "64,32,3,3", "--reduce", "flatten"], "expected 32x18432"),
])
def test_import_bad_input(material, capsys, bad, msg):
    d, X, bits = material
    base = ["key", "import", "--matrix", d / "X.npy", "--bits", d / "bits.npy", "--param", "c.weight",
            "--reduce", "mean", "-o", d / "k.json"]
    rc = run_cli(*(base + bad))
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1


def test_bits_must_be_binary(material, capsys):
    d, X, bits = material
    np.save(d / "pm.npy", 2 * bits.astype(int) - 1)
    rc = run_cli("key", "import", "--matrix", d / "X.npy", "--bits", d / "pm.npy", "--param", "c.weight",
                 "--shape", "64,32,3,3", "--reduce", "mean", "-o", d / "k.json")
    assert rc == 2 and "0/1" in capsys.readouterr().err


def test_verify_and_show(material, capsys):
    d, X, bits = material
    out = d / "k.json"
    run_cli("key", "import", "--matrix", d / "X.npy", "--bits", d / "bits.npy", "--param", "c.weight",
            "--shape", "64,32,3,3", "--reduce", "mean", "-o", out)
    capsys.readouterr()
    assert run_cli("key", "verify", out, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] and doc["whitebox"][0]["n_bits"] == 32
    # a modified sidecar fails verification with exit 2
    np.save(d / load_key(out).whitebox[0].projection["path"], X * 2)
    capsys.readouterr()
    assert run_cli("key", "verify", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0], err


def test_no_traceback_from_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "auditor", "extract", str(tmp_path / "nope.onnx"),
                        "--key", str(tmp_path / "nope.json")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1

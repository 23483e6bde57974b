"""attack --target: the attacked model measured against the original on native and emulated
CPUs (the emulated lane). Fidelity floors only: the same static int8 file measures about
40 dB with VNNI or on Arm and 20-26 dB on AVX2 without VNNI (docs/hardware.md)."""
import json

from targets_helpers import needs as _needs, wmaudit as _wmaudit

DIGITS = "data-digits-cnn"


def test_attack_measured_on_native_and_emulated_avx2(build_fixture, tmp_path):
    _needs("x86-64-v3")
    fx = build_fixture(DIGITS)
    r = _wmaudit("attack", fx / "model.onnx", "--quantize", "static-qdq-per-channel", "--data", fx / "digits.npz",
                 "--target", "native", "--target", "x86-64-v3", "--eval-samples", 200, "-o", tmp_path / "q.onnx",
                 "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc["targets"]) == {"native", "x86-64-v3"}
    for t, d in doc["targets"].items():
        assert d["samples"] == 200
        assert d["fidelity"]["sqnr_db"] >= 15.0, (t, d)  # int8 stays faithful on every target
        assert d["fidelity"]["top1_agreement"] >= 0.95 and d["accuracy"] >= 0.9
    hw = doc["hardware"]["targets"]
    assert hw["native"]["emulated"] is None and hw["x86-64-v3"]["emulated"]["cpu"] == "Haswell-v4"
    assert hw["x86-64-v3"]["cpu"]["features"]["avx2"] and not hw["x86-64-v3"]["cpu"]["features"]["avx512f"]
    r2 = _wmaudit("attack", fx / "model.onnx", "--quantize", "fp16", "--data", fx / "digits.npz",
                  "--target", "x86-64-v9", "-o", tmp_path / "h.onnx")
    assert r2.returncode == 2 and "unknown target 'x86-64-v9'" in r2.stderr and "Traceback" not in r2.stderr
    assert len(r2.stderr.strip().splitlines()) <= 2  # argparse's usage line, then the one error line


def test_session_option_target_removes_the_avx2_int8_loss(build_fixture, tmp_path):
    """native+x64quantprecision: onnxruntime's non-saturating x64 int8 kernels; never worse than
    native, and recorded in the hardware record."""
    fx = build_fixture(DIGITS)
    r = _wmaudit("attack", fx / "model.onnx", "--quantize", "static-qdq-per-channel", "--data", fx / "digits.npz",
                 "--target", "native", "--target", "native+x64quantprecision", "--eval-samples", 200,
                 "-o", tmp_path / "q.onnx", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    plain, precise = doc["targets"]["native"], doc["targets"]["native+x64quantprecision"]
    assert precise["fidelity"]["sqnr_db"] >= plain["fidelity"]["sqnr_db"] - 0.5
    assert precise["fidelity"]["sqnr_db"] >= 30.0  # no 16-bit saturation on any x86 kernel path
    rec = doc["hardware"]["targets"]["native+x64quantprecision"]
    assert rec["onnxruntime"]["session_config"] == {"session.x64quantprecision": "1"}
    for bad, msg in (("aarch64+x64quantprecision", "applies to x86 CPU targets only"),
                     ("native+fast", "unknown session option 'fast'")):
        r = _wmaudit("attack", fx / "model.onnx", "--quantize", "fp16", "--target", bad, "-o", tmp_path / "h.onnx")
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_attack_measured_on_aarch64(build_fixture, tmp_path):
    _needs("aarch64")
    fx = build_fixture(DIGITS)
    r = _wmaudit("attack", fx / "model.onnx", "--quantize", "static-qdq-per-channel", "--data", fx / "digits.npz",
                 "--target", "aarch64", "--eval-samples", 200, "-o", tmp_path / "q.onnx", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    d = doc["targets"]["aarch64"]
    assert d["fidelity"]["sqnr_db"] >= 15.0 and d["fidelity"]["top1_agreement"] >= 0.95
    assert doc["hardware"]["cpu"]["arch"] == "aarch64" and doc["hardware"]["emulated"]["emulator"] == "qemu-aarch64"

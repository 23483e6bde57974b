"""Targets: the model runs in a child per target, which reports the hardware it sees.

The emulated lanes (qemu-user) prove that a target really ran on the emulated
instruction set: the feature list its child reports differs from the host's.
They skip where qemu-user (or the arm64 root, `make aarch64-root`) is missing.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from auditor.backends import hardware
from auditor.backends.targets import TARGETS, TargetRunner, aarch64_root, availability, resolve
from auditor.errors import AuditError


def _needs(name):
    ok, why, fix = availability(name)
    if not ok:
        pytest.skip(f"target {name} is not available here: {why} (run: {fix})")


def _linear(path, batch="N"):
    rng = np.random.default_rng(0)
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], rng.standard_normal((4, 3)).astype(np.float32).ravel())
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "lin",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])], [w])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def _slow_loop(path):
    """A model that loops 2^40 times: it runs until it is stopped."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    g = helper.make_graph([helper.make_node("Loop", ["M", "c", "x"], ["y"], body=body)], "loop",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                          [helper.make_tensor("M", TensorProto.INT64, [], [1 << 40]),
                           helper.make_tensor("c", TensorProto.BOOL, [], [True])])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def _check_record(rec, target):
    assert rec["target"] == target
    cpu = rec["cpu"]
    assert cpu["arch"] in ("x86_64", "aarch64")
    kernel = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8") \
        if cpu["arch"] == "x86_64" else ("asimd", "asimddp", "i8mm", "sve", "bf16")
    assert set(kernel) <= set(cpu["features"]) and all(isinstance(v, bool) for v in cpu["features"].values())
    assert cpu["microarchitecture"] and cpu["named_by"].startswith("archspec")
    assert rec["onnxruntime"]["version"] and rec["onnxruntime"]["execution_provider"] == "CPUExecutionProvider"
    assert rec["numpy"] and rec["python"]


def test_native_runner_matches_numpy_and_reports_this_process(tmp_path):
    path = _linear(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    w = onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    with TargetRunner(path, "native", threads=1) as r:
        y = r.infer({"x": x})["y"]
        assert r.fixed_batch() is None and r.input_names == ["x"]
        rec = r.hardware
        child_pid = r.proc.pid
    assert child_pid != os.getpid()  # the model ran in a child
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
    _check_record(rec, "native")
    assert rec["emulated"] is None and rec["onnxruntime"]["intra_op_threads"] == 1
    # this process sees the same CPU as its native child
    mine = hardware.process_record()
    assert mine["cpu"]["features"] == rec["cpu"]["features"]
    assert mine["cpu"]["microarchitecture"] == rec["cpu"]["microarchitecture"]


def test_crash_during_inference_is_one_line(tmp_path):
    path = _linear(tmp_path / "m.onnx")
    with TargetRunner(path, "native") as r:
        os.kill(r.proc.pid, signal.SIGSEGV)  # what a hostile graph does to onnxruntime's process
        with pytest.raises(AuditError, match=r"^onnxruntime crashed \(SIGSEGV\) on this model$"):
            r.infer({"x": np.zeros((1, 4), np.float32)})


def test_inference_that_never_ends_is_stopped(tmp_path):
    path = _slow_loop(tmp_path / "loop.onnx")
    with TargetRunner(path, "native", timeout=3) as r:
        with pytest.raises(AuditError, match=r"onnxruntime ran out of time \(3 s\) on this model"):
            r.infer({"x": np.zeros(1, np.float32)})
        pid = r.proc.pid
    with pytest.raises(ProcessLookupError):  # the child is gone, not left running
        os.kill(pid, 0)


def test_unloadable_model_and_unknown_target(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(AuditError, match="^onnxruntime cannot load junk.onnx: "):
        with TargetRunner(tmp_path / "junk.onnx", "native"):
            pass
    with pytest.raises(AuditError, match="unknown target 'x86-64-v9'"):
        resolve("x86-64-v9")
    assert resolve("ort-cpu").name == "native"


def test_targets_command_lists_every_target_with_a_remedy():
    r = subprocess.run([sys.executable, "-m", "auditor", "targets", "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {t["name"]: t for t in doc["targets"]}
    assert list(rows) == list(TARGETS)
    assert rows["native"]["available"] is True
    for t in rows.values():
        assert t["available"] or (t["why_not"] and t["make_available"]), t
    assert doc["hardware"]["target"] == "native" and doc["hardware"]["ran_model"] is False


@pytest.mark.parametrize("target,arch", [("x86-64-v3", "x86_64"), ("x86-64-v2", "x86_64"), ("aarch64", "aarch64"),
                                         ("aarch64-i8mm", "aarch64")])
def test_emulated_target_runs_on_the_emulated_instruction_set(tmp_path, target, arch):
    _needs(target)
    path = _linear(tmp_path / "m.onnx")
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    with TargetRunner(path, "native") as r:
        y_native, host = r.infer({"x": x})["y"], r.hardware
    with TargetRunner(path, target) as r:
        y, rec = r.infer({"x": x})["y"], r.hardware
    np.testing.assert_allclose(y, y_native, rtol=1e-5, atol=1e-5)
    _check_record(rec, target)
    assert rec["cpu"]["arch"] == arch
    em = rec["emulated"]
    assert em["emulator"] == TARGETS[target].emulator and em["cpu"] == TARGETS[target].emulator_cpu and em["version"]
    # the child saw the emulated CPU, not the host's (a child that escaped emulation would not)
    assert rec["cpu"]["all_features"] != host["cpu"]["all_features"]
    if target == "x86-64-v3":
        f = rec["cpu"]["features"]
        assert f["avx2"] and f["fma"] and not f["avx512f"] and not f["avx512_vnni"]
        assert rec["cpu"]["level"] == "x86_64_v3" and rec["cpu"]["microarchitecture"] == "haswell"
    if target == "x86-64-v2":
        assert not rec["cpu"]["features"]["avx"] and rec["cpu"]["level"] == "x86_64_v2"
    if target.startswith("aarch64"):
        assert rec["cpu"]["features"]["asimd"] and rec["cpu"]["features"]["asimddp"]
        assert rec["cpu"]["features"]["i8mm"] == rec["cpu"]["features"]["sve"] == (target == "aarch64-i8mm")
        assert rec["onnxruntime"]["version"] == json.loads((aarch64_root() / "versions.json").read_text())["onnxruntime"]

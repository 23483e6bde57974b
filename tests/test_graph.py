"""Opening ONNX files safely: refusals with one-line AuditErrors, lazy external reads."""
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from auditor.errors import AuditError
from auditor.read.graph import external_files, open_model, tensor_array


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    init = numpy_helper.from_array(w, "W")
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])], [init])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _save_external(model: onnx.ModelProto, path, location: str, data: bytes, offset: int = 0) -> None:
    """Point every initializer at `location` (raw bytes written by the caller)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        set_external_data(t, location=location, offset=offset, length=len(data))
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
    with open(path, "wb") as f:
        f.write(m.SerializeToString())


@pytest.fixture
def w():
    return np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)


def test_missing_file_directory_and_garbage(tmp_path):
    with pytest.raises(AuditError, match="no such file"):
        open_model(tmp_path / "absent.onnx")
    with pytest.raises(AuditError, match="directory"):
        open_model(tmp_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff\xff\xff not a protobuf at all \x00\x01")
    with pytest.raises(AuditError, match="not an ONNX model"):
        open_model(bad)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(AuditError, match="not an ONNX model"):
        open_model(empty)


def test_truncated_file_is_refused(tmp_path, w):
    p = tmp_path / "m.onnx"
    onnx.save(_matmul_model(w), p)
    data = p.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AuditError) as e:
        open_model(cut)
    assert "\n" not in str(e.value)


def test_external_data_inside_folder_reads_only_its_bytes(tmp_path, w):
    pad = b"\x00" * 100
    (tmp_path / "weights.bin").write_bytes(pad + w.tobytes() + b"\x07" * 50)
    p = tmp_path / "m.onnx"
    _save_external(_matmul_model(w), p, "weights.bin", w.tobytes(), offset=100)
    m = open_model(p)
    assert external_files(m) == ["weights.bin"]
    t = m.graph.initializer[0]
    assert t.data_location == TensorProto.EXTERNAL and not t.raw_data  # not loaded by open_model
    got = tensor_array(t, tmp_path)
    assert got.dtype == np.float32 and np.array_equal(got, w)


def test_external_data_in_subfolder_is_accepted(tmp_path, w):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "w.bin").write_bytes(w.tobytes())
    p = tmp_path / "m.onnx"
    _save_external(_matmul_model(w), p, "data/w.bin", w.tobytes())
    assert np.array_equal(tensor_array(open_model(p).graph.initializer[0], tmp_path), w)


@pytest.mark.parametrize("location", ["../x.bin", "sub/../../x.bin"])
def test_external_data_climbing_out_is_refused(tmp_path, w, location):
    inner = tmp_path / "model"
    (inner / "sub").mkdir(parents=True)
    (tmp_path / "x.bin").write_bytes(w.tobytes())  # the file exists: refusal is about the path
    p = inner / "m.onnx"
    _save_external(_matmul_model(w), p, location, w.tobytes())
    with pytest.raises(AuditError, match="outside the model's folder"):
        open_model(p)


def test_absolute_external_location_is_refused(tmp_path, w):
    target = tmp_path / "abs.bin"
    target.write_bytes(w.tobytes())
    p = tmp_path / "m.onnx"
    _save_external(_matmul_model(w), p, str(target), w.tobytes())
    with pytest.raises(AuditError, match="absolute"):
        open_model(p)


def test_symlinks_are_refused_inside_or_out(tmp_path, w):
    """onnx's rule (CVE-2026-27489): no symbolic link is followed, even one that points inside the folder."""
    outside = tmp_path / "secret.bin"
    outside.write_bytes(w.tobytes())
    inner = tmp_path / "model"
    inner.mkdir()
    os.symlink(outside, inner / "w.bin")
    p = inner / "m.onnx"
    _save_external(_matmul_model(w), p, "w.bin", w.tobytes())
    with pytest.raises(AuditError, match="symbolic link"):
        open_model(p)
    (inner / "real.bin").write_bytes(w.tobytes())
    os.symlink(inner / "real.bin", inner / "inside.bin")
    p2 = inner / "m2.onnx"
    _save_external(_matmul_model(w), p2, "inside.bin", w.tobytes())
    with pytest.raises(AuditError, match="symbolic link"):
        open_model(p2)
    os.symlink(tmp_path, inner / "up")  # a linked folder on the way
    p3 = inner / "m3.onnx"
    _save_external(_matmul_model(w), p3, "up/secret.bin", w.tobytes())
    with pytest.raises(AuditError, match="symbolic link"):
        open_model(p3)


def test_missing_or_short_external_file_is_refused(tmp_path, w):
    p = tmp_path / "m.onnx"
    _save_external(_matmul_model(w), p, "gone.bin", w.tobytes())
    with pytest.raises(AuditError, match="not found"):
        open_model(p)
    (tmp_path / "short.bin").write_bytes(w.tobytes()[:40])
    p2 = tmp_path / "m2.onnx"
    _save_external(_matmul_model(w), p2, "short.bin", w.tobytes())
    with pytest.raises(AuditError, match="bytes"):
        open_model(p2)


def test_onnx_external_data_helpers_roundtrip(tmp_path):
    """A model written by onnx's own external-data writer reads back exactly, int4 included."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float16)
    q = rng.integers(-8, 8, size=(5, 7)).astype(np.int8)
    flat = np.append(q.flatten(), 0).astype(np.uint8) & 0x0F  # int4 packs two per byte, low nibble first
    t4 = helper.make_tensor("Q4", TensorProto.INT4, q.shape, (flat[0::2] | (flat[1::2] << 4)).tobytes(), raw=True)
    init = [numpy_helper.from_array(w, "W16"), t4]
    node = helper.make_node("Identity", ["W16"], ["y"])
    node2 = helper.make_node("Identity", ["Q4"], ["y4"])
    g = helper.make_graph([node, node2], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None),
                                                   helper.make_tensor_value_info("y4", TensorProto.INT4, None)], init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    p = tmp_path / "m.onnx"
    onnx.save_model(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    mm = open_model(p)
    by = {t.name: t for t in mm.graph.initializer}
    assert all(t.data_location == TensorProto.EXTERNAL for t in by.values())
    assert np.array_equal(tensor_array(by["W16"], tmp_path), w)
    assert np.array_equal(tensor_array(by["Q4"], tmp_path).astype(np.int8), q)

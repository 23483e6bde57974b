"""The data layer: every source bound to the model's declared inputs, and bad data refused in one line."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from auditor.data import inputs
from auditor.data.accuracy import outputs
from auditor.errors import AuditError


def _model(path, ins, op="Identity"):
    """A one-node model: Identity of the first input (or Add of two float inputs)."""
    vis = [helper.make_tensor_value_info(n, t, dims) for n, t, dims in ins]
    if op == "Identity":
        nodes = [helper.make_node("Identity", [ins[0][0]], ["y"])]
        out_t, out_dims = ins[0][1], ins[0][2]
    else:  # two int inputs -> their float sum per row, [N, 2] "logits"
        nodes = [helper.make_node("Add", [ins[0][0], ins[1][0]], ["s"]),
                 helper.make_node("Cast", ["s"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
                 helper.make_node("ReduceSum", ["f", "axes"], ["r"], keepdims=1),
                 helper.make_node("Concat", ["r", "r"], ["y"], axis=1)]
        out_t, out_dims = TensorProto.FLOAT, ["N", 2]
    g = helper.make_graph(nodes, "g", vis, [helper.make_tensor_value_info("y", out_t, out_dims)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    onnx.save(m, str(path))
    return path


@pytest.fixture()
def img_model(tmp_path):
    return _model(tmp_path / "img.onnx", [("x", TensorProto.FLOAT, ["N", 1, 8, 8])])


def test_npz_npy_idx_and_shapes(img_model, tmp_path):
    x = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    y = np.arange(10) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = inputs.load_data(str(tmp_path / "d.npz"), img_model)
    assert d.n == 10 and d.source == "npz:d.npz" and np.array_equal(d.labels, y)
    np.testing.assert_array_equal(d.inputs["x"], x)
    # a single-input model takes the archive's only array whatever its name
    np.savez(tmp_path / "other.npz", images=x)
    assert inputs.load_data(str(tmp_path / "other.npz"), img_model).labels is None
    # .npy [n, 8, 8] gets the single channel axis; a seeded subset
    np.save(tmp_path / "x.npy", x[:, 0].astype(np.float64))
    d = inputs.load_data(str(tmp_path / "x.npy"), img_model, samples=4, seed=1)
    idx = np.sort(np.random.default_rng(1).choice(10, 4, replace=False))
    np.testing.assert_array_equal(d.inputs["x"], x[idx])
    assert d.inputs["x"].dtype == np.float32
    # IDX uint8 [n, 8, 8] images: scaled by 1/255 (the stated default preprocessing)
    px = (np.arange(3 * 64) % 256).astype(np.uint8).reshape(3, 8, 8)
    with gzip.open(tmp_path / "imgs-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">III", 3, 8, 8) + px.tobytes())
    d = inputs.load_data(str(tmp_path / "imgs-idx3-ubyte.gz"), img_model)
    np.testing.assert_allclose(d.inputs["x"][:, 0], px / 255.0, atol=1e-7)
    assert d.preprocess["scale"] == 255.0


def test_image_folder_with_class_folders_and_stated_preprocessing(tmp_path):
    from PIL import Image

    model = _model(tmp_path / "rgb.onnx", [("x", TensorProto.FLOAT, ["N", 3, 4, 4])])
    for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 51, 255))):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(tmp_path / "imgs" / c / f"{i}.png")
    pre = inputs.parse_preprocess("scale=255,mean=0.5/0.5/0.5,std=0.5/0.5/0.5")
    d = inputs.load_data(str(tmp_path / "imgs"), model, preprocess=pre)
    assert d.inputs["x"].shape == (4, 3, 4, 4) and list(d.labels) == [0, 0, 1, 1]
    # (255/255 - 0.5) / 0.5 = 1, (0 - 0.5) / 0.5 = -1, (51/255 - 0.5) / 0.5 = -0.6
    np.testing.assert_allclose(d.inputs["x"][0, :, 0, 0], [1.0, -1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(d.inputs["x"][3, :, 0, 0], [-1.0, -0.6, 1.0], atol=1e-6)
    assert d.preprocess["layout"] == "nchw" and d.preprocess["size"] == [4, 4]
    nhwc = inputs.load_data(str(tmp_path / "imgs"), _model(tmp_path / "nhwc.onnx",
                            [("x", TensorProto.FLOAT, ["N", 4, 4, 3])]), preprocess=pre)
    np.testing.assert_allclose(nhwc.inputs["x"], d.inputs["x"].transpose(0, 2, 3, 1))


def test_two_inputs_synthetic_and_fixed_batch(tmp_path):
    two = _model(tmp_path / "two.onnx", [("input_ids", TensorProto.INT64, ["N", "seq"]),
                                         ("attention_mask", TensorProto.INT64, ["N", "seq"])], op="Add")
    d = inputs.load_data("synthetic", two, samples=6, seed=3)
    assert d.synthetic and d.describe()["synthetic"] and "do not reflect deployment" in d.describe()["caveat"]
    assert d.inputs["input_ids"].shape == (6, inputs.SYNTHETIC_DIM) and d.inputs["input_ids"].dtype == np.int64
    assert set(np.unique(d.inputs["input_ids"])) <= {0, 1} and np.all(d.inputs["attention_mask"] == 1)
    assert d.digest == inputs.load_data("synthetic", two, samples=6, seed=3).digest
    out = outputs(str(two), d)["y"]
    np.testing.assert_array_equal(out[:, 0], (d.inputs["input_ids"] + 1).sum(axis=1))
    # a fixed batch of 4: 10 examples -> 3 batches of 4, the last padded with repeats of its own
    # 2 examples; every example gets its own output, the padding's are discarded
    fixed = _model(tmp_path / "b4.onnx", [("x", TensorProto.FLOAT, [4, 3])])
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    np.save(tmp_path / "x.npy", x)
    d = inputs.load_data(str(tmp_path / "x.npy"), fixed)
    assert (d.n, d.batch_size, d.dropped, d.padded) == (10, 4, 0, 2)
    assert [len(b["x"]) for b in d.batches()] == [4, 4, 4]
    assert [n for _, n in d.counted_batches()] == [4, 4, 2]
    last = list(d.batches())[-1]["x"]
    np.testing.assert_array_equal(last, x[[8, 9, 8, 9]])
    assert d.describe()["padded"] == 2 and d.describe()["remainder"].startswith("padded")
    np.testing.assert_array_equal(outputs(str(fixed), d)["y"], x)   # Identity: each example its own row
    # calibration does not pad (repeats would weigh examples twice): 8 examples, 2 dropped
    c = d.without_remainder()
    assert (c.n, c.dropped, c.padded) == (8, 2, 0) and c.describe()["remainder"] == "none"
    # fewer examples than one batch: padded, never refused
    np.save(tmp_path / "x3.npy", x[:3])
    d3 = inputs.load_data(str(tmp_path / "x3.npy"), fixed)
    assert (d3.n, d3.padded) == (3, 1) and d3.without_remainder() is d3
    np.testing.assert_array_equal(outputs(str(fixed), d3)["y"], x[:3])


@pytest.mark.parametrize("case", ["shape", "dtype", "nan", "empty", "labels", "image", "npz-missing", "npy-two"])
def test_bad_data_is_one_line(case, img_model, tmp_path):
    two = _model(tmp_path / "two.onnx", [("input_ids", TensorProto.INT64, ["N", 5]),
                                         ("attention_mask", TensorProto.INT64, ["N", 5])], op="Add")
    x = np.zeros((4, 1, 8, 8), np.float32)
    model, spec, labels, want = img_model, str(tmp_path / "d.npy"), None, ""
    if case == "shape":
        np.save(spec, np.zeros((4, 1, 28, 28), np.float32))
        want = "shape [4, 1, 28, 28] does not fit input 'x' [N, 1, 8, 8]"
    elif case == "dtype":
        model, spec = two, str(tmp_path / "d.npz")
        np.savez(spec, input_ids=np.zeros((4, 5), np.float32), attention_mask=np.ones((4, 5), np.int64))
        want = "dtype float32 does not fit input 'input_ids' (int64)"
    elif case == "nan":
        x[1, 0, 2, 2] = np.nan
        x[2, 0, 0, 0] = np.inf
        np.save(spec, x)
        want = "2 NaN/Inf values"
    elif case == "empty":
        (tmp_path / "d.npy").write_bytes(b"")
        want = "empty file"
    elif case == "labels":
        np.save(spec, x)
        np.save(tmp_path / "y.npy", np.arange(3))
        labels, want = str(tmp_path / "y.npy"), "3 labels for 4 examples"
    elif case == "image":
        (tmp_path / "imgs").mkdir()
        (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
        spec, want = str(tmp_path / "imgs"), "cannot read image"
    elif case == "npz-missing":
        model, spec = two, str(tmp_path / "d.npz")
        np.savez(spec, input_ids=np.zeros((4, 5), np.int64))
        want = "no array for model input 'attention_mask'"
    elif case == "npy-two":
        model = two
        np.save(spec, np.zeros((4, 5), np.int64))
        want = "use an .npz with one array per input"
    with pytest.raises(AuditError) as e:
        inputs.load_data(spec, model, labels=labels)
    msg = str(e.value)
    assert want in msg and "\n" not in msg


def test_default_data_is_fashion_mnist_only_for_its_shape(img_model, tmp_path):
    with pytest.raises(AuditError, match=r"the model takes x \[N, 1, 8, 8\] float32, not Fashion-MNIST images: "
                                         r"give --data"):
        inputs.load_data(None, img_model)
    fm = _model(tmp_path / "fm.onnx", [("input", TensorProto.FLOAT, ["N", 1, 28, 28])])
    d = inputs.load_data(None, fm, samples=5)  # evaluation: the test split (calibration: train, see test_calibration)
    assert d.source == "fashion-mnist:test" and d.inputs["input"].shape == (5, 1, 28, 28)

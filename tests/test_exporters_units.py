"""Torch side: reductions, regulariser, determinism, key round-trip, export promises.

Small real trainings (Fashion-MNIST subsets, sine windows) keep this file
under a minute on one core.
"""
import copy

import numpy as np
import onnx
import pytest
import torch

from auditor.marks import keys
from exporters import data, export, models, train
from exporters import watermark as wm

TARGET = "features.conv2.weight"


@pytest.fixture(scope="module")
def fashion_small():
    return data.fashion("train", n=256, seed=5), data.fashion("test", n=200, seed=5)


def _tiny_cnn(fashion_small, seed=0, mark=True):
    (x, y), test = fashion_small
    train.seeded(seed)
    model = models.SmallCNN()
    spec = wm.MarkSpec(TARGET, wm.random_bits(64, 1), "mean", seed=2)
    reg = wm.UchidaRegularizer(model, [spec], strength=10.0) if mark else None
    metrics = train.train_classifier(model, x, y, epochs=1, batch=32, seed=seed, reg=reg, test=test,
                                     target_lr={TARGET: 3e-2})
    return model, spec, metrics


@pytest.fixture(scope="module")
def tiny_cnn(fashion_small):
    return _tiny_cnn(fashion_small)


def test_reduce_torch_matches_auditor_reduction():
    g = torch.Generator().manual_seed(0)
    for shape in [(32, 32, 3, 3), (128, 16), (5, 7)]:
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        for red in keys.REDUCTIONS:
            np.testing.assert_allclose(wm.reduce_torch(w, red).numpy(), keys.reduce_weight(w.numpy(), red),
                                       rtol=0, atol=1e-15)


def test_regulariser_uses_the_key_generator():
    model = models.SeqRNN("gru", 16, 16, 1)
    spec = wm.MarkSpec("rnn.weight_hh_l0", wm.random_bits(100, 3), "flatten", seed=9, scale=0.5)
    reg = wm.UchidaRegularizer(model, [spec])
    X = keys.generate_projection(9, 100, 48 * 16, 0.5)
    assert np.array_equal(reg._X[spec.id].numpy(), X.astype(np.float32))
    mark = wm.make_key(model, [spec]).whitebox[0]
    assert np.array_equal(mark.matrix(), X)


def test_random_bits_are_seeded_and_balanced():
    b = wm.random_bits(256, 1)
    assert np.array_equal(b, wm.random_bits(256, 1))
    assert not np.array_equal(b, wm.random_bits(256, 2))
    assert 100 < int(b.sum()) < 156


def test_two_marks_embed_in_kernel_and_recurrent_weights():
    x, y = data.sine_windows(data.sine_signal(), 6, 16)
    train.seeded(3)
    model = models.SeqRNN("rnn", 16, 16, 1)  # 256 kernel and 256 recurrent weights
    specs = [wm.MarkSpec("rnn.weight_ih_l0", wm.random_bits(64, 1), "flatten", seed=2),
             wm.MarkSpec("rnn.weight_hh_l0", wm.random_bits(64, 3), "flatten", seed=4)]
    before = wm.UchidaRegularizer(model, specs).ber()
    assert all(0.2 < v < 0.8 for v in before.values())
    reg = wm.UchidaRegularizer(model, specs, strength=1.0)
    metrics = train.train_regression(model, x, y, epochs=30, batch=32, lr=1e-2, seed=3, reg=reg)
    assert metrics["ber"] == {s.id: 0.0 for s in specs}
    assert metrics["train_mse"] < 0.01
    key = wm.make_key(model, specs)
    for mark in key.whitebox:
        assert np.array_equal(wm.extract_bits_torch(model, mark), mark.bits)


def test_training_is_deterministic_and_commitment_follows(fashion_small, tiny_cnn):
    model_a, spec, metrics_a = tiny_cnn
    model_b, _, metrics_b = _tiny_cnn(fashion_small)
    for (n, pa), (_, pb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(pa, pb), n
    assert metrics_a["test_accuracy"] == metrics_b["test_accuracy"]
    ka, kb = wm.make_key(model_a, [spec]), wm.make_key(model_b, [spec])
    assert ka.to_json()["commitment"] == kb.to_json()["commitment"]
    # Another seed trains other weights, hence other BN anchors and another commitment.
    model_c, _, _ = _tiny_cnn(fashion_small, seed=1)
    assert wm.make_key(model_c, [spec]).to_json()["commitment"] != ka.to_json()["commitment"]


def test_mark_embedded_and_bn_anchors_stored(tiny_cnn, tmp_path):
    model, spec, metrics = tiny_cnn
    assert metrics["ber"][spec.id] == 0.0
    assert metrics["test_accuracy"] > 0.4  # 8 steps on 256 images; chance is 0.1
    key = wm.make_key(model, [spec], {"name": "SmallCNN"})
    bn = model.features.bn2
    anchors = key.whitebox[0].batchnorm
    for k, t in [("gamma", bn.weight), ("beta", bn.bias), ("running_mean", bn.running_mean),
                 ("running_var", bn.running_var)]:
        assert np.array_equal(np.asarray(anchors[k], dtype=np.float32), t.detach().numpy()), k
    assert anchors["eps"] == bn.eps
    # Round trip through the key file: same bits, shape, X, anchors, commitment.
    doc = keys.save_key(key, tmp_path / "key.json")
    back = keys.load_key(tmp_path / "key.json")
    m0, m1 = key.whitebox[0], back.whitebox[0]
    assert back.commitment == doc["commitment"]
    assert (m1.param, m1.shape, m1.reduce) == (TARGET, (32, 32, 3, 3), "mean")
    assert np.array_equal(m1.bits, m0.bits) and np.array_equal(m1.matrix(), m0.matrix())
    assert m1.batchnorm == m0.batchnorm
    assert np.array_equal(wm.extract_bits_torch(model, m1), spec.bits)


def test_explicit_matrix_goes_to_a_sidecar(tmp_path):
    model = models.SeqRNN("lstm", 4, 8, 1)
    X = np.random.default_rng(0).standard_normal((16, 32 * 8))
    spec = wm.MarkSpec("rnn.weight_hh_l0", wm.random_bits(16, 0), "flatten", matrix=X)
    key = wm.make_key(model, [spec], sidecar_dir=tmp_path)
    keys.save_key(key, tmp_path / "key.json")
    assert np.array_equal(keys.load_key(tmp_path / "key.json").whitebox[0].matrix(), X)


def _bn_count(path):
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("exporter,optimize", [("dynamo", "none"), ("legacy", "none"), ("dynamo", "keep-batchnorm")])
def test_export_keeps_mark_and_batchnorm(tiny_cnn, fashion_small, tmp_path, exporter, optimize):
    model, spec, _ = tiny_cnn
    _, (xt, _) = fashion_small
    key = wm.make_key(model, [spec])
    res = export.export_marked(model, tmp_path, xt[:2], [xt[:3], xt[3:50]], key=key, exporter=exporter,
                               optimize=optimize, dynamic_axes={0: "batch"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json", "manifest.json", "model.onnx"]
    m = onnx.load(str(res.onnx_path))
    assert m.ir_version <= 10
    assert _bn_count(res.onnx_path) == 3
    entry = res.manifest["params"][TARGET]
    assert entry["transform"] == "identity" and entry["batchnorm_kept"] is True
    w = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}[entry["onnx"]]
    assert np.array_equal(w, model.features.conv2.weight.detach().numpy())
    assert res.manifest["validation"]["max_abs_diff"] < 1e-4
    assert res.manifest["input_dims"][0] == "batch"
    bits = (key.whitebox[0].matrix() @ keys.reduce_weight(w, "mean") > 0).astype(np.uint8)
    assert np.array_equal(bits, spec.bits)


def test_export_fails_loudly_when_outputs_differ(tiny_cnn, fashion_small, tmp_path):
    model, spec, _ = tiny_cnn
    _, (xt, _) = fashion_small
    export.export_onnx(model, xt[:2], tmp_path / "m.onnx", exporter="legacy", dynamic_axes={0: "batch"})
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.fc2.bias += 0.01
    with pytest.raises(export.ExportError, match="differs from torch"):
        export.validate_outputs(other, tmp_path / "m.onnx", [xt[:4]])
    with pytest.raises(export.ExportError, match="not found bit-identical"):
        with torch.no_grad():
            other.features.conv2.weight[0, 0, 0, 0] += 1e-6
        export.locate_params(tmp_path / "m.onnx", other, [TARGET])
    assert export.validate_outputs(model, tmp_path / "m.onnx", [xt[:4]])["max_abs_diff"] < 1e-4


def test_export_leaves_no_partial_files_on_failure(tiny_cnn, fashion_small, tmp_path):
    model, spec, _ = tiny_cnn
    _, (xt, _) = fashion_small
    # Inputs of another image size cannot validate the exported graph: refused, nothing written.
    with pytest.raises(export.ExportError, match="no validation input fits"):
        export.export_marked(model, tmp_path, xt[:2], [torch.zeros(3, 1, 27, 27)],
                             key=wm.make_key(model, [spec]), exporter="legacy")
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_external_data_only_when_asked(tmp_path, exporter):
    train.seeded(0)
    model = models.SeqRNN("gru", 16, 32, 1)
    spec = wm.MarkSpec("rnn.weight_hh_l0", wm.random_bits(32, 1), "flatten", seed=2)
    x, _ = data.sine_windows(data.sine_signal(), 8, 16)
    res = export.export_marked(model, tmp_path, x[:2], [x[:5]], key=wm.make_key(model, [spec]), exporter=exporter,
                               dynamic_axes={0: "batch", 1: "time"}, external_data=True)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.onnx" in files and any(f.startswith("model.onnx") and f != "model.onnx" for f in files)
    assert res.manifest["exporter"]["external_data"] is True
    m = onnx.load(str(res.onnx_path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    entry = res.manifest["params"]["rnn.weight_hh_l0"]
    from auditor.read import layout
    from auditor.read.weights import WeightStore
    w = layout.apply_transform(WeightStore.open(res.onnx_path).array(entry["onnx"]), entry["transform"])
    assert np.array_equal(w, model.rnn.weight_hh_l0.detach().numpy())


@pytest.mark.slow
def test_large_cnn_exports_with_mark_located(tmp_path):
    train.seeded(0)
    model = models.LargeCNN()
    assert 32_000_000 < models.n_params(model) < 34_000_000
    assert model.features.conv2.weight.numel() == 36_864
    xt, _ = data.fashion("test", n=16, seed=0)
    spec = wm.MarkSpec(TARGET, wm.random_bits(256, 1), "mean", seed=2)
    res = export.export_marked(model, tmp_path, xt[:2], [xt[:8]], key=wm.make_key(model, [spec]),
                               dynamic_axes={0: "batch"})
    assert res.manifest["params"][TARGET]["batchnorm_kept"] is True
    assert res.manifest["validation"]["max_abs_diff"] < 1e-4


def test_decoupled_embedding_reaches_the_bits_and_is_recorded():
    corpus = data.CharCorpus.shakespeare(max_chars=20000)
    train.seeded(0)
    model = models.CharLSTM(corpus.vocab_size, 32)
    before = model.rnn.weight_hh_l0.detach().clone()
    specs = [wm.MarkSpec("rnn.weight_ih_l0", wm.random_bits(32, 1), "flatten", seed=2),
             wm.MarkSpec("rnn.weight_hh_l0", wm.random_bits(32, 3), "flatten", seed=4)]
    reg = wm.UchidaRegularizer(model, specs, strength=1.0, decoupled_lr=2.0)
    assert not reg.joint
    m = train.train_char(model, corpus, steps=30, seq_len=40, batch=8, seed=0, reg=reg)
    assert m["ber"] == {s.id: 0.0 for s in specs}
    assert not torch.equal(before, model.rnn.weight_hh_l0)
    entry = reg.key().to_json()["whitebox"][0]
    assert entry["embedding"] == {"method": "uchida2017", "loss": "bce", "strength": 1.0,
                                  "update": "decoupled-sgd(lr=2)"}

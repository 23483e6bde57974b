"""The model transformation on ONNX: parity, accuracy with wrong keys, equality with torch's, CLI.

Measured on the keyed-vit fixture (TinyViT, 2 epochs on 4,000 images), 500 seeded test images:
plain 0.668; keyed + right key 0.668 (max |logit diff| ~2e-6, agreement 1.0); keyed + plain
images 0.128 (orthogonal key a) / 0.238 (permutation key d); keyed + 3 wrong keys worst
0.12 (orthogonal) / 0.22 (permutation); chance 0.10.
"""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from auditor.cli import main
from auditor.keyed import cipher, keys, verify
from auditor.keyed import model as km
from auditor.keyed.inputs import read_data


@pytest.fixture(scope="module")
def vit(build_fixture):
    return build_fixture("keyed-vit")


@pytest.fixture(scope="module")
def test_data():
    return read_data("fashion-mnist:test", limit=500, seed=0)


def _inits(m):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("plain_file", ["plain.onnx", "plain-linear.onnx"])
@pytest.mark.parametrize("client", ["client-a", "client-d"])
def test_parity_and_accuracy(vit, test_data, plain_file, client):
    key = keys.load(vit / "keys" / f"{client}.json")
    plain = onnx.load(str(vit / plain_file))
    emb = km.locate(plain, key)
    assert emb.kind == ("conv" if plain_file == "plain.onnx" else "matmul")
    assert emb.pos == "pos_embed" and emb.pos_offset == 1
    keyed = km.transform(plain, key, emb)
    r = verify.accuracies(plain, keyed, key, test_data.inputs, test_data.labels, n_wrong=3, seed=0)
    assert r["parity"]["max_abs_diff"] <= 1e-4 and r["parity"]["top1_agreement"] == 1.0
    acc = r["accuracy"]
    assert acc["plain_model_plain_images"]["accuracy"] > 0.6
    assert acc["keyed_model_right_key"]["accuracy"] == acc["plain_model_plain_images"]["accuracy"]
    # pixel shuffling inside 4x4 blocks keeps more of the image than an orthogonal mixing
    near_chance = 0.2 if key.variant == "orthogonal" else 0.3
    assert acc["keyed_model_plain_images"]["accuracy"] < near_chance
    assert acc["keyed_model_wrong_keys"]["worst"] < near_chance and acc["keyed_model_wrong_keys"]["samples_per_key"] == 500


@pytest.mark.parametrize("client", ["a", "d"])
def test_onnx_transformation_equals_torch(vit, client):
    key = keys.load(vit / "keys" / f"client-{client}.json")
    plain = onnx.load(str(vit / "plain.onnx"))
    ours = _inits(km.transform(plain, key))
    torch_side = _inits(onnx.load(str(vit / f"torch-keyed-{client}.onnx")))
    base = _inits(plain)
    for name in ("patch_embed.weight", "pos_embed"):
        assert np.abs(ours[name] - torch_side[name]).max() < 1e-6
        assert np.abs(ours[name] - base[name]).max() > 1e-3  # the key changed it
    for name in base:
        if name not in ("patch_embed.weight", "pos_embed"):
            assert np.array_equal(ours[name], base[name])


def test_linear_patchify_measured(vit):
    key = keys.load(vit / "keys" / "client-a.json")
    emb = km.locate(onnx.load(str(vit / "plain-linear.onnx")), key)
    # (row, col, channel) order of the patchify: feature l = row*4 + col for one channel
    assert np.array_equal(emb.token_block, np.arange(49)) and np.array_equal(emb.feature_offset, np.arange(16))
    assert emb.weight_transposed


def test_cli_encrypt_model_images_verify(vit, tmp_path, capsys):
    key = vit / "keys" / "client-b.json"
    out = tmp_path / "keyed.onnx"
    assert main(["keyed", "encrypt-model", str(vit / "plain.onnx"), "--key", str(key), "-o", str(out),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["parity"]["holds"] and doc["output"]["sha256"].startswith("sha256:")
    assert doc["key_commitment"] == keys.load(key).commitment
    enc = tmp_path / "enc.npz"
    from auditor.data.datasets import data_root

    idx = data_root() / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"  # IDX images, labels from the sibling file
    assert main(["keyed", "encrypt-images", str(idx), "--key", str(key), "-o", str(enc)]) == 0
    with np.load(enc) as z:
        x, y = z["input"], z["y"]
    assert x.shape == (10000, 1, 28, 28) and len(y) == 10000
    k = keys.load(key)
    d = read_data("fashion-mnist:test")
    assert np.abs(cipher.decrypt(x[:50], k) - d.inputs[:50]).max() < 1e-5
    capsys.readouterr()
    assert main(["keyed", "verify", str(out), "--key", str(key), "--plain", str(vit / "plain.onnx"),
                 "--samples", "300", "--wrong-keys", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["parity"]["top1_agreement"] == 1.0 and doc["accuracy"]["keyed_model_wrong_keys"]["keys"] == 2
    # the wrong key: parity fails, exit 1
    assert main(["keyed", "verify", str(out), "--key", str(vit / "keys" / "client-a.json"), "--plain",
                 str(vit / "plain.onnx"), "--samples", "300", "--wrong-keys", "0"]) == 1
    # a key with another block size: one line, exit 2, nothing written
    bad = tmp_path / "b7.json"
    keys.save(keys.generate(image_size=28, channels=1, block=7, seed=1), bad)
    capsys.readouterr()
    assert main(["keyed", "encrypt-model", str(vit / "plain.onnx"), "--key", str(bad), "-o",
                 str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "block size 4" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


def test_names_and_token_order_do_not_matter(vit, test_data):
    """Renamed initializers (as quantizers and the legacy exporter do) and a column-major
    patchify (token order measured, not assumed) are keyed with exact parity."""
    key = keys.load(vit / "keys" / "client-c.json")
    m = onnx.load(str(vit / "plain-linear.onnx"))
    rename = {"pos_embed": "t0", "patch_embed.weight": "t1"}
    for t in m.graph.initializer:
        t.name = rename.get(t.name, t.name)
    for n in m.graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
    for n in m.graph.node:
        if n.op_type == "Transpose" and [a.ints for a in n.attribute if a.name == "perm"][0] == [0, 2, 4, 3, 5, 1]:
            del n.attribute[:]
            n.attribute.append(onnx.helper.make_attribute("perm", [0, 4, 2, 3, 5, 1]))  # tokens column-major
            break
    else:
        raise AssertionError("patchify Transpose not found")
    emb = km.locate(m, key)
    assert (emb.weight, emb.pos) == ("t1", "t0")
    assert np.array_equal(emb.token_block, np.arange(49).reshape(7, 7).T.reshape(-1))
    keyed = km.transform(m, key, emb)
    par = km.parity(m, keyed, key, test_data.inputs[:200])
    assert par["max_abs_diff"] <= 1e-4 and par["top1_agreement"] == 1.0

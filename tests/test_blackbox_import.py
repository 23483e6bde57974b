"""Importing trigger sets made elsewhere: .npy or a folder of PNGs, labels as .npy or text."""
import json

import numpy as np
import pytest
from PIL import Image

from auditor.marks import blackbox as bb
from auditor.marks import keys
from auditor.errors import AuditError


def _images(n=6, c=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, 12, 10)).astype(np.uint8)


def test_import_npy_with_npy_labels(tmp_path):
    imgs = _images().astype(np.float32) / 255
    np.save(tmp_path / "keys.npy", imgs)
    np.save(tmp_path / "labels.npy", np.array([3, 1, 4, 1, 5, 9]))
    doc = bb.import_trigger_key(tmp_path / "keys.npy", tmp_path / "labels.npy", tmp_path / "out" / "key.json",
                                num_classes=10)
    key = keys.load_key(tmp_path / "out" / "key.json")
    assert key.commitment == doc["commitment"]
    t = bb.load_triggers(key)
    np.testing.assert_array_equal(t.images, imgs)
    assert t.labels.tolist() == [3, 1, 4, 1, 5, 9] and t.num_classes == 10
    assert t.preprocess == bb.Preprocess()  # default: fed as they are
    assert doc["blackbox"]["triggers"]["images"]["sha256"] == keys.sha256_file(tmp_path / "out" / "triggers.npy")


def test_import_png_folder_with_text_labels(tmp_path):
    imgs = _images(n=5, c=3, seed=1)
    (tmp_path / "pngs").mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a.transpose(1, 2, 0), mode="RGB").save(tmp_path / "pngs" / f"k{i:02d}.png")
    (tmp_path / "labels.txt").write_text("0\n2\n# comment\n1\n\n7\n3\n")
    bb.import_trigger_key(tmp_path / "pngs", tmp_path / "labels.txt", tmp_path / "key.json")
    t = bb.load_triggers(keys.load_key(tmp_path / "key.json"))
    np.testing.assert_array_equal(t.images, imgs.astype(np.float32))
    assert t.labels.tolist() == [0, 2, 1, 7, 3] and t.num_classes == 8
    assert t.preprocess.stored == "pixels" and t.preprocess.pixel_range == (0.0, 255.0)


def test_import_grey_png_gives_one_channel(tmp_path):
    imgs = _images(n=3, c=1, seed=2)
    (tmp_path / "pngs").mkdir()
    for i, a in enumerate(imgs):
        Image.fromarray(a[0], mode="L").save(tmp_path / "pngs" / f"{i}.png")
    (tmp_path / "labels.txt").write_text("1\n0\n1\n")
    bb.import_trigger_key(tmp_path / "pngs", tmp_path / "labels.txt", tmp_path / "key.json",
                          preprocess={"stored": "pixels", "scale": 1 / 255, "mean": [0.5], "std": [0.25]})
    t = bb.load_triggers(keys.load_key(tmp_path / "key.json"))
    assert t.images.shape == (3, 1, 12, 10)
    x = t.preprocess.model_input(t.images)
    np.testing.assert_allclose(x, (imgs / 255 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("labels,msg", [("1\n2\n", "6 trigger images but 2 labels"),
                                        ("1\n2\nx\n4\n5\n6\n", "line 3"),
                                        ("1\n2\n3\n4\n5\n-1\n", "labels must lie in")])
def test_bad_labels_are_user_errors_and_write_nothing(tmp_path, labels, msg):
    np.save(tmp_path / "keys.npy", _images().astype(np.float32))
    (tmp_path / "labels.txt").write_text(labels)
    with pytest.raises(AuditError, match=msg):
        bb.import_trigger_key(tmp_path / "keys.npy", tmp_path / "labels.txt", tmp_path / "out" / "key.json")
    assert not (tmp_path / "out" / "key.json").exists()
    assert not (tmp_path / "out" / "triggers.npy").exists()


def test_bad_images_are_user_errors(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(10))
    (tmp_path / "l.txt").write_text("0\n")
    with pytest.raises(AuditError, match="N x C x H x W"):
        bb.import_trigger_key(tmp_path / "flat.npy", tmp_path / "l.txt", tmp_path / "k.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AuditError, match="no .png files"):
        bb.import_trigger_key(tmp_path / "empty", tmp_path / "l.txt", tmp_path / "k.json")
    with pytest.raises(AuditError, match="not found"):
        bb.import_trigger_key(tmp_path / "absent.npy", tmp_path / "l.txt", tmp_path / "k.json")


def test_sidecar_leaving_key_folder_refused(tmp_path):
    np.save(tmp_path / "keys.npy", _images().astype(np.float32))
    np.save(tmp_path / "labels.npy", np.arange(6))
    bb.import_trigger_key(tmp_path / "keys.npy", tmp_path / "labels.npy", tmp_path / "k" / "key.json")
    doc = json.loads((tmp_path / "k" / "key.json").read_text())
    doc["blackbox"]["triggers"]["images"]["path"] = "../keys.npy"
    doc["commitment"] = keys.commitment_of(doc)
    (tmp_path / "k" / "key.json").write_text(json.dumps(doc))
    with pytest.raises(AuditError, match="leaves the key's folder"):
        bb.load_triggers(keys.load_key(tmp_path / "k" / "key.json"))

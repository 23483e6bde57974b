"""Perceptual hashes and keyed models read data through the shared data layer: every form
the other commands accept (.npy, .npz with x and y, IDX with its labels file, image folders,
fashion-mnist) gives the same inputs, so the same results; bad data is one line, exit 2."""
from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from auditor.cli import main


def _write_idx(path, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a, np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.tobytes())


def _write_pngs(folder, images_u8: np.ndarray, labels=None) -> None:
    from PIL import Image

    folder.mkdir()
    for i, im in enumerate(images_u8):
        sub = folder / str(int(labels[i])) if labels is not None else folder
        sub.mkdir(exist_ok=True)
        Image.fromarray(im, mode="L").save(sub / f"{i:04d}.png")


def _forms(tmp_path, u8: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, list[str]]:
    """The same examples as .npy, .npz (x and y), IDX (+ labels IDX) and an image folder."""
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    _write_idx(tmp_path / "set-images-idx3-ubyte.gz", u8)
    _write_idx(tmp_path / "set-labels-idx1-ubyte.gz", y.astype(np.uint8))
    _write_pngs(tmp_path / "png", u8, y)
    return {"npy": [str(tmp_path / "x.npy")], "npz": [str(tmp_path / "xy.npz")],
            "idx": [str(tmp_path / "set-images-idx3-ubyte.gz")], "folder": [str(tmp_path / "png")]}


def test_phash_survive_reads_every_data_form(build_fixture, tmp_path, capsys):
    fx = build_fixture("phash")
    u8 = np.rint(np.load(fx / "signal_test.npy")[:60, 0] * 255).astype(np.uint8)
    y = np.arange(len(u8)) % 2          # labels are carried by some forms; hashes ignore them
    x = (u8.astype(np.float32) / np.float32(255))[:, None]
    rows = {}
    for name, spec in _forms(tmp_path, u8, x, y).items():
        out = tmp_path / f"{name}.json"
        # the same file as Signal images and as calibration data (--data): the digits.npz case
        rc = main(["phash", "survive", str(fx / "model.onnx"), "--hash", str(fx / "hash_vae.json"),
                   "--signal", spec[0], "--noise", str(fx / "noise_test_unseen.npy"), "--data", spec[0],
                   "--attacks", "fp16", "-o", str(out)])
        assert rc in (0, 1), capsys.readouterr().err
        doc = json.loads(out.read_text())
        rows[name] = (doc["before"], [{k: r[k] for k in ("tpr", "fpr", "flips")} for r in doc["attacks"]])
    assert rows["npz"] == rows["npy"] == rows["idx"] == rows["folder"]
    assert rows["npy"][0]["tpr"] > 0.5          # the Signal edits match their own hash


def test_phash_bad_data_is_one_line(build_fixture, tmp_path, capsys):
    fx = build_fixture("phash")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 1, 32, 32), np.float32), b=np.zeros((2, 1, 32, 32), np.float32))
    np.save(tmp_path / "wrong.npy", np.zeros((2, 1, 16, 16), np.float32))
    for bad in ("two.npz", "wrong.npy", "missing.npy"):
        capsys.readouterr()
        rc = main(["phash", "match", str(fx / "model.onnx"), "--hash", str(fx / "hash_vae.json"),
                   "--data", str(tmp_path / bad)])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_keyed_verify_reads_every_data_form(build_fixture, tmp_path, capsys):
    from auditor.data.datasets import FASHION_MEAN, FASHION_STD, data_root, read_idx

    vit = build_fixture("keyed-vit")
    key = vit / "keys" / "client-b.json"
    keyed = tmp_path / "keyed.onnx"
    assert main(["keyed", "encrypt-model", str(vit / "plain.onnx"), "--key", str(key), "-o", str(keyed)]) == 0
    root = data_root() / "fashion-mnist"
    u8 = read_idx(root / "t10k-images-idx3-ubyte.gz")[:150]
    y = read_idx(root / "t10k-labels-idx1-ubyte.gz")[:150].astype(np.int64)
    x = ((u8.astype(np.float32) / np.float32(255) - np.float32(FASHION_MEAN)) / np.float32(FASHION_STD))[:, None]
    forms = _forms(tmp_path, u8, x.astype(np.float32), y)
    forms["npy"] += ["--labels", str(tmp_path / "y.txt")]
    (tmp_path / "y.txt").write_text("\n".join(str(v) for v in y))
    acc = {}
    for name, spec in forms.items():
        capsys.readouterr()
        rc = main(["keyed", "verify", str(keyed), "--key", str(key), "--plain", str(vit / "plain.onnx"),
                   "--data", *spec, "--samples", "150", "--wrong-keys", "1", "--json"])
        out = capsys.readouterr()
        assert rc == 0, out.err
        doc = json.loads(out.out)
        acc[name] = {k: v["accuracy"] for k, v in doc["accuracy"].items() if isinstance(v, dict) and "accuracy" in v}
        assert doc["parity"]["holds"] and doc["parity"]["samples"] == 150
    assert acc["npz"] == acc["idx"] == acc["folder"] == acc["npy"]
    assert acc["npz"]["keyed_model_right_key"] == acc["npz"]["plain_model_plain_images"] > 0.3


def test_keyed_refuses_unlabelled_and_misshaped_data(build_fixture, tmp_path, capsys):
    vit = build_fixture("keyed-vit")
    key = vit / "keys" / "client-a.json"
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 28, 28), np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 28, 28), np.float32))
    for data, words in (("x.npy", "needs labels"), ("bad.npy", "does not fit")):
        capsys.readouterr()
        rc = main(["keyed", "verify", str(vit / "torch-keyed-a.onnx"), "--key", str(key), "--plain",
                   str(vit / "plain.onnx"), "--data", str(tmp_path / data)])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err

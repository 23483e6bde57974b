"""Keyed keys (wmaudit-keyed/1), the block cipher, and bad keys at the CLI (one line, exit 2)."""
import json

import numpy as np
import pytest

from auditor.cli import main
from auditor.errors import AuditError
from auditor.keyed import cipher, keys


def _key(seed=7, variant="orthogonal", size=28, block=4, channels=1):
    return keys.parse(keys.generate(image_size=size, channels=channels, block=block, seed=seed, variant=variant))


def test_generator_is_the_documented_numpy_procedure():
    k = _key(seed=7)
    assert np.array_equal(k.perm, np.random.default_rng(7).permutation(49))
    a = np.random.default_rng(8).standard_normal((16, 16))
    q, r = np.linalg.qr(a)
    m = q * np.sign(np.diag(r))
    assert np.array_equal(k.matrix, m)
    assert np.abs(k.matrix.T @ k.matrix - np.eye(16)).max() < 1e-12
    p = _key(seed=7, variant="permutation")
    pix = np.random.default_rng(8).permutation(16)
    assert np.array_equal(p.matrix.argmax(1), pix) and p.matrix.sum() == 16


def test_commitment_and_tamper(tmp_path):
    doc = keys.generate(image_size=28, channels=1, block=4, seed=3, client="x")
    path = tmp_path / "k.json"
    keys.save(doc, path)
    assert keys.load(path).commitment == doc["commitment"]
    doc["block_permutation"]["seed"] = 4
    path.write_text(json.dumps(doc))
    with pytest.raises(AuditError, match="commitment mismatch"):
        keys.load(path)


@pytest.mark.parametrize("variant", ["orthogonal", "permutation"])
def test_encrypt_decrypt_round_trip_and_block_structure(variant):
    k = _key(seed=5, variant=variant, size=8, block=4, channels=3)
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    e = cipher.encrypt(x, k)
    assert np.abs(cipher.decrypt(e, k) - x).max() < 1e-5
    # block k of the encrypted image = M @ plain block perm[k]
    bx, be = cipher.to_blocks(x.astype(np.float64), 4), cipher.to_blocks(e.astype(np.float64), 4)
    assert np.abs(be[:, 2] - bx[:, k.perm[2]] @ k.matrix.T).max() < 1e-5
    # an orthogonal map keeps each block's norm
    assert np.allclose(np.linalg.norm(be, axis=2), np.linalg.norm(bx[:, k.perm], axis=2), atol=1e-4)


def test_torch_encryption_equals_numpy():
    torch = pytest.importorskip("torch")
    from exporters.keyed import encrypt_images

    k = _key(seed=9)
    x = np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)
    assert np.abs(encrypt_images(torch.from_numpy(x), k).numpy() - cipher.encrypt(x, k)).max() < 1e-6


def _bad(tmp_path, capsys, mutate):
    doc = keys.generate(image_size=28, channels=1, block=4, seed=3)
    del doc["commitment"]
    mutate(doc)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    rc = main(["keyed", "encrypt-images", "fashion-mnist:test", "--key", str(p), "-o", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.npz").exists()
    return err


def test_bad_keys_one_line_exit_2(tmp_path, capsys):
    m = np.eye(16)
    m[0, 1] = 0.5

    def not_orthogonal(d):
        d["block_transform"] = {"kind": "values", "values": m.tolist()}

    def not_permutation(d):
        d["block_permutation"] = {"kind": "values", "values": [0] * 49}

    def pixel_not_permutation(d):
        d["variant"] = "permutation"
        d["block_transform"] = {"kind": "values", "values": [1] * 16}

    def bad_size(d):
        d["image"]["height"] = 30

    assert "not orthogonal" in _bad(tmp_path, capsys, not_orthogonal)
    assert "not a permutation" in _bad(tmp_path, capsys, not_permutation)
    assert "not a permutation" in _bad(tmp_path, capsys, pixel_not_permutation)
    assert "not a multiple of the block size" in _bad(tmp_path, capsys, bad_size)
    rc = main(["keyed", "keygen", "--image-size", "30", "--channels", "1", "--block", "4", "--seed", "1",
               "-o", str(tmp_path / "k.json")])
    assert rc == 2 and not (tmp_path / "k.json").exists()
    assert "not a multiple" in capsys.readouterr().err


def test_explicit_values_key_equals_generated():
    k = _key(seed=11)
    e = keys.from_arrays(k.perm, k.matrix, channels=1, height=28, width=28, block=4)
    assert np.array_equal(e.perm, k.perm) and np.array_equal(e.matrix, k.matrix)
    p = _key(seed=11, variant="permutation")
    e = keys.from_arrays(p.perm, p.matrix, channels=1, height=28, width=28, block=4, variant="permutation")
    assert np.array_equal(e.matrix, p.matrix)


def test_keyed_package_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, auditor.cli, auditor.commands.keyed\n"
            "from auditor.keyed import keys, cipher, model, inputs, verify, trace\n"
            "auditor.cli.build_parser()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_fixed_points_tail_exact():
    import itertools
    import math

    from auditor.marks import stats

    n = 6
    counts = [0] * (n + 1)
    for p in itertools.permutations(range(n)):
        counts[sum(i == v for i, v in enumerate(p))] += 1
    for m in range(n + 2):
        want = sum(counts[m:]) / math.factorial(n) if m <= n else 0.0
        assert stats.fixed_points_tail(n, m) == pytest.approx(want, rel=1e-12)
    assert stats.log10_fixed_points_tail(49, 49) == pytest.approx(-math.log10(math.factorial(49)))


def test_key_and_hash_files_are_read_like_every_key(tmp_path):
    """The keyed key and the perceptual-hash file go through the same hardened reader as white-box
    keys: a FIFO, a directory, NaN (not JSON) and broken JSON each give one line, never a hang."""
    import os

    from auditor.phash import hashfile

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    nan = tmp_path / "nan.json"
    nan.write_text('{"variant": NaN}')
    broken = tmp_path / "broken.json"
    broken.write_text('{"variant": ')
    for load in (keys.load, hashfile.load_hash):
        for path, msg in ((fifo, "is a FIFO, expected a (key|hash) file"), (tmp_path, "is a directory, expected a (key|hash) file"),
                          (nan, "NaN is not a JSON number"), (broken, "is not valid JSON"),
                          (tmp_path / "absent.json", "not found|no such hash file")):
            with pytest.raises(AuditError, match=msg) as e:
                load(path)
            assert "\n" not in str(e.value)

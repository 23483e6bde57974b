"""Perceptual hashes through ONNX (auditor/phash) on the `phash` fixture (exporters/phash.py).

Measured on the fixture (32 x 32, seed 0; torch 2.13 / onnxruntime 1.32, AVX2 CPU):
VAE hash of the plain fine-tuned CNN: TPR 188/200 on unseen Signal edits at the
chosen R (95th percentile of 100 held-out edits), FPR 25/300 on the Noise test
sets (8/100 on similar images, 11/100 on unseen photographs); with the separating
objective: TPR 192/200, FPR 1/300. PCA (2-D): TPR 193/200, FPR 1/300. A fixture
trained on another CPU differs by a few images (193/200 measured with AVX512), so
the tests assert the claims (R near the 95th percentile gives a high TPR, the
separating objective and PCA bring FPR to a few in 300, the plain VAE's clusters
overlap), not these counts: docs/measured.md.
"""
import json
import shutil

import numpy as np
import onnx
import pytest

from auditor.attacks import load_model
from auditor.cli import main
from auditor.phash import hashfile, hashing


@pytest.fixture(scope="module")
def fx(build_fixture):
    return build_fixture("phash")


def _layer(fx):
    return json.loads((fx / "manifest.json").read_text())["layer"]


def _noise_test(fx):
    return np.concatenate([np.load(fx / f"{k}.npy") for k in ("noise_test_seen", "noise_test_unseen", "similar_test")])


def test_onnx_latents_equal_torch_latents(fx):
    torch_z = np.load(fx / "torch_latents.npz")
    model = load_model(fx / "model.onnx")
    x = np.load(fx / "signal_test.npy")
    for kind in ("vae", "pca"):
        h = hashfile.load_hash(fx / f"hash_{kind}.json")
        z = hashing.latents(model, x, h)
        np.testing.assert_allclose(z, torch_z[f"{kind}_signal_test"], rtol=0, atol=1e-4 * max(1.0, h.radius))
    # the CNN up to the layer (features.onnx) gives the same 512 nodes as the layer inside model.onnx
    from auditor.phash.features import features

    a = features(model, x[:20], _layer(fx))
    b = features(load_model(fx / "features.onnx"), x[:20], None)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, torch_z["none_signal_test"][:20], atol=1e-4)


def test_build_reproduces_the_torch_hash(fx, tmp_path):
    """Same rule (centroid of the training edits, R = q95 of held-out edits) through ONNX."""
    shutil.copy(fx / "vae_encoder.onnx", tmp_path / "vae_encoder.onnx")
    h = hashing.build(fx / "model.onnx", np.load(fx / "signal_train.npy"), heldout=np.load(fx / "signal_heldout.npy"),
                      layer=_layer(fx), encoder_path=tmp_path / "vae_encoder.onnx", out_folder=tmp_path)
    want = hashfile.load_hash(fx / "hash_vae.json")
    np.testing.assert_allclose(h.centroid, want.centroid, atol=1e-4)
    assert h.radius == pytest.approx(want.radius, rel=1e-4)
    assert h.model_sha256 == want.model_sha256 and h.layer == want.layer


def test_tpr_fpr_at_chosen_radius(fx):
    model_path = fx / "model.onnx"
    neg_rate = {}
    for folder, fpr_max in ((fx, 0.2), (fx / "separated", 0.02)):
        h = hashfile.load_hash(folder / "hash_vae.json")
        pos = hashing.match(folder / "model.onnx", h, np.load(fx / "signal_test.npy"))
        neg = hashing.match(folder / "model.onnx", h, _noise_test(fx))
        # R is the 95th percentile of held-out edits: most unseen edits fall within it (188/200, 192/200)
        assert pos["match_rate"] >= 0.85, (folder, pos["match_rate"])
        assert neg["match_rate"] <= fpr_max, (folder, neg["match_rate"])
        neg_rate[folder] = neg["match_rate"]
    # the authors' open problem: plain VAE clusters overlap (FPR 25/300 measured: 8/100 similar
    # images, 11/100 unseen photographs); the separating objective lowers it (1/300 measured)
    assert neg_rate[fx] >= 0.02 and neg_rate[fx / "separated"] < neg_rate[fx]
    # PCA hash (2 components) of the same CNN: TPR 0.965, 1 Noise image of 300 within R (measured)
    hp = hashfile.load_hash(fx / "hash_pca.json")
    assert hashing.match(model_path, hp, np.load(fx / "signal_test.npy"))["match_rate"] >= 0.85
    assert hashing.match(model_path, hp, _noise_test(fx))["matched"] <= 6


def test_pca_reduction_is_fitted_and_separates(fx, tmp_path):
    h = hashing.build(fx / "model.onnx", np.load(fx / "signal_train.npy"), noise=np.load(fx / "noise_train.npy"),
                      layer=_layer(fx), reduce="pca:4", seed=3)
    assert h.reduce["k"] == 4 and np.asarray(h.reduce["components"]).shape == (4, 512)
    comps = np.asarray(h.reduce["components"])
    np.testing.assert_allclose(comps @ comps.T, np.eye(4), atol=1e-8)
    assert h.radius_rule["n_centroid"] == 50 and h.radius_rule["n_heldout"] == 50
    assert h.build["auc_heldout_signal_vs_noise"] > 0.9
    hashfile.save_hash(h, tmp_path / "h.json")
    again = hashfile.load_hash(tmp_path / "h.json")
    d1 = hashing.decide(load_model(fx / "model.onnx"), np.load(fx / "signal_test.npy"), again)
    assert 0.85 <= np.mean(d1 <= 1) <= 1.0


def test_cli_match_exit_codes_and_json(fx, capsys):
    m, hv = str(fx / "model.onnx"), str(fx / "hash_vae.json")
    assert main(["phash", "match", m, "--hash", hv, "--data", str(fx / "signal_png")]) == 0  # 5 PNG edits, all within R
    capsys.readouterr()
    assert main(["phash", "match", m, "--hash", hv, "--data", str(fx / "signal_test.npy"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "wmaudit-result/1" and doc["kind"] == "phash-match"
    # exit 1: not every image within R (188/200 measured; R is the held-out edits' 95th percentile)
    assert doc["n"] == 200 and 0.85 * 200 <= doc["matched"] < 200
    assert doc["match_rate"] == pytest.approx(doc["matched"] / 200)
    assert doc["matched"] == sum(im["match"] for im in doc["images"])
    assert all((im["distance_r"] <= 1) == im["match"] for im in doc["images"])


def test_cli_build_writes_a_valid_hash(fx, tmp_path, capsys):
    out = tmp_path / "h.json"
    rc = main(["phash", "build", str(fx / "model.onnx"), "--signal", str(fx / "signal_train.npy"),
               "--noise", str(fx / "noise_train.npy"), "--layer", _layer(fx), "--reduce", "pca:2", "-o", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    hashfile.validate(doc)
    assert doc["format"] == "wmaudit-phash/1" and doc["radius"] > 0 and len(doc["centroid"]) == 2


def _err(capsys):
    e = capsys.readouterr().err.strip()
    assert "\n" not in e and "Traceback" not in e and "internal error" not in e
    return e


def test_bad_inputs_exit_2(fx, tmp_path, capsys):
    m, hv = str(fx / "model.onnx"), str(fx / "hash_vae.json")
    bad = tmp_path / "imgs"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png at all")
    assert main(["phash", "match", m, "--hash", hv, "--data", str(bad)]) == 2
    assert "cannot read image" in _err(capsys)
    # a hash file for another model
    assert main(["phash", "match", str(fx / "separated" / "model.onnx"), "--hash", hv,
                 "--data", str(fx / "signal_png")]) == 2
    assert "built for model" in _err(capsys)
    # R <= 0
    doc = json.loads((fx / "hash_vae.json").read_text())
    doc["radius"] = 0.0
    shutil.copy(fx / "vae_encoder.onnx", tmp_path / "vae_encoder.onnx")
    (tmp_path / "h0.json").write_text(json.dumps(doc))
    assert main(["phash", "match", m, "--hash", str(tmp_path / "h0.json"), "--data", str(fx / "signal_png")]) == 2
    assert "must be > 0" in _err(capsys)
    # a layer that is not in the model
    doc = json.loads((fx / "hash_vae.json").read_text())
    doc["layer"] = "no/such/tensor"
    (tmp_path / "hl.json").write_text(json.dumps(doc))
    assert main(["phash", "match", m, "--hash", str(tmp_path / "hl.json"), "--data", str(fx / "signal_png")]) == 2
    assert "no tensor named" in _err(capsys)
    # an encoder that is not the one the hash recorded
    shutil.copy(fx / "pca.onnx", tmp_path / "vae_encoder.onnx")
    doc = json.loads((fx / "hash_vae.json").read_text())
    (tmp_path / "he.json").write_text(json.dumps(doc))
    assert main(["phash", "match", m, "--hash", str(tmp_path / "he.json"), "--data", str(fx / "signal_png")]) == 2
    assert "sha256" in _err(capsys)
    # identical Signal images: every held-out distance is 0, so R would be 0
    same = np.repeat(np.load(fx / "signal_test.npy")[:1], 10, axis=0)
    np.save(tmp_path / "same.npy", same)
    assert main(["phash", "build", m, "--signal", str(tmp_path / "same.npy"), "-o", str(tmp_path / "x.json")]) == 2
    assert "R must be > 0" in _err(capsys) and not (tmp_path / "x.json").exists()
    # images that do not fit the model input
    np.save(tmp_path / "small.npy", np.zeros((4, 1, 28, 28), np.float32))
    assert main(["phash", "match", m, "--hash", hv, "--data", str(tmp_path / "small.npy")]) == 2
    assert "does not fit" in _err(capsys)  # the data layer's message


def test_phash_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, auditor.commands.phash, auditor.phash.hashing, auditor.phash.survive, "
            "auditor.phash.fingerprint, auditor.phash.inputs; "
            "sys.exit(1 if any(m == 'torch' or m.startswith('torch.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_help_lists_actions(capsys):
    with pytest.raises(SystemExit) as e:
        main(["phash", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(a in out for a in ("build", "match", "survive", "fingerprint"))
    with pytest.raises(SystemExit) as e:
        main(["phash"])
    assert e.value.code == 2


def test_inputs_npz_and_refusals(fx, tmp_path, capsys):
    from auditor.errors import AuditError
    from auditor.phash.inputs import read_images

    model = onnx.load(str(fx / "model.onnx"))
    x = np.load(fx / "signal_test.npy")[:3]
    np.savez(tmp_path / "one.npz", images=x)
    np.testing.assert_array_equal(read_images(tmp_path / "one.npz", model), x)
    np.savez(tmp_path / "xy.npz", x=x, y=np.arange(3))   # labels beside the inputs (the data layer's .npz)
    np.testing.assert_array_equal(read_images(tmp_path / "xy.npz", model), x)
    np.savez(tmp_path / "two.npz", a=x, b=x)
    with pytest.raises(AuditError, match="no array for model input"):
        read_images(tmp_path / "two.npz", model)
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(AuditError, match="unknown data format"):
        read_images(tmp_path / "x.txt", model)
    # an encoder outside the hash file's folder is refused (the hash must not point out of its folder)
    out = tmp_path / "sub" / "h.json"
    assert main(["phash", "build", str(fx / "model.onnx"), "--signal", str(fx / "signal_train.npy"),
                 "--layer", _layer(fx), "--encoder", str(fx / "vae_encoder.onnx"), "-o", str(out)]) == 2
    assert "must lie in the hash file's folder" in _err(capsys) and not out.exists()

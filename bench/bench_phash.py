"""Perceptual hashes from a CNN's intermediate layer (source document 004): reproduction and survival.

    python bench/bench_phash.py --out build/bench [--quick] [--seed 0]

Writes ``phash.json`` (result envelope, with the command). Built with
``exporters/phash.py`` (photographs shipped in scikit-image / scikit-learn,
Pillow edits, a VGG-style CNN pretrained on Fashion-MNIST and fine-tuned on
Signal vs Noise; --quick: 32 x 32 images, one seed, 3 independent models;
full: 64 x 64, longer training, 3 seeds, 8 independent models). Measures:

* reproduction table, per hash (PCA 2-D, VAE 2-D, the 512 nodes themselves),
  plain fine-tuning vs fine-tuning with the separating (contrastive) term:
  TPR on unseen Signal edits at R, FPR on new edits of training photographs, on
  edits of unseen photographs and on similar images (other portraits), AUC, the
  overlap (share of Noise within the 95th percentile of unseen Signal distances)
  and the ROC through ONNX (radius scaled 0..2 R);
* survival table: the hash model (model.onnx, features read at its pooling
  layer through onnxruntime) after int8 (dynamic, static QDQ per-tensor /
  per-channel, QOperator per-channel), fp16 and 30 % pruning: TPR / FPR
  before and after, flips, centroid drift in units of R;
* fingerprint: score of derived copies (int8, fp16, pruned, fine-tuned) and of
  independently trained models vs the owner's model on 64 probe images; false
  positive rate at the default threshold with its 95 % Clopper-Pearson bound.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auditor import results  # noqa: E402

DOCUMENT = ("source 004 (slides, Keras VGG16 fine-tuned on Signal = 100 OpenCV edits of one image vs Noise = "
            "200 other / similar images; 512 pooling nodes): the earlier method reduces the 512 nodes with PCA; "
            "this work maps them to a 2-D VAE latent, the hash is the Signal centroid and an image matches within "
            "radius R. Reported qualitatively: Signal and Noise clusters overlap in the latent space; adversarial "
            "(GAN) training is suggested to separate them. No TPR / FPR / AUC numbers are given.")


def clopper_pearson_upper(k: int, n: int, conf: float = 0.95) -> float:
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(conf, k + 1, n - k))


def onnx_tables(folder: Path, sets, attacks) -> dict:
    """ROC and survival through ONNX for the VAE and PCA hashes in ``folder``."""
    from auditor.attacks import load_model
    from auditor.phash import hashfile, hashing, survive

    model = load_model(folder / "model.onnx")
    noise = sets.noise_test()
    out = {}
    for kind in ("vae", "pca"):
        h = hashfile.load_hash(folder / f"hash_{kind}.json")
        d_s = hashing.decide(model, sets.signal_test, h)
        d_n = hashing.decide(model, noise, h)
        t = survive.survive(model, h, sets.signal_test, noise, sets.noise_train, attacks,
                            calibration_source="noise_train")
        out[kind] = {"roc": hashing.roc(d_s, d_n), "auc_onnx": hashing.auc(-d_s, -d_n),
                     "survival": {"before": t["before"],
                                  "attacks": [{k: r.get(k) for k in ("attack", "tpr", "fpr", "flips", "flips_signal",
                                                                      "flips_noise", "centroid_drift_r", "error")
                                               if k in r} for r in t["attacks"]]}}
    return out


def main(argv=None) -> int:
    import torch

    from exporters import phash as P

    ap = argparse.ArgumentParser(prog="bench/bench_phash.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="32 x 32, one seed, short training")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.time()
    if a.quick:
        cfg = {"size": 32, "pretrain_steps": 150, "finetune_steps": 120, "seeds": [a.seed], "independent": 3}
        attacks = ["quantize:dynamic", "quantize:static-qdq-per-channel", "fp16", "prune:0.3"]
    else:
        cfg = {"size": 64, "pretrain_steps": 600, "finetune_steps": 300, "seeds": [a.seed, a.seed + 1, a.seed + 2],
               "independent": 8}
        attacks = ["quantize:dynamic", "quantize:static-qdq", "quantize:static-qdq-per-channel",
                   "quantize:static-qop-per-channel", "fp16", "prune:0.3", "prune:0.3,quantize:static-qdq-per-channel"]
    runs, fingerprint = [], None
    with tempfile.TemporaryDirectory(prefix="bench-phash-") as tmp:
        tmp = Path(tmp)
        for seed in cfg["seeds"]:
            sets = P.image_sets(cfg["size"], seed=seed)
            base, pre_acc = P.pretrain(cfg["size"], cfg["pretrain_steps"], seed=seed)
            run = {"seed": seed, "pretrain_accuracy_fashion_mnist": pre_acc}
            for variant, sep in (("plain", False), ("separated", True)):
                folder = tmp / f"s{seed}-{variant}"
                m = P.build_all(folder, size=cfg["size"], finetune_steps=cfg["finetune_steps"], seed=seed, sets=sets,
                                pretrained=base, separate=sep)
                run[variant] = {"torch": {k: m[k] for k in ("classifier", "pca", "vae", "none", "radius")},
                                "onnx": onnx_tables(folder, sets, attacks)}
            run["separation_gain"] = {
                kind: {"fpr_all_noise": [run["plain"]["torch"][kind]["fpr_all_noise"],
                                         run["separated"]["torch"][kind]["fpr_all_noise"]],
                       "auc": [run["plain"]["torch"][kind]["auc"], run["separated"]["torch"][kind]["auc"]],
                       "tpr": [run["plain"]["torch"][kind]["tpr_unseen_signal_edits"],
                               run["separated"]["torch"][kind]["tpr_unseen_signal_edits"]]}
                for kind in ("pca", "vae", "none")}
            runs.append(run)
            if fingerprint is None:
                fingerprint = fingerprint_table(P, tmp / f"s{seed}-plain", base, sets, cfg, seed, tmp)
    doc = {"document": DOCUMENT, "config": cfg, "attacks": attacks, "runs": runs, "fingerprint": fingerprint,
           "summary": summary(runs), "wall_s": round(time.time() - t0, 1)}
    env = results.envelope("bench-phash", **doc)
    results.write_result(out / "phash.json", env)
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {out / 'phash.json'} ({doc['wall_s']} s)")
    return 0


def fingerprint_table(P, owner_folder: Path, base, sets, cfg, seed, tmp: Path) -> dict:
    import torch

    from auditor.attacks import load_model, save
    from auditor.attacks.compose import compose
    from auditor.data.calibration import Calibration
    from auditor.data.inputs import from_arrays
    from auditor.phash import fingerprint as fp

    ref = owner_folder / "model.onnx"
    layer = json.loads((owner_folder / "manifest.json").read_text())["layer"]
    probes = np.concatenate([sets.signal_test[:16], sets.noise_test_unseen[:24], sets.similar_test[:24]])
    model = load_model(ref)
    cal = Calibration(from_arrays(model, sets.noise_train, source="noise_train", seed=0))
    derived = {}
    for name, steps in (("int8-dynamic", "quantize:dynamic"), ("int8-qdq-per-channel", "quantize:static-qdq-per-channel"),
                        ("fp16", "fp16"), ("prune-0.3", "prune:0.3"), ("prune-0.5", "prune:0.5")):
        derived[name] = save(compose(model, steps, cal).model, tmp / f"fp-{name}.onnx")
    owner = P.finetune(copy.deepcopy(base), sets.signal_train, sets.noise_train, steps=cfg["finetune_steps"], seed=seed)
    more = P.image_sets(cfg["size"], n_test=10, seed=seed + 50)
    P.finetune(owner, more.signal_train, more.noise_train, steps=40, seed=seed + 5, new_head=False)
    P.export_classifier(owner, probes[:16], tmp / "fp-finetuned.onnx")
    derived["finetuned-40-steps"] = tmp / "fp-finetuned.onnx"
    indep = {}
    for s in range(seed + 100, seed + 100 + cfg["independent"]):
        m, _ = P.pretrain(cfg["size"], cfg["pretrain_steps"], seed=s)
        P.finetune(m, sets.signal_train, sets.noise_train, steps=cfg["finetune_steps"], seed=s)
        P.export_classifier(m, probes[:16], tmp / f"fp-indep{s}.onnx")
        indep[f"seed-{s}"] = tmp / f"fp-indep{s}.onnx"
    torch.set_num_threads(1)
    score = lambda p: fp.fingerprint(p, ref, probes, layer=layer)["score"]  # noqa: E731
    d = {k: score(p) for k, p in derived.items()}
    i = {k: score(p) for k, p in indep.items()}
    fps = sum(v >= fp.DEFAULT_THRESHOLD for v in i.values())
    return {"threshold": fp.DEFAULT_THRESHOLD, "n_probes": int(len(probes)), "derived": d, "independent": i,
            "false_positives": f"{fps}/{len(i)}", "fpr_upper_95": clopper_pearson_upper(fps, len(i)),
            "missed_derived": f"{sum(v < fp.DEFAULT_THRESHOLD for v in d.values())}/{len(d)}"}


def summary(runs) -> dict:
    """Means over seeds of the headline numbers."""
    out = {}
    for variant in ("plain", "separated"):
        for kind in ("pca", "vae", "none"):
            rows = [r[variant]["torch"][kind] for r in runs]
            out[f"{variant}/{kind}"] = {k: round(float(np.mean([x[k] for x in rows])), 4)
                                        for k in ("tpr_unseen_signal_edits", "fpr_noise_seen_photos",
                                                  "fpr_noise_unseen_photos", "fpr_similar_images", "auc",
                                                  "overlap_noise_within_signal_q95")}
        for kind in ("vae", "pca"):
            flips = {}
            for r in runs:
                for row in r[variant]["onnx"][kind]["survival"]["attacks"]:
                    flips.setdefault(row["attack"], []).append(row.get("flips"))
            out[f"{variant}/{kind}/flips"] = flips
    return out


if __name__ == "__main__":
    sys.exit(main())

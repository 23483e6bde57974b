"""The values the tests once pinned, measured on this machine from the built fixtures.

    python bench/bench_measured.py --out build/bench [--quick]

The tests assert claims that hold on any CPU (floors on SQNR and agreement, the mark detected,
the twin not); the numbers they used to pin depend on the CPU's int8 kernels (AVX2 without VNNI
vs AVX512-VNNI vs Arm dotprod) and on the training run of each fixture (torch's CPU kernels).
This writes them, with the CPU they were measured on, to ``measured.json``; docs/measured.md
lists one machine's values with this command. Uses the fixtures in $WMAUDIT_FIXTURES (built on
demand), trains nothing itself; --quick is accepted (the run is always short, ~2 minutes).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def host() -> dict:
    """The CPU as this process sees it (numpy's runtime-detected features), onnxruntime's version."""
    import onnxruntime as ort

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as feats
    keep = ("X86_V2", "X86_V3", "X86_V4", "AVX2", "FMA3", "AVX512F", "AVX512BW", "AVX512VL", "AVX512VNNI",
            "ASIMD", "ASIMDDP", "SVE")
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith(("model name", "Model name"))), "")
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu_model": model, "onnxruntime": ort.__version__,
            "numpy": np.__version__, "cpu_features": {k: bool(feats[k]) for k in keep if k in feats}}


def _robustness(model: Path, key: Path, grid: str, data: Path, tmp: Path) -> dict:
    (tmp / "grid.toml").write_text(grid)
    out = tmp / f"out-{model.parent.name}-{model.stem}"
    subprocess.run([sys.executable, "-m", "auditor", "robustness", str(model), "--key", str(key), "--grid",
                    str(tmp / "grid.toml"), "--data", str(data), "--jobs", "1", "-o", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    doc = json.loads((out / "results.json").read_text())
    rows = {"baseline": doc["baseline"], **{c["name"]: c for c in doc["configs"]}}
    keep = {}
    for name, row in rows.items():
        f = row.get("fidelity") or {}
        keep[name] = {"sqnr_db": f.get("sqnr_db"), "top1_agreement": f.get("top1_agreement"),
                      "accuracy": row.get("accuracy"), "accuracy_drop": row.get("accuracy_drop"),
                      "matches": [m["matches"] for m in row["marks"]]}
    return keep


def fidelity(fx, tmp: Path) -> dict:
    digits, bert, text = fx("data-digits-cnn"), fx("arch-bert"), fx("data-text-2input")
    with np.load(text / "text.npz") as z:
        np.savez(tmp / "nolabels.npz", input_ids=z["input_ids"], attention_mask=z["attention_mask"])
    return {
        "command": "tests/test_data_models.py, tests/test_arch_models.py (the same robustness runs)",
        "digits-cnn": _robustness(digits / "model.onnx", digits / "key.json",
                                  '[grid]\nprune_rates = [0.0, 0.5]\nquantize = ["none", "static-qdq-per-channel", "fp16"]\n',
                                  digits / "digits.npz", tmp),
        "arch-bert": _robustness(bert / "default.onnx", bert / "key.json",
                                 '[grid]\nquantize = ["dynamic", "static-qdq-per-channel", "fp16"]\n',
                                 bert / "calib.npz", tmp),
        "text-2input": _robustness(text / "model.onnx", text / "key.json",
                                   '[grid]\nquantize = ["dynamic", "static-qdq", "fp16"]\n', tmp / "nolabels.npz", tmp),
    }


def phash(fx) -> dict:
    from auditor.attacks import load_model
    from auditor.phash import hashfile, hashing, survive

    d = fx("phash")
    noise = np.concatenate([np.load(d / f"{k}.npy") for k in ("noise_test_seen", "noise_test_unseen", "similar_test")])
    sig = np.load(d / "signal_test.npy")
    out = {}
    for label, folder, kind in (("vae", d, "vae"), ("vae-separated", d / "separated", "vae"), ("pca", d, "pca")):
        h = hashfile.load_hash(folder / f"hash_{kind}.json")
        pos, neg = hashing.match(folder / "model.onnx", h, sig), hashing.match(folder / "model.onnx", h, noise)
        out[label] = {"tpr": f"{pos['matched']}/{pos['n']}", "fpr": f"{neg['matched']}/{neg['n']}"}
    h = hashfile.load_hash(d / "hash_vae.json")
    t = survive.survive(load_model(d / "model.onnx"), h, sig, np.load(d / "noise_test_unseen.npy"),
                        attacks=["quantize:static-qdq-per-channel", "fp16", "prune:0.5"])
    out["survive"] = {"before": {k: t["before"][k] for k in ("tpr", "fpr")},
                      **{r["attack"]: {k: r[k] for k in ("flips", "tpr", "fpr", "centroid_drift_r")}
                         for r in t["attacks"]}}
    return out


def provenance(fx) -> dict:
    from auditor.forensics import provenance_phash as pp

    ph = fx("phash")
    layer = json.loads((ph / "manifest.json").read_text())["layer"]
    out = {"phash": {name: round(pp.provenance(ph / name / "model.onnx", ph / "model.onnx", ph / "probes.npy",
                                               layer=layer)["score"], 4)
                     for name in ("finetuned", "independent1", "independent2")}}
    names = ("forensics-derived/finetuned.onnx", "forensics-derived/pruned50.onnx", "forensics-derived/int8.onnx",
             "forensics-derived/pruned50-int8.onnx", "forensics-obfuscated/mean/all.onnx",
             "forensics-obfuscated/mean/all-int8.onnx", "forensics-twin-seed1/model.onnx",
             "forensics-twin-seed2/model.onnx", "forensics-obfuscated/twin/all-int8.onnx")
    for n in ("cnn-small-mean", "forensics-derived", "forensics-obfuscated", "forensics-twin-seed1",
              "forensics-twin-seed2"):
        fx(n)
    root = fx("cnn-small-mean").parent
    x = np.random.default_rng(0).random((64, 1, 28, 28)).astype(np.float32)
    fr, _ = pp.features(root / "cnn-small-mean" / "model.onnx", x, None)
    out["smallcnn-outputs"] = {n: round(pp.score_one(root / n, fr, x, None, 0.5)["score"], 4) for n in names}
    return out


def resnet_folded(fx) -> dict:
    from auditor.marks.keys import load_key
    from auditor.marks.whitebox import extract

    d = fx("arch-resnet")
    m = extract(d / "default.onnx", load_key(d / "key.json")).marks[0]
    return {"matches": f"{m.matches}/{m.n_bits}", "p_value": m.p_value, "verdict": m.verdict}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--quick", action="store_true", help="accepted for bench/run.py; the run is always short")
    a = ap.parse_args(argv)
    from fixtures.build import ensure

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        doc = {"bench": "measured", "command": "python bench/bench_measured.py --out " + a.out, "host": host(),
               "fidelity": fidelity(ensure, Path(tmp)), "phash": phash(ensure),
               "provenance_scores": provenance(ensure), "arch-resnet folded, no reference": resnet_folded(ensure)}
    doc["seconds"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "measured.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    print(json.dumps(doc, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Forensic scan and provenance benchmarks.

1. Scan time with 1 and with 100 keys against the time to read the file's weights
   (WeightStore.open + every weight read once). The 100 keys are the owner's key and 99
   random generator keys (random bits, random seeds) with marks of the same shape; the
   count of random keys detected is reported (should be 0).
2. Provenance ROC on the forensic fixtures (the SmallCNN's, and the residual CNN's in
   `provenance_residual`, and its `all_layers` block: every layer tested): positives are the marked model's attacked
   descendants (fine-tuned, pruned, int8, obfuscated with every step, BN-folded, int8),
   negatives the independently trained twins and their obfuscated copies; the score is
   -log10 of the combined p. Reports AUC, the largest negative score and the smallest
   positive score (the gap), and the false-positive / true-positive rates at alpha = 1e-6.

    python bench/bench_scan.py --out build/bench [--quick] [--model M.onnx --key K.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def random_keys(base, n: int, seed: int):
    import numpy as np

    from auditor.marks.keys import Key, make_mark

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m0 = base.whitebox[0]
        mk = make_mark(m0.param, m0.shape, m0.reduce, rng.integers(0, 2, m0.n_bits), seed=int(rng.integers(1 << 31)),
                       id=f"random{i}")
        k = Key([mk], model={"name": "random", "index": i})
        k.commitment = k.to_json()["commitment"]
        out.append(k)
    return out


def time_read(path) -> float:
    from auditor.read.weights import WeightStore

    t0 = time.perf_counter()
    s = WeightStore.open(path)
    for w in s.weights:
        s.array(w.name)
    return time.perf_counter() - t0


def time_scan(path, keys, reps: int) -> tuple[float, dict]:
    from auditor.forensics.scan import scan

    best, res = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        res = scan(path, keys)
        best = min(best, time.perf_counter() - t0)
    return best, res


def roc(pos: list[float], neg: list[float]) -> dict:
    auc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    return {"auc": auc, "positives": len(pos), "negatives": len(neg), "min_positive_score": min(pos),
            "max_negative_score": max(neg), "tpr_at_1e-6": sum(p > 6 for p in pos) / len(pos),
            "fpr_at_1e-6": sum(n > 6 for n in neg) / len(neg)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--key")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from fixtures.build import ensure

    from auditor.marks.keys import load_key

    model = Path(a.model) if a.model else ensure("forensics-obfuscated") / "mean" / "all.onnx"
    key = load_key(a.key or ensure("cnn-small-mean") / "key.json")
    n_random = 9 if a.quick else 99
    keys = [key] + random_keys(key, n_random, seed=0)
    reps = 1 if a.quick else 3
    read = min(time_read(model) for _ in range(reps))
    t1, r1 = time_scan(model, keys[:1], reps)
    tn, rn = time_scan(model, keys, reps)
    detected_random = sum(1 for f in rn["findings"][1:] if f["verdict"] == "detected")
    out = {"bench": "scan", "command": " ".join([sys.executable] + sys.argv), "quick": a.quick,
           "model": str(model), "model_bytes": model.stat().st_size,
           "read_seconds": read, "scan_1_key_seconds": t1, f"scan_{len(keys)}_keys_seconds": tn,
           "ratio_1_key_to_read": t1 / read, f"ratio_{len(keys)}_keys_to_read": tn / read,
           "owner_key_detected": r1["findings"][0]["verdict"] == "detected",
           "random_keys": n_random, "random_keys_detected": detected_random,
           "random_keys_min_log10_p_corrected": min(f["log10_p_corrected"] for f in rn["findings"][1:])}
    if not a.model:
        from auditor.forensics.provenance import test

        ref = ensure("cnn-small-mean") / "model.onnx"
        der, obf = ensure("forensics-derived"), ensure("forensics-obfuscated")
        names = ["perm-in", "all", "all-int8"] if a.quick else ["perm-in", "perm-out", "scale", "split-4", "dummy-4",
                                                                 "clique-4", "all", "all-bnfold", "all-int8"]
        pos_files = [der / f"{n}.onnx" for n in ("finetuned", "pruned50", "int8", "pruned50-int8")] + \
                    [obf / "mean" / f"{n}.onnx" for n in names]
        neg_files = [ensure(f"forensics-twin-seed{s}") / "model.onnx" for s in (1, 2)] + \
                    [obf / "twin" / f"{n}.onnx" for n in names]
        t0 = time.perf_counter()
        pos = [-test(f, ref)["log10_p_combined"] for f in pos_files]
        neg = [-test(f, ref)["log10_p_combined"] for f in neg_files]
        out["provenance"] = {**roc(pos, neg), "seconds": time.perf_counter() - t0,
                             "scores_positive": dict(zip([str(p.relative_to(p.parents[1])) for p in pos_files], pos)),
                             "scores_negative": dict(zip([str(p.relative_to(p.parents[1])) for p in neg_files], neg))}
        # the residual CNN obfuscated inside a residual block (reference: arch-resnet kept.onnx)
        rref = ensure("arch-resnet") / "kept.onnx"
        robf = ensure("forensics-resnet-obfuscated")
        pos_files = [robf / s / f"{n}.onnx" for s in ("kept", "default") for n in names]
        neg_files = [ensure("forensics-resnet-twin") / "model.onnx"] + [robf / "twin" / f"{n}.onnx" for n in names]
        t0 = time.perf_counter()
        pos = [-test(f, rref)["log10_p_combined"] for f in pos_files]
        neg = [-test(f, rref)["log10_p_combined"] for f in neg_files]
        out["provenance_residual"] = {**roc(pos, neg), "seconds": time.perf_counter() - t0,
                                      "scores_positive": dict(zip([str(p.relative_to(p.parents[1])) for p in pos_files], pos)),
                                      "scores_negative": dict(zip([str(p.relative_to(p.parents[1])) for p in neg_files], neg))}
        # the same files, every layer tested (--all-layers: the other residual branches and fc as well)
        t0 = time.perf_counter()
        pos = [-test(f, rref, all_layers=True)["log10_p_combined"] for f in pos_files]
        neg = [-test(f, rref, all_layers=True)["log10_p_combined"] for f in neg_files]
        out["provenance_residual"]["all_layers"] = {
            **roc(pos, neg), "seconds": time.perf_counter() - t0,
            "scores_positive": dict(zip([str(p.relative_to(p.parents[1])) for p in pos_files], pos)),
            "scores_negative": dict(zip([str(p.relative_to(p.parents[1])) for p in neg_files], neg))}
    # third-party files nobody marked x random keys of their own weights' shapes
    import importlib.util

    spec = importlib.util.spec_from_file_location("tf", ROOT / "tests" / "test_forensics.py")
    tf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tf)
    from auditor.forensics.scan import scan

    tp = Path(os.environ.get("WMAUDIT_DATA", ROOT / "build" / "data")) / "thirdparty"
    files = sorted(tp.glob("*.onnx"))[: (2 if a.quick else None)]
    per = 10 if a.quick else 200
    rows = {}
    for f in files:
        t0 = time.perf_counter()
        r = scan(f, tf.random_keys_for(f, per, seed=1))
        rows[f.name] = {"keys": per, "detected": r["detected"], "seconds": time.perf_counter() - t0,
                        "min_log10_p": min(x.get("log10_p", 0.0) for x in r["findings"]),
                        "min_log10_p_corrected": min(x.get("log10_p_corrected", 0.0) for x in r["findings"])}
    out["third_party_random_keys"] = {"files": rows, "keys_total": per * len(files),
                                      "detected_total": sum(v["detected"] for v in rows.values())}
    d = Path(a.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "scan.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "provenance"}, indent=2))
    if "provenance" in out:
        print(json.dumps({k: v for k, v in out["provenance"].items() if not k.startswith("scores")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

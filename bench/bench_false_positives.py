"""False positives of white-box verdicts on third-party files that carry no mark.

    python bench/bench_false_positives.py --out build/bench [--quick] [--keys 1000]

Writes DIR/false_positives.json. Two counts over the third-party ONNX files
($WMAUDIT_DATA/thirdparty, docs/thirdparty.md):

1. committed keys (``auditor.marks.evidence.committed_false_positives``): 1,000
   random committed keys (256 bits, X and bits derived from their statements)
   x every file, each key on one weight per file (reduced length <= 16,384),
   fair-coin p: detections at alpha = 1e-6, and how many pairs reach p <= 0.01 /
   0.05 (a calibration check; under a valid null at most ~1 % / 5 %).
2. structured keys as in yu4u/dnn-watermark (``direct``: one-hot rows at
   np.random.randint, ``diff``: +1/-1 pairs) with all-zero and all-one bits:
   how many the fair coin would call detected, and what ``wmaudit extract``'s
   checked null says (``null_checks`` fails them; the empirical null's
   resolution cannot reach 1e-6), on every conv / linear weight of the files.

``--quick``: 200 committed keys and 20 structured keys per weight.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from auditor.marks import evidence, keys, stats  # noqa: E402


def structured(paths, per_weight: int, n_bits: int = 256, max_coeffs: int = 16384) -> dict:
    """Fair-coin detections of yu4u-style structured keys, against what the checked null allows."""
    from auditor.read.layout import torch_views
    from auditor.read.weights import WeightStore

    out = {}
    for kind in ("direct", "diff"):
        for bit in (0, 1):
            out[f"{kind}/bits={bit}"] = {"pairs": 0, "fair_coin_detections": 0, "checked_null_fails": 0}
    for path in paths:
        store = WeightStore.open(path)
        names = set()
        for v in torch_views(store):
            if v.weight.name in names or len(v.shape) < 2 or v.kind not in ("conv", "linear"):
                continue
            names.add(v.weight.name)
            w = keys.reduce_weight(v.array(), "mean")
            N = w.size
            if N > max_coeffs or N < 2:
                continue
            for j in range(per_weight):
                rs = np.random.RandomState(j)
                for kind in ("direct", "diff"):
                    X = np.zeros((n_bits, N))
                    X[np.arange(n_bits), rs.randint(0, N, n_bits)] = 1.0
                    if kind == "diff":
                        X[np.arange(n_bits), rs.randint(0, N, n_bits)] -= 1.0
                    y = X @ w
                    for bit in (0, 1):
                        k = int(((y > 0).astype(np.uint8) == bit).sum())
                        r = out[f"{kind}/bits={bit}"]
                        r["pairs"] += 1
                        r["fair_coin_detections"] += stats.binom_tail_half(n_bits, k) < stats.DEFAULT_ALPHA
            # the checked null on the first key of each kind (the checks depend on X and bits only)
            for kind in ("direct", "diff"):
                rs = np.random.RandomState(0)
                X = np.zeros((n_bits, N))
                X[np.arange(n_bits), rs.randint(0, N, n_bits)] = 1.0
                if kind == "diff":
                    X[np.arange(n_bits), rs.randint(0, N, n_bits)] -= 1.0
                for bit in (0, 1):
                    mk = keys.WhiteboxMark(id="w", param="w", shape=tuple(v.shape), reduce="mean",
                                           bits=np.full(n_bits, bit, np.uint8),
                                           projection={"kind": "npy", "path": "X.npy"}, _X=X)
                    out[f"{kind}/bits={bit}"]["checked_null_fails"] += not evidence.null_checks(mk)["fair_coin"]
                    out[f"{kind}/bits={bit}"]["weights"] = out[f"{kind}/bits={bit}"].get("weights", 0) + 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keys", type=int, default=None, help="committed keys (default 1000, --quick 200)")
    a = ap.parse_args(argv)
    paths = evidence.default_null_corpus()
    if not paths:
        print("no third-party files: run scripts/fetch_thirdparty.sh", file=sys.stderr)
        return 2
    n_keys = a.keys or (200 if a.quick else 1000)
    t0 = time.perf_counter()
    committed = evidence.committed_false_positives(paths, n_keys)
    t1 = time.perf_counter()
    struct = structured(paths, 20 if a.quick else 100)
    t2 = time.perf_counter()
    doc = {"bench": "false_positives", "command": " ".join([sys.executable, *sys.argv]), "quick": a.quick,
           "files": [p.name for p in paths], "committed": committed, "committed_seconds": round(t1 - t0, 2),
           "structured": struct, "structured_seconds": round(t2 - t1, 2),
           "note": "structured keys: fair_coin_detections is what the unchecked binomial would have said; "
                   "checked_null_fails counts weights on which null_checks refused the fair coin "
                   "(then the empirical null applies, whose resolution 1/(n+1) cannot reach 1e-6)"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".false_positives.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "false_positives.json")
    print(json.dumps({"pairs": committed["pairs"], "detections": committed["detections"],
                      "min_p": committed["min_p"], "structured": struct}, indent=1))
    return 0 if committed["detections"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

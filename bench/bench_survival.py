"""White-box survival benchmark: the seed's robustness table (4.1) on ONNX files, and survival curves.

    python bench/bench_survival.py --out build/bench/survival [--quick] [--seed 0] [--threads 2]
    python bench/bench_survival.py --out DIR --rejudge OLD/survival.json   # seed comparison only, no training

Writes ``survival.json`` (result envelope: numbers, the exact command, seeds,
versions) and prints a table.

Models: SmallCNN (~1.9 M parameters, target ``features.conv2.weight``, 9,216
weights) and LargeCNN (~33 M, target 36,864 weights), trained (seeded) on
Fashion-MNIST subsets with a 256-bit and a 10-bit Uchida mark (reduce
``mean``: the mark reads X . mean over output channels of W, as in Uchida et
al. 2017), plus an unmarked twin per size trained identically without the
regulariser. Every model is exported to ONNX with BatchNorm kept, and every
measurement below is made from an ONNX file:

* table: per model x bits x attack in {none, prune 80 % (magnitude, per
  layer), int8 (onnxruntime static QDQ per-channel), prune 80 % + int8,
  QAT + int8}: BER, p, log10 p, |margin| min / median, signed margin min,
  verdict, task accuracy before / after (onnxruntime, seeded Fashion-MNIST
  test subset), the seed's statement for that row and ``consistent_with_seed``
  computed from the numbers by the criterion written beside it;
* curve: BER and margins vs pruning rate for each quantization mode in
  {none, dynamic, static-qdq-per-channel} on the SmallCNN 256-bit model,
  and the first pruning rate at which the mark breaks (p >= alpha).

A 10-bit mark can never be "detected" at alpha = 1e-6: its smallest possible
p is 2^-10 ~ 9.8e-4, so "insufficient evidence" is the correct verdict even
with every bit right. ``--quick`` trains the small model only, on fewer
images, with fewer curve points; the JSON says so.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from auditor import __version__, results, whitebox  # noqa: E402
from auditor.marks import keys
from auditor.marks import stats
from auditor.data.accuracy import accuracy  # noqa: E402
from auditor.data.inputs import fashion_mnist  # noqa: E402
from auditor.attacks import compose, save  # noqa: E402
from auditor.data.calibration import Calibration  # noqa: E402
from exporters import attacks as torch_attacks  # noqa: E402
from exporters import data, export, models, train  # noqa: E402
from exporters import watermark as wm  # noqa: E402

TARGET = "features.conv2.weight"
ALPHA = stats.DEFAULT_ALPHA
INT8 = "quantize:static-qdq-per-channel"
ATTACKS = {  # label -> (torch-side step, onnx attack steps)
    "none": (None, None),
    "prune80": (None, "prune:0.8"),
    "int8": (None, INT8),
    "prune80+int8": (None, f"prune:0.8,{INT8}"),
    "qat+int8": ("qat", INT8),
}
MARK_SEEDS = {256: dict(bits_seed=1, seed=2), 10: dict(bits_seed=21, seed=22)}
CURVE_MODES = ("none", "dynamic", "static-qdq-per-channel")

SEED_NONE = "seed 4.1: the mark is extracted after embedding"
SEED_NONE_10 = (SEED_NONE + "; 10 bits: 'insufficient evidence' is the right verdict at alpha 1e-6 "
                "(the best possible p, 2^-10 ~ 9.8e-4, is above alpha)")
SEED_PRUNE_256 = "seed 4.1: 256 bits, pruning 80 %: no difference between the sizes"
SEED_PRUNE_10 = "seed 4.1: 10 bits, pruning 80 %: the small model's mark degraded more than the large model's"
SEED_QUANT = ("seed 4.1: int8 / QAT + int8: extracted values look near-perfect; degradation can no longer be "
              "judged from the bits -- the margins show it")
SEED_UNMARKED = "control (not in the seed): an unmarked twin must not be detected"


def _spec(bits: int) -> wm.MarkSpec:
    s = MARK_SEEDS[bits]
    return wm.MarkSpec(TARGET, wm.random_bits(bits, s["bits_seed"]), "mean", seed=s["seed"], id=f"{TARGET}:mean:{bits}")


def configs(quick: bool, seed: int, threads: int) -> dict:
    """Training / attack settings per model size (what the JSON records)."""
    small = {"model": "SmallCNN", "train_subset": 2000 if quick else 6000, "epochs": 1, "batch": 32, "lr": 1e-3,
             "target_lr": {TARGET: 1e-2}, "strength": 10.0, "seed": seed, "subset_seed": seed, "threads": threads,
             "qat": {"subset": 1000 if quick else 3000, "epochs": 1, "lr": 5e-4, "batch": 64, "seed": seed}}
    large = {"model": "LargeCNN", "train_subset": 5000, "epochs": 1, "batch": 32, "lr": 1e-3,
             "target_lr": {TARGET: 1e-2}, "strength": 10.0, "seed": seed, "subset_seed": seed, "threads": threads,
             "qat": {"subset": 2000, "epochs": 1, "lr": 5e-4, "batch": 64, "seed": seed}}
    return {"small": small} if quick else {"small": small, "large": large}


# ---------------------------------------------------------------- training and export
def train_model(cfg: dict, bits: int | None, x, y, test) -> tuple[torch.nn.Module, dict]:
    """A seeded model of cfg['model'] trained with a ``bits``-bit mark (None: the unmarked twin)."""
    train.seeded(cfg["seed"], cfg["threads"])
    model = getattr(models, cfg["model"])()
    reg = wm.UchidaRegularizer(model, [_spec(bits)], strength=cfg["strength"]) if bits else None
    metrics = train.train_classifier(model, x, y, epochs=cfg["epochs"], batch=cfg["batch"], lr=cfg["lr"],
                                     seed=cfg["seed"], reg=reg, test=test, target_lr=cfg["target_lr"])
    return model, metrics


def export_model(model, out: Path, key_bits: list[int], xt, name: str) -> tuple[Path, dict]:
    """model.onnx + key.json (the marks of ``key_bits``) + manifest.json in ``out``."""
    key = wm.make_key(model, [_spec(b) for b in key_bits], {"name": type(model).__name__, "bench": name})
    res = export.export_marked(model, out, xt[:2], [xt[:3], xt[3:131]], key=key, exporter="dynamo",
                               dynamic_axes={0: "batch"}, inputs_description="Fashion-MNIST test subset images 0-130")
    return res.onnx_path, res.manifest


# ---------------------------------------------------------------- measuring
_ACCURACY: dict[tuple[str, int], float] = {}


def file_accuracy(path: Path, heldout, threads: int) -> float:
    """Task accuracy of the ONNX file (once per file content: an unmarked twin is audited with two marks)."""
    k = (results.file_sha256(path), id(heldout))
    if k not in _ACCURACY:
        _ACCURACY[k] = accuracy(path, heldout, threads=threads)
    return _ACCURACY[k]


def measure(path: Path, key: keys.Key, mark_id: str, manifest: dict | None, heldout, threads: int) -> dict:
    """One mark's numbers and the task accuracy, read from the ONNX file at ``path``."""
    r = whitebox.extract(path, key, manifest=manifest, alpha=ALPHA, marks=[mark_id]).marks[0]
    return {"ber": r.ber, "wrong_bits": r.wrong_bits, "n_bits": r.n_bits, "p_value": r.p_value,
            "log10_p": r.log10_p, "margin_min": r.margin_min, "margin_median": r.margin_median,
            "signed_margin_min": r.signed_margin_min, "verdict": r.verdict,
            "weight": r.location.weight if r.location else None, "quant": r.location.quant if r.location else None,
            "accuracy": file_accuracy(path, heldout, threads)}


def attacked_file(src: onnx.ModelProto, steps: str | None, calibration, folder: Path, label: str) -> Path:
    if steps is None:
        path = folder / f"{label}.onnx"
        save(src, path)
        return path
    r = compose.compose(src, steps, calibration, prune_seed=0)
    path = folder / f"{label}.onnx"
    save(r.model, path)
    return path


# ---------------------------------------------------------------- seed comparison
def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def judge(rows: list[dict], sizes: list[str]) -> None:
    """Fill ``seed`` / ``criterion`` / ``consistent_with_seed`` on every row (in place)."""
    idx = {(r["size"], r["mark"], r["attack"]): r for r in rows}
    # ratios first: the size comparison of one row reads the other size's ratio
    for r in rows:
        base = idx.get((r["size"], r["mark"], "none"))
        if base is not None:
            r["margin_median_ratio_vs_none"] = _ratio(r["margin_median"], base["margin_median"])
            r["margin_min_ratio_vs_none"] = _ratio(r["margin_min"], base["margin_min"])
    for r in rows:
        marked = r["mark"].startswith("marked")
        bits = r["n_bits"]
        if not marked:
            r["seed"], r["criterion"] = SEED_UNMARKED, "verdict is not 'detected'"
            r["consistent_with_seed"] = r["verdict"] != stats.DETECTED
        elif r["attack"] == "none":
            want = stats.DETECTED if bits == 256 else stats.INSUFFICIENT
            r["seed"] = SEED_NONE if bits == 256 else SEED_NONE_10
            r["criterion"] = f"BER == 0 and verdict == {want!r}"
            r["consistent_with_seed"] = r["ber"] == 0.0 and r["verdict"] == want
        elif r["attack"] == "prune80":
            other = [idx.get((s, r["mark"], "prune80")) for s in sizes if s != r["size"]]
            if not other or other[0] is None:
                r["seed"] = SEED_PRUNE_256 if bits == 256 else SEED_PRUNE_10
                r["criterion"] = "needs both sizes (quick mode has the small model only)"
                r["consistent_with_seed"] = None
                continue
            small = idx[("small", r["mark"], "prune80")]
            large = idx[("large", r["mark"], "prune80")]
            if bits == 256:
                r["seed"] = SEED_PRUNE_256
                r["criterion"] = "same verdict and |BER_small - BER_large| <= 0.02"
                r["consistent_with_seed"] = (small["verdict"] == large["verdict"]
                                             and abs(small["ber"] - large["ber"]) <= 0.02)
            else:
                r["seed"] = SEED_PRUNE_10
                r["criterion"] = ("small degraded more: BER_small > BER_large, or equal BERs and a lower "
                                  "median-|margin| ratio (after / before pruning) for the small model")
                rs, rl = small.get("margin_median_ratio_vs_none"), large.get("margin_median_ratio_vs_none")
                r["consistent_with_seed"] = bool(small["ber"] > large["ber"] or
                                                 (small["ber"] == large["ber"] and rs is not None and rl is not None
                                                  and rs < rl))
        else:  # int8, prune80+int8, qat+int8
            # The seed's checkable claim is that the bits after int8 / QAT look as good as before
            # quantization. Whether they hide a degradation is read from the margins of the dequantized
            # floats against the float model the quantizer saw: reported beside, not part of the claim.
            ref_attack = "prune80" if r["attack"] == "prune80+int8" else "none"
            ref = idx.get((r["size"], r["mark"], ref_attack))
            r["seed"] = SEED_QUANT
            r["criterion"] = f"bits look as good as before quantization: BER <= BER of '{ref_attack}'"
            r["consistent_with_seed"] = bool(ref is not None and r["ber"] <= ref["ber"])
            if ref is not None:
                rmed = _ratio(r["margin_median"], ref["margin_median"])
                rmin = _ratio(r["margin_min"], ref["margin_min"])
                r["margin_vs_float"] = {"reference": ref_attack, "median_ratio": rmed, "min_ratio": rmin}
                hidden = rmed is not None and rmed < 0.99
                r["hidden_degradation"] = hidden
                r["finding"] = ("bits unchanged but the median |margin| fell >= 1 %: the bits mask a degradation "
                                "the margins show" if hidden and r["ber"] <= ref["ber"] else
                                "median |margin| within 1 % of (or above) the float model's: from the dequantized "
                                "values int8 masks nothing here; there is no degradation to mask")


# ---------------------------------------------------------------- the curve
def curve(onnx_path: Path, key: keys.Key, mark_id: str, manifest: dict, rates: list[float], calibration,
          heldout, threads: int, folder: Path) -> dict:
    src = onnx.load(str(onnx_path))
    out = {}
    for mode in CURVE_MODES:
        pts = []
        for rate in rates:
            steps = [f"prune:{rate:g}"] if rate > 0 else []
            if mode != "none":
                steps.append(f"quantize:{mode}")
            label = f"curve-{mode}-{rate:g}"
            path = attacked_file(src, ",".join(steps) or None, calibration, folder, label)
            m = measure(path, key, mark_id, manifest, heldout, threads)
            m.update(rate=rate, steps=",".join(steps) or "none")
            pts.append(m)
            path.unlink()
            print(f"curve {mode:24s} prune {rate:4.2f}  BER {m['ber']:.3f}  log10p {m['log10_p']:8.2f}  "
                  f"margin min {m['margin_min']:.4f} med {m['margin_median']:.4f}  acc {m['accuracy']:.3f}", flush=True)
        breaks = next((p["rate"] for p in pts if p["p_value"] >= ALPHA), None)
        out[mode] = {"points": pts, "first_break_rate": breaks}
    return out


# ---------------------------------------------------------------- printing
def table(rows: list[dict]) -> str:
    head = (f"{'size':5s} {'mark':12s} {'attack':13s} {'BER':>6s} {'log10 p':>8s} {'m.min':>7s} {'m.med':>7s} "
            f"{'s.min':>8s} {'verdict':21s} {'acc b/a':>11s} seed?")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = {True: "yes", False: "NO", None: "n/a"}[r.get("consistent_with_seed")]
        lines.append(f"{r['size']:5s} {r['mark']:12s} {r['attack']:13s} {r['ber']:6.3f} {r['log10_p']:8.2f} "
                     f"{r['margin_min']:7.4f} {r['margin_median']:7.4f} {r['signed_margin_min']:8.4f} "
                     f"{r['verdict']:21s} {r['accuracy_before']:.3f}/{r['accuracy']:.3f} {c}")
    lines.append("")
    lines.append("seed statements (consistent_with_seed: yes / NO / n/a = cannot be judged from this run):")
    for r in rows:
        if r["mark"].startswith("marked") and r["attack"] != "none":
            c = {True: "yes", False: "NO", None: "n/a"}[r.get("consistent_with_seed")]
            lines.append(f"  {r['size']} {r['mark']} {r['attack']}: {c} -- {r['seed']} [{r['criterion']}]")
    return "\n".join(lines)


def rejudge(src: Path, out: Path) -> int:
    """Re-run ``judge`` and ``table`` on the rows of an earlier result; the measured numbers are kept."""
    doc = json.loads(src.read_text())
    rows = doc["rows"]
    for r in rows:
        for k in ("seed", "criterion", "consistent_with_seed", "finding", "hidden_degradation", "margin_vs_float",
                  "margin_median_ratio_vs_none", "margin_min_ratio_vs_none"):
            r.pop(k, None)
    judge(rows, list(doc["training"]))
    doc["table"] = table(rows)
    doc["rejudged"] = {"from": str(src), "measured_by": doc["command"],
                       "command": " ".join(shlex.quote(s) for s in [sys.executable] + sys.argv)}
    print(doc["table"])
    out.mkdir(parents=True, exist_ok=True)
    results.write_result(out / "survival.json", doc)
    print(f"wrote {out / 'survival.json'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="small model only, fewer steps and curve points (minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    ap.add_argument("--rejudge", metavar="JSON", help="recompute the seed comparison and the table of an earlier "
                    "survival.json (numbers unchanged, no training) and write it to --out")
    a = ap.parse_args(argv)
    if a.rejudge:
        return rejudge(Path(a.rejudge), Path(a.out))
    t_start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfgs = configs(a.quick, a.seed, a.threads)
    n_heldout = 1000 if a.quick else 2000
    heldout = fashion_mnist("evaluation", n_heldout, seed=a.seed)
    calib_data = fashion_mnist("calibration", 128, seed=a.seed)
    # 0.98 and 0.99 go beyond the asked 0-95 %: the 256-bit mean mark has not broken at 95 %.
    rates = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99] if a.quick else [round(0.1 * i, 1) for i in range(10)] + [0.95, 0.98, 0.99]
    rows: list[dict] = []
    trained: dict = {}
    curve_doc = None
    with tempfile.TemporaryDirectory(prefix="bench-survival-") as tmpd:
        tmp = Path(tmpd)
        calibration = Calibration(calib_data, folder=tmp / "calibration")
        for size, cfg in cfgs.items():
            test = data.fashion("test", n=500, seed=a.seed)
            x, y = data.fashion("train", n=cfg["train_subset"], seed=cfg["subset_seed"])
            for mark in ("marked-256", "marked-10", "unmarked"):
                bits = int(mark.split("-")[1]) if mark != "unmarked" else None
                t0 = time.time()
                model, metrics = train_model(cfg, bits, x, y, test)
                folder = tmp / f"{size}-{mark}"
                key_bits = [bits] if bits else [256, 10]
                path, manifest = export_model(model, folder / "float", key_bits, test[0], f"{size}-{mark}")
                key = keys.load_key(folder / "float" / "key.json")
                trained[f"{size}/{mark}"] = {"params": models.n_params(model), "metrics": metrics,
                                             "train_and_export_s": round(time.time() - t0, 1)}
                print(f"trained {size} {mark}: {metrics.get('test_accuracy')} test acc, "
                      f"torch BER {metrics.get('ber')}, {time.time() - t0:.0f}s", flush=True)
                src = onnx.load(str(path))
                files: dict[str, Path] = {}
                for label, (torch_step, steps) in ATTACKS.items():
                    if not bits and label == "qat+int8":
                        continue  # the control needs no QAT
                    t1 = time.time()
                    if torch_step == "qat":
                        q = cfg["qat"]
                        xq, yq = x[:q["subset"]], y[:q["subset"]]
                        qm = torch_attacks.qat(model, xq, yq, epochs=q["epochs"], seed=q["seed"], lr=q["lr"],
                                               batch=q["batch"])
                        qpath, _ = export_model(qm, folder / "qat", key_bits, test[0], f"{size}-{mark}-qat")
                        files[label] = attacked_file(onnx.load(str(qpath)), steps, calibration, folder, label)
                    else:
                        files[label] = attacked_file(src, steps, calibration, folder, label)
                    for b in key_bits:
                        mark_id = _spec(b).id
                        m = measure(files[label], key, mark_id, manifest, heldout, a.threads)
                        row = {"size": size, "model": cfg["model"], "mark": mark if bits else f"unmarked/{b}",
                               "attack": label, "steps": ("qat(torch) then " if torch_step else "") + (steps or "none"),
                               **m, "seconds": round(time.time() - t1, 1)}
                        rows.append(row)
                        print(f"{size:5s} {row['mark']:11s} {label:13s} BER {m['ber']:.3f} log10p {m['log10_p']:8.2f} "
                              f"margin min {m['margin_min']:.4f} med {m['margin_median']:.4f} {m['verdict']} "
                              f"acc {m['accuracy']:.3f}", flush=True)
                for f in files.values():
                    if f.name != "none.onnx":
                        f.unlink()
                if size == "small" and mark == "marked-256":
                    curve_doc = curve(path, key, _spec(256).id, manifest, rates, calibration, heldout,
                                      a.threads, folder)
                del model, src
        for r in rows:
            base = next(b for b in rows if b["size"] == r["size"] and b["mark"] == r["mark"] and b["attack"] == "none")
            r["accuracy_before"] = base["accuracy"]
        judge(rows, list(cfgs))
    text = table(rows)
    print()
    print(text)
    if curve_doc:
        print("\nfirst pruning rate with p >= 1e-6 (SmallCNN, 256 bits): "
              + ", ".join(f"{k}: {v['first_break_rate'] if v['first_break_rate'] is not None else 'none up to ' + str(rates[-1])}"
                          for k, v in curve_doc.items()))
    doc = {
        "quick": a.quick,
        "mode": "quick: SmallCNN only, 2,000 training images, 1,000 held-out images, 6 curve points"
                if a.quick else "full: SmallCNN and LargeCNN",
        "seeds": {"training": a.seed, "subsets": a.seed, "heldout": a.seed, "calibration": a.seed,
                  "marks": {str(k): v for k, v in MARK_SEEDS.items()}, "prune_seed": 0},
        "versions": {"wmaudit": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "alpha": ALPHA,
        "mark": {"target": TARGET, "reduce": "mean (Uchida et al. 2017: X . mean over output channels of W)",
                 "loss": "strength * BCE(sigmoid(X w), b)", "bits": [256, 10]},
        "note_10_bits": "a 10-bit mark cannot reach p < 1e-6 (best p = 2^-10): 'insufficient evidence' is the right "
                        "verdict even with BER 0",
        "training": cfgs, "trained": trained, "heldout": heldout.describe(), "calibration": calib_data.describe(),
        "attacks": {k: ("QAT (exporters.attacks.qat, torch) then " if t else "") + (s or "none")
                    for k, (t, s) in ATTACKS.items()},
        "note_pruning": "pruning 80 % per layer (every Conv/Gemm weight, BatchNorm and biases untouched) without "
                        "fine-tuning afterwards: the task accuracy collapses, the mark's bits mostly survive",
        "rows": rows, "table": text,
        "curve": {"model": "small/marked-256", "rates": rates, "modes": curve_doc},
        "wall_s": round(time.time() - t_start, 1),
    }
    env = results.envelope("bench-survival", command=" ".join(shlex.quote(s) for s in [sys.executable] + sys.argv),
                           **doc)
    results.write_result(out / "survival.json", env)
    print(f"wrote {out / 'survival.json'} ({doc['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

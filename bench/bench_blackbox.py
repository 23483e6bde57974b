"""Black-box benchmark: logo and trigger marks under model and query attacks.

    python bench/bench_blackbox.py --out build/bench/blackbox [--quick] [--seed 0]

Writes ``blackbox.json`` (result envelope, with the command) and decoded logo
PNGs. Measures, on the ``bb-logo-wrn`` and ``bb-trigger`` fixtures:

* logo Pearson r vs the number of key images per group (1/3/5/10/20), clean,
  after model attacks (numpy magnitude pruning of every weight initializer,
  onnxruntime int8 dynamic / static QDQ quantisation) and after query attacks
  (JPEG, Gaussian noise, resize, crop, rotation, shift), next to the seed's
  qualitative result (4.2, fig. 5);
* trigger accuracy and p under the same attacks;
* task accuracy (Fashion-MNIST test set through onnxruntime) of marked vs unmarked;
* key-query throughput of ``auditor.marks.blackbox.query`` vs a raw onnxruntime
  batched run of the same inputs (goal: <= 10 % overhead).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from auditor.marks import blackbox as bb  # noqa: E402
from auditor import results  # noqa: E402
from auditor.data import datasets
from auditor.marks import keys
from auditor.backends import open_runner  # noqa: E402

SEED_RESULT = ("seed 4.2 (Sakazawa et al., MIPR 2019, WRN on CIFAR-100, 10x10 logo): the logo emerges more "
               "clearly as 1, 3, 5, 10 key images are summed (fig. 5a); under attacks on the model and on the "
               "query images it is less clear but still subjectively visible (fig. 5b); an unmarked model gives "
               "a random pattern (fig. 5c). No numbers are given.")


def prune_model(src: Path, dst: Path, rate: float) -> Path:
    """Zero the fraction ``rate`` of smallest-magnitude coefficients of every weight
    initializer with >= 2 axes (per tensor), in numpy; the source file is untouched."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    for init in m.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim < 2 or w.dtype.kind != "f":
            continue
        k = int(round(rate * w.size))
        if k == 0:
            continue
        thr = np.partition(np.abs(w).reshape(-1), k - 1)[k - 1]
        pruned = np.where(np.abs(w) <= thr, 0, w).astype(w.dtype)
        init.CopyFrom(numpy_helper.from_array(pruned, init.name))
    onnx.save(m, str(dst))
    return dst


def model_variants(src: Path, folder: Path, quick: bool) -> dict[str, Path]:
    from fixtures.blackbox import calibration_images, int8_variant

    out = {"clean": src}
    for rate in ((0.5,) if quick else (0.3, 0.5, 0.7, 0.9)):
        out[f"prune:{rate:g}"] = prune_model(src, folder / f"{src.stem}-prune{rate:g}.onnx", rate)
    out["int8:dynamic"] = int8_variant(src, folder / f"{src.stem}-int8d.onnx", mode="dynamic")
    out["int8:static-qdq"] = int8_variant(src, folder / f"{src.stem}-int8s.onnx", calibration_images())
    out["prune:0.5+int8:static-qdq"] = int8_variant(out.get("prune:0.5"), folder / f"{src.stem}-p5i8.onnx",
                                                    calibration_images())
    return out


def task_accuracy(model: Path, n: int) -> float:
    imgs, labels = datasets.fashion_mnist("test")
    x = datasets.fashion_mnist_normalized(imgs[:n])
    with open_runner(model) as r:
        return float((r.infer_batches(x, 256).argmax(1) == labels[:n]).mean())


def logo_rows(model: Path, mark: bb.LogoMark, attack: str | None, seed: int) -> dict:
    with open_runner(model) as r:
        res = bb.evaluate_logo(r, mark, n_perm=2000, seed=seed, attack=attack, attack_seed=seed,
                               verdict_perm=2000)
    return {"r": {d["k"]: round(d["r"], 4) for d in res["per_k"]},
            "p_2000_perm": {d["k"]: d["p_value"] for d in res["per_k"]}, "maps": res["maps"]}


def trigger_row(model: Path, t: bb.TriggerSet, attack: str | None, seed: int) -> dict:
    with open_runner(model) as r:
        res = bb.evaluate_triggers(r, t, attack=attack, attack_seed=seed)
    return {"trigger_accuracy": res["trigger_accuracy"], "p_value": res["p_value"], "verdict": res["verdict"]}


def throughput(model: Path, images: np.ndarray, pp: bb.Preprocess, repeats: int, batch: int = 64) -> dict:
    """Median seconds of auditor.marks.blackbox.query vs raw InferenceSession.run on the same batches."""
    import onnxruntime as ort

    x = pp.model_input(images)
    batches = [x[i:i + batch] for i in range(0, len(x), batch)]
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    raw, ours = [], []
    with open_runner(model) as r:
        for _ in range(2):  # warm-up both paths
            [sess.run(None, {name: b}) for b in batches]
            bb.query(r, images, pp, batch_size=batch)
        for _ in range(repeats):  # interleaved, so machine load hits both alike
            t0 = time.perf_counter()
            [sess.run(None, {name: b}) for b in batches]
            raw.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            bb.query(r, images, pp, batch_size=batch)
            ours.append(time.perf_counter() - t0)
    t_raw, t_ours = float(np.median(raw)), float(np.median(ours))
    return {"images": len(x), "batch": batch, "repeats": repeats, "raw_onnxruntime_s": t_raw,
            "wmaudit_query_s": t_ours, "images_per_s": len(x) / t_ours,
            "overhead": t_ours / t_raw - 1.0, "goal": "<= 0.10"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_blackbox.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer attacks and repeats")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from fixtures.build import ensure

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    logo_fx, trig_fx = ensure("bb-logo-wrn"), ensure("bb-trigger")
    mark = bb.load_logo(keys.load_key(logo_fx / "key.json"))
    trig = bb.load_triggers(keys.load_key(trig_fx / "key.json"))
    query_attacks = (["jpeg:50", "noise:0.1", "rotate:10"] if a.quick else
                     ["jpeg:75", "jpeg:50", "jpeg:20", "noise:0.05", "noise:0.1", "noise:0.2", "resize:0.5",
                      "crop:0.85", "rotate:5", "rotate:15", "shift:1", "shift:3"])
    doc = {"seed": a.seed, "quick": a.quick, "seed_result": SEED_RESULT, "logo": {}, "triggers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fx, kind in ((logo_fx, "logo"), (trig_fx, "triggers")):
            marked = model_variants(fx / "marked.onnx", tmp, a.quick)
            conditions = [(f"model {k}", p, None) for k, p in marked.items()]
            conditions += [(f"query {q}", fx / "marked.onnx", q) for q in query_attacks]
            conditions += [("unmarked clean", fx / "unmarked.onnx", None)]
            conditions += [(f"unmarked query {q}", fx / "unmarked.onnx", q) for q in query_attacks[:1]]
            for label, model, attack in conditions:
                if kind == "logo":
                    row = logo_rows(model, mark, attack, a.seed)
                    safe = label.replace(" ", "_").replace(":", "").replace("+", "_")
                    row["png"] = {k: w["path"] for k, w in
                                  bb.write_logo_pngs(row.pop("maps"), out / "logos", prefix=safe, upscale=8).items()}
                    doc["logo"][label] = row
                else:
                    doc["triggers"][label] = trigger_row(model, trig, attack, a.seed)
                print(f"{kind:8s} {label:32s} {doc[kind][label].get('r', doc[kind][label])}", flush=True)
            if kind == "logo":
                doc["logo_variants_accuracy"] = {k: task_accuracy(p, 2000 if a.quick else 10000) for k, p in marked.items()}
    n_acc = 2000 if a.quick else 10000
    doc["task_accuracy"] = {f"{fx.name}/{m}": task_accuracy(fx / f"{m}.onnx", n_acc)
                            for fx in (logo_fx, trig_fx) for m in ("marked", "unmarked")}
    doc["task_accuracy_images"] = n_acc
    doc["throughput"] = {
        "logo_keys": throughput(logo_fx / "marked.onnx", mark.images, mark.preprocess, 5 if a.quick else 20),
        "triggers": throughput(trig_fx / "marked.onnx", trig.images, trig.preprocess, 5 if a.quick else 20)}
    doc["wall_s"] = round(time.time() - t_start, 1)
    env = results.envelope("bench-blackbox", **doc)
    results.write_result(out / "blackbox.json", env)
    print(f"wrote {out / 'blackbox.json'} ({doc['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""RNN white-box marks: the source documents' experiments (000/001 section 4.3, 002).

    python bench/bench_rnn.py --out build/bench [--quick] [--seed 0]

Writes DIR/bench_rnn.json. Every marked model is exported to ONNX (legacy
exporter: ONNX RNN/LSTM nodes with gate-reordered W/R) and its marks are read
back from the file by ``auditor.marks.whitebox.extract`` (with the manifest), so
the numbers are what an auditor sees.

1. sine / SimpleRNN(20): 100 samples per period, 2 periods of training signal,
   predict the next sample from the 25 before it. Kernel weight_ih_l0 has 20
   weights, recurrent weight_hh_l0 400. Marks (8 bits each, flatten) on the
   kernel, the recurrent weight, or both, beside the unmarked model: final
   training loss, test MSE (other phase), free-running prediction MSE from
   samples 0-24 over the next 175 samples, and bits detected.
   (Documents: both weights can carry the mark; kernel-only tracks the wave a
   little worse.)
2. noisy sine / LSTM(300): kernel 1,200 weights, recurrent 360,000; 8-bit
   mark on each (documents: kernel 100 %, recurrent 87.5 % detected).
3. char-level LSTM(128) on Hamlet (lower case, one-hot input): 1 / 8 / 256
   bits on the kernel, the recurrent weight, or both; validation perplexity
   beside the unmarked model (documents: Table 5, perplexity ~2.9-3.4 on
   their corpus; embedding does not hurt the task much). Two ways to embed:
   ``joint`` (E_R added to the Adam objective, Uchida's formulation) and
   ``decoupled`` (an SGD step on E_R after each Adam step). Measured here:
   joint embedding on the one-hot kernel raises perplexity (Adam moves every
   coefficient the dense projection touches by ~lr per step, including the
   columns of characters absent from the batch); decoupled does not.

Bits are seeded random (numpy default_rng), not the all-ones bits of the
documents: a random pattern is the harder and more usual test. ``--quick``
shortens every training (about 2 minutes on 2 cores); the full run takes
about 15-20 minutes.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from auditor.marks import keys  # noqa: E402
from exporters import data, export, models, train  # noqa: E402
from exporters import watermark as wm  # noqa: E402

KERNEL, RECURRENT = "rnn.weight_ih_l0", "rnn.weight_hh_l0"
THREADS = 1  # torch threads for every training (set by --threads)
TARGETS = {"kernel": [KERNEL], "recurrent": [RECURRENT], "both": [KERNEL, RECURRENT]}


def detect(model: torch.nn.Module, specs: list[wm.MarkSpec], example: torch.Tensor,
           validation: list[torch.Tensor]) -> dict:
    """Export (legacy), then read every mark back from the ONNX file."""
    key = wm.make_key(model, specs, {"name": type(model).__name__, "bench": "rnn"})
    with tempfile.TemporaryDirectory(prefix="bench-rnn-") as tmp:
        res = export.export_marked(model, tmp, example, validation, key=key, exporter="legacy",
                                   dynamic_axes={0: "batch", 1: "time"}, atol=1e-4, rtol=1e-3)
        path = Path(tmp) / "model.onnx"
        out = {"onnx_max_abs_diff": res.manifest["validation"]["max_abs_diff"], "marks": {}}
        try:
            from auditor.marks import whitebox
            ext = whitebox.extract(path, key, manifest=res.manifest)
            for m in ext.marks:
                out["marks"][m.id] = {"param": m.param, "bits": m.n_bits, "matches": m.matches,
                                      "detected_fraction": m.matches / m.n_bits, "ber": m.ber,
                                      "p_value": m.p_value, "verdict": m.verdict,
                                      "margin_min": m.margin_min, "via": "auditor.marks.whitebox.extract"}
        except ImportError:  # auditor without white-box extraction: read the bits with numpy
            from auditor.read import layout
            from auditor.read.weights import WeightStore
            store = WeightStore.open(path)
            for mark in key.whitebox:
                loc = res.manifest["params"][mark.param]
                w = layout.apply_transform(store.array(loc["onnx"]), loc["transform"])
                bits = (mark.matrix() @ keys.reduce_weight(w, mark.reduce) > 0).astype(np.uint8)
                k = int((bits == mark.bits).sum())
                out["marks"][mark.id] = {"param": mark.param, "bits": mark.n_bits, "matches": k,
                                         "detected_fraction": k / mark.n_bits, "ber": 1 - k / mark.n_bits,
                                         "via": "numpy on the ONNX initializer"}
    return out


def _specs(targets: list[str], n_bits: int, seed: int) -> list[wm.MarkSpec]:
    return [wm.MarkSpec(p, wm.random_bits(n_bits, seed + 10 * i + 1), "flatten", seed=seed + 10 * i + 2)
            for i, p in enumerate(targets)]


@torch.no_grad()
def free_running_mse(model: torch.nn.Module, signal: np.ndarray, context: int) -> float:
    """Feed the first ``context`` samples, then predict each next sample from the model's own outputs."""
    seq = list(signal[:context])
    for _ in range(len(signal) - context):
        x = torch.tensor(seq[-context:], dtype=torch.float32).view(1, context, 1)
        seq.append(float(model(x)))
    pred = np.asarray(seq[context:])
    return float(np.mean((pred - signal[context:]) ** 2))


def sine_experiment(cell: str, hidden: int, noise: float, n_bits: int, configs: list[str], epochs: int,
                    lr: float, strength: float, seed: int, context: int = 25) -> dict:
    signal = data.sine_signal(noise=noise, seed=seed)
    x, y = data.sine_windows(signal, context, 1)
    clean_test = data.sine_signal(phase=0.7)
    xt, yt = data.sine_windows(clean_test, context, 1)
    rows = {}
    for config in ["unmarked"] + configs:
        train.seeded(seed, THREADS)
        model = models.SeqRNN(cell, 1, hidden, 1)
        specs = _specs(TARGETS[config], n_bits, seed) if config != "unmarked" else []
        reg = wm.UchidaRegularizer(model, specs, strength=strength) if specs else None
        t0 = time.perf_counter()
        m = train.train_regression(model, x, y, epochs=epochs, batch=32, lr=lr, seed=seed, reg=reg, test=(xt, yt))
        row = {"task_loss": m["task_loss"], "train_mse": m["train_mse"], "test_mse": m["test_mse"],
               "free_running_mse": free_running_mse(model, data.sine_signal(), context),
               "train_seconds": round(time.perf_counter() - t0, 1),
               "weights": {p: int(dict(model.named_parameters())[p].numel()) for p in (KERNEL, RECURRENT)}}
        if specs:
            row["ber_torch"] = m["ber"]
            row.update(detect(model, specs, xt[:2], [xt[:16], xt[16:40, :10]]))
        rows[config] = row
        print(f"  {cell}({hidden}) noise={noise} {config:9s} loss {m['task_loss']:.2e} test {m['test_mse']:.2e} "
              + " ".join(f"{v['param']}: {v['matches']}/{v['bits']}" for v in row.get("marks", {}).values()),
              flush=True)
    return {"cell": cell, "hidden": hidden, "noise": noise, "bits": n_bits, "reduce": "flatten",
            "context": context, "epochs": epochs, "lr": lr, "strength": strength,
            "signal": "sin(2*pi*t/100), 2 periods (200 samples)" + (f" + N(0,{noise}^2)" if noise else ""),
            "test_signal": "clean sine, phase 0.7", "results": rows}


def char_experiment(plan: list[tuple[str, int, str]], steps: int, strength: float, decoupled_lr: float,
                    seed: int, max_chars: int | None) -> dict:
    """``plan``: (config, bits, update) rows; update ``joint`` adds E_R to the Adam objective
    (Uchida's formulation), ``decoupled`` takes a separate SGD step on E_R after each Adam step."""
    corpus = data.CharCorpus.shakespeare(max_chars=max_chars)
    rows = {}
    for config, n_bits, update in [("unmarked", 0, "")] + plan:
        train.seeded(seed, THREADS)
        model = models.CharLSTM(corpus.vocab_size, 128)
        specs = _specs(TARGETS[config], n_bits, seed) if n_bits else []
        reg = None
        if specs:
            reg = wm.UchidaRegularizer(model, specs, strength=strength,
                                       decoupled_lr=decoupled_lr if update == "decoupled" else None)
        m = train.train_char(model, corpus, steps=steps, seq_len=100, batch=32, lr=3e-3, seed=seed, reg=reg)
        row = {"config": config, "bits": n_bits, "update": reg.describe()["update"] if reg else None,
               "task_loss": m["task_loss"], "perplexity": m["perplexity"], "train_seconds": m["train_seconds"]}
        if specs:
            row["ber_torch"] = m["ber"]
            xv, _ = next(corpus.batches("val", 50, 4, 1, seed))
            row.update(detect(model, specs, xv[:2], [xv, xv[:, :20]]))
        name = "unmarked" if not n_bits else f"{config}-{n_bits}-{update}"
        rows[name] = row
        print(f"  char-LSTM(128) {name:22s} loss {m['task_loss']:.3f} perplexity {m['perplexity']:.2f} "
              + " ".join(f"{v['param']}: {v['matches']}/{v['bits']}" for v in row.get("marks", {}).values()),
              flush=True)
    return {"corpus": f"hamlet_gut.txt, lower case{'' if max_chars is None else f', first {max_chars} chars'}",
            "vocab": corpus.vocab_size, "hidden": 128, "steps": steps, "seq_len": 100, "batch": 32, "lr": 3e-3,
            "strength": strength, "decoupled_lr": decoupled_lr,
            "kernel_weights": 4 * 128 * corpus.vocab_size, "recurrent_weights": 4 * 128 * 128, "results": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_rnn.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (writes bench_rnn.json)")
    ap.add_argument("--quick", action="store_true", help="short trainings (about 2 minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    global THREADS
    THREADS = a.threads
    argv = sys.argv[1:] if argv is None else argv
    command = "python bench/bench_rnn.py " + " ".join(shlex.quote(s) for s in argv)
    t0 = time.perf_counter()
    q = a.quick
    print("sine / SimpleRNN(20)", flush=True)
    simple = sine_experiment("rnn", 20, 0.0, 8, ["kernel", "recurrent", "both"], epochs=60 if q else 200,
                             lr=1e-2, strength=1.0, seed=a.seed)
    print("noisy sine / LSTM(300)", flush=True)
    lstm = sine_experiment("lstm", 300, 0.1, 8, ["kernel", "recurrent"], epochs=20 if q else 60,
                           lr=2e-3, strength=1.0, seed=a.seed)
    print("char-level LSTM(128)", flush=True)
    if q:
        plan = [("kernel", 8, "joint"), ("kernel", 8, "decoupled"), ("recurrent", 8, "decoupled")]
    else:
        plan = [(c, b, "decoupled") for b in (1, 8, 256) for c in ("kernel", "recurrent", "both")] \
            + [("both", b, "joint") for b in (1, 8, 256)]
    char = char_experiment(plan, steps=100 if q else 400, strength=1.0, decoupled_lr=2.0, seed=a.seed,
                           max_chars=None)
    doc = {"bench": "rnn", "command": command, "seed": a.seed, "threads": a.threads, "quick": q,
           "torch": torch.__version__.split("+")[0], "seconds": round(time.perf_counter() - t0, 1),
           "sine_simple_rnn": simple, "noisy_sine_lstm": lstm, "char_lstm": char,
           "documents": {"lstm300_noisy_sine_detected": {"kernel": 1.0, "recurrent": 0.875},
                         "char_lstm128_perplexity": {"kernel": [2.91, 3.16, 3.10], "recurrent": [3.33, 2.93, 3.42],
                                                     "both": [3.12, 2.91, 3.20], "bits": [1, 8, 256]}}}
    out = Path(a.out)
    keys.write_json_atomic(out / "bench_rnn.json", doc)
    print(f"wrote {out / 'bench_rnn.json'} ({doc['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

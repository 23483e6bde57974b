"""Training-step time with and without the Uchida regulariser (goal: <= 5 % overhead).

    python bench/bench_embed_overhead.py --out build/bench [--quick] [--seed 0] [--threads 1]

Writes DIR/bench_embed_overhead.json. For each model the same optimiser
takes alternating blocks of steps without and with the embedding loss on the
same batches (alternation spreads machine noise over both arms); the result
is the median time per step of each arm and the overhead in percent. The one-off
cost of building X is reported apart (it is paid once per training).

Models: SmallCNN (Fashion-MNIST batch 64, 256-bit mean mark on
features.conv2.weight), LSTM(300) on the noisy sine (8-bit flatten marks on
kernel and recurrent weights, 360,000 recurrent weights), CharLSTM(128) on
Hamlet (8-bit and 256-bit flatten marks on kernel and recurrent weights).
The regulariser reads X (T x N floats) twice per step, so its cost grows with
T x N against the step's own cost: negligible for the mean-reduced conv
(256 x 288), tens of percent for 256-bit flatten marks on a small LSTM whose
step is cheap.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from auditor.marks import keys  # noqa: E402
from exporters import data, models, train  # noqa: E402
from exporters import watermark as wm  # noqa: E402


def measure(model, batches, loss_fn, specs, *, blocks: int, steps_per_block: int, strength: float = 1.0) -> dict:
    t0 = time.perf_counter()
    reg = wm.UchidaRegularizer(model, specs, strength=strength)
    setup = time.perf_counter() - t0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = {"plain": [], "regularised": []}

    def step(batch, with_reg):
        t = time.perf_counter()
        loss = loss_fn(model, batch)
        if with_reg:
            loss = loss + reg.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    for i in range(3):  # warm-up (allocator, first-call costs)
        step(batches[i % len(batches)], i % 2 == 1)
    k = 0
    for b in range(blocks):
        order = ("plain", "regularised") if b % 2 == 0 else ("regularised", "plain")
        for arm in order:
            for _ in range(steps_per_block):
                times[arm].append(step(batches[k % len(batches)], arm == "regularised"))
                k += 1
    med = {arm: statistics.median(v) for arm, v in times.items()}
    return {"median_step_seconds": med, "steps_per_arm": len(times["plain"]),
            "overhead_percent": 100.0 * (med["regularised"] / med["plain"] - 1.0),
            "projection_setup_seconds": round(setup, 4),
            "marks": [{"param": s.param, "reduce": s.reduce, "bits": int(s.bits.size),
                       "coefficients": keys.reduced_length(tuple(dict(model.named_parameters())[s.param].shape),
                                                           s.reduce)} for s in specs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/bench_embed_overhead.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (writes bench_embed_overhead.json)")
    ap.add_argument("--quick", action="store_true", help="fewer steps (about 1 minute)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = "python bench/bench_embed_overhead.py " + " ".join(shlex.quote(s) for s in argv)
    blocks, per = (4, 5) if a.quick else (10, 10)
    results = {}

    train.seeded(a.seed, a.threads)
    x, y = data.fashion("train", n=64 * 8, seed=a.seed)
    cnn = models.SmallCNN()
    results["SmallCNN"] = measure(
        cnn, [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)],
        lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        [wm.MarkSpec("features.conv2.weight", wm.random_bits(256, 1), "mean", seed=2)],
        blocks=blocks, steps_per_block=per, strength=10.0)
    print(f"SmallCNN       {results['SmallCNN']['overhead_percent']:+.2f} %", flush=True)

    train.seeded(a.seed, a.threads)
    sx, sy = data.sine_windows(data.sine_signal(noise=0.1, seed=a.seed), 25, 1)
    lstm = models.SeqRNN("lstm", 1, 300, 1)
    results["LSTM300-sine"] = measure(
        lstm, [(sx[i:i + 32], sy[i:i + 32]) for i in range(0, len(sy), 32)],
        lambda m, b: F.mse_loss(m(b[0]), b[1]),
        [wm.MarkSpec("rnn.weight_ih_l0", wm.random_bits(8, 1), "flatten", seed=2),
         wm.MarkSpec("rnn.weight_hh_l0", wm.random_bits(8, 11), "flatten", seed=12)],
        blocks=blocks, steps_per_block=per)
    print(f"LSTM(300) sine {results['LSTM300-sine']['overhead_percent']:+.2f} %", flush=True)

    train.seeded(a.seed, a.threads)
    corpus = data.CharCorpus.shakespeare()
    char = models.CharLSTM(corpus.vocab_size, 128)
    char_batches = list(corpus.batches("train", 100, 32, 8, a.seed))
    for n_bits in (8, 256):
        name = f"CharLSTM128-{n_bits}bit"
        results[name] = measure(
            char, char_batches,
            lambda m, b: F.cross_entropy(m(b[0]).reshape(-1, corpus.vocab_size), b[1].reshape(-1)),
            [wm.MarkSpec("rnn.weight_ih_l0", wm.random_bits(n_bits, 1), "flatten", seed=2),
             wm.MarkSpec("rnn.weight_hh_l0", wm.random_bits(n_bits, 11), "flatten", seed=12)],
            blocks=blocks, steps_per_block=per)
        print(f"{name:15s} {results[name]['overhead_percent']:+.2f} %", flush=True)

    doc = {"bench": "embed_overhead", "command": command, "seed": a.seed, "threads": a.threads, "quick": a.quick,
           "torch": torch.__version__.split("+")[0], "goal_percent": 5.0,
           "within_goal": {k: v["overhead_percent"] <= 5.0 for k, v in results.items()}, "results": results}
    keys.write_json_atomic(Path(a.out) / "bench_embed_overhead.json", doc)
    print(f"wrote {Path(a.out) / 'bench_embed_overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

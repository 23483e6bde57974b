"""Forensic scan and provenance benchmarks.

0. The streaming scan against its physical anchor, in the same run: a plain read of every byte of
   the model's files into one reused 64 MiB buffer (page cache warm). Scans with 1 and 100 keys run
   in fresh processes (so peak RSS is their own): wall time, peak RSS, the weight bytes the scan held
   at its peak, against the file size and the largest tensor. Also the keys' own floor: generating
   the 100 keys' projections X (256 x 4096 normals each) once, which any check of those keys pays.
   The full run then scans a file larger than this machine's memory (`build_huge`: a sparse
   external-data file of MemTotal + 1 GiB, 256 MiB tensors, one carrying the mark) in a child.
1. Scan time with 1 and with 100 keys against the time to read the file's weights
   (WeightStore.open + every weight read once and kept in memory, as the scan holds them); also
   against a streaming read (each weight dropped after reading: the page faults of fresh memory
   are not paid) and against onnx.load + numpy_helper.to_array. Medians of the repetitions. The 100 keys are the owner's key and 99
   random generator keys (random bits, random seeds) with marks of the same shape; the
   count of random keys detected is reported (should be 0).
2. Provenance ROC on the forensic fixtures (the SmallCNN's, and the residual CNN's in
   `provenance_residual`, and its `all_layers` block: every layer tested): positives are the marked model's attacked
   descendants (fine-tuned, pruned, int8, obfuscated with every step, BN-folded, int8),
   negatives the independently trained twins and their obfuscated copies; the score is
   -log10 of the combined p. Reports AUC, the largest negative score and the smallest
   positive score (the gap), and the false-positive / true-positive rates at alpha = 1e-6.

    python bench/bench_scan.py --out build/bench [--quick] [--model M.onnx --key K.json] [--no-huge]

Without --model: --quick scans the obfuscated SmallCNN (7.7 MB); the full run builds the 1 GiB
model (build_large: sixteen 4096 x 4096 weights, a committed 256-bit mark written into W8).
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
sys.path.insert(0, str(ROOT / "bench"))


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


def with_mark(W, mark):
    """A MatMul weight W [in, out] (float32) carrying a `mean` mark: the minimal-norm change of W (one
    vector added to every output column, i.e. to the mean the mark reads: torch layout [out, in],
    mean over out) that gives every bit a margin of 3 standard deviations of X m."""
    import numpy as np

    W = np.asarray(W, np.float64)
    X = mark.matrix()
    y = X @ W.mean(axis=1)
    d = X.T @ np.linalg.solve(X @ X.T, (2.0 * mark.bits - 1.0) * 3.0 * float(y.std()) - y)
    return (W + d[:, None]).astype(np.float32)


def build_large(out_dir: Path, side: int = 4096):
    """The 1 GiB model of bench_read (sixteen side x side float32 MatMul weights, x @ W0 @ ... @ W15)
    with a committed 256-bit `mean` mark written into W8: the minimal-norm change of W8 (one vector
    added to every output column, i.e. to the mean the mark reads) that gives every bit a margin of
    3 standard deviations of X m. Built once (stamp), deterministically. Returns (model, key path)."""
    import numpy as np
    import onnx

    from auditor.marks.evidence import committed_mark
    from auditor.marks.keys import Key, save_key
    from bench_read import build

    model, target, _ = build(out_dir, side)
    key_path = out_dir / "key.json"
    spec = {"target": target, "side": side, "owner": "wmaudit bench", "nonce": "scan-1g", "bits": 256}
    stamp = out_dir / "marked.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec and key_path.exists():
        return model, key_path
    mark = committed_mark("wmaudit bench", "scan-1g", "2026-11-30", param=target, shape=(side, side), reduce="mean",
                          n_bits=256)
    key = Key([mark], model={"name": "bench 1 GiB"})
    t = next(i for i in onnx.load(str(model), load_external_data=False).graph.initializer if i.name == target)
    info = {e.key: e.value for e in t.external_data}
    off, n = int(info["offset"]), int(info["length"])
    data = out_dir / info["location"]
    with open(data, "r+b") as f:
        f.seek(off)
        W = np.frombuffer(f.read(n), dtype=np.float32).reshape(side, side)
        f.seek(off)
        f.write(with_mark(W, mark).tobytes())
    save_key(key, key_path)
    stamp.write_text(json.dumps(spec))
    return model, key_path


def time_read(path, keep: bool = False) -> float:
    """WeightStore.open + every weight read once; `keep`: the arrays are kept (memory for the whole
    file is allocated, as any tool holding the weights pays), else each is dropped after reading."""
    from auditor.read.weights import WeightStore

    t0 = time.perf_counter()
    s = WeightStore.open(path)
    if keep:
        s.keep_arrays()
    for w in s.weights:
        s.array(w.name)
    dt = time.perf_counter() - t0
    del s
    return dt


def time_onnx_load(path) -> float:
    """onnx.load (external data included) + numpy_helper.to_array of every initializer."""
    import onnx
    from onnx import numpy_helper

    t0 = time.perf_counter()
    m = onnx.load(str(path))
    arrays = [numpy_helper.to_array(t, base_dir=str(Path(path).parent)) for t in m.graph.initializer]
    dt = time.perf_counter() - t0
    del m, arrays
    return dt


def time_scan(path, keys, reps: int) -> tuple[float, dict]:
    from auditor.forensics.scan import scan

    import statistics

    times, res = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        res = scan(path, keys)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), res


def data_files(model: Path) -> list[Path]:
    """The model file and the external data files beside it that belong to it."""
    return sorted(f for f in model.parent.iterdir() if f.is_file() and f.name.startswith(model.name))


def time_plain_read(model: Path, reps: int = 3, buffer_bytes: int = 64 << 20) -> float:
    """The anchor: every byte of the model's files read into one reused buffer (median). A 64 MiB
    buffer is a tensor's size (what a scan that holds a tensor must fill); a 1 MiB buffer stays in
    the CPU's caches and is the fastest plain read there is."""
    import statistics

    buf = memoryview(bytearray(buffer_bytes))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for f in data_files(model):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_key_generation(keys) -> float:
    """Generating every key's projection X once, on one core, into one reused buffer (as the scan
    does): what any check of these keys pays, whatever else it does."""
    import numpy as np

    from auditor.marks.keys import generate_projection

    bufs: dict = {}
    t0 = time.perf_counter()
    for k in keys:
        for m in k.whitebox:
            p = m.projection
            shape = (m.n_bits, m.n_coeffs)
            buf = bufs.setdefault(shape, np.empty(shape))
            generate_projection(p["seed"], m.n_bits, m.n_coeffs, p.get("scale", 1.0), out=buf)
    return time.perf_counter() - t0


def child_scan(model: Path, key_file: Path, n_keys: int, reps: int = 1) -> dict:
    """`scan` with the owner's key and n_keys - 1 random keys, each of `reps` runs in a fresh process
    (so peak RSS is one scan's): the median wall seconds (inside the process, keys made and the
    scan's modules imported before the clock starts), the largest peak RSS, RSS before the scan, the
    weight bytes the scan held at its peak, and the owner's finding."""
    import statistics

    runs = [_child_scan_once(model, key_file, n_keys) for _ in range(reps)]
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    out = dict(runs[0])
    out["seconds_all"] = [r["seconds"] for r in runs]
    out["seconds"] = statistics.median(out["seconds_all"])
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return out


def _child_scan_once(model: Path, key_file: Path, n_keys: int, reps: int = 1) -> dict:
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               ORT_DISABLE_TELEMETRY="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(model), str(key_file), str(n_keys), str(reps)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1], "rc": r.returncode}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _child(model: str, key_file: str, n_keys: int, reps: int) -> int:
    import resource
    import statistics

    from auditor.forensics.scan import scan
    from auditor.marks.keys import load_key

    # the modules the scan imports on first use (onnx among them, about 0.13 s): loaded before the
    # clock, as a fixed cost of the process that the plain read of the anchor does not pay either
    import auditor.forensics.align  # noqa: F401
    import auditor.forensics.canon  # noqa: F401
    import auditor.marks.evidence  # noqa: F401
    import auditor.marks.whitebox  # noqa: F401
    import auditor.read.layout  # noqa: F401
    import auditor.read.weights  # noqa: F401

    key = load_key(Path(key_file))
    keys = [key] + random_keys(key, n_keys - 1, seed=0)

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024.0

    before = rss_mb()
    times, res = [], None
    for _ in range(reps):
        for k in keys:            # each run generates the projections anew, as a fresh process would
            for m in k.whitebox:
                m._X = None
        t0 = time.perf_counter()
        res = scan(Path(model), keys)
        times.append(time.perf_counter() - t0)
    f0 = res["findings"][0]
    print(json.dumps({"seconds": statistics.median(times), "seconds_all": times, "keys": n_keys,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                      "rss_before_scan_mb": before,
                      "peak_weight_bytes_held": res["tried"].get("peak_weight_bytes_held"),
                      "candidate_tensors": res["tried"]["candidate_tensors"],
                      "owner_verdict": f0["verdict"], "owner_matches": f0.get("matches"),
                      "owner_log10_p_corrected": f0.get("log10_p_corrected"),
                      "random_keys_detected": sum(1 for f in res["findings"][1:] if f["verdict"] == "detected")}))
    return 0


def build_huge(out_dir: Path, min_bytes: int, side: int = 8192):
    """A model whose external data file is larger than `min_bytes` (this machine's memory): a chain
    of side x side float32 MatMul weights in one sparse file (holes read back as zeros, so the disk
    holds little), each tensor with 64 short random runs on 64 rows (distinct tensors), and one tensor in the middle
    fully random with a committed 256-bit `mean` mark written as in `build_large`. Built once
    (stamp), deterministically. Returns (model, key path, file bytes, allocated bytes)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    from onnx.external_data_helper import set_external_data

    from auditor.marks.evidence import committed_mark
    from auditor.marks.keys import Key, save_key

    per = side * side * 4
    n = -(-min_bytes // per)
    target = n // 2
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path, data_path, key_path = out_dir / "model.onnx", out_dir / "model.onnx.data", out_dir / "key.json"
    stamp = out_dir / "stamp.json"
    spec = {"side": side, "n": n, "target": target, "seed": 7, "bits": 256, "filler": "64x32"}
    if not (stamp.exists() and json.loads(stamp.read_text()) == spec and model_path.exists() and key_path.exists()):
        rng = np.random.default_rng(7)
        mark = committed_mark("wmaudit bench", "scan-huge", "2026-12-06", param=f"W{target}", shape=(side, side),
                              reduce="mean", n_bits=256)
        tmp = data_path.with_suffix(".data.tmp")
        inits, nodes = [], []
        with open(tmp, "wb") as f:
            f.truncate(n * per)                       # sparse: nothing written yet
            for i in range(n):
                f.seek(i * per)
                if i == target:
                    f.write(with_mark(rng.standard_normal((side, side), dtype=np.float32), mark).tobytes())
                else:   # 64 stored rows get 32 random values each (64 pages written): distinct tensors whose
                    # rows and columns point every which way, as trained weights do, the rest holes (zeros)
                    for r in range(64):
                        f.seek(i * per + (r * (side // 64)) * side * 4 + r * 32 * 4)
                        f.write(rng.standard_normal(32, dtype=np.float32).tobytes())
                t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[side, side])
                t.raw_data = b""
                set_external_data(t, location=data_path.name, offset=i * per, length=per)
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                inits.append(t)
                nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"W{i}"], [f"h{i}"]))
        graph = helper.make_graph(nodes, "huge", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                                  [helper.make_tensor_value_info(f"h{n - 1}", TensorProto.FLOAT, [1, side])], inits)
        os.replace(tmp, data_path)
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(model_path))
        save_key(Key([mark], model={"name": "bench larger than memory"}), key_path)
        stamp.write_text(json.dumps(spec))
    st = data_path.stat()
    return model_path, key_path, st.st_size, st.st_blocks * 512


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("MemTotal:")) * 1024


def stream_section(model: Path, key_file: Path, keys, reps: int) -> dict:
    """Part 0: the streaming scan against a plain read of the file, in one run."""
    import statistics

    import numpy as np

    from auditor.read.weights import WeightStore

    time_plain_read(model, 1)                               # page cache warm
    plain = time_plain_read(model, reps)
    plain_1m = time_plain_read(model, reps, 1 << 20)
    gen = time_key_generation(keys)
    one = child_scan(model, key_file, 1, reps)
    many = child_scan(model, key_file, len(keys), reps)
    plain_after = time_plain_read(model, reps)              # the anchor again: the machine did not change
    # this shared VM's speed drifts within a run (the anchor moved by up to 1.7x between the two
    # measurements above): each scan is also timed right after its own anchor, and the ratios' median
    # is the figure that survives the drift
    paired = {}
    for label, n in (("1_key", 1), (f"{len(keys)}_keys", len(keys))):
        pairs = []
        for _ in range(reps):
            anchor = time_plain_read(model, 1)
            r = _child_scan_once(model, key_file, n)
            if "seconds" in r:
                pairs.append({"plain_read_seconds": anchor, "scan_seconds": r["seconds"],
                              "ratio": r["seconds"] / anchor})
        if pairs:
            paired[label] = {"runs": pairs, "median_ratio": statistics.median(p["ratio"] for p in pairs)}
    s = WeightStore.open(model)
    largest = max(int(np.prod(w.shape)) * 4 for w in s.weights)
    size = sum(f.stat().st_size for f in data_files(model))
    out = {"model_bytes": size, "largest_tensor_bytes": largest,
           "plain_read_seconds": plain, "plain_read_seconds_after": plain_after,
           "plain_read_how": "every byte of the model's files read into one reused 64 MiB buffer, page cache warm "
                             "(median of reps)",
           "plain_read_1mib_buffer_seconds": plain_1m,
           f"key_generation_{len(keys)}_keys_seconds": gen,
           "scan_1_key": one, f"scan_{len(keys)}_keys": many, "paired_with_anchor": paired}
    if "seconds" in one:
        out["ratio_1_key_to_plain_read"] = one["seconds"] / plain
        out["ratio_1_key_to_plain_read_1mib_buffer"] = one["seconds"] / plain_1m
        out["peak_rss_1_key_over_largest_tensor"] = one["peak_rss_mb"] * 2 ** 20 / largest
    if "seconds" in many:
        out[f"ratio_{len(keys)}_keys_to_plain_read"] = many["seconds"] / plain
        out[f"ratio_{len(keys)}_keys_to_plain_read_1mib_buffer"] = many["seconds"] / plain_1m
        out[f"ratio_{len(keys)}_keys_to_plain_read_plus_key_generation"] = many["seconds"] / (plain + gen)
        # the least any scan of these keys can take here: the read (one stream) and the keys'
        # generation, both unavoidable, spread over every core; nothing else counted
        cores = os.cpu_count() or 1
        out["cores"] = cores
        out[f"floor_{len(keys)}_keys_over_plain_read"] = max(plain, (plain + gen) / cores) / plain
        out[f"peak_rss_{len(keys)}_keys_mb"] = many["peak_rss_mb"]
    return out


def huge_section(out_dir: Path) -> dict:
    """A file larger than this machine's memory, scanned in a child (1 key)."""
    total = mem_total()
    model, key_file, size, allocated = build_huge(out_dir, total + (1 << 30))
    r = child_scan(model, key_file, 1)
    _drop_from_page_cache(data_files(model))   # (what it left in the page cache slows later measurements)
    return {"machine_memory_bytes": total, "file_bytes": size, "file_allocated_bytes": allocated,
            "model": str(model), "scan": r,
            "peak_rss_over_file": (r["peak_rss_mb"] * 2 ** 20 / size) if "peak_rss_mb" in r else None}


def _drop_from_page_cache(files) -> None:
    """Ask the kernel to drop these files' cached pages: a scan of a file the size of the machine's
    memory fills the page cache, and a machine short of free memory allocates fresh memory slowly."""
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)


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
    ap.add_argument("--model-dir", default=str(ROOT / "build" / "bench-data" / "scan-1g"),
                    help="where the full run builds its 1 GiB model")
    ap.add_argument("--huge-dir", default=str(ROOT / "build" / "bench-data" / "scan-huge"),
                    help="where the full run builds its model larger than the machine's memory")
    ap.add_argument("--no-huge", action="store_true", help="leave out the file larger than memory")
    ap.add_argument("--only-stream", action="store_true", help="part 0 only (streaming scan, memory, huge file)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        c = sys.argv[2:6]
        return _child(c[0], c[1], int(c[2]), int(c[3]))
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from fixtures.build import ensure

    from auditor.marks.keys import load_key

    if a.model:
        model, key_file = Path(a.model), Path(a.key)
    elif a.quick:
        model, key_file = ensure("forensics-obfuscated") / "mean" / "all.onnx", ensure("cnn-small-mean") / "key.json"
    else:
        model, key_file = build_large(Path(a.model_dir))
    key = load_key(key_file)
    n_random = 9 if a.quick else 99
    keys = [key] + random_keys(key, n_random, seed=0)
    reps = 1 if a.quick else 3
    streaming = stream_section(model, key_file, keys, reps)
    if not a.quick and not a.no_huge and not a.model:
        streaming["larger_than_memory"] = huge_section(Path(a.huge_dir))
    if a.only_stream:
        d = Path(a.out)
        d.mkdir(parents=True, exist_ok=True)
        doc = {"bench": "scan", "command": " ".join([sys.executable] + sys.argv), "quick": a.quick,
               "model": str(model), "streaming": streaming}
        (d / "scan.json").write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(doc, indent=2))
        return 0
    # read times: the median of `reps` runs each (page-cache warm after the first), and scan times
    # likewise; three baselines, since allocating memory for the whole file is a large part of a read
    import statistics

    med = statistics.median
    stream = med([time_read(model) for _ in range(reps)])
    read = med([time_read(model, keep=True) for _ in range(reps)])
    load = med([time_onnx_load(model) for _ in range(reps)])
    t1, r1 = time_scan(model, keys[:1], reps)
    tn, rn = time_scan(model, keys, reps)
    detected_random = sum(1 for f in rn["findings"][1:] if f["verdict"] == "detected")
    data_bytes = sum(f.stat().st_size for f in model.parent.iterdir() if f.name.startswith(model.name))
    out = {"bench": "scan", "command": " ".join([sys.executable] + sys.argv), "quick": a.quick,
           "model": str(model), "model_bytes": data_bytes, "reps": reps, "streaming": streaming,
           "read_seconds": read, "read_how": "WeightStore: every weight read and kept in memory (median of reps)",
           "read_streaming_seconds": stream, "onnx_load_seconds": load,
           "scan_1_key_seconds": t1, f"scan_{len(keys)}_keys_seconds": tn,
           "ratio_1_key_to_read": t1 / read, f"ratio_{len(keys)}_keys_to_read": tn / read,
           f"ratio_{len(keys)}_keys_to_streaming_read": tn / stream,
           f"ratio_{len(keys)}_keys_to_onnx_load": tn / load,
           "search_kinds_left_out": rn["tried"].get("search_kinds_left_out"),
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

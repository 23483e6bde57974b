"""Reading one weight out of a large external-data ONNX model.

`python bench/bench_read.py --out DIR [--quick] [--repeat N]` builds (once,
deterministically) a model of 16 MatMul weights in one external data file
(>= 1 GiB; 256 MiB with --quick) under build/bench-data/, then measures, each
method in a fresh subprocess so that peak RSS is its own:

- weightstore: `WeightStore.open(model).array(name)` (what the auditor does);
- onnx_load:   `onnx.load(model)` with its external data, then the tensor;
- raw_tensor:  one seek + read of exactly the tensor's bytes (the floor);
- raw_file:    reading the whole data file into one reused buffer (the disk's
               sequential rate, no memory to fault in);
- raw_file_fresh: the whole file read into fresh tensor-sized buffers (the
               raw rate when the bytes must land in new memory, as a tensor's do).

Each is timed with the page cache dropped for the data file (cold,
posix_fadvise DONTNEED) and with it warm. Writes DIR/read.json with the
numbers, the goals (our rate >= 70 % of the raw rate into fresh memory; peak
memory far below the file size) and the command that produced them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

N_TENSORS = 16
SEED = 20240601
ALIGN = 4096


def build(out_dir: Path, side: int) -> tuple[Path, str, int]:
    """The benchmark model (built once per size): x @ W0 @ ... @ W15, W_i [side, side] float32,
    all in model.onnx.data at 4 KiB-aligned offsets. Returns (model, target name, file bytes)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    from onnx.external_data_helper import set_external_data

    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.onnx"
    data_path = out_dir / "model.onnx.data"
    stamp = out_dir / "stamp.json"
    spec = {"side": side, "n": N_TENSORS, "seed": SEED, "align": ALIGN}
    target = f"W{N_TENSORS // 2}"
    if stamp.exists() and json.loads(stamp.read_text()) == spec and model_path.exists() and data_path.exists():
        return model_path, target, data_path.stat().st_size
    rng = np.random.default_rng(SEED)
    inits, nodes, offset = [], [], 0
    tmp = data_path.with_suffix(".data.tmp")
    with open(tmp, "wb") as f:
        for i in range(N_TENSORS):
            w = rng.standard_normal((side, side), dtype=np.float32)
            pad = (-offset) % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(w.tobytes())
            t = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[side, side])
            t.raw_data = b""  # set_external_data wants the field present
            set_external_data(t, location=data_path.name, offset=offset, length=w.nbytes)
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            inits.append(t)
            offset += w.nbytes
            nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"W{i}"], [f"h{i}"], name=f"mm{i}"))
            del w
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                              [helper.make_tensor_value_info(f"h{N_TENSORS - 1}", TensorProto.FLOAT, [1, side])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    os.replace(tmp, data_path)
    onnx.save(model, str(model_path))
    stamp.write_text(json.dumps(spec))
    return model_path, target, data_path.stat().st_size


def drop_cache(path: Path) -> bool:
    """Evict the file's pages from the page cache (no root needed for clean pages)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def child(method: str, model: str, target: str) -> dict:
    """Runs in its own process: one measurement, printed as JSON."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from auditor.read.graph import external_info
    from auditor.read.weights import WeightStore

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = Path(model).with_suffix(".onnx.data")
    t0 = time.perf_counter()
    read_seconds = None
    if method == "weightstore":
        store = WeightStore.open(model)
        t1 = time.perf_counter()
        a = store.array(target)
        read_seconds = time.perf_counter() - t1
        nbytes, checksum = a.nbytes, float(np.float64(a[::97, ::89].sum()))
    elif method == "onnx_load":
        m = onnx.load(model)
        t = next(t for t in m.graph.initializer if t.name == target)
        a = numpy_helper.to_array(t)
        nbytes, checksum = a.nbytes, float(np.float64(a[::97, ::89].sum()))
    elif method == "raw_tensor":
        m = onnx.load(model, load_external_data=False)
        info = external_info(next(t for t in m.graph.initializer if t.name == target))
        off, n = int(info["offset"]), int(info["length"])
        buf = bytearray(n)
        with open(data, "rb", buffering=0) as f:
            f.seek(off)
            mv, got = memoryview(buf), 0
            while got < n:
                got += f.readinto(mv[got:])
        a = np.frombuffer(buf, dtype=np.float32).reshape(m.graph.initializer[0].dims)
        nbytes, checksum = n, float(np.float64(a[::97, ::89].sum()))
    elif method == "raw_file":
        # the disk / page-cache rate: one reused 16 MiB buffer, no fresh memory to fault in
        buf = bytearray(16 << 20)
        mv, nbytes = memoryview(buf), 0
        with open(data, "rb", buffering=0) as f:
            while True:
                k = f.readinto(mv)
                if not k:
                    break
                nbytes += k
        checksum = None
    elif method == "raw_file_fresh":
        # the whole file read into fresh memory, one tensor-sized numpy buffer at a time
        chunk = int(np.prod(onnx.load(model, load_external_data=False).graph.initializer[0].dims)) * 4
        nbytes = 0
        with open(data, "rb", buffering=0) as f:
            while True:
                b = np.empty(chunk, dtype=np.uint8)
                k = f.readinto(memoryview(b))
                if not k:
                    break
                nbytes += k
                del b
        checksum = None
    else:
        raise SystemExit(f"unknown method {method}")
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    read_seconds = seconds if read_seconds is None else read_seconds
    return {"seconds": seconds, "read_seconds": read_seconds, "open_seconds": seconds - read_seconds,
            "bytes": nbytes, "mb_per_s": nbytes / seconds / 1e6, "read_mb_per_s": nbytes / read_seconds / 1e6,
            "peak_rss_mb": peak_kb / 1024, "rss_added_mb": (peak_kb - base_kb) / 1024, "checksum": checksum}


def measure(method: str, model: Path, target: str, cold: bool, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        dropped = drop_cache(model.with_suffix(".onnx.data")) if cold else None
        if not cold:  # warm the cache with one untimed read of the whole file
            with open(model.with_suffix(".onnx.data"), "rb") as f:
                while f.read(16 << 20):
                    pass
        out = subprocess.run([sys.executable, __file__, "--child", method, "--model", str(model), "--target", target],
                             capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["cache_dropped"] = dropped
        runs.append(r)
    med = statistics.median(r["seconds"] for r in runs)
    best = min(runs, key=lambda r: abs(r["seconds"] - med))
    return {"median": best, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--quick", action="store_true", help="256 MiB model instead of 1 GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-dir", default=str(ROOT / "build" / "bench-data" / "read"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.model, a.target)))
        return 0
    side = 2048 if a.quick else 4096  # 16 x 16 MiB or 16 x 64 MiB
    t0 = time.time()
    model, target, file_bytes = build(Path(a.data_dir) / f"side{side}", side)
    build_s = time.time() - t0
    results = {}
    for cache in ("cold", "warm"):
        results[cache] = {m: measure(m, model, target, cache == "cold", a.repeat)
                          for m in ("weightstore", "raw_tensor", "raw_file", "raw_file_fresh", "onnx_load")}
    doc = {"bench": "read", "command": " ".join([sys.executable, *sys.argv]), "model": str(model),
           "file_bytes": file_bytes, "target": target, "target_bytes": side * side * 4, "build_seconds": build_s,
           "repeat": a.repeat, "results": results, "goals": {}}
    for cache, r in results.items():
        ours, raw = r["weightstore"]["median"], r["raw_file_fresh"]["median"]
        ok_sum = r["weightstore"]["median"]["checksum"] == r["onnx_load"]["median"]["checksum"] == r["raw_tensor"]["median"]["checksum"]
        doc["goals"][cache] = {
            # read rate: array() alone; the one-off open (parse, path checks, graph scan) is reported apart
            "open_seconds": ours["open_seconds"],
            "rate_vs_raw_file_fresh": ours["read_mb_per_s"] / raw["mb_per_s"],
            "rate_vs_raw_file": ours["read_mb_per_s"] / r["raw_file"]["median"]["mb_per_s"],
            "rate_vs_raw_tensor": ours["read_mb_per_s"] / r["raw_tensor"]["median"]["mb_per_s"],
            "open_and_read_rate_vs_raw_file_fresh": ours["mb_per_s"] / raw["mb_per_s"],
            "rate_goal_met": ours["read_mb_per_s"] >= 0.7 * raw["mb_per_s"],
            "peak_rss_mb": ours["peak_rss_mb"], "onnx_load_peak_rss_mb": r["onnx_load"]["median"]["peak_rss_mb"],
            "memory_goal_met": ours["rss_added_mb"] < 0.25 * file_bytes / 2**20,
            "speedup_vs_onnx_load": r["onnx_load"]["median"]["seconds"] / ours["seconds"],
            "same_values": ok_sum,
        }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".read.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "read.json")
    for cache, g in doc["goals"].items():
        r = results[cache]
        w = r["weightstore"]["median"]
        print(f"{cache}: weightstore open {w['open_seconds'] * 1e3:.1f} ms + read {w['read_seconds'] * 1e3:.1f} ms "
              f"({w['read_mb_per_s']:.0f} MB/s, peak {g['peak_rss_mb']:.0f} MB); "
              f"raw file {r['raw_file']['median']['mb_per_s']:.0f} MB/s (fresh memory {r['raw_file_fresh']['median']['mb_per_s']:.0f}); raw tensor {r['raw_tensor']['median']['mb_per_s']:.0f} MB/s; "
              f"onnx.load {r['onnx_load']['median']['seconds']:.2f}s (peak {g['onnx_load_peak_rss_mb']:.0f} MB); "
              f"rate {g['rate_vs_raw_file_fresh']:.0%} of raw into fresh memory ({g['rate_vs_raw_file']:.0%} of reused-buffer raw) -> goal {'met' if g['rate_goal_met'] else 'NOT met'}; "
              f"memory goal {'met' if g['memory_goal_met'] else 'NOT met'}; values agree: {g['same_values']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

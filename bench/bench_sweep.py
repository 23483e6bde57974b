"""Sweep throughput: files per minute, local pool vs Ray, and the cost of isolating each file.

    python bench/bench_sweep.py --out build/bench [--quick] [--copies N] [--jobs J]

Corpus: every fixture model (build/fixtures/*/model.onnx) and the five
third-party files ($WMAUDIT_DATA/thirdparty), each present ``--copies`` times
(hard links under build/bench-data/sweep, so every copy is a distinct path),
against the three white-box fixture keys (cnn-small-mean, seq-lstm-dynamo,
attacks-tinycnn-marked). Measured, each on the same corpus:

- inprocess: ``audit_file`` called in this process, one file after another:
  the audit alone, no isolation, no hashing;
- local-1: ``sweep(executor="local", jobs=1)``: the same work with each file in a
  limited child (forkserver), hashing and fsynced lines; (local-1 - inprocess)
  / files is the per-file cost of the isolation and the results file;
- local-J: the local pool with J children at once;
- ray-J: a local Ray with J CPUs; Ray's start is timed apart (``ray_init_s``)
  and not counted in its files per minute.

Writes DIR/bench_sweep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYS = ("cnn-small-mean", "seq-lstm-dynamo", "attacks-tinycnn-marked")


def build_corpus(dest: Path, copies: int) -> list[Path]:
    from fixtures.build import root

    data = Path(os.environ.get("WMAUDIT_DATA", ROOT / "build" / "data"))
    sources = sorted(root().glob("*/model.onnx")) + sorted((data / "thirdparty").glob("*.onnx"))
    if dest.exists():
        shutil.rmtree(dest)
    files = []
    for c in range(copies):
        for i, src in enumerate(sources):
            f = dest / f"copy{c}" / f"{i:02d}-{src.parent.name}-{src.name}"
            f.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, f)
            except OSError:
                shutil.copyfile(src, f)
            files.append(f)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--copies", type=int, help="times each file is present (default 2 quick, 10 full)")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    copies = a.copies or (2 if a.quick else 10)

    from auditor.forensics.sweep import Limits, audit_file, sweep
    from auditor.marks.keys import load_key
    from fixtures.build import ensure

    keys = [load_key(ensure(k) / "key.json") for k in KEYS]
    work = ROOT / "build" / "bench-data" / "sweep"
    files = build_corpus(work / "corpus", copies)
    listing = work / "corpus.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    n = len(files)
    limits = Limits(timeout_s=300, memory_mb=4096)
    runs: dict[str, dict] = {}

    t0 = time.perf_counter()
    for f in files:
        try:
            audit_file(f, keys)
        except Exception:  # noqa: BLE001 - the in-process baseline has no isolation to catch anything
            pass
    t = time.perf_counter() - t0
    runs["inprocess"] = {"seconds": round(t, 3), "files_per_minute": round(60 * n / t, 1)}

    def timed(name: str, **kw) -> dict:
        out = work / f"{name}.jsonl"
        for p in (out, out.with_name(f"{name}.summary.json"), out.with_name(f"{name}.html")):
            p.unlink(missing_ok=True)
        t0 = time.perf_counter()
        doc = sweep(listing, keys, out, limits=limits, **kw)
        t = time.perf_counter() - t0
        r = doc["result"]
        runs[name] = {"seconds": round(t, 3), "files_per_minute": round(60 * n / t, 1),
                      "verdicts": r["verdicts"], "lines": r["lines"]}
        return runs[name]

    timed("local-1", executor="local", jobs=1)
    timed(f"local-{a.jobs}", executor="local", jobs=a.jobs)
    ray_init_s = None
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None:
        t0 = time.perf_counter()
        ray.init(num_cpus=a.jobs, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray_init_s = round(time.perf_counter() - t0, 2)
        try:
            timed(f"ray-{a.jobs}", executor="ray", jobs=a.jobs)
        finally:
            ray.shutdown()
    overhead = (runs["local-1"]["seconds"] - runs["inprocess"]["seconds"]) / n
    same = len({json.dumps(r.get("verdicts"), sort_keys=True) for k, r in runs.items() if k != "inprocess"}) == 1
    out = {"benchmark": "sweep", "command": " ".join([sys.executable, *sys.argv]),
           "files": n, "distinct_files": n // copies, "copies": copies, "keys": len(keys), "pairs": n * len(keys),
           "jobs": a.jobs, "cores": os.cpu_count(),
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "runs": runs, "ray_init_s": ray_init_s,
           "isolation_overhead_ms_per_file": round(1000 * overhead, 1),
           "same_verdicts_in_every_run": same}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench_sweep.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

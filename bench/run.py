"""Run every benchmark (bench/bench_*.py) and collect their JSON results.

`python bench/run.py --out build/bench [--quick] [NAME ...]`. Each benchmark is
a script taking `--out DIR` (and `--quick`) that writes DIR/<name>.json with
its numbers and the exact command that produced them. This runner writes
DIR/summary.json listing each benchmark, its exit status and wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/bench")
    ap.add_argument("--quick", action="store_true", help="small budgets (minutes, not hours)")
    ap.add_argument("names", nargs="*", help="benchmarks to run, e.g. rnn read (default: all)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scripts = sorted(HERE.glob("bench_*.py"))
    if a.names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in a.names]
    summary = []
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for s in scripts:
        cmd = [sys.executable, str(s), "--out", str(out)] + (["--quick"] if a.quick else [])
        print(f"== {s.name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, env=env)
        summary.append({"bench": s.stem, "rc": rc, "seconds": round(time.time() - t0, 1), "command": " ".join(cmd)})
        print(f"== {s.name}: exit {rc} in {time.time() - t0:.0f}s", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(r["rc"] == 0 for r in summary) else 1


if __name__ == "__main__":
    sys.exit(main())

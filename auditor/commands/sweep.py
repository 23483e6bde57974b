"""wmaudit sweep: audit a whole corpus of ONNX files against many keys."""
from __future__ import annotations

import argparse
import math
import sys

from auditor import results
from auditor.commands import _types
from auditor.errors import AuditError
from auditor.marks import stats
from auditor.forensics.sweep import load_sweep_keys as load_keys  # noqa: F401 (re-exported)

HELP = "audit every ONNX file of a corpus against many keys (local pool or Ray), one JSON line per pair"
DESCRIPTION = """Audit every ONNX file of CORPUS (a folder searched recursively, a glob, or a list
file of paths) against every key, each file in a child process under a time and
memory limit, and append one JSON line per (file, key) to RESULTS.jsonl (verdict
or error, corrected p, where the mark was found, timings); write a summary JSON
and an HTML index beside it. Killed and started again with --resume, it audits
only the pairs that have no line yet. Exit 0 when every file was processed
(per-file errors are result lines), 2 on a usage error."""


def _seconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return v


def _megabytes(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0 = no memory limit)")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    from auditor.forensics.sweep import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S

    p.add_argument("corpus", help="folder (searched recursively for *.onnx), glob, or list file of ONNX paths")
    p.add_argument("--key", action="append", default=[], help="key file (repeatable)")
    p.add_argument("--keys", metavar="DIR", help="every *.json key file in DIR")
    p.add_argument("-o", "--output", required=True, metavar="RESULTS.jsonl", help="results file (JSON lines)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local process pool (default) or Ray")
    p.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--jobs", type=_types.positive_int, help="files audited at once (default: CPU count; "
                                                             "for a local Ray: its CPUs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep into RESULTS.jsonl")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S,
                   help=f"wall-clock limit per file in seconds (default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--memory", type=_megabytes, default=DEFAULT_MEMORY_MB,
                   help=f"address-space limit per file in MB, 0 = none (default {DEFAULT_MEMORY_MB})")
    p.add_argument("--alpha", type=_types.alpha, default=stats.DEFAULT_ALPHA,
                   help="detection threshold on the corrected p-value (default 1e-6)")
    p.add_argument("--policy", metavar="POLICY.toml",
                   help="also hold every (file, key) to this release policy (the gate; attacks per file)")
    p.add_argument("--json", action="store_true", help="the summary document (result JSON) on stdout")


def run(args) -> int:
    import wmaudit
    from auditor.report.terminal import Progress

    if args.address and args.executor != "ray":
        raise AuditError("--address needs --executor ray")
    with Progress(0, "sweep") as progress:
        r = wmaudit.sweep(args.corpus, args.key, args.output, keys_dir=args.keys, executor=args.executor,
                          jobs=args.jobs, address=args.address, resume=args.resume, alpha=args.alpha,
                          timeout=args.timeout, memory_mb=args.memory, policy=args.policy, progress=progress,
                          command=results.command_line())
    if args.json:
        sys.stdout.write(results.dumps(r.document))
    else:
        print(render(r.document))
    return 0


def render(doc: dict) -> str:
    r = doc["result"]
    run = r["run"]
    counts = ", ".join(f"{n} {v}" for v, n in r["verdicts"].items()) or "nothing"
    lines = [f"sweep  {r['files']} files x {len(r['keys'])} keys = {r['pairs']} pairs: {counts}",
             f"run    {run['executor']}, {run['files_this_run']} files this run in {run['wall_s']:.1f} s"
             + (f" ({run['files_per_minute']} files/min)" if run.get("files_per_minute") else "")
             + (f", {run['resumed_lines']} lines kept from before" if run["resumed_lines"] else "")]
    for d in r["detected"]:
        lines.append(f"FOUND  {d['file']}  key {d['key'][:19]}…  p {d['p']:.3g}  at {d['where']}")
    if r.get("gate"):
        lines.append("gate   " + ", ".join(f"{n} {v}" for v, n in r["gate"].items()) + " (file, key) pairs")
    if r["files_with_errors"]:
        lines.append(f"errors in {len(r['files_with_errors'])} files (see the results file)")
    lines.append(f"results {r['results']}")
    return "\n".join(lines)

"""wmaudit targets: where models can run here, and what each target stands for."""
from __future__ import annotations

import argparse
import sys

from auditor import results

HELP = "list the targets (native CPU, emulated CPUs, GPUs): available here or not, and how to get them"
DESCRIPTION = """List every target a model can run on (--target of query, robustness, gate, attack,
phash survive and keyed verify): available here or missing, why, and the one command that makes
it available. With --probe, each available CPU target runs a one-node model in its own process
and reports the hardware record that process sees (emulated targets take seconds each)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", action="store_true", help="start each available CPU target and record its hardware")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def probe(name: str) -> dict:
    """The hardware record a target's child reports for a one-node model."""
    import tempfile
    from pathlib import Path

    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from auditor.backends.targets import TargetRunner

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with tempfile.TemporaryDirectory(prefix="wmaudit-probe-") as d:
        path = Path(d) / "probe.onnx"
        onnx.save_model(m, str(path))
        with TargetRunner(path, name) as r:
            y = r.infer({"x": np.array([[-1, 0, 1, 2]], np.float32)})["y"]
            if not np.array_equal(y, [[0, 0, 1, 2]]):
                raise RuntimeError(f"target {name} computed {y.tolist()} for relu([-1, 0, 1, 2])")
            return r.hardware


def run(args) -> int:
    from auditor.backends import hardware
    from auditor.backends.targets import TARGETS, availability

    rows = []
    for name, t in TARGETS.items():
        ok, why, fix = availability(name)
        row = {**t.describe(), "available": ok, "why_not": why or None, "make_available": fix or None}
        if args.probe and ok and t.kind != "gpu":
            try:
                row["hardware"] = probe(name)
            except Exception as e:  # noqa: BLE001 - a probe that fails is reported on its row
                row["available"], row["why_not"] = False, " ".join(str(e).split())[:300]
        rows.append(row)
    doc = results.envelope("targets", targets=rows)
    if args.json:
        sys.stdout.write(results.dumps(doc))
        return 0
    for r in rows:
        state = "available" if r["available"] else "missing"
        print(f"{r['name']:12s} {state:9s} {r['stands_for']}")
        if not r["available"]:
            print(f"{'':22s} why: {r['why_not']}" + (f"; run: {r['make_available']}" if r["make_available"] else ""))
        if r.get("hardware"):
            print(f"{'':22s} {hardware.summary(r['hardware'])}")
    return 0

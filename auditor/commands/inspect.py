"""wmaudit inspect: what an ONNX file holds, seen as an auditor needs it."""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

HELP = "show producer, opsets, operators, external data, every weight and the layers a mark can sit in"
DESCRIPTION = """Inspect MODEL: producer, IR version, opsets, node count by operator (subgraphs
included), external data files, every weight (ONNX shape, stored dtype, where it
lives, quantized form or runtime layout such as onnxruntime's NCHWc blocks, number of
coefficients), the weights that could not be read (a layout not understood) and the candidate layers for
white-box marks (conv / linear / RNN weights with at least 64 coefficients) with
their torch-layout shapes. Reads no tensor data. Exit 0, or 2 on bad input."""

MIN_CANDIDATE_SIZE = 64
_CANDIDATE_KINDS = ("conv", "conv_transpose", "linear", "rnn")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX file (or onnxruntime's ORT-format .ort file)")
    p.add_argument("--json", action="store_true", help="machine output (result JSON) on stdout")


def inspect_model(path: str | Path) -> dict[str, Any]:
    """The inspection body as data (no tensor values read)."""
    import numpy as np

    from auditor.read.graph import external_files, iter_graphs, model_dir
    from auditor.read.layout import torch_views
    from auditor.read.weights import WeightStore

    store = WeightStore.open(path)
    m = store.model
    ops: Counter[str] = Counter()
    for g, _ in iter_graphs(m.graph):
        for n in g.node:
            ops[f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type] += 1
    base = model_dir(path)
    ext = [{"location": loc, "bytes": (base / loc).stat().st_size} for loc in external_files(m)]
    weights = [{"name": w.name, "stored_name": w.stored_name, "shape": list(w.shape), "stored_dtype": w.stored_dtype,
                "location": w.location, "quant": w.quant, "layout": w.layout, "aliases": list(w.aliases),
                "params": w.size,
                "uses": [{"op": op, "node": node, "input": i} for op, node, i in w.uses]} for w in store.weights]
    candidates = [{"weight": v.weight.name, "kind": v.kind, "transform": v.transform, "torch_shape": list(v.shape),
                   "direction": v.direction, "quant": v.weight.quant, "layout": v.weight.layout,
                   "aliases": list(v.weight.aliases), "params": int(np.prod(v.shape))}
                  for v in torch_views(store)
                  if v.kind in _CANDIDATE_KINDS and len(v.shape) >= 2  # weights, not biases
                  and int(np.prod(v.shape)) >= MIN_CANDIDATE_SIZE]
    source = next((p.value for p in m.metadata_props if p.key == "wmaudit.source_format"), "onnx")
    return {
        "format": source,
        "producer": {"name": m.producer_name, "version": m.producer_version},
        "ir_version": int(m.ir_version),
        "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in m.opset_import},
        "nodes": {"total": sum(ops.values()), "by_op": dict(sorted(ops.items()))},
        "graph": {"initializers": len(m.graph.initializer), "inputs": [i.name for i in m.graph.input
                  if i.name not in {t.name for t in m.graph.initializer}], "outputs": [o.name for o in m.graph.output]},
        "external_data": ext,
        "weights": weights,
        "total_params": int(sum(w.size for w in store.weights)),
        "candidates": candidates,
        "unreadable": list(store.unreadable),
    }


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join("  " + ln.rstrip() for ln in lines)


def render(body: dict[str, Any], path: str) -> str:
    out = [f"{path}",
           *([f"  format: {body['format']}"] if body.get("format", "onnx") != "onnx" else []),
           f"  producer: {body['producer']['name'] or '?'} {body['producer']['version']}".rstrip(),
           f"  IR version {body['ir_version']}; opsets: " + ", ".join(f"{d} {v}" for d, v in body["opsets"].items()),
           f"  nodes: {body['nodes']['total']} (" + ", ".join(f"{k} {v}" for k, v in body["nodes"]["by_op"].items()) + ")"]
    if body["external_data"]:
        out.append("  external data: " + ", ".join(f"{e['location']} ({e['bytes']} bytes)" for e in body["external_data"]))
    else:
        out.append("  external data: none")
    out.append(f"\nweights ({len(body['weights'])}, {body['total_params']} coefficients):")
    rows = [[w["name"], "x".join(map(str, w["shape"])) or "scalar", w["stored_dtype"], w["location"],
             w["quant"] or w.get("layout") or "-", w["params"]] for w in body["weights"]]
    out.append(_table(rows, ["name", "onnx shape", "stored", "where", "quantized / layout", "#params"])
               if rows else "  (none)")
    if body.get("unreadable"):
        out.append("\nweights that could not be read (a mark in them reads 'could not read', never 'not detected'):")
        for u in body["unreadable"]:
            shape = "x".join(map(str, u["shape"])) if u.get("shape") is not None else "?"
            out.append(f"  {u['tensor']} {shape} ({u['op']} node {u['node']!r}): {u['reason']}")
    out.append(f"\ncandidate layers for marks (>= {MIN_CANDIDATE_SIZE} coefficients), torch layout:")
    rows = [[c["weight"] + (f" ({', '.join(c['aliases'])})" if c.get("aliases") else ""), c["kind"], c["transform"],
             "x".join(map(str, c["torch_shape"])), c["quant"] or c.get("layout") or "-"] for c in body["candidates"]]
    out.append(_table(rows, ["weight (layer's name)", "kind", "transform", "torch shape", "quantized / layout"])
               if rows else "  (none)")
    return "\n".join(out) + "\n"


def run(args) -> int:
    from auditor import results

    body = inspect_model(args.model)
    if args.json:
        print(results.dumps(results.envelope("inspect", model_path=args.model, **body)), end="")
    else:
        print(render(body, args.model), end="")
    return 0

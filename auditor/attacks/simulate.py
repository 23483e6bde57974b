"""Simulated int8 quantize -> dequantize of weights onnxruntime never quantizes.

onnxruntime quantizes no GRU and no RNN node (dynamic or static), so a
deployer's int8 cannot reach those weights. To still ask "would the mark
survive int8?", this module rounds their W and R initializers through a
symmetric int8 grid and stores the float result back:

    s = max|w| / 127 (per tensor, or per output row: axis 1 of ONNX [D, G*H, K])
    q = clip(round_half_even(w / s), -127, 127)      # int8, zero point 0
    w' = q * s                                        # float32

This is exactly ``DequantizeLinear(QuantizeLinear(w, s, 0), s, 0)`` of the
ONNX spec with int8 (round half to even, saturation); the tests check it
against onnx's reference evaluator. Every result is labelled
``simulated=True``: no runtime would have produced these weights.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from auditor.errors import AuditError
from auditor.attacks import AttackResult, cap_ir_version, copy_model

RNN_OPS = ("GRU", "RNN")
GRANULARITIES = ("per-tensor", "per-channel")


def int8_roundtrip(w: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Symmetric int8 quantize->dequantize of w (per tensor when axis is None, else per slice along axis)."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        amax = np.float32(np.abs(w).max()) if w.size else np.float32(0)
    else:
        axes = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        amax = np.abs(w).max(axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127)
    return (q * scale).astype(np.float32), scale


# Layout-only ops through which exporters build W/R from the parameters
# (torch's dynamo exporter: Slice/Concat/Unsqueeze of weight_ih_l0 / weight_hh_l0).
_LAYOUT_OPS = frozenset({"Slice", "Concat", "Transpose", "Reshape", "Unsqueeze", "Squeeze",
                         "Gather", "Split", "Identity", "Cast"})


def _source_initializers(name: str, inits: set[str], producer: dict, seen: set) -> list[str]:
    """Float initializers (ndim >= 2) a constant W/R tensor is built from."""
    if name in seen:
        return []
    seen.add(name)
    if name in inits:
        return [name]
    node = producer.get(name)
    if node is None or node.op_type not in _LAYOUT_OPS:
        return []
    out = []
    # data inputs only: Slice/Gather/Reshape index inputs are small int tensors
    data = node.input if node.op_type in ("Concat",) else node.input[:1]
    for i in data:
        out += _source_initializers(i, inits, producer, seen)
    return out


def rnn_weight_names(model: onnx.ModelProto, ops=RNN_OPS) -> list[str]:
    """Initializers behind the W (input 1) and R (input 2) of every node of type ``ops``:
    the W/R initializers themselves, or those they are sliced/concatenated from."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    names = []
    for n in model.graph.node:
        if n.op_type in ops:
            for name in list(n.input[1:3]):
                for src in _source_initializers(name, inits, producer, set()):
                    if src not in names:
                        names.append(src)
    return names


def simulate_int8(model: onnx.ModelProto, *, granularity: str = "per-channel", ops=RNN_OPS,
                  names: list[str] | None = None) -> AttackResult:
    """Round the W/R weights of ``ops`` nodes (or the named initializers) through int8; simulated."""
    if granularity not in GRANULARITIES:
        raise AuditError(f"unknown granularity {granularity!r} (one of {', '.join(GRANULARITIES)})")
    m = copy_model(model)
    targets = list(names) if names is not None else rnn_weight_names(m, tuple(ops))
    by_name = {i.name: i for i in m.graph.initializer}
    missing = [t for t in targets if t not in by_name]
    if missing:
        raise AuditError(f"no initializer named {missing[0]!r}")
    for t in targets:
        init = by_name[t]
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32:
            raise AuditError(f"{t}: simulated int8 needs a float32 weight, got {w.dtype}")
        # ONNX RNN weights are [D, G*H, K]: one channel per (direction, gate row).
        axis = None if granularity == "per-tensor" else (1 if w.ndim == 3 else 0)
        if axis == 1:
            wq = np.stack([int8_roundtrip(w[d], axis=0)[0] for d in range(w.shape[0])])
        else:
            wq = int8_roundtrip(w, axis=axis)[0]
        init.CopyFrom(numpy_helper.from_array(wq, t))
    params = {"mode": "simulated-int8", "granularity": granularity, "ops": list(ops), "weights": targets}
    notes = [f"simulated symmetric int8 round-trip ({granularity}) of {len(targets)} weights: "
             "onnxruntime does not quantize these; no runtime would produce this model"]
    if not targets:
        notes = [f"no {'/'.join(ops)} weights found; model unchanged"]
    return AttackResult(cap_ir_version(m), params, notes, simulated=bool(targets))

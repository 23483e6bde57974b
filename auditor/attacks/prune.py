"""Weight pruning on ONNX initializers, with numpy (onnxruntime has no pruning).

Which weights: the float tensors of rank >= 2 (initializers or Constant
nodes, in the main graph or inside If/Loop/Scan bodies) that are the weight
input of Conv, ConvTranspose, Gemm (B), MatMul (the constant operand) and
LSTM/GRU/RNN (W and R). Biases and BatchNorm parameters are never pruned.

Modes (rate r in [0, 1)):

* ``magnitude``: per layer, the k = round(r * n) coefficients of smallest
  |w| are set to 0 (ties broken by position, stable sort).
* ``global``: one ranking of |w| over all selected layers; the
  k = round(r * total) smallest are set to 0 (small layers may lose more).
* ``random``: per layer, k = round(r * n) positions drawn with
  ``numpy.random.default_rng(seed).permutation`` (layers in graph order).
* ``l1-filter``: per layer, round(r * C_out) whole output channels
  (filters) with the smallest L1 norm are set to 0.
* ``l1-channel``: the same over input channels.

round() is round-half-up: k = floor(r * n + 1/2). The result has exactly k
zeros per layer (or in total for ``global``) whenever the layer had at most k
zeros before; pre-existing zeros are among the smallest and count towards k.
The per-layer counts are returned in ``params["layers"]``.

Output-channel / input-channel axes: Conv [O, I, kh, kw] -> 0 / 1;
ConvTranspose [I, O, ...] -> 1 / 0; Gemm B -> 0 / 1 with transB=1, else
1 / 0; MatMul B [.., K, N] -> last / second to last; RNN W/R [D, G*H, K] ->
1 / 2.

Already-quantized models: an integer weight behind a DequantizeLinear (a QDQ
file, per tensor or per channel) is pruned in its dequantized values: the
ranking (magnitude, global, L1 groups) uses |(q - zero point) * scale| and a
pruned entry is set to its zero point, so it dequantizes to exactly 0 (a
deployer pruning an int8 file, after quantizing). The weights of quantized
operators (QLinearConv, ConvInteger, QGemm, ...), blocked quantization and
4-bit or float8 weights are not pruned, and the notes count them; ``compose`` applies steps in the order
asked.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from auditor.errors import AuditError
from auditor.attacks import AttackResult, cap_ir_version, copy_model

MODES = ("magnitude", "global", "random", "l1-filter", "l1-channel")
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
# integer weights a DequantizeLinear reads that are pruned in place (4-bit packed and float8 ones are not:
# they would be written back as another type than their zero point's)
_DQ_INTS = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16)


def count(rate: float, n: int) -> int:
    """Number of coefficients (or channels) pruned out of n at rate: floor(rate * n + 1/2)."""
    return int(np.floor(float(rate) * n + 0.5))


def _axes(node: onnx.NodeProto, slot: int, ndim: int) -> tuple[int, int]:
    """(output-channel axis, input-channel axis) of the weight in input ``slot`` of ``node``."""
    op = node.op_type
    if op == "Conv":
        return 0, 1
    if op == "ConvTranspose":
        return 1, 0
    if op == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return (0, 1) if trans_b else (1, 0)
    if op == "MatMul":
        # constant A (slot 0) acts as [M, K]: rows are outputs
        return (ndim - 1, ndim - 2) if slot == 1 else (ndim - 2, ndim - 1)
    return 1, 2  # LSTM / GRU / RNN W and R: [D, gates*H, K]


def stored_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every constant tensor a node can read by name, in every graph (If/Loop/Scan bodies
    included): initializers and the `value` tensors of Constant nodes. Writing into these
    TensorProtos changes the model; shipped files keep weights in any of these places."""
    from auditor.read.graph import iter_graphs

    out: dict[str, onnx.TensorProto] = {}
    for g, _ in iter_graphs(model.graph):
        for t in g.initializer:
            out.setdefault(t.name, t)
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        out.setdefault(n.output[0], a.t)
    return out


def prunable_weights(model: onnx.ModelProto, ops=WEIGHT_OPS) -> tuple[list[tuple[str, onnx.NodeProto, int]], list[str]]:
    """([(weight name, consumer node, input slot)], [quantized weight names skipped]) in graph order,
    over the main graph and its subgraphs; weights may be initializers or Constant nodes."""
    from auditor.read.graph import iter_graphs

    tensors = stored_tensors(model)
    nodes = [n for g, _ in iter_graphs(model.graph) for n in g.node]
    found, seen, quantized = [], set(), []
    for n in nodes:
        if n.op_type not in ops:
            continue
        slots = {"Conv": [1], "ConvTranspose": [1], "Gemm": [1], "MatMul": [0, 1]}.get(n.op_type, [1, 2])
        for s in slots:
            if s >= len(n.input) or n.input[s] not in tensors or n.input[s] in seen:
                continue
            seen.add(n.input[s])
            t = tensors[n.input[s]]
            if t.data_type in _FLOATS and len(t.dims) >= 2:
                found.append((n.input[s], n, s))
    # weights behind DequantizeLinear or inside quantized ops: never pruned here
    for n in nodes:
        if n.op_type in ("DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                         "QGemm", "DynamicQuantizeLSTM", "MatMulNBits"):
            for name in n.input:
                t = tensors.get(name)
                if t is not None and t.data_type not in _FLOATS and len(t.dims) >= 2 and name not in quantized:
                    quantized.append(name)
    return found, quantized


class _DQWeight:
    """An integer weight behind a DequantizeLinear feeding a weight slot: its dequantized values (the
    ranking) and how to write a pruned copy back (pruned entries set to the zero point)."""

    def __init__(self, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int):
        self.q = q
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis % q.ndim] = scale.size
        self.zp = np.broadcast_to(zp.astype(np.int64).reshape(shape), q.shape)
        self.values = (q.astype(np.float64) - self.zp) * scale.astype(np.float64).reshape(shape)

    def write(self, pruned_values: np.ndarray) -> np.ndarray:
        return np.where(pruned_values == 0, self.zp, self.q).astype(self.q.dtype)


def dq_weights(model: onnx.ModelProto, ops=WEIGHT_OPS) -> tuple[list[tuple[str, onnx.NodeProto, int]], dict]:
    """([(integer weight name, consumer node, slot)], {name: _DQWeight}) for the weights a DequantizeLinear
    hands to a weight slot of `ops` (QDQ files), in graph order; blocked quantization is left out."""
    from auditor.read.graph import iter_graphs

    tensors = stored_tensors(model)
    nodes = [n for g, _ in iter_graphs(model.graph) for n in g.node]
    dq = {n.output[0]: n for n in nodes if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")
          and n.output and n.input and n.input[0] in tensors}
    found, info = [], {}
    for n in nodes:
        if n.op_type not in ops:
            continue
        slots = {"Conv": [1], "ConvTranspose": [1], "Gemm": [1], "MatMul": [0, 1]}.get(n.op_type, [1, 2])
        for s in slots:
            d = dq.get(n.input[s]) if s < len(n.input) else None
            if d is None or d.input[0] in info:
                continue
            t = tensors[d.input[0]]
            attrs = {a.name: helper.get_attribute_value(a) for a in d.attribute}
            if t.data_type not in _DQ_INTS or len(t.dims) < 2 or attrs.get("block_size", 0) or len(d.input) < 2 \
                    or d.input[1] not in tensors or (len(d.input) > 2 and d.input[2] and d.input[2] not in tensors):
                continue
            q = numpy_helper.to_array(t)
            scale = numpy_helper.to_array(tensors[d.input[1]]).reshape(-1)
            zp = (numpy_helper.to_array(tensors[d.input[2]]).reshape(-1) if len(d.input) > 2 and d.input[2]
                  else np.zeros(1, dtype=np.int64))
            axis = int(attrs.get("axis", 1))
            if scale.size not in (1, q.shape[axis % q.ndim]) or zp.size not in (1, scale.size):
                continue
            info[d.input[0]] = _DQWeight(q, scale, zp, axis)
            found.append((d.input[0], n, s))
    return found, info


def _prune_groups(w: np.ndarray, axis: int, rate: float) -> tuple[np.ndarray, int]:
    axis = axis % w.ndim
    moved = np.moveaxis(w, axis, 0)
    norms = np.abs(moved.reshape(moved.shape[0], -1)).sum(axis=1)
    kg = count(rate, moved.shape[0])
    out = moved.copy()
    out[np.argsort(norms, kind="stable")[:kg]] = 0
    return np.moveaxis(out, 0, axis), kg * (w.size // w.shape[axis])


def prune(model: onnx.ModelProto, rate: float, *, mode: str = "magnitude", seed: int = 0,
          ops=WEIGHT_OPS, names: list[str] | None = None) -> AttackResult:
    """Prune a copy of ``model`` at ``rate`` (see the module docstring for the exact counts)."""
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise AuditError(f"pruning rate must be a number, got {rate!r}") from None
    if not 0.0 <= rate < 1.0:
        raise AuditError(f"pruning rate must be in [0, 1), got {rate}")
    if mode not in MODES:
        raise AuditError(f"unknown pruning mode {mode!r} (one of {', '.join(MODES)})")
    m = copy_model(model)
    from auditor.attacks.quantize import constants_as_tensors

    constants_as_tensors(m)  # value_floats Constants become tensors the loop below can rewrite
    found, quantized = prunable_weights(m, tuple(ops))
    dq_found, dq = dq_weights(m, tuple(ops))
    found += dq_found
    quantized = [q for q in quantized if q not in dq]
    if names is not None:
        by = {f[0]: f for f in found}
        missing = [n for n in names if n not in by]
        if missing:
            raise AuditError(f"{missing[0]!r} is not a float or QDQ weight of {'/'.join(ops)}")
        found = [by[n] for n in names]
    if not found:
        raise AuditError("no float or QDQ weights to prune" + (
            " (its weights are quantized inside quantized operators, or as 4-bit, float8 or blocked QDQ: prune "
            "before quantizing, or quantize to 8-bit QDQ)"
            if quantized else ""))
    inits = stored_tensors(m)
    arrays = {name: (dq[name].values if name in dq else numpy_helper.to_array(inits[name])) for name, _, _ in found}
    layers: dict[str, dict] = {}
    if mode == "global":
        flat = np.concatenate([np.abs(arrays[n].astype(np.float64)).ravel() for n, _, _ in found])
        k = count(rate, flat.size)
        mask = np.ones(flat.size, dtype=bool)
        mask[np.argsort(flat, kind="stable")[:k]] = False
        off = 0
        for name, _, _ in found:
            w = arrays[name]
            keep = mask[off: off + w.size].reshape(w.shape)
            off += w.size
            arrays[name] = np.where(keep, w, np.zeros((), dtype=w.dtype))
            layers[name] = {"size": int(w.size), "pruned": int((~keep).sum())}
    else:
        rng = np.random.default_rng(seed)
        for name, node, slot in found:
            w = arrays[name]
            if mode in ("magnitude", "random"):
                k = count(rate, w.size)
                order = (np.argsort(np.abs(w).ravel(), kind="stable") if mode == "magnitude"
                         else rng.permutation(w.size))
                flat = w.ravel().copy()
                flat[order[:k]] = 0
                arrays[name], pruned = flat.reshape(w.shape), k
            else:
                out_axis, in_axis = _axes(node, slot, w.ndim)
                arrays[name], pruned = _prune_groups(w, out_axis if mode == "l1-filter" else in_axis, rate)
            layers[name] = {"size": int(w.size), "pruned": int(pruned)}
    for name, w in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(dq[name].write(w) if name in dq else w, inits[name].name))
    total = sum(v["size"] for v in layers.values())
    pruned = sum(v["pruned"] for v in layers.values())
    params = {"rate": rate, "mode": mode, "layers": layers, "sparsity": pruned / total if total else 0.0}
    if dq:
        params["quantized_layers_pruned"] = sorted(n for n in layers if n in dq)
    if mode == "random":
        params["seed"] = int(seed)
    notes = [f"pruned {pruned} of {total} weights in {len(layers)} layers ({mode}, rate {rate:g})"]
    if dq:
        notes.append(f"{len([n for n in layers if n in dq])} QDQ (integer) weights pruned in their dequantized "
                     f"values, pruned entries set to the zero point")
    if quantized:
        notes.append(f"{len(quantized)} weights inside quantized operators or in 4-bit, float8 or blocked QDQ form "
                     f"not pruned: prune before quantizing")
    return AttackResult(cap_ir_version(m), params, notes)

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

Already-quantized models: integer initializers (int8 weights behind
DequantizeLinear, QLinearConv, ConvInteger, ...) are not pruned, and the
notes count them; a deployer prunes the float model, then quantizes
(``compose`` does this in the order asked).
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
                if name in tensors and tensors[name].data_type not in _FLOATS and name not in quantized:
                    quantized.append(name)
    return found, quantized


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
    if names is not None:
        by = {f[0]: f for f in found}
        missing = [n for n in names if n not in by]
        if missing:
            raise AuditError(f"{missing[0]!r} is not a float weight of {'/'.join(ops)}")
        found = [by[n] for n in names]
    if not found:
        raise AuditError("no float weights to prune" + (" (the model is quantized: prune before quantizing)"
                                                        if quantized else ""))
    inits = stored_tensors(m)
    arrays = {name: numpy_helper.to_array(inits[name]) for name, _, _ in found}
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
        inits[name].CopyFrom(numpy_helper.from_array(w, inits[name].name))
    total = sum(v["size"] for v in layers.values())
    pruned = sum(v["pruned"] for v in layers.values())
    params = {"rate": rate, "mode": mode, "layers": layers, "sparsity": pruned / total if total else 0.0}
    if mode == "random":
        params["seed"] = int(seed)
    notes = [f"pruned {pruned} of {total} weights in {len(layers)} layers ({mode}, rate {rate:g})"]
    if quantized:
        notes.append(f"{len(quantized)} quantized (integer) weights not pruned: prune before quantizing")
    return AttackResult(cap_ir_version(m), params, notes)

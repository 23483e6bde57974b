"""MultiHeadAttention's per-head packed inputs (onnxruntime's UNet attention fusion,
`enable_packed_qkv` / `enable_packed_kv`).

com.microsoft MultiHeadAttention takes, instead of separate query / key / value:

* a packed QKV query [B, L, N, 3, H] (key and value empty), or
* a packed KV key [B, L, N, 2, H] (value empty; the query stays separate: cross attention),

made by one MatMul whose weight [C, N x P x H] has its columns laid out (head n, part p, h), then a
Reshape to [B, L, N, P, H] (onnxruntime writes the shape [0, 0, N, P, H]), optionally with a packed
bias added between them. `packed_inputs(store)` finds every such input, walking back from the
attention node through the Reshape (and a bias Add, a dynamic quantization's Cast / scale Mul,
activation Q/DQ pairs) to the MatMul, and either reads the layout (N from the node's `num_heads`, P
from the Reshape, H = columns / (N x P)) or says why it cannot: a Reshape whose shape is not a
constant, or one that disagrees with `num_heads` or the weight, describes a layout that is not read,
and the weight is listed as unreadable ("could not read", never "not detected").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from auditor.errors import AuditError

__all__ = ["PackedInput", "packed_inputs", "PARTS"]

_MS = "com.microsoft"
# the projection's own op (weight at input 1); onnxruntime's quantized forms of MatMul included
_MATMULS = {"MatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
# between the MatMul and the attention node: the Reshape, a bias Add, a dynamic quantization's Cast and
# scale Mul, activation Q/DQ pairs
_BETWEEN = {"Reshape", "Add", "Mul", "Cast", "QuantizeLinear", "DequantizeLinear", "Identity"}
PARTS = {3: "qkv", 2: "kv"}


@dataclass
class PackedInput:
    """One packed attention input. matmul: the projection node's name; weight_key: its stored weight
    (the integer tensor of a quantized one); bias_key / bias_node: the packed bias added between the
    MatMul and the Reshape (None if none); parts: 3 (QKV) or 2 (KV); heads N, head size H;
    reason: why the layout is not read (None when it is)."""

    attention: str
    matmul: str
    weight_key: str | None
    parts: int
    heads: int
    head_size: int
    bias_key: str | None = None
    bias_node: str | None = None
    reason: str | None = None

    def labels(self) -> list[str]:
        """`qkv-heads:<part>:<N>x<P>x<H>` for each projection packed here."""
        return [f"qkv-heads:{p}:{self.heads}x{self.parts}x{self.head_size}" for p in PARTS[self.parts]]


def unpack(a: np.ndarray, transform: str) -> np.ndarray:
    """The projection `qkv-heads:<part>:<N>x<P>x<H>` of a packed weight [C, N*P*H] as torch's Linear
    weight [N*H, C], or of a packed bias [N*P*H] as its bias [N*H]."""
    _, part, dims = transform.split(":")
    N, P, H = (int(x) for x in dims.split("x"))
    i = PARTS[P].index(part)
    if a.ndim == 1:
        return np.ascontiguousarray(a.reshape(N, P, H)[:, i, :].reshape(N * H))
    C = a.shape[0]
    return np.ascontiguousarray(a.reshape(C, N, P, H)[:, :, i, :].reshape(C, N * H).T)


def packed_inputs(store) -> list[PackedInput]:
    """Every packed input of a com.microsoft MultiHeadAttention in the store's graph (cached)."""
    cached = getattr(store, "_packed_inputs", None)
    if cached is None:
        cached = []
        for nname, node in store._nodes.items():
            if node.op_type != "MultiHeadAttention" or node.domain != _MS:
                continue
            ins = list(node.input) + [""] * 3
            if ins[0] and not ins[1] and not ins[2]:
                slot, parts = 0, 3
            elif ins[0] and ins[1] and not ins[2]:
                slot, parts = 1, 2
            else:
                continue
            p = _trace(store, nname, node, slot, parts)
            if p is not None:
                cached.append(p)
        store._packed_inputs = cached
    return cached


def _producer_name(store, tensor: str) -> str | None:
    return store._producer.get(tensor)


def _trace(store, att_name: str, att, slot: int, parts: int) -> PackedInput | None:
    """Walk back from the attention node's packed input to its MatMul (depth first, at most 8 nodes)."""
    path: list[str] = []

    def walk(tensor: str, depth: int) -> str | None:
        n = _producer_name(store, tensor)
        if n is None or depth > 8:
            return None
        node = store._nodes[n]
        if node.op_type in _MATMULS and len(node.input) > 1 and _weight_key(store, n) is not None:
            path.append(n)
            return n
        if node.op_type not in _BETWEEN:
            return None
        path.append(n)
        inputs = node.input[:1] if node.op_type in ("Reshape", "Cast", "QuantizeLinear", "DequantizeLinear",
                                                    "Identity") else node.input
        for t in inputs:
            if t and not store.is_constant(t):
                found = walk(t, depth + 1)
                if found is not None:
                    return found
        path.pop()
        return None

    mm = walk(att.input[slot], 0)
    if mm is None:
        return None
    w = _weight_key(store, mm)
    heads = _num_heads(att)
    cols = _cols(store, w)
    head_size = cols // (heads * parts) if heads > 0 and cols and cols % (heads * parts) == 0 else 0
    out = PackedInput(att_name, mm, w, parts, heads, head_size)
    for n in path:
        node = store._nodes[n]
        if node.op_type == "Add":
            k = next((store._const_key(n, j) for j in range(2) if store._const_key(n, j) is not None), None)
            if k is not None and out.bias_key is None:
                out.bias_key, out.bias_node = k, n
    what = f"packed {'QKV' if parts == 3 else 'KV'} input of MultiHeadAttention {att_name!r}"
    reshapes = [n for n in path if store._nodes[n].op_type == "Reshape"]
    if len(reshapes) != 1:
        out.reason = f"the {what} is not made by one Reshape of its MatMul's output; the packed layout is unknown"
        return out
    shape_key = store._const_key(reshapes[0], 1)
    if shape_key is None:
        out.reason = (f"the {what} comes from Reshape {reshapes[0]!r} whose shape is computed at run time; "
                      f"the packed layout (head, part, h) cannot be read from the file")
        return out
    shape = [int(x) for x in np.asarray(store._value(shape_key)).reshape(-1)]
    if heads <= 0:
        out.reason = f"the {what}: the attention node states no number of heads (num_heads)"
    elif not cols or len(shape) != 5 or shape[3] != parts or shape[2] != heads or head_size <= 0 \
            or shape[4] not in (head_size, -1):
        out.reason = (f"the {what} comes from Reshape {reshapes[0]!r} to {shape}, which is not [B, L, "
                      f"num_heads={heads}, {parts}, H] over the weight's {cols} columns; the packed layout is unknown")
    elif out.bias_key is not None and _size(store, out.bias_key) not in (cols, 1):
        out.bias_key = out.bias_node = None
    return out


def _num_heads(node) -> int:
    from onnx import helper

    v = 0
    for a in node.attribute:
        if a.name == "num_heads":
            try:
                v = helper.get_attribute_value(a)
            except Exception:
                raise AuditError(f"node {node.name or node.op_type!r}: attribute 'num_heads' has no readable value") from None
    if isinstance(v, bool) or not isinstance(v, int):
        raise AuditError(f"node {node.name or node.op_type!r}: attribute 'num_heads' must be an integer")
    return v


def _weight_key(store, mm: str) -> str | None:
    """The stored weight of a projection node: its input 1, or the integer tensor a DequantizeLinear
    turns into it."""
    node = store._nodes[mm]
    if len(node.input) < 2 or not node.input[1]:
        return None
    t = node.input[1]
    dq = _producer_name(store, t)
    if dq is not None and store._nodes[dq].op_type == "DequantizeLinear":
        k = store._const_key(dq, 0)
        if k is not None:
            return k
    return store._const_key(mm, 1)


def _cols(store, key: str | None) -> int:
    if key is None:
        return 0
    try:
        shape = store._shape(key)
    except AuditError:
        return 0
    return int(shape[-1]) if len(shape) == 2 else 0


def _size(store, key: str) -> int:
    try:
        return int(np.prod(store._shape(key)))
    except AuditError:
        return 0

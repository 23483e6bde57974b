"""ONNX layout -> torch layout: every plausible torch view of every weight.

A torch parameter can reach ONNX transposed (Linear as Gemm transB=0 or as
MatMul, stored [in, out]), split per direction and gate-reordered (RNN W/R),
or stored in a quantized op's own layout (DynamicQuantizeLSTM [D, in, 4H]).
`torch_views` lists, for each weight, the views under which it may equal a
torch parameter; the white-box extractor tries them. RNN weights are found
through the inputs of the RNN node, never by their names.

Transform labels: `identity`, `transpose`, `rnn:<LSTM|GRU|RNN>:<W|R>:dir=<d>`,
`rnn:<LSTM|GRU|RNN>:<Bih|Bhh>:dir=<d>` (the two halves of B),
`DynamicQuantizeLSTM:<W|R>:dir=<d>`, and the Q / K / V parts of a packed projection
(onnxruntime's transformer fusions): `qkv-slice:<q|k|v>:<start>:<end>` (columns of com.microsoft
Attention's weights, or of a MatMul split in three feeding MultiHeadAttention), and
`qkv-heads:<q|k|v>:<N>x<P>x<H>`: one projection of MultiHeadAttention's per-head packed input (a MatMul
weight [in, N x P x H], columns laid out (head, part, h), reshaped to [B, L, N, P, H]; auditor.read.packed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from auditor.errors import AuditError
from auditor.read import packed
from auditor.read.weights import Weight, WeightStore

__all__ = ["TorchView", "torch_views", "views_of", "following_batchnorm", "GATE_ORDER", "apply_transform"]

# ONNX gate order -> torch gate order: torch gate k is ONNX gate GATE_ORDER[op][k].
GATE_ORDER = {
    "LSTM": (0, 2, 3, 1),   # ONNX i,o,f,c -> torch i,f,g,o
    "GRU": (1, 0, 2),       # ONNX z,r,h   -> torch r,z,n
    "RNN": (0,),
}
# onnxruntime's fused forms (com.microsoft FusedConv / FusedGemm, NCHWc Conv read back by
# auditor.read.blocked) read their weight where the plain op does.
_CONV_OPS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1}
_MATMUL_OPS = {"MatMul": 1, "MatMulInteger": 1, "QLinearMatMul": 3, "MatMulNBits": 1,
               "MatMulIntegerToFloat": 1, "DynamicQuantizeMatMul": 1}
_GEMM_OPS = {"Gemm": 1, "QGemm": 3, "FusedGemm": 1}
_RNN_OPS = {"LSTM", "GRU", "RNN"}
_LAYER_KIND = {**{op: "conv" for op in _CONV_OPS}, "ConvTranspose": "conv_transpose",
               **{op: "linear" for op in _MATMUL_OPS}, **{op: "linear" for op in _GEMM_OPS},
               **{op: "rnn" for op in _RNN_OPS}, "DynamicQuantizeLSTM": "rnn", "FusedMatMul": "linear"}


@dataclass
class TorchView:
    """One way to read an ONNX weight as a torch parameter.

    weight: the Weight; transform: layout label; kind: `conv` |
    `conv_transpose` | `linear` | `rnn` | `tensor`; direction: RNN direction
    (None elsewhere); shape: torch-layout shape; array(): float32 values in
    that layout (read lazily).
    """

    weight: Weight
    transform: str
    kind: str
    direction: int | None
    shape: tuple[int, ...]
    _fn: Callable[[], np.ndarray] = field(repr=False, compare=False, default=None)

    def array(self) -> np.ndarray:
        return self._fn()


def _attr(node: onnx.NodeProto, name: str, default=None):
    from auditor.read.weights import _attr as attr

    return attr(node, name, default)


def _number(node: onnx.NodeProto, name: str, default, kind=int):
    """A numeric attribute; AuditError (one line) when the file gives another type."""
    v = _attr(node, name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise AuditError(f"node {node.name or node.op_type!r}: attribute {name!r} must be a number")
    return kind(v)


def _reorder_gates(a: np.ndarray, op: str) -> np.ndarray:
    """[G*H, X] in ONNX gate order -> [G*H, X] in torch gate order."""
    order = GATE_ORDER[op]
    g = len(order)
    return np.ascontiguousarray(a.reshape(g, a.shape[0] // g, *a.shape[1:])[list(order)].reshape(a.shape))


def apply_transform(a: np.ndarray, transform: str) -> np.ndarray:
    """Map an ONNX-layout array to torch layout under a transform label."""
    if transform == "identity":
        return a
    if transform == "transpose":
        return np.ascontiguousarray(a.T)
    if transform.startswith("qkv-slice:"):
        return _packed(a, transform)
    if transform.startswith("qkv-heads:"):
        return packed.unpack(a, transform)
    parts = transform.split(":")
    d = int(parts[-1].split("=")[1])
    if parts[0] == "rnn" and parts[2] in ("Bih", "Bhh"):
        half = a.shape[1] // 2
        b = a[d, :half] if parts[2] == "Bih" else a[d, half:]
        return _reorder_gates(b, parts[1])
    if parts[0] == "rnn":
        return _reorder_gates(a[d], parts[1])
    if parts[0] == "DynamicQuantizeLSTM":
        return _reorder_gates(np.ascontiguousarray(a[d].T), "LSTM")
    raise ValueError(f"unknown layout transform {transform!r}")


def _packed(a: np.ndarray, transform: str) -> np.ndarray:
    """Q, K or V of a packed projection weight [in, q+k+v] as torch's Linear weight [out, in]:
    `qkv-slice:<q|k|v>:<start>:<end>` takes columns start:end (com.microsoft Attention, Q|K|V side by
    side; a packed MatMul split in three)."""
    parts = transform.split(":")
    return np.ascontiguousarray(a[:, int(parts[2]):int(parts[3])].T)


def views_of(store: WeightStore, w: Weight) -> list[TorchView]:
    """Every plausible torch view of one weight (identity always first)."""
    shape = tuple(w.shape)
    views: dict[str, TorchView] = {}

    def add(transform: str, kind: str, direction: int | None, tshape: tuple[int, ...]) -> None:
        if transform in views:
            if views[transform].kind == "tensor" and kind != "tensor":
                views[transform].kind = kind
            return
        fn = lambda name=w.name, t=transform: apply_transform(store.array(name), t)  # noqa: E731
        views[transform] = TorchView(w, transform, kind, direction, tuple(int(x) for x in tshape), fn)

    kinds = []
    for op, node_name, idx in w.uses:
        node = store.node(node_name)
        if op in _CONV_OPS and idx == _CONV_OPS[op]:
            kinds.append(("identity", "conv"))
        elif op == "ConvTranspose" and idx == 1:
            kinds.append(("identity", "conv_transpose"))
        elif op in _GEMM_OPS and idx == _GEMM_OPS[op]:
            kinds.append(("identity" if _number(node, "transB", 0) else "transpose", "linear"))
        elif op in _MATMUL_OPS and idx == _MATMUL_OPS[op] and len(shape) == 2:
            kinds.append(("transpose", "linear"))
            for t, tshape in _packed_views(store, node_name, shape):
                add(t, "linear", None, tshape)
            for p in packed.packed_inputs(store):
                if p.matmul == node_name and p.reason is None and shape[1] == p.heads * p.parts * p.head_size:
                    for t in p.labels():
                        add(t, "linear", None, (p.heads * p.head_size, shape[0]))
        elif op == "Add" and len(shape) == 1:
            # the packed bias added between a packed projection's MatMul and its Reshape
            for p in packed.packed_inputs(store):
                if p.bias_node == node_name and p.reason is None and shape[0] == p.heads * p.parts * p.head_size:
                    for t in p.labels():
                        add(t, "tensor", None, (p.heads * p.head_size,))
        elif op == "FusedMatMul" and idx == 1 and len(shape) == 2:
            # com.microsoft FusedMatMul folds a Transpose of B into transB: B^T [N, K] is torch's layout
            kinds.append(("identity" if _number(node, "transB", 0) else "transpose", "linear"))
        elif op in _RNN_OPS and idx in (1, 2) and len(shape) == 3:
            tag = "W" if idx == 1 else "R"
            for d in range(shape[0]):
                add(f"rnn:{op}:{tag}:dir={d}", "rnn", d, (shape[1], shape[2]))
        elif op in _RNN_OPS and idx == 3 and len(shape) == 2:
            # B [D, 2*G*H] = [Wb | Rb]: torch bias_ih / bias_hh per direction
            half = shape[1] // 2
            for d in range(shape[0]):
                add(f"rnn:{op}:Bih:dir={d}", "rnn", d, (half,))
                add(f"rnn:{op}:Bhh:dir={d}", "rnn", d, (half,))
        elif op == "Attention" and idx == 1 and len(shape) == 2:
            # com.microsoft Attention: weights [in, q + k + v], Q | K | V side by side
            sizes = [int(x) for x in (_attr(node, "qkv_hidden_sizes") or [])] or [shape[1] // 3] * 3
            if len(sizes) == 3 and sum(sizes) == shape[1]:
                start = 0
                for part, size in zip("qkv", sizes):
                    add(f"qkv-slice:{part}:{start}:{start + size}", "linear", None, (size, shape[0]))
                    start += size
        elif op == "DynamicQuantizeLSTM" and idx in (1, 2) and len(shape) == 3:
            tag = "W" if idx == 1 else "R"
            for d in range(shape[0]):
                add(f"DynamicQuantizeLSTM:{tag}:dir={d}", "rnn", d, (shape[2], shape[1]))
    first = [k for t, k in kinds if t == "identity"]
    if not first and not any(op in _LAYER_KIND for op, _, _ in w.uses):
        # A torch-named source that reaches its layer only through constant folding
        # (dynamo: weight_ih_l0 -> Slice/Concat -> LSTM, fc.weight -> Transpose -> MatMul)
        # is the torch parameter itself: its identity view takes the layer's kind.
        k = _downstream_kind(store, w)
        if k is not None:
            first = [k]
    add("identity", first[0] if first else "tensor", None, shape)
    for t, k in kinds:
        if t == "transpose":
            add("transpose", k, None, shape[::-1])
    if len(shape) == 2:
        add("transpose", "tensor", None, shape[::-1])
    # identity first, then transpose, then per-direction RNN views
    order = sorted(views.values(), key=lambda v: (v.transform != "identity", v.transform != "transpose", v.transform))
    return order


def _packed_views(store: WeightStore, node_name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple]]:
    """Q, K, V views of a MatMul weight [in, 3 x hidden] whose output (through a bias Add) is split in
    three along the last axis (a packed projection feeding MultiHeadAttention's query, key, value).
    MultiHeadAttention's per-head packed inputs [B, L, N, 3, H] / [B, L, N, 2, H] are read by
    auditor.read.packed."""
    if shape[1] % 3:
        return []
    out_key = store._output_key(node_name)
    for _ in range(2):
        cons = store.consumers(out_key) if out_key else []
        if len(cons) != 1:
            return []
        node, name, j = cons[0]
        if node.op_type == "Add":
            out_key = store._output_key(name)
            continue
        if node.op_type == "Split" and len(node.output) == 3 and _attr(node, "axis", 0) in (-1, 2):
            third = shape[1] // 3
            return [(f"qkv-slice:{p}:{i * third}:{(i + 1) * third}", (third, shape[0])) for i, p in enumerate("qkv")]
        return []
    return []


def _downstream_kind(store: WeightStore, w: Weight) -> str | None:
    """Kind of the layer a weight feeds through folded constants only, if exactly one kind."""
    layer_kind = _LAYER_KIND
    found: set[str] = set()
    frontier, seen = [w.stored_name], set()
    while frontier and len(seen) < 256:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        for node, name, _ in store.consumers(t):
            if node.op_type in layer_kind:
                found.add(layer_kind[node.op_type])
                continue
            outs = [store._output_key(name, i) for i in range(len(node.output))]
            outs = [o for o in outs if o]
            if outs and all(store.is_constant(o) for o in outs):
                frontier.extend(outs)
    return found.pop() if len(found) == 1 else None


def torch_views(store: WeightStore) -> list[TorchView]:
    """Every plausible torch view of every weight of the store."""
    out: list[TorchView] = []
    for w in store.weights:
        out.extend(views_of(store, w))
    return out


def following_batchnorm(store: WeightStore, weight_name: str) -> dict | None:
    """The BatchNormalization fed by the Conv that uses this weight, or None.

    Returns {"node", "scale", "bias", "mean", "var", "eps"} (arrays float32),
    the arrays also under the key file's anchor names gamma / beta /
    running_mean / running_var,
    when the conv's output goes (possibly through Identity) into exactly one
    BatchNormalization whose parameters are constants. A conv weight with no
    such BN in the graph may have had it folded in.
    """
    w = store.get(weight_name)
    for op, node_name, idx in w.uses:
        if op not in _CONV_OPS and op != "ConvTranspose":
            continue
        node = store.node(node_name)
        out = node.output[0]
        # Quantized graphs put activation Q/DQ pairs after the conv; ConvInteger's float
        # output only exists after its Cast, scale Mul and bias Add.
        passthrough = {"Identity", "QuantizeLinear", "DequantizeLinear"}
        if op == "ConvInteger":
            passthrough |= {"Cast", "Mul", "Add"}
        for _ in range(6):
            cons = store.consumers(store._output_key(node_name) or out)
            if len(cons) != 1:
                break
            nxt, nxt_name, j = cons[0]
            if nxt.op_type in passthrough:
                node, node_name = nxt, nxt_name
                continue
            if nxt.op_type == "BatchNormalization" and j == 0:
                keys = [store._const_key(nxt_name, i) for i in range(1, 5)]
                if any(k is None for k in keys):
                    return None
                vals = [np.asarray(store._value(k), dtype=np.float32) for k in keys]
                eps = _number(nxt, "epsilon", 1e-5, float)
                # ONNX names and the key file's anchor names (gamma, beta, running_mean, running_var)
                return {"node": nxt_name, "scale": vals[0], "bias": vals[1], "mean": vals[2], "var": vals[3], "eps": eps,
                        "gamma": vals[0], "beta": vals[1], "running_mean": vals[2], "running_var": vals[3]}
            break
    return None

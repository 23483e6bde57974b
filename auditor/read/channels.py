"""Where a layer's output channels go: the channel flow through an ONNX graph.

A function-preserving transformation of a layer (permuting, scaling,
splitting or adding output neurons) must change the layer's rows *and*
everything downstream that indexes the same channels: the BatchNormalization
after it, and the input columns of the next layers, possibly after pooling
and a Flatten/Reshape into a Gemm/MatMul (each channel is then a block of
H*W features) or a Concat (each channel at an offset). Undoing such a
transformation needs the same picture. `layers(model)` lists the layers
(Conv, Gemm, MatMul with a constant weight); `trace(model, layer)` follows
the layer's output channels to the consumers; `producer(model, layer)` is the
layer whose output channels are this layer's input channels; `input_flow(model,
layer)` the flow of the channels it reads (also when they are a residual stream).

Main graph only. Ops passed through: BatchNormalization (per-channel
parameters), activations (ReLU-like ones are positively homogeneous, so a
positive per-channel scale passes through them), pooling, ReduceMean/ReduceMax
over the spatial axes, Identity, Dropout, Flatten/Reshape, Concat (axis 1).
A residual Add / Sum (non-constant operands of one shape) joins the channels
into one stream with its other inputs: the trace walks those back to every
layer writing into the stream (`Flow.writers`) and forward to every reader.
A depthwise Conv (group == channels, weight [C, 1, k..], channel multiplier 1,
constant weight and bias) is a per-channel op with parameters: the trace records it on the
writer it follows (`Writer.depthwise`, with the BatchNorms after it in
`Writer.depthwise_batchnorms`), or, when it reads the channels after a residual Add, on the
stream (`Flow.stream_depthwise`, the BatchNorms after it in `stream_batchnorms`), and goes on
from its output; `producer` and `input_flow` walk back through it. Other grouped Convs
(1 < group < C, or a channel multiplier > 1) end the trace.
A constant Add right after a layer (through Q/DQ at most) with one value per
channel or a scalar along the channel axis is the layer's bias (`Writer.biases`;
converters write Conv/MatMul biases so). A Mul of the channels by a
squeeze-excitation gate computed from them alone passes them (`Flow.gates`: the
gate's layer follows their index map). Channels on the last axis (a MatMul on
[B, T, C], `Flow.last_axis`) pass per-channel ops, bias and residual Adds and a
ReduceMean over the middle axes; ops working on axis 1 end the trace there.
Any other op mixing channels of two tensors (Mul, Sub, Div, an Add with a
constant that is not a bias, or after a Flatten/Concat), a stream reaching the
graph input or written by anything but a plain layer, ends the trace with a reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["Layer", "Consumer", "Flow", "Writer", "Bias", "Gate", "layers", "trace", "producer", "input_flow", "constant_tensors", "HOMOGENEOUS"]

# Positively homogeneous: f(s x) = s f(x) for s > 0 (a per-channel scale passes through).
HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                         "GlobalMaxPool", "Identity", "Dropout"})
# Per-channel, but not homogeneous (a permutation or duplicate passes, a scale does not).
ELEMENTWISE = frozenset({"Sigmoid", "Tanh", "Gelu", "Elu", "Selu", "Softplus", "HardSigmoid", "HardSwish",
                         "Clip", "Silu", "Mish"})
_LAYER_OPS = ("Conv", "Gemm", "MatMul")
_PER_CHANNEL_BACK = HOMOGENEOUS | ELEMENTWISE | {"BatchNormalization", "QuantizeLinear", "DequantizeLinear"}


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Main-graph initializers and Constant-node tensors by name (the caller may rewrite them)."""
    out: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out.setdefault(n.output[0], a.t)
    return out


@dataclass
class Layer:
    """A Conv / Gemm / MatMul with a constant weight.

    out_axis / in_axis: axes of the stored (ONNX-layout) weight that index output
    and input channels (Conv [O, I, k..]: 0 / 1; Gemm transB=1 [O, I]: 0 / 1;
    Gemm transB=0 and MatMul [I, O]: 1 / 0)."""

    node: onnx.NodeProto
    index: int
    weight: str
    bias: str | None
    out_axis: int
    in_axis: int

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def op(self) -> str:
        return self.node.op_type


@dataclass
class Consumer:
    """A layer reading the traced channels: channel c is its input block
    [offset + c*spatial, offset + (c+1)*spatial) along its in_axis."""

    layer: Layer
    spatial: int = 1
    offset: int = 0


@dataclass
class Bias:
    """A constant Add reading a layer's output directly (through Q/DQ at most): the layer's bias
    as converters write it (MatMul + Add, Conv without bias + Add). `const` is the constant input;
    it broadcasts one value per channel (or one scalar) along the channel axis, which is
    `from_end` axes before the last one of the Add's output."""

    node: onnx.NodeProto
    index: int          # which input of the Add is the constant
    from_end: int
    reshape: onnx.NodeProto | None = None   # a Reshape / Unsqueeze of a 1-D constant [C] (Paddle2ONNX)

    @property
    def const(self) -> str:
        return self.reshape.input[0] if self.reshape is not None else self.node.input[self.index]

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]


@dataclass
class Writer:
    """A layer writing into the traced channels, with its bias Adds and the BatchNorms between it
    and the first residual Add."""

    layer: Layer
    batchnorms: list[onnx.NodeProto] = field(default_factory=list)
    depthwise: list[onnx.NodeProto] = field(default_factory=list)   # depthwise Convs after it, in order
    depthwise_batchnorms: list[onnx.NodeProto] = field(default_factory=list)  # BatchNorms after one
    biases: list[Bias] = field(default_factory=list)


@dataclass
class Gate:
    """The excitation layer of a squeeze-excitation block on the traced channels: y = x * gate,
    gate = Sigmoid/HardSigmoid(layer(...GlobalAveragePool(x))) of shape [N, C, 1, 1]. Its output
    rows (and bias) follow x's channels (same index map, no scale); `reshapes` are Reshape nodes
    between it and the Mul whose target holds C."""

    layer: Layer
    mul: onnx.NodeProto
    biases: list[Bias] = field(default_factory=list)
    reshapes: list[onnx.NodeProto] = field(default_factory=list)


@dataclass
class Flow:
    layer: Layer
    channels: int
    batchnorms: list[onnx.NodeProto] = field(default_factory=list)   # the traced layer's own
    consumers: list[Consumer] = field(default_factory=list)
    reshapes: list[tuple[onnx.NodeProto, int]] = field(default_factory=list)  # (Reshape, flat size before)
    homogeneous: bool = True        # only positively homogeneous ops between layer and consumers
    ops: list[str] = field(default_factory=list)
    blocked: str | None = None      # why the trace could not be completed (None = complete)
    writers: list[Writer] = field(default_factory=list)   # every layer writing these channels, traced one first
    stream_batchnorms: list[onnx.NodeProto] = field(default_factory=list)  # BatchNorms after an Add
    residual: list[str] = field(default_factory=list)     # the Adds joining the stream
    depthwise: list[onnx.NodeProto] = field(default_factory=list)   # the traced layer's own (Writer.depthwise)
    depthwise_batchnorms: list[onnx.NodeProto] = field(default_factory=list)
    stream_depthwise: list[onnx.NodeProto] = field(default_factory=list)   # depthwise Convs after an Add
    gates: list[Gate] = field(default_factory=list)       # squeeze-excitation gates on the channels
    last_axis: bool = False         # channels on the last axis of a rank > 2 tensor (MatMul on [B, T, C])
    heads: int = 0                  # > 0: the channels pass multi-head attention as values (H heads of
                                    # C / H channels; a channel moves only within its head)

    @property
    def group(self) -> list[Layer]:
        return [w.layer for w in self.writers]


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.consts = constant_tensors(model)
        self.producer: dict[str, tuple[int, onnx.NodeProto]] = {}
        self.consumers: dict[str, list[tuple[int, onnx.NodeProto, int]]] = {}
        for i, n in enumerate(model.graph.node):
            for o in n.output:
                self.producer[o] = (i, n)
            for j, t in enumerate(n.input):
                if t:
                    self.consumers.setdefault(t, []).append((i, n, j))
        self.outputs = {o.name for o in model.graph.output}
        self._shapes: dict[str, list[int | None]] | None = None

    def shape(self, name: str) -> list[int | None] | None:
        if self._shapes is None:
            self._shapes = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model)
            except Exception:  # shape inference is best effort on foreign graphs
                inferred = self.model
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                t = vi.type.tensor_type
                if t.HasField("shape"):
                    self._shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        return self._shapes.get(name)

    def value(self, name: str) -> np.ndarray | None:
        t = self.consts.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def is_const(self, name: str) -> bool:
        """A stored constant, or a DequantizeLinear of one (a weight of a QDQ model)."""
        if name in self.consts:
            return True
        p = self.producer.get(name)
        return p is not None and p[1].op_type == "DequantizeLinear" and p[1].input[0] in self.consts

    def dims(self, name: str) -> list[int]:
        if name in self.consts:
            return list(self.consts[name].dims)
        return list(self.consts[self.producer[name][1].input[0]].dims)


def _layer_of(g: _Graph, i: int, n: onnx.NodeProto) -> Layer | None:
    if n.op_type not in _LAYER_OPS or len(n.input) < 2 or not g.is_const(n.input[1]):
        return None
    dims = g.dims(n.input[1])
    bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
    if n.op_type == "Conv":
        if int(_attr(n, "group", 1)) != 1 or len(dims) < 3:
            return None
        return Layer(n, i, n.input[1], bias, 0, 1)
    if len(dims) != 2:
        return None
    if n.op_type == "Gemm":
        if int(_attr(n, "transA", 0)):
            return None
        return Layer(n, i, n.input[1], bias, *((0, 1) if int(_attr(n, "transB", 0)) else (1, 0)))
    return Layer(n, i, n.input[1], None, 1, 0)


def _is_depthwise(g: _Graph, n: onnx.NodeProto) -> bool:
    """A Conv with group == its channels, weight [C, 1, k..] (multiplier 1), constant weight and bias."""
    return n.op_type == "Conv" and _depthwise_refusal(g, n) is None


def _depthwise_refusal(g: _Graph, n: onnx.NodeProto, channels: int | None = None) -> str | None:
    """Why the grouped Conv `n` cannot be traced as a per-channel op (None: it can)."""
    group = int(_attr(n, "group", 1))
    name = n.name or n.output[0]
    if len(n.input) < 2 or not g.is_const(n.input[1]):
        return f"depthwise Conv {name} has a non-constant weight"
    dims = g.dims(n.input[1])
    if len(dims) < 3 or group < 2:
        return f"Conv {name} is not a depthwise conv"
    if int(dims[1]) != 1:
        return (f"grouped Conv {name} (group {group}, {dims[1]} input channels per group) mixes channels "
                f"within its groups")
    if int(dims[0]) != group:
        return f"depthwise Conv {name} has channel multiplier {int(dims[0]) // group} (only 1 is traced)"
    if len(n.input) > 2 and n.input[2] and not g.is_const(n.input[2]):
        return f"depthwise Conv {name} has a non-constant bias"
    if channels is not None and group != channels:
        return f"depthwise Conv {name} reads {group} channels, the traced layer writes {channels}"
    return None


def layers(model: onnx.ModelProto, g: _Graph | None = None) -> list[Layer]:
    """Every Conv / Gemm / MatMul of the main graph with a constant float weight, in graph order."""
    g = g or _Graph(model)
    out = []
    for i, n in enumerate(model.graph.node):
        lay = _layer_of(g, i, n)
        if lay is not None:
            out.append(lay)
    return out


def _reduce_axes(g: _Graph, n: onnx.NodeProto) -> list[int] | None:
    axes = _attr(n, "axes")
    if axes is None and len(n.input) > 1 and n.input[1]:
        v = g.value(n.input[1])
        axes = None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]
    return None if axes is None else list(axes)


_QDQ = ("QuantizeLinear", "DequantizeLinear")
# ops whose meaning depends on which axis holds the channels (axis 1 here)
_AXIS_OPS = frozenset({"BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                       "ReduceMean", "ReduceMax", "Flatten", "Reshape", "Concat", "Mul"})
_GATE_ACT = ("Sigmoid", "HardSigmoid")
_GATE_PASS = ("Identity", "QuantizeLinear", "DequantizeLinear", "Unsqueeze", "Reshape")
_SQUEEZE_PASS = HOMOGENEOUS | ELEMENTWISE | {"Flatten", "Reshape", "Squeeze", "QuantizeLinear", "DequantizeLinear",
                                             "BatchNormalization"}


def _out_rank(g: _Graph, lay: Layer) -> int | None:
    """Rank of a layer's output (None: unknown)."""
    if lay.op == "Conv":
        return len(g.dims(lay.weight))
    if lay.op == "Gemm":
        return 2
    s = g.shape(lay.node.output[0]) or g.shape(lay.node.input[0])
    return None if s is None else len(s)


def _reshaped_const(g: _Graph, x: str) -> onnx.NodeProto | None:
    """The Reshape / Unsqueeze producing x from a stored constant and constant shape or axes."""
    p = g.producer.get(x)
    if p is None or p[1].op_type not in ("Reshape", "Unsqueeze"):
        return None
    n = p[1]
    if n.input[0] not in g.consts or any(not g.is_const(y) for y in n.input[1:] if y):
        return None
    return n


def _const_operand(g: _Graph, n: onnx.NodeProto) -> tuple[str, str] | None:
    """(constant, other) of a two-input Add with exactly one constant operand (a stored constant,
    a DequantizeLinear of one, or a constant reshaped by a constant shape)."""
    ins = [x for x in n.input if x]
    if n.op_type != "Add" or len(ins) != 2:
        return None
    a, b = (g.is_const(x) or _reshaped_const(g, x) is not None for x in ins)
    if a == b:
        return None
    return (ins[0], ins[1]) if a else (ins[1], ins[0])


def _reads_directly(g: _Graph, t: str, outs) -> bool:
    """t is one of `outs` or reaches one through QuantizeLinear / DequantizeLinear only."""
    for _ in range(8):
        if t in outs:
            return True
        p = g.producer.get(t)
        if p is None or p[1].op_type not in _QDQ:
            return False
        t = p[1].input[0]
    return False


def _bias(g: _Graph, n: onnx.NodeProto, t: str, channels: int, rank: int | None, last_axis: bool,
          outs) -> tuple[Bias | None, str]:
    """(Bias, "") when Add n adds to t, a layer output in `outs` read directly, a constant with one
    value per channel (or one scalar) along the channel axis; else (None, why not)."""
    co = _const_operand(g, n)
    if co is None or co[1] != t:
        return None, "not a two-input Add of the channels and one constant"
    if not _reads_directly(g, t, outs):
        return None, "it is not directly after the layer"
    if rank is None:
        return None, f"cannot infer the rank of {t!r}"
    from_end = 0 if last_axis else rank - 2
    reshape = None if g.is_const(co[0]) else _reshaped_const(g, co[0])
    if reshape is not None:
        src = list(g.consts[reshape.input[0]].dims)
        dims = g.shape(co[0])
        if len(src) != 1 or src[0] != channels or dims is None or None in dims:
            return None, f"the reshaped constant {src} is not one value per channel"
    else:
        dims = g.dims(co[0])
    if len(dims) > rank:
        return None, f"the constant {list(dims)} has more axes than the channels' tensor (rank {rank})"
    for i, d in enumerate(dims):
        pos = len(dims) - 1 - i
        if not (d == 1 or (pos == from_end and d == channels)):
            return None, (f"the constant {list(dims)} does not broadcast one value per channel along "
                          f"axis {rank - 1 - from_end} ({channels} channels)")
    return Bias(n, list(n.input).index(co[0]), from_end, reshape), ""


def _se_gate(g: _Graph, mul: onnx.NodeProto, x: str, channels: int, rank: int | None) -> tuple[Gate | None, str]:
    """(Gate, "") when Mul `mul` multiplies x by a squeeze-excitation gate computed from x alone:
    x -> GlobalAveragePool / ReduceMean -> layer(s) and per-channel ops -> a layer with `channels`
    outputs (its bias Add) -> Sigmoid / HardSigmoid, shape [N, channels, 1, ...]; else (None, why)."""
    ins = [y for y in mul.input if y]
    if len(ins) != 2 or x not in ins or ins[0] == ins[1]:
        return None, "not a product of the channels and one other tensor"
    t = ins[1] if ins[0] == x else ins[0]
    if g.is_const(t):
        return None, "a constant factor"
    gs = g.shape(t)
    if rank is None or gs is None or len(gs) != rank or gs[1] != channels or any(d != 1 for d in gs[2:]):
        return None, f"the other factor is not of shape [N, {channels}, 1, ...]"
    act, adds, reshapes, fc2 = False, [], [], None
    for _ in range(16):
        if len([c for c in g.consumers.get(t, []) if c[1].op_type not in ("Shape", "Size")]) != 1:
            return None, f"{t!r} on the gate's path has other readers"
        p = g.producer.get(t)
        if p is None:
            return None, "the other factor is not computed from the channels"
        i, n = p
        lay = _layer_of(g, i, n)
        if lay is not None:
            fc2 = lay
            break
        if n.op_type in _GATE_ACT:
            act = True
        elif n.op_type == "Reshape":
            reshapes.append(n)
        elif n.op_type == "Add" and _const_operand(g, n) is not None:
            adds.append(n)
            t = _const_operand(g, n)[1]
            continue
        elif n.op_type not in _GATE_PASS:
            return None, f"{n.op_type} {n.name} on the gate's path"
        t = n.input[0]
    if fc2 is None or not act:
        return None, "no Sigmoid / HardSigmoid after the gate's layer"
    if int(g.dims(fc2.weight)[fc2.out_axis]) != channels:
        return None, f"the gate's layer {fc2.name} has {g.dims(fc2.weight)[fc2.out_axis]} outputs, not {channels}"
    biases = []
    frank = _out_rank(g, fc2)
    for a in adds:
        b, why = _bias(g, a, _const_operand(g, a)[1], channels, frank, False, {fc2.node.output[0]})
        if b is None:
            return None, f"Add {a.name} on the gate's path: {why}"
        biases.append(b)
    s = fc2.node.input[0]
    for _ in range(32):
        p = g.producer.get(s)
        if p is None:
            return None, "the gate is not computed from the channels"
        i, n = p
        if n.op_type in ("GlobalAveragePool", "ReduceMean"):
            if n.op_type == "ReduceMean":
                axes = _reduce_axes(g, n)
                if axes is None or sorted(a % rank for a in axes) != list(range(2, rank)):
                    return None, f"ReduceMean {n.name} does not pool over the spatial axes"
            if not _reads_directly(g, n.input[0], {x}):
                return None, "the gate is computed from another tensor"
            return Gate(fc2, mul, biases, reshapes), ""
        if _layer_of(g, i, n) is not None or n.op_type in _SQUEEZE_PASS:
            s = n.input[0]
        elif _const_operand(g, n) is not None:
            s = _const_operand(g, n)[1]
        else:
            return None, f"{n.op_type} {n.name} between the pooling and the gate's layer"
    return None, "the gate's path is too long"


def _se_operand(g: _Graph, mul: onnx.NodeProto, channels: int, rank: int | None) -> str | None:
    """The gated operand x of a squeeze-excitation Mul (None: not one)."""
    for x in mul.input:
        if x and _se_gate(g, mul, x, channels, rank)[0] is not None:
            return x
    return None


def trace(model: onnx.ModelProto, layer: Layer, g: _Graph | None = None) -> Flow:
    """Follow `layer`'s output channels to the layers that read them.

    Through a residual Add (or Sum) the channels are one stream with the Add's other
    inputs: the trace walks those back to every layer writing into the stream
    (`Flow.writers`, the traced layer first, each with its bias Adds and the BatchNorms
    between it and the first Add) and forward from every tensor of the stream to its readers.
    A constant Add right after a writer is its bias (`Writer.biases`); a squeeze-excitation
    Mul on the channels passes them, its excitation layer listed in `Flow.gates`."""
    g = g or _Graph(model)
    C = int(g.dims(layer.weight)[layer.out_axis])
    flow = Flow(layer, C)
    flow.writers.append(Writer(layer))
    rank = _out_rank(g, layer)
    flow.last_axis = layer.op == "MatMul" and rank is not None and rank > 2
    writer_nodes = {layer.node.output[0]: layer}
    # (tensor, spatial block size, channel offset, in the stream: walk back to its producer too)
    frontier = [(layer.node.output[0], 1, 0, True)]
    seen = set()
    seen_nodes: set[tuple[int, int]] = set()
    bns: list[tuple[int, onnx.NodeProto]] = []
    dws: list[tuple[int, onnx.NodeProto]] = []
    biases: dict[int, Bias] = {}

    def axis_issue(op: str, n: onnx.NodeProto) -> str | None:
        if flow.last_axis:
            return (f"the channels of {layer.name} are the last axis of a rank-{rank} tensor; {op} {n.name} "
                    f"works on axis 1")
        if layer.op == "MatMul" and rank is None:
            return f"cannot infer the rank of {layer.name}'s output (its channel axis) before {op} {n.name}"
        return None

    while frontier:
        t, spatial, offset, stream = frontier.pop()
        if (t, offset) in seen:
            continue
        seen.add((t, offset))
        if t in g.outputs:
            flow.blocked = f"channels of {layer.name} reach the graph output {t!r}"
            return flow
        if stream and t not in writer_nodes:
            p = g.producer.get(t)
            if p is None:
                flow.blocked = (f"the residual stream of {layer.name} starts at the graph input {t!r} "
                                f"(its channels cannot be rewritten)")
                return flow
            i, n = p
            lay = _layer_of(g, i, n)
            if lay is not None:
                r2 = _out_rank(g, lay)
                if (lay.op == "MatMul" and r2 is not None and r2 > 2) != flow.last_axis:
                    flow.blocked = (f"{lay.name} writes into the stream of {layer.name} along another "
                                    f"channel axis")
                    return flow
                writer_nodes[t] = lay
                flow.writers.append(Writer(lay))
            elif n.op_type in _REGION_OPS and _region_source(g, t) is not None:
                frontier.append((_region_source(g, t), 1, 0, True))   # an activation of several nodes
            elif n.op_type == "Add" and _const_operand(g, n) is not None:
                frontier.append((_const_operand(g, n)[1], 1, 0, True))   # a bias: checked going forward
            elif n.op_type == "Mul" and not flow.last_axis and _se_operand(g, n, C, rank) is not None:
                frontier.append((_se_operand(g, n, C, rank), 1, 0, True))
            elif n.op_type in ("Add", "Sum") or n.op_type in _PER_CHANNEL_BACK or _is_depthwise(g, n):
                ins = n.input if n.op_type in ("Add", "Sum") else n.input[:1]
                for x in ins:
                    frontier.append((x, 1, 0, True))
            else:
                flow.blocked = (f"the residual stream of {layer.name} is written by {n.op_type} {n.name}, "
                                f"which the trace does not rewrite")
                return flow
        for i, n, j in g.consumers.get(t, []):
            op = n.op_type
            if op in ("Shape", "Size") or (op == "CastLike" and j == 1):
                continue  # reads only the tensor's shape or type
            if (i, offset) in seen_nodes:
                continue
            seen_nodes.add((i, offset))
            flow.ops.append(op)
            reg = _elementwise_region(g, t) if op in _REGION_OPS else None
            if reg is not None and i in reg[0]:   # an activation written as several nodes
                seen_nodes.update((k, offset) for k in reg[0])
                flow.ops.extend(sorted({m.op_type for m in reg[0].values()} - {op}))
                flow.homogeneous = False
                frontier.append((reg[1], spatial, offset, stream))
                continue
            lay = _layer_of(g, i, n)
            if lay is not None and j == 0:
                if op == "Conv" and spatial != 1:
                    flow.blocked = f"{lay.name} reads flattened channels of {layer.name}"
                    return flow
                if op == "Conv" and axis_issue(op, n):
                    flow.blocked = axis_issue(op, n)
                    return flow
                if op == "MatMul" and not flow.last_axis:
                    shp = g.shape(t)
                    if shp is None or len(shp) != 2:
                        flow.blocked = (f"MatMul {lay.name} reads the last axis of {t!r}, which does not "
                                        f"hold the channels of {layer.name}" if shp else
                                        f"cannot infer the rank of {t!r} read by MatMul {lay.name}")
                        return flow
                flow.consumers.append(Consumer(lay, spatial, offset))
                continue
            if flow.last_axis and op in ("ReduceMean", "ReduceMax") and j == 0 and spatial == 1:
                axes, shp = _reduce_axes(g, n), g.shape(t)
                rk = len(shp) if shp else None
                if axes is None or rk is None or any(a % rk in (0, rk - 1) for a in axes):
                    flow.blocked = f"{op} {n.name} does not reduce over the axes between batch and channels only"
                    return flow
                frontier.append((n.output[0], 1, offset, False))   # the channels stay on the last axis
                continue
            if flow.last_axis and op == "Reshape" and j == 0 and spatial == 1 and offset == 0:
                att = _attention_values(g, n, C)
                if att is not None:   # the values of multi-head attention: per channel, within its head
                    flow.heads = att[1]
                    flow.ops.extend(["Transpose", "MatMul", "Transpose", "Reshape"])
                    frontier.append((att[0], 1, 0, False))
                    continue
            if op in _AXIS_OPS and axis_issue(op, n):
                flow.blocked = axis_issue(op, n)
                return flow
            if op == "Conv" and j == 0 and int(_attr(n, "group", 1)) != 1:
                why = _depthwise_refusal(g, n, C)
                if why is None and (spatial != 1 or offset != 0):
                    why = f"depthwise Conv {n.name} reads the channels of {layer.name} flattened or at an offset"
                if why is not None:
                    flow.blocked = why
                    return flow
                dws.append((i, n))
                frontier.append((n.output[0], spatial, offset, stream))
                continue
            if op == "BatchNormalization" and j == 0 and spatial == 1:
                if any(not g.is_const(x) for x in n.input[1:5]):
                    flow.blocked = f"BatchNormalization {n.name} has non-constant parameters"
                    return flow
                bns.append((i, n))
                frontier.append((n.output[0], spatial, offset, stream))
            elif op in ("QuantizeLinear", "DequantizeLinear") and j == 0:
                frontier.append((n.output[0], spatial, offset, stream))  # activation Q/DQ of a QDQ model
            elif (op in HOMOGENEOUS or op in ELEMENTWISE) and j == 0:
                if op in ELEMENTWISE or (op == "PRelu"):
                    flow.homogeneous = False
                if op.startswith("Global"):
                    frontier.append((n.output[0], 1, offset, stream))
                else:
                    frontier.append((n.output[0], spatial, offset, stream))
            elif op in ("ReduceMean", "ReduceMax") and j == 0 and spatial == 1:
                axes = _reduce_axes(g, n)
                shp = g.shape(t)
                rk = len(shp) if shp else None
                if axes is None or rk is None or any(a % rk in (0, 1) for a in axes):
                    flow.blocked = f"{op} {n.name} does not reduce over spatial axes only"
                    return flow
                keep = int(_attr(n, "keepdims", 1))
                if not keep and sorted(a % rk for a in axes) != list(range(2, rk)):
                    flow.blocked = f"{op} {n.name} drops some but not all spatial axes"
                    return flow
                frontier.append((n.output[0], 1, offset, False))
            elif op in ("Flatten", "Reshape") and j == 0:
                shp = g.shape(t)
                if op == "Flatten" and int(_attr(n, "axis", 1)) != 1:
                    flow.blocked = f"Flatten {n.name} with axis != 1"
                    return flow
                if shp is None or len(shp) < 2 or any(d is None for d in shp[1:]):
                    flow.blocked = f"cannot infer the shape of {t!r} before {op} {n.name}"
                    return flow
                if spatial != 1:
                    flow.blocked = f"{op} {n.name} after flattening"
                    return flow
                sp = int(np.prod(shp[2:])) if len(shp) > 2 else 1
                if op == "Reshape":
                    out = g.shape(n.output[0])
                    if out is None or len(out) != 2:
                        flow.blocked = f"Reshape {n.name} does not flatten to [batch, features]"
                        return flow
                    flow.reshapes.append((n, int(np.prod(shp[1:]))))
                frontier.append((n.output[0], sp, offset * sp, False))
            elif op == "Concat" and spatial == 1 and int(_attr(n, "axis", 1)) == 1:
                off = 0
                for inp in n.input[:j]:
                    s = g.shape(inp)
                    if s is None or len(s) < 2 or s[1] is None:
                        flow.blocked = f"cannot infer the channels of Concat {n.name}'s inputs"
                        return flow
                    off += int(s[1])
                frontier.append((n.output[0], spatial, offset + off, False))
            elif op == "Add" and _const_operand(g, n) is not None:
                b, why = (None, "after a Flatten/Concat") if spatial != 1 or offset else \
                    _bias(g, n, t, C, rank, flow.last_axis, writer_nodes)
                if b is None:
                    flow.blocked = (f"channels of {layer.name} meet a constant in {op} {n.name} "
                                    f"(a bias the trace does not rewrite: {why})")
                    return flow
                biases[i] = b
                frontier.append((n.output[0], spatial, offset, stream))
            elif op in ("Add", "Sum") and spatial == 1 and offset == 0 and stream:
                others = [x for x in n.input if x and x != t]
                if any(g.is_const(x) for x in others):
                    flow.blocked = (f"channels of {layer.name} meet a constant in {op} {n.name} "
                                    f"(a bias the trace does not rewrite)")
                    return flow
                shapes = [g.shape(x) for x in n.input if x]
                if all(s is not None for s in shapes) and any(s != shapes[0] for s in shapes):
                    flow.blocked = f"{op} {n.name} broadcasts its inputs (not a residual join)"
                    return flow
                flow.residual.append(n.name or n.output[0])
                for x in others:
                    frontier.append((x, 1, 0, True))
                frontier.append((n.output[0], 1, 0, True))
            elif op == "Mul" and spatial == 1 and offset == 0:
                gate, why = _se_gate(g, n, t, C, rank)
                if gate is None and _se_input(g, n) not in (None, t):
                    why = ("they are the gate of a squeeze-excitation block: rewritten with the channels "
                           "it gates, not alone")
                if gate is None:
                    flow.blocked = f"channels of {layer.name} meet another branch in {op} {n.name} ({why})"
                    return flow
                if not any(x.mul is n for x in flow.gates):
                    flow.gates.append(gate)
                frontier.append((n.output[0], spatial, offset, stream))
            elif op in ("Add", "Sum", "Sub", "Mul", "Div"):
                flow.blocked = (f"channels of {layer.name} meet another branch in {op} {n.name}"
                                + (" after a Flatten/Concat" if op in ("Add", "Sum", "Mul") else ""))
                return flow
            else:
                flow.blocked = f"channels of {layer.name} go into {op} {n.name}, which the trace does not follow"
                return flow
    for lay in flow.group:
        d = g.dims(lay.weight)
        if int(d[lay.out_axis]) != C:
            flow.blocked = f"{lay.name} writes {d[lay.out_axis]} channels into the stream of {layer.name} ({C})"
            return flow
    # a bias belongs to the writer whose output it reads (through Q/DQ)
    writer_of = {w.layer.node.output[0]: w for w in flow.writers}
    for _, b in sorted(biases.items()):
        x = _const_operand(g, b.node)[1]
        for _ in range(8):
            if x in writer_of:
                writer_of[x].biases.append(b)
                break
            x = g.producer[x][1].input[0]
    # a BatchNorm belongs to the writer it follows (through per-channel ops, before any Add);
    # otherwise it sits on the stream itself
    by_out = {w.layer.node.output[0]: w for w in flow.writers}
    def through(x: str, p) -> str | None:   # bias Adds, SE Muls, activations of several nodes
        if p[0] in biases:
            return _const_operand(g, p[1])[1]
        if any(gt.mul is p[1] for gt in flow.gates):
            return _se_operand(g, p[1], C, rank)
        if p[1].op_type in _REGION_OPS:
            return _region_source(g, x)
        return None

    if dws:
        _assign_depthwise(g, flow, by_out, dws, bns, through)
    for _, bn in sorted(bns, key=lambda x: x[0]):
        x = bn.input[0]
        owner = None
        for _ in range(16):
            if x in by_out:
                owner = by_out[x]
                break
            p = g.producer.get(x)
            if p is not None and p[0] in biases:   # through bias Adds and squeeze-excitation Muls
                x = _const_operand(g, p[1])[1]
                continue
            if p is not None and any(gt.mul is p[1] for gt in flow.gates):
                x = _se_operand(g, p[1], C, rank)
                continue
            if p is None or p[1].op_type not in _PER_CHANNEL_BACK:
                break
            x = p[1].input[0]
        if owner is None:
            flow.stream_batchnorms.append(bn)
        else:
            owner.batchnorms.append(bn)
    flow.batchnorms = list(flow.writers[0].batchnorms)
    flow.depthwise = list(flow.writers[0].depthwise)
    flow.depthwise_batchnorms = list(flow.writers[0].depthwise_batchnorms)
    if not flow.consumers:
        flow.blocked = flow.blocked or f"no layer reads the channels of {layer.name}"
    return flow


def _assign_depthwise(g: _Graph, flow: Flow, by_out: dict, dws: list, bns: list, through=None) -> None:
    """Give each depthwise Conv, and each BatchNorm after one, to the writer it follows (through
    per-channel ops, before any Add), removing those BatchNorms from `bns`; a depthwise Conv that
    follows no single writer (after an Add) sits on the stream."""
    dw_ids = {id(n) for _, n in dws}
    dw_bns = []
    for i, node in sorted(dws + bns, key=lambda x: x[0]):
        x, owner, after = node.input[0], None, id(node) in dw_ids
        for _ in range(64):
            if x in by_out:
                owner = by_out[x]
                break
            p = g.producer.get(x)
            if p is not None and through is not None and through(x, p) is not None:
                x = through(x, p)
                continue
            if p is None or not (p[1].op_type in _PER_CHANNEL_BACK or id(p[1]) in dw_ids):
                break
            after = after or id(p[1]) in dw_ids
            x = p[1].input[0]
        if id(node) in dw_ids:
            if owner is None:
                flow.stream_depthwise.append(node)
            else:
                owner.depthwise.append(node)
        elif after and owner is not None:
            owner.depthwise_batchnorms.append(node)
            dw_bns.append(node)
    ids = {id(b) for b in dw_bns}
    bns[:] = [(i, b) for i, b in bns if id(b) not in ids]


# Elementwise ops that, with scalar constants, build an activation out of several nodes
# (GELU as x * 0.5 * (1 + erf(x / sqrt 2)) or its tanh form, hard-swish as x * relu6(x + 3) / 6,
# swish as x * sigmoid(x), as converters and older opsets write them).
_REGION_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Sigmoid", "Relu", "Clip",
                         "Exp", "Log", "Neg", "Abs", "Max", "Min", "HardSigmoid", "HardSwish", "Softplus",
                         "Gelu", "Elu", "Selu", "LeakyRelu", "Identity", "Reciprocal"})


def _scalar_const(g: _Graph, name: str) -> bool:
    if not g.is_const(name):
        return False
    v = g.value(name)
    return v is not None and np.asarray(v).size == 1


def _elementwise_region(g: _Graph, t: str) -> tuple[dict[int, onnx.NodeProto], str] | None:
    """An activation written as several elementwise nodes on `t`: the nodes reachable from t whose
    inputs are t, their own outputs or scalar constants (so the result is one function applied to
    every value of t alone: it passes a permutation, a copy or a new channel, not a scale), with
    at least one node combining two of them (x * f(x)) and exactly one output leaving the region.
    Returns ({node index: node}, exit tensor) or None."""
    cache = g.__dict__.setdefault("_regions", {})
    if t in cache:
        return cache[t]
    nodes: dict[int, onnx.NodeProto] = {}
    tensors, todo = {t}, [t]
    while todo:
        x = todo.pop()
        for i, n, _ in g.consumers.get(x, []):
            if i in nodes or n.op_type not in _REGION_OPS:
                continue
            ins = [y for y in n.input if y]
            if all(y in tensors or _scalar_const(g, y) for y in ins):
                nodes[i] = n
                for o in n.output:
                    if o and o not in tensors:
                        tensors.add(o)
                        todo.append(o)
    res = None
    if any(sum(1 for y in n.input if y in tensors) >= 2 for n in nodes.values()):
        exits = {o for n in nodes.values() for o in n.output if o and (
            o in g.outputs or any(k not in nodes for k, _, _ in g.consumers.get(o, [])))}
        if len(exits) == 1:
            res = (nodes, exits.pop())
    cache[t] = res
    return res


def _region_source(g: _Graph, exit_tensor: str) -> str | None:
    """The tensor whose elementwise region (see `_elementwise_region`) ends at `exit_tensor`."""
    x, seen = exit_tensor, []
    for _ in range(32):
        p = g.producer.get(x)
        if p is None or p[1].op_type not in _REGION_OPS:
            break
        ins = [y for y in p[1].input if y and not _scalar_const(g, y)]
        if not ins:
            return None
        x = ins[0]
        seen.append(x)
    for cand in seen:
        r = _elementwise_region(g, cand)
        if r is not None and r[1] == exit_tensor:
            return cand
    return None


_BACK = _PER_CHANNEL_BACK


def producer(model: onnx.ModelProto, layer: Layer, g: _Graph | None = None) -> Layer | None:
    """The layer whose output channels are `layer`'s input channels (through BN, activations,
    pooling; Flatten/Reshape for a Gemm after a conv), or None (graph input, residual, ...)."""
    g = g or _Graph(model)
    t = layer.node.input[0]
    for _ in range(16):
        if t not in g.producer:
            return None
        i, n = g.producer[t]
        lay = _layer_of(g, i, n)
        if lay is not None:
            return lay
        att = _attention_back(g, t) if n.op_type == "Reshape" else None
        if att is not None:                     # the merged heads of attention: back to the values
            t = att
            continue
        if n.op_type in _BACK or n.op_type in _SHAPE_BACK or _is_depthwise(g, n):
            t = n.input[0]
            continue
        src = _region_source(g, t) if n.op_type in _REGION_OPS else None
        if src is not None:                     # an activation written as several nodes
            t = src
            continue
        if _const_operand(g, n) is not None:    # a bias Add: right after a layer (through Q/DQ)
            t = _const_operand(g, n)[1]
            while t in g.producer and g.producer[t][1].op_type in _QDQ:
                t = g.producer[t][1].input[0]
            if t not in g.producer or _layer_of(g, *g.producer[t]) is None:
                return None
            continue
        x = _se_input(g, n)
        if x is not None:
            t = x
            continue
        return None
    return None


# Walked back through when looking for the layer whose channels a layer reads (the forward
# trace from that layer then checks that it really reaches the reader, and how).
_SHAPE_BACK = frozenset({"Flatten", "Reshape", "ReduceMean", "ReduceMax", "Squeeze"})


def _only_consumer(g: _Graph, t: str, op: str) -> tuple[onnx.NodeProto, int] | None:
    """The one node reading `t` (through the activation Q/DQ pairs of a quantized model), if it is `op`."""
    for _ in range(4):
        cons = [(n, j) for _, n, j in g.consumers.get(t, []) if n.op_type not in ("Shape", "Size")]
        if len(cons) != 1:
            return None
        if cons[0][0].op_type in _QDQ and cons[0][1] == 0:
            t = cons[0][0].output[0]
            continue
        return cons[0] if cons[0][0].op_type == op else None
    return None


def _producer_skip_qdq(g: _Graph, t: str):
    p = g.producer.get(t)
    while p is not None and p[1].op_type in _QDQ:
        p = g.producer.get(p[1].input[0])
    return p


def _perm(n: onnx.NodeProto) -> list[int]:
    return [int(v) for v in _attr(n, "perm", [])]


def _attention_values(g: _Graph, split: onnx.NodeProto, C: int) -> tuple[str, int] | None:
    """(tensor after the heads are merged again, H) when `split` begins the value path of multi-head
    attention on [B, T, C]: Reshape to [B, T, H, C/H] -> Transpose (0, 2, 1, 3) -> MatMul as the right
    operand (attention weights [B, H, T, T] times values) -> Transpose (0, 2, 1, 3) -> Reshape to
    [B, T, C]. Each output channel is then a mix over tokens of the same value channel only."""
    src, out = g.shape(split.input[0]), g.shape(split.output[0])
    if not src or not out or len(src) != 3 or len(out) != 4 or out[2] is None or out[3] is None:
        return None
    H, d = int(out[2]), int(out[3])
    if H * d != C or src[2] not in (None, C):
        return None
    tr = _only_consumer(g, split.output[0], "Transpose")
    if tr is None or _perm(tr[0]) != [0, 2, 1, 3]:
        return None
    mm = _only_consumer(g, tr[0].output[0], "MatMul")
    if mm is None or mm[1] != 1:
        return None
    tr2 = _only_consumer(g, mm[0].output[0], "Transpose")
    if tr2 is None or _perm(tr2[0]) != [0, 2, 1, 3]:
        return None
    merge = _only_consumer(g, tr2[0].output[0], "Reshape")
    if merge is None:
        return None
    ms = g.shape(merge[0].output[0])
    if not ms or len(ms) != 3 or ms[2] != C:
        return None
    return merge[0].output[0], H


def _attention_back(g: _Graph, t: str) -> str | None:
    """Walking back from the merged heads `t`: the value tensor [B, T, C] before its split (None: `t` is
    not the output of an attention value path)."""
    x, split = t, None
    for op in ("Reshape", "Transpose", "MatMul", "Transpose", "Reshape"):
        p = _producer_skip_qdq(g, x)
        if p is None or p[1].op_type != op:
            return None
        split = p[1]
        x = p[1].input[1] if op == "MatMul" else p[1].input[0]
    C = (g.shape(t) or [None])[-1]
    att = _attention_values(g, split, int(C)) if C is not None else None
    return x if att is not None and att[0] == t else None


def _se_input(g: _Graph, n: onnx.NodeProto) -> str | None:
    """The gated input x of a squeeze-excitation Mul (None: n is not one)."""
    if n.op_type != "Mul":
        return None
    for x in n.input:
        s = g.shape(x) if x else None
        if s and len(s) > 2 and s[1] and _se_gate(g, n, x, int(s[1]), len(s))[0] is not None:
            return x
    return None


def input_flow(model: onnx.ModelProto, layer: Layer, g: _Graph | None = None) -> Flow | None:
    """The flow of the channels `layer` reads: its producer's, or, when it reads a residual
    stream, the flow of a layer writing into that stream (None: graph input, or not traceable)."""
    g = g or _Graph(model)
    p = producer(model, layer, g)
    if p is not None:
        return trace(model, p, g)
    t = layer.node.input[0]
    todo, seen = [t], set()
    while todo:
        t = todo.pop()
        if t in seen or t not in g.producer:
            continue
        seen.add(t)
        i, n = g.producer[t]
        lay = _layer_of(g, i, n)
        if lay is not None:
            f = trace(model, lay, g)
            if f.blocked or not any(c.layer.node is layer.node for c in f.consumers):
                return None
            return f
        if n.op_type in _REGION_OPS and _region_source(g, t) is not None:
            todo.append(_region_source(g, t))
        elif n.op_type in ("Add", "Sum"):
            todo.extend(x for x in n.input if x)
        elif n.op_type in _BACK or n.op_type in _SHAPE_BACK or _is_depthwise(g, n):
            todo.append(n.input[0])
        elif _se_input(g, n) is not None:
            todo.append(_se_input(g, n))
    return None

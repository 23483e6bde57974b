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
Any other op mixing channels of two tensors (Mul, Sub, Div, an Add with a
constant or after a Flatten/Concat), a stream reaching the graph input or
written by anything but a plain layer, ends the trace with a reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["Layer", "Consumer", "Flow", "Writer", "layers", "trace", "producer", "input_flow", "constant_tensors", "HOMOGENEOUS"]

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
class Writer:
    """A layer writing into the traced channels, with the BatchNorms between it and the first Add."""

    layer: Layer
    batchnorms: list[onnx.NodeProto] = field(default_factory=list)
    depthwise: list[onnx.NodeProto] = field(default_factory=list)   # depthwise Convs after it, in order
    depthwise_batchnorms: list[onnx.NodeProto] = field(default_factory=list)  # BatchNorms after one


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


def trace(model: onnx.ModelProto, layer: Layer, g: _Graph | None = None) -> Flow:
    """Follow `layer`'s output channels to the layers that read them.

    Through a residual Add (or Sum) the channels are one stream with the Add's other
    inputs: the trace walks those back to every layer writing into the stream
    (`Flow.writers`, the traced layer first, each with the BatchNorms between it and the
    first Add) and forward from every tensor of the stream to its readers."""
    g = g or _Graph(model)
    C = int(g.dims(layer.weight)[layer.out_axis])
    flow = Flow(layer, C)
    flow.writers.append(Writer(layer))
    writer_nodes = {layer.node.output[0]: layer}
    # (tensor, spatial block size, channel offset, in the stream: walk back to its producer too)
    frontier = [(layer.node.output[0], 1, 0, True)]
    seen = set()
    seen_nodes: set[tuple[int, int]] = set()
    bns: list[tuple[int, onnx.NodeProto]] = []
    dws: list[tuple[int, onnx.NodeProto]] = []
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
                writer_nodes[t] = lay
                flow.writers.append(Writer(lay))
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
            lay = _layer_of(g, i, n)
            if lay is not None and j == 0:
                if op == "Conv" and spatial != 1:
                    flow.blocked = f"{lay.name} reads flattened channels of {layer.name}"
                    return flow
                flow.consumers.append(Consumer(lay, spatial, offset))
                continue
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
                rank = len(shp) if shp else None
                if axes is None or rank is None or any(a % rank in (0, 1) for a in axes):
                    flow.blocked = f"{op} {n.name} does not reduce over spatial axes only"
                    return flow
                keep = int(_attr(n, "keepdims", 1))
                if not keep and sorted(a % rank for a in axes) != list(range(2, rank)):
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
            elif op in ("Add", "Sum", "Sub", "Mul", "Div"):
                flow.blocked = (f"channels of {layer.name} meet another branch in {op} {n.name}"
                                + (" after a Flatten/Concat" if op in ("Add", "Sum") else ""))
                return flow
            else:
                flow.blocked = f"channels of {layer.name} go into {op} {n.name}, which the trace does not follow"
                return flow
    for lay in flow.group:
        d = g.dims(lay.weight)
        if int(d[lay.out_axis]) != C:
            flow.blocked = f"{lay.name} writes {d[lay.out_axis]} channels into the stream of {layer.name} ({C})"
            return flow
    # a BatchNorm belongs to the writer it follows (through per-channel ops, before any Add);
    # otherwise it sits on the stream itself
    by_out = {w.layer.node.output[0]: w for w in flow.writers}
    if dws:
        _assign_depthwise(g, flow, by_out, dws, bns)
    for _, bn in sorted(bns, key=lambda x: x[0]):
        x = bn.input[0]
        owner = None
        for _ in range(16):
            if x in by_out:
                owner = by_out[x]
                break
            p = g.producer.get(x)
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


def _assign_depthwise(g: _Graph, flow: Flow, by_out: dict, dws: list, bns: list) -> None:
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
        if n.op_type in _BACK or n.op_type in _SHAPE_BACK or _is_depthwise(g, n):
            t = n.input[0]
            continue
        return None
    return None


# Walked back through when looking for the layer whose channels a layer reads (the forward
# trace from that layer then checks that it really reaches the reader, and how).
_SHAPE_BACK = frozenset({"Flatten", "Reshape", "ReduceMean", "ReduceMax", "Squeeze"})


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
        if n.op_type in ("Add", "Sum"):
            todo.extend(x for x in n.input if x)
        elif n.op_type in _BACK or n.op_type in _SHAPE_BACK or _is_depthwise(g, n):
            todo.append(n.input[0])
    return None

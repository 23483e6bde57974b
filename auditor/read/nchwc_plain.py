"""An ORT_ENABLE_ALL graph (onnxruntime's NCHWc nodes) written back as the plain NCHW graph it computes.

The channel trace (auditor.read.channels) and what builds on it (neuron cleaning in
auditor.forensics.canon, alignment and provenance) follow channels through standard ONNX ops. In a
file onnxruntime saved at ORT_ENABLE_ALL the Convs are `com.microsoft.nchwc:Conv` with blocked,
zero-padded weights, a residual Add fused in as the Conv's fourth input (`Sum`) and the activation as
an attribute, and the tensors between them are blocked (ReorderInput / ReorderOutput around them,
NCHWc MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, Upsample on them). Every one of these
has a plain meaning in NCHW:

* ``Conv(X, W, B, Sum)`` with ``activation``: ``act(Conv(X, W, B) + Sum)`` (MLAS adds Sum before the
  activation), W the weight unblocked to OIHW with the padding dropped (auditor.read.blocked, read by
  the WeightStore), B its first O values;
* ``ReorderInput`` / ``ReorderOutput``: the identity on NCHW values (a Transpose when
  ``channels_last``);
* the NCHWc pooling ops: the ONNX ops of the same name and attributes; ``Upsample``: ``Resize``.

`plain_model(store, block)` writes that graph for one block-size reading (a file where both 8 and 16
fit every Conv has two readings, `readings(store)`), with the unblocked weights as initializers under
the graph tensors' names, and the map from those names to the store's weight names.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from auditor.errors import AuditError
from auditor.read import blocked

__all__ = ["has_nchwc", "readings", "plain_model"]

_MS = "com.microsoft"
_POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
# MLAS's fused activations (onnxruntime's nchwc Conv `activation`) and their parameters
_ACTIVATIONS = {"Relu": (), "Sigmoid": (), "Tanh": (), "LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta")}


def has_nchwc(model: onnx.ModelProto) -> bool:
    """NCHWc nodes, or com.microsoft FusedConv / FusedGemm (a layer with its activation fused:
    ORT_ENABLE_EXTENDED, and the layers ORT_ENABLE_ALL does not block)."""
    return any(n.domain == blocked.NCHWC_DOMAIN or (n.domain == _MS and n.op_type in ("FusedConv", "FusedGemm"))
               for n in model.graph.node)


def readings(store) -> list[int]:
    """The NCHWc block sizes under which the store read every blocked Conv (empty: none blocked)."""
    found = set()
    for w in store.weights:
        if w.layout and w.layout.startswith("nchwc(block="):
            found.add(int(w.layout[len("nchwc(block="):].split(",")[0]))
    return sorted(found)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def plain_model(store, block: int | None) -> tuple[onnx.ModelProto, dict[str, str], dict[str, np.ndarray]]:
    """(plain NCHW model, {graph tensor name of each unblocked weight: store weight name}, {graph tensor
    name: weight with the channel padding the store could not drop dropped}) for the reading with NCHWc
    block `block` (None: a file with FusedConv only). AuditError (one line) for an NCHWc node the
    store could not read (this reading's padding not zero included) or a node of that domain with no
    plain meaning here.

    Where a residual stream's channels are not a multiple of the block, onnxruntime pads every Conv
    writing into it and the input channels of every Conv reading it, and states the true count only
    where the stream leaves the blocked region (ReorderOutput's `channels`) or at one writer: the
    count is carried along the stream (Sum inputs, Adds, activations, pooling), and the padding
    (zero rows and bias, and the input columns that read the zero channels) dropped."""
    model = store.model
    conv_weight: dict[str, str] = {}     # NCHWc Conv / FusedConv node name -> the store's weight (this reading)
    for w in store.weights:
        if w.layout and w.layout.startswith(f"nchwc(block={block},"):
            for op, nname, idx in w.uses:
                conv_weight[nname] = w.name
        elif not (w.layout or "").startswith("nchwc"):
            for op, nname, idx in w.uses:
                if op == "FusedConv" and idx == 1:
                    conv_weight[nname] = w.name
    inits = {t.name: t for t in model.graph.initializer}
    replaced: dict[str, onnx.TensorProto] = {}
    alias: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    convs: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []   # (plain Conv, the NCHWc Conv it came from)
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}#{i}"
        if node.domain == _MS and node.op_type == "FusedConv":
            nodes.extend(_conv(store, node, name, conv_weight.get(name), inits, replaced, alias, relaid=False))
            continue
        if node.domain == _MS and node.op_type == "FusedGemm":
            nodes.extend(_fused_gemm(node, name))
            continue
        if node.domain != blocked.NCHWC_DOMAIN:
            nodes.append(node)
            continue
        op = node.op_type
        if op == "Conv":
            first = len(nodes)
            nodes.extend(_conv(store, node, name, conv_weight.get(name), inits, replaced, alias))
            convs.append((nodes[first], node))   # _conv gives the Conv first
        elif op in ("ReorderInput", "ReorderOutput"):
            if int(_attr(node, "channels_last", 0)):
                perm = [0, 3, 1, 2] if op == "ReorderInput" else [0, 2, 3, 1]
                nodes.append(helper.make_node("Transpose", [node.input[0]], [node.output[0]], name=name, perm=perm))
            else:
                nodes.append(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=name))
        elif op in _POOLS:
            n = helper.make_node(op, list(node.input), list(node.output), name=name)
            n.attribute.extend(node.attribute)
            nodes.append(n)
        elif op == "Upsample":
            # onnxruntime's NCHWc Upsample: integer `scales` over all four axes, `mode` nearest (asymmetric
            # coordinates, floor) or linear with the Resize's `coordinate_transformation_mode`
            scales = [float(x) for x in (_attr(node, "scales") or [])]
            scales = ([1.0, 1.0] + scales) if len(scales) == 2 else scales
            mode = _attr(node, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            ctm = _attr(node, "coordinate_transformation_mode", b"asymmetric")
            ctm = ctm.decode() if isinstance(ctm, bytes) else str(ctm)
            if len(scales) != 4 or mode not in ("nearest", "linear"):
                raise AuditError(f"{blocked.NCHWC_DOMAIN}:Upsample node {name!r}: scales {scales} / mode {mode!r} "
                                 "are not what onnxruntime writes")
            sname = f"{name}/scales"
            replaced[sname] = numpy_helper.from_array(np.array(scales, np.float32), sname)
            attrs = {"mode": mode, "coordinate_transformation_mode": ctm}
            if mode == "nearest":
                attrs["nearest_mode"] = "floor"
            nodes.append(helper.make_node("Resize", [node.input[0], "", sname], [node.output[0]], name=name, **attrs))
        else:
            raise AuditError(f"{blocked.NCHWC_DOMAIN}:{op} node {name!r} has no plain NCHW meaning known here; "
                             "give the file onnxruntime started from (before ORT_ENABLE_ALL)")
    trimmed = _drop_stream_padding(model, nodes, convs, replaced)
    kept = [replaced.pop(t.name, t) for t in model.graph.initializer]
    graph = helper.make_graph(nodes, model.graph.name, list(model.graph.input), list(model.graph.output),
                              kept + list(replaced.values()))
    opsets = [o for o in model.opset_import if o.domain != blocked.NCHWC_DOMAIN]
    default = next((o for o in opsets if o.domain in ("", "ai.onnx")), None)
    if default is not None and default.version < 11:
        default.version = 11
    out = helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version,
                            producer_name=model.producer_name, producer_version=model.producer_version)
    return out, alias, trimmed


# ops that keep their input's channels (in a blocked region: the same padded channels)
_SAME_CHANNELS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "Clip", "Identity", "MaxPool",
                            "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Resize"})


def _drop_stream_padding(model, nodes, convs, replaced) -> dict[str, np.ndarray]:
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        while parent.get(t, t) != t:
            t = parent[t]
        return t

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb

    consts = {t.name for t in model.graph.initializer} | set(replaced)
    for n in nodes:
        if n.op_type in _SAME_CHANNELS and n.input and n.input[0]:
            union(n.input[0], n.output[0])
        elif n.op_type in ("Add", "Sum") and not any(i in consts for i in n.input):
            for i in n.input:
                union(i, n.output[0])
    known: dict[str, int] = {}

    def state(t: str, c: int) -> None:
        r = find(t)
        known[r] = min(known.get(r, c), c)

    for n in model.graph.node:
        if n.domain == blocked.NCHWC_DOMAIN and n.op_type == "ReorderOutput" and _attr(n, "channels"):
            state(n.input[0], int(_attr(n, "channels")))
    arrays = {name: numpy_helper.to_array(t) for name, t in replaced.items()}
    for conv, orig in convs:
        w = arrays[conv.input[1]]
        stored = next((t for t in model.graph.initializer if t.name == orig.input[1]), None)
        if stored is not None and w.shape[0] < stored.dims[0]:
            state(conv.output[0], int(w.shape[0]))   # the store dropped this Conv's padding: its true count
    trimmed: dict[str, np.ndarray] = {}
    for conv, orig in convs:
        wt = conv.input[1]
        w = arrays[wt]
        group = int(_attr(conv, "group", 1))
        C = known.get(find(conv.output[0]))
        if C is not None and C < w.shape[0]:
            b = arrays.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
            if np.any(w[C:]) or (b is not None and np.any(b[C:])):
                raise AuditError(f"NCHWc Conv {conv.name!r}: the channels past the stream's {C} are not zero; "
                                 "not onnxruntime's padding")
            w = w[:C]
            if b is not None:
                trimmed[conv.input[2]] = np.ascontiguousarray(b[:C])
                replaced[conv.input[2]] = numpy_helper.from_array(trimmed[conv.input[2]], conv.input[2])
            if group > 1:
                for a in conv.attribute:
                    if a.name == "group":
                        a.i = C
                group = C
        Cin = known.get(find(conv.input[0]))
        if group == 1 and Cin is not None and Cin < w.shape[1]:
            w = w[:, :Cin]   # the input columns that read the stream's zero padding
        if w.shape != arrays[wt].shape:
            w = np.ascontiguousarray(w)
            replaced[wt] = numpy_helper.from_array(w, wt)
            trimmed[wt] = w
    return trimmed


def _fused_gemm(node, name) -> list[onnx.NodeProto]:
    """com.microsoft FusedGemm: Gemm, then its activation (parameters activation_alpha / _beta)."""
    act = _attr(node, "activation")
    act = act.decode() if isinstance(act, bytes) else act
    attrs = [a for a in node.attribute if not a.name.startswith("activation")]
    if act is None:
        g = helper.make_node("Gemm", list(node.input), list(node.output), name=name)
        g.attribute.extend(attrs)
        return [g]
    if act not in _ACTIVATIONS:
        raise AuditError(f"{node.domain}:FusedGemm {name!r}: fused activation {act!r} is not read here")
    y = f"{name}/gemm"
    g = helper.make_node("Gemm", list(node.input), [y], name=name)
    g.attribute.extend(attrs)
    kw = {p: float(_attr(node, f"activation_{p}")) for p in _ACTIVATIONS[act] if _attr(node, f"activation_{p}") is not None}
    return [g, helper.make_node(act, [y], list(node.output), name=f"{name}/{act}", **kw)]


def _conv(store, node, name, wname, inits, replaced, alias, relaid: bool = True) -> list[onnx.NodeProto]:
    what = f"{node.domain}:{node.op_type} {name!r}"
    if wname is None:
        why = next((u["reason"] for u in getattr(store, "unreadable", []) if u["node"] == name), None)
        raise AuditError(f"{what}: its weight was not read" + (f" ({why})" if why else "")
                         + "; give the file onnxruntime started from (before ORT_ENABLE_ALL)")
    act = _attr(node, "activation")
    act = act.decode() if isinstance(act, bytes) else act
    if act is not None and act not in _ACTIVATIONS and act != "Clip":
        raise AuditError(f"{what}: fused activation {act!r} is not one MLAS applies")
    wt = node.input[1]
    w = store.array(wname)
    O = int(w.shape[0])
    alias[wt] = wname
    ins = [node.input[0], wt]
    if relaid:
        if wt not in inits:
            raise AuditError(f"{what}: its weight {wt!r} is not an initializer of the file")
        replaced[wt] = numpy_helper.from_array(np.asarray(w, np.float32), wt)
    if len(node.input) > 2 and node.input[2] and relaid:
        bt = node.input[2]
        if bt in store:
            b = store.array(bt)
        elif bt in inits:
            b = numpy_helper.to_array(inits[bt])
        else:
            raise AuditError(f"NCHWc Conv {name!r}: its bias {bt!r} is not a constant of the file")
        replaced[bt] = numpy_helper.from_array(np.asarray(b, np.float32).reshape(-1)[:O].copy(), bt)
        ins.append(bt)
    elif len(node.input) > 2 and node.input[2]:
        ins.append(node.input[2])
    attrs = [a for a in node.attribute if a.name not in ("activation", "activation_params")]
    out = node.output[0]
    has_sum = len(node.input) > 3 and node.input[3]
    y = out if not (has_sum or act) else f"{name}/conv"
    conv = helper.make_node("Conv", ins, [y], name=name)
    conv.attribute.extend(attrs)
    nodes = [conv]
    if has_sum:
        s = out if not act else f"{name}/sum"
        nodes.append(helper.make_node("Add", [y, node.input[3]], [s], name=f"{name}/Sum"))
        y = s
    if act:
        params = [float(p) for p in (_attr(node, "activation_params") or [])]
        if act == "Clip":
            lo, hi = (params + [-np.inf, np.inf])[:2] if len(params) >= 2 else (-np.inf, np.inf)
            lo_t, hi_t = f"{name}/clip_min", f"{name}/clip_max"
            replaced[lo_t] = numpy_helper.from_array(np.array(lo, np.float32), lo_t)
            replaced[hi_t] = numpy_helper.from_array(np.array(hi, np.float32), hi_t)
            nodes.append(helper.make_node("Clip", [y, lo_t, hi_t], [out], name=f"{name}/{act}"))
        else:
            kw = dict(zip(_ACTIVATIONS[act], params))
            nodes.append(helper.make_node(act, [y], [out], name=f"{name}/{act}", **kw))
    return nodes

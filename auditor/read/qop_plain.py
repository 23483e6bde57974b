"""An int8 graph in onnxruntime's QOperator or dynamic form written back as the float graph it computes.

The channel trace (auditor.read.channels) and what builds on it (neuron cleaning in
auditor.forensics.canon, alignment and provenance) follow channels through float ONNX ops and Q/DQ
pairs. onnxruntime's quantizer writes two other int8 forms, and its optimizer rewrites them again:

* QOperator (``quantize_static(quant_format=QOperator)``): ``QLinearConv``, ``QLinearMatMul``,
  ``com.microsoft:QGemm``, ``QLinearAdd`` / ``QLinearMul``, ``QLinearGlobalAveragePool`` /
  ``QLinearAveragePool``, ``QLinearConcat``, ``QLinearSigmoid`` / ``QLinearLeakyRelu`` on uint8 / int8
  tensors, ``QuantizeLinear`` / ``DequantizeLinear`` at the edges; a ReLU after a layer or an Add is
  folded into the output's range (zero point at the type's minimum);
* dynamic (``quantize_dynamic``): ``DynamicQuantizeLinear`` -> ``ConvInteger`` / ``MatMulInteger`` ->
  ``Cast`` -> ``Mul`` by the product of the two scales (-> bias ``Add``), and onnxruntime's fusions
  ``com.microsoft:DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat``;
* saved at ORT_ENABLE_EXTENDED / ORT_ENABLE_ALL: the NHWC transformer's ``com.microsoft:QLinearConv``
  with ``channels_last=1``, ``NhwcMaxPool``, the pooling ops with ``channels_last``, wrapped in
  ``Transpose`` pairs (perm [0,2,3,1] into NHWC, [0,3,1,2] back).

Each has a float meaning with the weights the WeightStore dequantizes: the quantized layer is the
float layer (weight and bias dequantized) clipped to its quantized output's range (which holds a
folded ReLU / ReLU6 and the int8 saturation), the
activation quantizers and the dynamic scale chains are the identity, and a channels-last region is
its NCHW graph (every tensor in it is kept in NCHW; a Transpose is written only where a tensor
leaves the region for an op that reads it as NHWC). What the float graph does not compute is the
activations' rounding (and the saturation of the int8 kernels' own arithmetic).

`plain_model(model, store)` writes that graph (standard ONNX ops only, float initializers under the
quantized tensors' names) and the map from the weight tensors' names to the store's weight names.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from auditor.errors import AuditError

__all__ = ["has_quantized_ops", "plain_model"]

_MS = "com.microsoft"
_TO_NHWC, _TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
# the quantized layers: op -> the input holding the weight
_LAYERS = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3, "ConvInteger": 1, "MatMulInteger": 1,
           "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1}
_QUANT_OPS = frozenset(_LAYERS) | {"QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
                                   "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "DynamicQuantizeLinear",
                                   "NhwcMaxPool"}
# ops computing one value per element from elements at the same position (any layout)
_ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Identity", "HardSigmoid", "HardSwish",
                          "QuantizeLinear", "DequantizeLinear", "Cast", "Add", "Mul", "Sub", "Div"})
_QRANGE = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
           TensorProto.INT16: (-32768, 32767)}


def has_quantized_ops(model: onnx.ModelProto) -> bool:
    """QOperator, dynamic or NHWC-transformed int8 nodes in the main graph."""
    return any(n.op_type in _QUANT_OPS and n.domain in ("", "ai.onnx", _MS) for n in model.graph.node)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _attrs_but(node, *names) -> list[onnx.AttributeProto]:
    return [a for a in node.attribute if a.name not in names]


def plain_model(model: onnx.ModelProto, store) -> tuple[onnx.ModelProto, dict[str, str]]:
    """(float model, {graph tensor name of each dequantized weight / bias: store weight name}).

    `model` is the store's model, or the plain graph auditor.read.nchwc_plain wrote from it (a
    dynamic file saved at ORT_ENABLE_ALL has NCHWc pooling between its ConvIntegers). AuditError (one
    line) for a quantized op whose weight the store did not read, or one with no float meaning here."""
    return _Rewrite(model, store).run()


class _Rewrite:
    def __init__(self, model, store):
        self.model = model
        self.store = store
        self.inits = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.inits.setdefault(n.output[0], a.t)
        # graph tensor name of a weight / bias -> the store's weight name
        self.weight_of: dict[str, str] = {}
        for w in store.weights:
            for _, nname, idx in w.uses:
                try:
                    node = store.node(nname)
                except KeyError:
                    continue
                if idx < len(node.input) and node.input[idx]:
                    self.weight_of.setdefault(node.input[idx], w.name)
        self.nodes: list[onnx.NodeProto] = []
        self.floats: dict[str, onnx.TensorProto] = {}   # new float initializers
        self.alias: dict[str, str] = {}
        self.rename: dict[str, str] = {}    # a tensor an identity wrote -> the tensor standing for it
        self.nhwc: set[str] = set()         # tensors kept NCHW here whose file value is NHWC
        self.scales: set[str] = set()       # dynamic activation scales (and products with constants)
        self.zeros: set[str] = set()        # dynamic activation zero points
        self.acc: set[str] = set()          # integer accumulators, float here (the scales are in the weight)
        # a ConvInteger's output (through Cast and the rescale) -> its Conv, while only one node reads it
        self.conv_of: dict[str, onnx.NodeProto] = {}
        self.readers: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                if i:
                    self.readers[i] = self.readers.get(i, 0) + 1
        self.count = 0

    # ---------------------------------------------------------------- helpers
    def _name(self, node) -> str:
        self.count += 1
        return node.name or f"{node.op_type}#{self.count}"

    def _in(self, t: str) -> str:
        return self.rename.get(t, t) if t else t

    def _const(self, t: str) -> np.ndarray | None:
        tp = self.inits.get(t)
        return None if tp is None else numpy_helper.to_array(tp)

    def _is_const(self, t: str) -> bool:
        return t in self.inits

    def _real(self, t: str) -> str:
        """A tensor as the file holds it (NHWC where it is, written by a Transpose here)."""
        t = self._in(t)
        if t not in self.nhwc:
            return t
        out = f"{t}/nhwc"
        if not any(out in n.output for n in self.nodes):
            self.nodes.append(helper.make_node("Transpose", [t], [out], name=out, perm=_TO_NHWC))
        return out

    def _nchw(self, t: str) -> str:
        """A channels-last op's input as NCHW."""
        t = self._in(t)
        if t in self.nhwc:
            return t
        out = f"{t}/nchw"
        if not any(out in n.output for n in self.nodes):
            self.nodes.append(helper.make_node("Transpose", [t], [out], name=out, perm=_TO_NCHW))
        return out

    def _weight(self, node, name: str, idx: int, what: str) -> str:
        t = node.input[idx] if idx < len(node.input) else ""
        wname = self.weight_of.get(t)
        if wname is None:
            why = next((u["reason"] for u in getattr(self.store, "unreadable", []) if u.get("node") == name), None)
            raise AuditError(f"{what}: its weight {t!r} was not read" + (f" ({why})" if why else "")
                             + "; give the float or QDQ file it was quantized from")
        self.floats[t] = numpy_helper.from_array(np.asarray(self.store.array(wname), np.float32), t)
        self.alias[t] = wname
        return t

    def _bias(self, node, idx: int, what: str) -> str | None:
        t = node.input[idx] if idx < len(node.input) else ""
        if not t:
            return None
        wname = self.weight_of.get(t)
        if wname is not None:
            a = np.asarray(self.store.array(wname), np.float32).reshape(-1)
            self.alias[t] = wname
        elif self._is_const(t) and self._const(t).dtype.kind == "f":
            a = np.asarray(self._const(t), np.float32).reshape(-1)
        else:
            raise AuditError(f"{what}: its bias {t!r} is not a constant read here")
        self.floats[t] = numpy_helper.from_array(a, t)
        return t

    def _same(self, out: str, src: str) -> None:
        """`out` is `src` here (an activation quantizer, a rescale, a layout Transpose): no node, so that
        what follows a layer reads it directly (a bias Add stays the layer's bias for the trace)."""
        self.rename[out] = self._in(src)

    def _out(self, node, zp_idx: int, name: str, suffix: str) -> tuple[str, tuple[float, float]]:
        """(the float op's output name, the range [lo, hi] of the node's quantized output): a Clip to it
        follows the float op into the node's output. That range holds the activation the quantizer
        folded into the output (ReLU: lo = 0; ReLU6: hi = 6) and the int8 saturation."""
        st = node.input[zp_idx - 1]
        zt = node.input[zp_idx] if zp_idx < len(node.input) else ""
        if not self._is_const(st) or (zt and not self._is_const(zt)):
            raise AuditError(f"{node.op_type} {name!r}: output scale / zero point is not a constant")
        sc = self._const(st).reshape(-1)
        if zt:
            tp = self.inits[zt]
            z, kind = numpy_helper.to_array(tp).reshape(-1), tp.data_type
        else:
            z, kind = np.zeros(1), TensorProto.UINT8   # the default zero point: uint8 0
        if sc.size != 1 or z.size != 1 or kind not in _QRANGE:
            raise AuditError(f"{node.op_type} {name!r}: output quantized per channel or to an unknown type")
        qmin, qmax = _QRANGE[kind]
        s_, z_ = float(sc[0]), float(z[0])
        return f"{name}/{suffix}", ((qmin - z_) * s_, (qmax - z_) * s_)

    def _saturate(self, node, y: str, bounds: tuple[float, float], name: str) -> None:
        lo, hi = f"{name}/min", f"{name}/max"
        self.floats[lo] = numpy_helper.from_array(np.array(bounds[0], np.float32), lo)
        self.floats[hi] = numpy_helper.from_array(np.array(bounds[1], np.float32), hi)
        self.nodes.append(helper.make_node("Clip", [y, lo, hi], [node.output[0]], name=f"{name}/range"))

    def _dequantized_const(self, t: str, s: str, z: str, name: str) -> str:
        q, sc = self._const(t), self._const(s)
        zp = self._const(z) if z else np.zeros((), np.int64)
        if sc is None or zp is None or sc.size != 1 or zp.size != 1:
            raise AuditError(f"{name!r}: constant operand {t!r} has no per-tensor scale / zero point")
        out = f"{t}/float"
        self.floats[out] = numpy_helper.from_array(
            ((q.astype(np.float64) - float(zp.reshape(-1)[0])) * float(sc.reshape(-1)[0])).astype(np.float32), out)
        return out

    def _operand(self, node, i: int, s: int, z: int, name: str) -> str:
        t = node.input[i]
        return self._dequantized_const(t, node.input[s], node.input[z] if z < len(node.input) else "", name) \
            if self._is_const(t) else self._in(t)

    # ---------------------------------------------------------------- the pass
    def run(self) -> tuple[onnx.ModelProto, dict[str, str]]:
        for node in self.model.graph.node:
            self._node(node)
        graph_out = []
        for o in self.model.graph.output:
            if self._in(o.name) != o.name or o.name in self.nhwc:
                self.nodes.append(helper.make_node("Identity", [self._real(o.name)], [o.name], name=f"{o.name}/out"))
            graph_out.append(o)
        used = {i for n in self.nodes for i in n.input if i}
        kept = [self.floats.pop(t.name, t) for t in self.model.graph.initializer if t.name in used]
        kept += [t for name, t in self.floats.items() if name in used]
        graph = helper.make_graph(self.nodes, self.model.graph.name, list(self.model.graph.input), graph_out, kept)
        opsets = list(self.model.opset_import)
        default = next((o for o in opsets if o.domain in ("", "ai.onnx")), None)
        if default is not None and default.version < 13:
            default.version = 13
        out = helper.make_model(graph, opset_imports=opsets, ir_version=self.model.ir_version,
                                producer_name=self.model.producer_name, producer_version=self.model.producer_version)
        return out, self.alias

    def _emit(self, node, ins, outs=None, op=None, attrs=(), name=None, **kw) -> onnx.NodeProto:
        n = helper.make_node(op or node.op_type, list(ins), list(outs if outs is not None else node.output),
                             name=name or node.name, **kw)
        n.attribute.extend(attrs)
        if op is None:   # the node as the file has it (its inputs renamed): its domain too
            n.domain = node.domain
        self.nodes.append(n)
        return n

    def _node(self, node) -> None:
        op, dom = node.op_type, node.domain
        name = self._name(node)
        what = f"{dom + ':' if dom else ''}{op} {name!r}"
        if dom not in ("", "ai.onnx", _MS):
            # another domain (NCHWc: written plain before this pass): as the file has it
            self._emit(node, [self._real(i) for i in node.input], attrs=node.attribute)
            return
        if op in ("QLinearConv", "ConvInteger"):
            return self._conv(node, name, what)
        if op in ("QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
            return self._matmul(node, name, what)
        if op == "DynamicQuantizeLinear":
            self._same(node.output[0], self._real(node.input[0]))
            if len(node.output) > 1 and node.output[1]:
                self.scales.add(node.output[1])
            if len(node.output) > 2 and node.output[2]:
                self.zeros.add(node.output[2])
            return
        ins = [i for i in node.input if i]
        if any(i in self.zeros for i in ins):
            raise AuditError(f"{what} reads a dynamic zero point; no float meaning known here")
        if ins and op in ("Mul", "Div", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity") and \
                all(i in self.scales or self._is_const(i) for i in ins) and any(i in self.scales for i in ins):
            self.scales.update(node.output)   # the scale product: folded into the dequantized weight
            return
        if op == "Cast" and node.input[0] in self.acc:
            self._same(node.output[0], node.input[0])
            self.acc.add(node.output[0])
            self._follow_conv(node.input[0], node.output[0])
            return
        if any(i in self.scales for i in ins):
            if op == "Mul" and len(ins) == 2 and any(i in self.acc for i in ins):
                a = next(i for i in ins if i in self.acc)
                self._same(node.output[0], a)
                self._follow_conv(a, node.output[0])
                return
            raise AuditError(f"{what} reads a dynamic activation scale other than to rescale an integer "
                             "layer's output; no float meaning known here")
        if op in ("Reshape", "Unsqueeze") and ins and all(self._is_const(i) for i in ins):
            self._fold_constant(node)   # a bias reshaped at run time: a constant here
            return
        if op == "Add" and len(ins) == 2 and self._conv_bias(node):
            return
        if op in ("QuantizeLinear", "DequantizeLinear"):
            if self._is_const(node.input[0]):   # a QDQ weight: as the file has it
                self._emit(node, list(node.input), attrs=node.attribute)
            else:
                self._same(node.output[0], node.input[0])
            return
        if op == "Transpose":
            perm = list(_attr(node, "perm") or [])
            x = node.input[0]
            if perm == _TO_NCHW and self._in(x) in self.nhwc:
                # the NCHW value: a tensor of its own name (the NHWC one is still read elsewhere)
                self._emit(node, [self._in(x)], op="Identity")
                return
            if perm == _TO_NHWC:
                self._emit(node, [self._real(x)], op="Identity")
                self.nhwc.add(node.output[0])
                return
            self._emit(node, [self._real(x)], attrs=node.attribute)
            return
        if op in ("QLinearAdd", "QLinearMul"):
            a = self._operand(node, 0, 1, 2, name)
            b = self._operand(node, 3, 4, 5, name)
            y, bounds = self._out(node, 7, name, op[len("QLinear"):].lower())
            both = [node.input[0], node.input[3]]
            if all(self._in(t) in self.nhwc or self._scalar(t) for t in both) and \
                    any(self._in(t) in self.nhwc for t in both):
                self.nhwc.update([y, node.output[0]])
            else:
                a, b = (self._real(node.input[0]) if a == self._in(node.input[0]) else a,
                        self._real(node.input[3]) if b == self._in(node.input[3]) else b)
            self._emit(node, [a, b], [y], op=op[len("QLinear"):], name=name)
            self._saturate(node, y, bounds, name)
            return
        if op in ("QLinearGlobalAveragePool", "QLinearAveragePool", "NhwcMaxPool"):
            last = op == "NhwcMaxPool" or int(_attr(node, "channels_last", 0))
            x = self._nchw(node.input[0]) if last else self._real(node.input[0])
            fop = {"QLinearGlobalAveragePool": "GlobalAveragePool", "QLinearAveragePool": "AveragePool",
                   "NhwcMaxPool": "MaxPool"}[op]
            self._emit(node, [x], [node.output[0]], op=fop, attrs=_attrs_but(node, "channels_last"))
            if last:
                self.nhwc.add(node.output[0])
            return
        if op in ("QLinearSigmoid", "QLinearLeakyRelu"):
            x = self._in(node.input[0])
            self._emit(node, [x], [node.output[0]], op=op[len("QLinear"):], attrs=node.attribute)
            self._layout_as(node.input[0], node.output[0])
            return
        if op == "QLinearConcat":
            axis = int(_attr(node, "axis"))
            xs = [node.input[i] for i in range(2, len(node.input), 3)]
            if all(self._in(x) in self.nhwc for x in xs) and axis in (3, -1):
                self._emit(node, [self._in(x) for x in xs], [node.output[0]], op="Concat", axis=1)
                self.nhwc.add(node.output[0])
            else:
                fx = [self._operand(node, i, i + 1, i + 2, name) if self._is_const(node.input[i])
                      else self._real(node.input[i]) for i in range(2, len(node.input), 3)]
                self._emit(node, fx, [node.output[0]], op="Concat", axis=axis)
            return
        if op in _QUANT_OPS or op.startswith("QLinear") or "Integer" in op or op.startswith("DynamicQuantize"):
            raise AuditError(f"{what}: a quantized op with no float meaning known here; give the float or QDQ "
                             "file it was quantized from")
        if op in _ELEMENTWISE and ins and all(self._in(i) in self.nhwc or self._scalar(i) for i in ins) \
                and any(self._in(i) in self.nhwc for i in ins):
            self._emit(node, [self._in(i) for i in node.input], attrs=node.attribute)
            self.nhwc.update(node.output)
            return
        self._emit(node, [self._real(i) for i in node.input], attrs=node.attribute)

    def _follow_conv(self, src: str, dst: str) -> None:
        if src in self.conv_of and self.readers.get(src, 0) == 1:
            self.conv_of[dst] = self.conv_of[src]

    def _fold_constant(self, node) -> None:
        x = self._const(node.input[0])
        if node.op_type == "Reshape":
            shape = [int(v) for v in self._const(node.input[1]).reshape(-1)]
            if not int(_attr(node, "allowzero", 0)):
                shape = [x.shape[i] if v == 0 and i < x.ndim else v for i, v in enumerate(shape)]
            y = x.reshape(shape)
        else:
            axes = _attr(node, "axes")
            axes = [int(v) for v in (self._const(node.input[1]).reshape(-1) if axes is None else axes)]
            y = x
            for a in sorted(a if a >= 0 else a + x.ndim + len(axes) for a in axes):
                y = np.expand_dims(y, a)
        out = node.output[0]
        self.inits[out] = self.floats[out] = numpy_helper.from_array(np.ascontiguousarray(y), out)

    def _conv_bias(self, node) -> bool:
        """A constant Add of one value per output channel right after a ConvInteger's rescale (how the
        dynamic quantizer writes a Conv's bias): the Conv's bias, so that a depthwise Conv's bias is
        where the float Conv had it. False (nothing done) for any other Add."""
        for k in (0, 1):
            t, c = node.input[k], node.input[1 - k]
            conv = self.conv_of.get(t)
            if conv is None or self.readers.get(t, 0) != 1 or len(conv.input) > 2 or not self._is_const(c):
                continue
            b = self._const(c)
            C = int(self.floats[conv.input[1]].dims[0])
            if b.dtype.kind != "f" or b.size != C or (b.ndim >= 3 and b.shape[-3] != C) or b.ndim not in (1, 3, 4) \
                    or (b.ndim == 1 and C != 1):
                continue
            bt = f"{conv.name or conv.output[0]}/bias"
            self.floats[bt] = numpy_helper.from_array(np.asarray(b, np.float32).reshape(-1), bt)
            conv.input.append(bt)
            self._same(node.output[0], t)
            return True
        return False

    def _scalar(self, t: str) -> bool:
        a = self._const(t)
        return a is not None and a.size == 1

    def _layout_as(self, src: str, dst: str) -> None:
        if self._in(src) in self.nhwc:
            self.nhwc.add(dst)

    def _conv(self, node, name, what) -> None:
        q = node.op_type == "QLinearConv"
        last = q and int(_attr(node, "channels_last", 0))
        x = self._nchw(node.input[0]) if last else self._real(node.input[0])
        w = self._weight(node, name, 3 if q else 1, what)
        ins = [x, w]
        b = self._bias(node, 8, what) if q else None
        if b:
            ins.append(b)
        attrs = _attrs_but(node, "channels_last")
        if q:
            y, bounds = self._out(node, 7, name, "conv")
            self._emit(node, ins, [y], op="Conv", attrs=attrs, name=name)
            self._saturate(node, y, bounds, name)
            if last:
                self.nhwc.add(y)
        else:
            conv = self._emit(node, ins, [node.output[0]], op="Conv", attrs=attrs, name=name)
            self.acc.add(node.output[0])
            self.conv_of[node.output[0]] = conv
        if last:
            self.nhwc.add(node.output[0])

    def _matmul(self, node, name, what) -> None:
        op = node.op_type
        a = self._real(node.input[0])
        if op == "QGemm":
            w, c = self._weight(node, name, 3, what), self._bias(node, 6, what)
            quant_out = len(node.input) > 7 and node.input[7]
            y, bounds = self._out(node, 8, name, "gemm") if quant_out else (node.output[0], None)
            self._emit(node, [a, w] + ([c] if c else []), [y], op="Gemm", name=name,
                       attrs=[x for x in node.attribute if x.name in ("alpha", "transA", "transB")])
            if bounds is not None:
                self._saturate(node, y, bounds, name)
            return
        w = self._weight(node, name, 3 if op == "QLinearMatMul" else 1, what)
        if op == "QLinearMatMul":
            y, bounds = self._out(node, 7, name, "matmul")
            self._emit(node, [a, w], [y], op="MatMul", name=name)
            self._saturate(node, y, bounds, name)
            return
        if op == "MatMulInteger":
            self._emit(node, [a, w], [node.output[0]], op="MatMul", name=name)
            self.acc.add(node.output[0])
            return
        bias_idx = 4 if op == "DynamicQuantizeMatMul" else 6
        c = self._bias(node, bias_idx, what)
        if op == "MatMulIntegerToFloat" and node.input[2] not in self.scales:
            raise AuditError(f"{what}: its input scale {node.input[2]!r} is not a dynamic activation scale")
        if c is None:
            self._emit(node, [a, w], [node.output[0]], op="MatMul", name=name)
            return
        y = f"{name}/matmul"
        self._emit(node, [a, w], [y], op="MatMul", name=name)
        self._emit(node, [y, c], [node.output[0]], op="Add", name=f"{name}/bias")

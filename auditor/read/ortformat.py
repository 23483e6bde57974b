"""onnxruntime's ORT format (``.ort``: mobile and minimal builds), read as an ONNX model.

An ``.ort`` file is a flatbuffer (file identifier ``ORTM``) holding the graph
onnxruntime saved: nodes, initializers, value infos, opsets, and for
runtime-optimized files the optimization records onnxruntime replays at load
time. It is parsed with onnxruntime's own flatbuffers schema classes
(``onnxruntime.tools.ort_format_model``) and rebuilt as an in-memory
``onnx.ModelProto`` (same names, attributes and tensor bytes), so every reader
of ``auditor.read`` sees it as it sees an ONNX file. Runtime optimization
records change nothing that is stored (the weights are those of the nodes
written), so they are not replayed.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from auditor.errors import AuditError

__all__ = ["ORT_IDENTIFIER", "is_ort_format", "to_onnx"]

ORT_IDENTIFIER = b"ORTM"


def is_ort_format(data: bytes) -> bool:
    """True for a flatbuffer carrying the ORT format's file identifier (bytes 4..8)."""
    return len(data) >= 8 and bytes(data[4:8]) == ORT_IDENTIFIER


def _fbs():
    import importlib
    import types

    base = "onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs"
    names = ("InferenceSession", "Model", "Graph", "Node", "Tensor", "Attribute", "AttributeType", "ValueInfo",
             "TypeInfo", "TypeInfoValue", "TensorTypeAndShape", "Shape", "Dimension", "DimensionValue",
             "DimensionValueType", "OperatorSetId", "StringStringEntry")
    try:
        return types.SimpleNamespace(**{n: importlib.import_module(f"{base}.{n}") for n in names})
    except ImportError as e:  # pragma: no cover - onnxruntime ships these classes
        raise AuditError(f"reading the ORT format needs onnxruntime's tools ({e})") from None


class _Where(str):
    """The file's name for messages, carrying what the conversion may still build: a flatbuffer can
    point many tensors (or subgraph attributes) at the same bytes, so a small hostile file could ask
    for far more than it holds. Tensor bytes may not exceed the file's; objects, one per 4 bytes."""

    def __new__(cls, where: str, size: int):
        w = super().__new__(cls, where)
        w.bytes_left, w.objects_left = size, size // 4 + 64
        return w

    def spend(self, nbytes: int = 0, objects: int = 1) -> None:
        self.bytes_left -= nbytes
        self.objects_left -= objects
        if self.bytes_left < 0 or self.objects_left < 0:
            raise AuditError(f"{self}: the ORT file's tables refer to more data than the file holds "
                             f"(shared or overlapping offsets); not a file onnxruntime writes")


def _s(b) -> str:
    return b.decode("utf-8") if isinstance(b, (bytes, bytearray)) else (b or "")


def _tensor(t, where: "_Where") -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.name = _s(t.Name())
    out.dims.extend(int(t.Dims(j)) for j in range(t.DimsLength()))
    out.data_type = int(t.DataType())
    if t.ExternalDataOffset() >= 0:
        raise AuditError(f"{where}: tensor {out.name!r} keeps its data outside the ORT file "
                         f"(external data offset {t.ExternalDataOffset()}), which is not read")
    if out.data_type == onnx.TensorProto.STRING:
        where.spend(0, 1 + t.StringDataLength())
        out.string_data.extend(t.StringData(j) for j in range(t.StringDataLength()))
    elif not t.RawDataIsNone():
        where.spend(t.RawDataLength())
        out.raw_data = t.RawDataAsNumpy().tobytes()
    else:
        where.spend()
    return out


def _attribute(a, fbs, where: "_Where", depth: int) -> onnx.AttributeProto:
    T = fbs.AttributeType.AttributeType
    where.spend()
    name, kind = _s(a.Name()), a.Type()
    if kind == T.FLOAT:
        return helper.make_attribute(name, float(a.F()))
    if kind == T.INT:
        return helper.make_attribute(name, int(a.I()))
    if kind == T.STRING:
        return helper.make_attribute(name, a.S() or b"")
    if kind == T.TENSOR:
        return helper.make_attribute(name, _tensor(a.T(), where))
    if kind == T.GRAPH:
        return helper.make_attribute(name, _graph(a.G(), fbs, where, depth + 1))
    if kind == T.FLOATS:
        attr = onnx.AttributeProto(name=name, type=onnx.AttributeProto.FLOATS)
        attr.floats.extend(float(x) for x in (a.FloatsAsNumpy() if not a.FloatsIsNone() else []))
        return attr
    if kind == T.INTS:
        attr = onnx.AttributeProto(name=name, type=onnx.AttributeProto.INTS)
        attr.ints.extend(int(x) for x in (a.IntsAsNumpy() if not a.IntsIsNone() else []))
        return attr
    if kind == T.STRINGS:
        attr = onnx.AttributeProto(name=name, type=onnx.AttributeProto.STRINGS)
        attr.strings.extend(a.Strings(j) for j in range(a.StringsLength()))
        return attr
    if kind == T.TENSORS:
        attr = onnx.AttributeProto(name=name, type=onnx.AttributeProto.TENSORS)
        attr.tensors.extend(_tensor(a.Tensors(j), where) for j in range(a.TensorsLength()))
        return attr
    if kind == T.GRAPHS:
        attr = onnx.AttributeProto(name=name, type=onnx.AttributeProto.GRAPHS)
        attr.graphs.extend(_graph(a.Graphs(j), fbs, where, depth + 1) for j in range(a.GraphsLength()))
        return attr
    raise AuditError(f"{where}: attribute {name!r} has ORT attribute type {kind}, which is not read")


def _value_info(vi, fbs) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto(name=_s(vi.Name()))
    t = vi.Type()
    if t is None or t.ValueType() != fbs.TypeInfoValue.TypeInfoValue.tensor_type:
        return out
    tt = fbs.TensorTypeAndShape.TensorTypeAndShape()
    tab = t.Value()
    tt.Init(tab.Bytes, tab.Pos)
    out.type.tensor_type.elem_type = int(tt.ElemType())
    shape = tt.Shape()
    if shape is not None:
        dims = out.type.tensor_type.shape
        for j in range(shape.DimLength()):
            d = dims.dim.add()
            v = shape.Dim(j).Value()
            if v is None:
                continue
            if v.DimType() == fbs.DimensionValueType.DimensionValueType.VALUE:
                d.dim_value = int(v.DimValue())
            elif v.DimParam():
                d.dim_param = _s(v.DimParam())
    return out


def _graph(g, fbs, where: "_Where", depth: int = 0) -> onnx.GraphProto:
    if depth > 64:
        raise AuditError(f"{where}: subgraphs nested deeper than 64 levels")
    out = onnx.GraphProto(name="ort")
    infos = {}
    for j in range(g.NodeArgsLength()):
        vi = _value_info(g.NodeArgs(j), fbs)
        where.spend(0, 1 + len(vi.type.tensor_type.shape.dim))
        infos[vi.name] = vi
    inits = [_tensor(g.Initializers(j), where) for j in range(g.InitializersLength())]
    out.initializer.extend(inits)
    if g.SparseInitializersLength():
        raise AuditError(f"{where}: sparse initializers in an ORT file are not read")
    for j in range(g.InputsLength()):
        n = _s(g.Inputs(j))
        out.input.append(infos.get(n, onnx.ValueInfoProto(name=n)))
    for j in range(g.OutputsLength()):
        n = _s(g.Outputs(j))
        out.output.append(infos.get(n, onnx.ValueInfoProto(name=n)))
    nodes = []
    for n in sorted((g.Nodes(j) for j in range(g.NodesLength())), key=lambda n: n.Index()):
        where.spend(0, 1 + n.InputsLength() + n.OutputsLength())
        node = onnx.NodeProto(name=_s(n.Name()), op_type=_s(n.OpType()), domain=_s(n.Domain()))
        node.input.extend(_s(n.Inputs(j)) for j in range(n.InputsLength()))
        node.output.extend(_s(n.Outputs(j)) for j in range(n.OutputsLength()))
        node.attribute.extend(_attribute(n.Attributes(j), fbs, where, depth) for j in range(n.AttributesLength()))
        nodes.append(node)
    out.node.extend(_topological(nodes))
    init_names = {t.name for t in inits}
    produced = {o for n in out.node for o in n.output} | {i.name for i in out.input} | init_names
    out.value_info.extend(vi for name, vi in infos.items() if name in produced and name not in init_names
                          and vi.type.HasField("tensor_type") and name not in {o.name for o in out.output}
                          and name not in {i.name for i in out.input})
    return out


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes in an order where each runs after the producers of its inputs (onnxruntime stores them
    by node index, which an optimizer leaves unordered); a cycle keeps the rest in index order, for
    the model checks to report."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [sum(1 for x in set(n.input) if x in producer) for n in nodes]
    users: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in set(n.input):
            if x in producer:
                users.setdefault(producer[x], []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order, seen = [], set()
    while ready:
        i = min(ready)
        ready.remove(i)
        order.append(i)
        seen.add(i)
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    order += [i for i in range(len(nodes)) if i not in seen]
    return [nodes[i] for i in order]


def to_onnx(data: bytes, where: str) -> onnx.ModelProto:
    """The ORT-format model in `data` as an onnx.ModelProto (AuditError, one line, when unreadable)."""
    fbs = _fbs()
    where = _Where(where, len(data))
    try:
        session = fbs.InferenceSession.InferenceSession.GetRootAs(data, 0)
        model = session.Model()
        if model is None or model.Graph() is None:
            raise AuditError(f"{where}: ORT-format file without a model graph")
        out = onnx.ModelProto(ir_version=int(model.IrVersion()), producer_name=_s(model.ProducerName()),
                              producer_version=_s(model.ProducerVersion()), domain=_s(model.Domain()),
                              model_version=int(model.ModelVersion()))
        for j in range(model.OpsetImportLength()):
            o = model.OpsetImport(j)
            out.opset_import.append(helper.make_opsetid(_s(o.Domain()), int(o.Version())))
        for j in range(model.MetadataPropsLength()):
            p = model.MetadataProps(j)
            out.metadata_props.append(onnx.StringStringEntryProto(key=_s(p.Key()), value=_s(p.Value())))
        out.graph.CopyFrom(_graph(model.Graph(), fbs, where))
        out.metadata_props.append(onnx.StringStringEntryProto(
            key="wmaudit.source_format", value=f"ort (ORT format version {_s(session.OrtVersion())})"))
        return out
    except AuditError:
        raise
    except Exception as e:  # a damaged flatbuffer raises whatever its accessors meet
        raise AuditError(f"{where}: not a readable ORT-format model ({type(e).__name__}: {str(e)[:160]})") from None

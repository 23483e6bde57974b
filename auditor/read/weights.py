"""Every weight of an ONNX model, as float32, in ONNX layout.

Weights are found wherever they live: graph initializers (inline or external
data), Constant nodes, initializers and Constants inside If/Loop/Scan bodies,
and tensors computed by constant subgraphs (Slice/Concat/Transpose/... chains
whose inputs are all constant, evaluated with onnx.reference). Every
onnxruntime quantized form is dequantized back to float; the quantized
tensor is then listed once, under the float weight's name, with `quant` set,
and its scales / zero points are not listed as weights.

Nothing is read until asked: `WeightStore.array(name)` reads the bytes of
that one tensor (and of its scale / zero point) and nothing else.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper
from onnx.reference import ReferenceEvaluator

from auditor.errors import AuditError
from auditor.read.graph import external_info, model_dir, open_model, tensor_array, tensor_shape

__all__ = ["Weight", "WeightStore", "dtype_name"]

# Any deterministic standard op whose inputs are all constant is folded (the
# usual Slice/Concat/Transpose/Reshape/Gather/Split/Cast/DequantizeLinear
# chains, and the Shape/Mul arithmetic dynamo uses for Slice bounds), its
# semantics always from onnx.reference, never re-implemented here. These are not:
_NOT_FOLDABLE = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli", "Dropout", "Constant", "If", "Loop", "Scan", "SequenceConstruct",
    # Layers themselves are never folded: a weight must stay visible at its layer
    # even when the layer's other input happens to be constant (zero initial state).
    "MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN", "MatMulInteger",
    "ConvInteger", "QLinearConv", "QLinearMatMul", "BatchNormalization", "Einsum",
})


# Consumers of a gathered integer embedding table: input index -> (scale, zero point) inputs.
_GATHERED_SCALE = {"DequantizeLinear": {0: (1, 2)}, "QLinearAdd": {0: (1, 2), 3: (4, 5)},
                   "QLinearMul": {0: (1, 2), 3: (4, 5)}}

# Default-domain ops onnxruntime lets an NCHWc tensor pass through (element-wise on the blocked data).
_NCHWC_PASSTHROUGH = frozenset({"Add", "Sum", "Mul", "Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu",
                                "HardSigmoid", "Identity"})
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_MS = "com.microsoft"


class MalformedAttribute(AuditError):
    """A node attribute of the wrong type, or missing where the operator requires it."""


class MalformedQuantization(AuditError):
    """Quantization parameters onnxruntime would reject (types, axis, lengths, scale values)."""


def dtype_name(data_type: int) -> str:
    """ONNX element type as a short lower-case name (float32, float16, int8, uint8, int4, ...)."""
    if data_type == onnx.TensorProto.FLOAT:
        return "float32"
    if data_type == onnx.TensorProto.DOUBLE:
        return "float64"
    try:
        return onnx.TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"unknown type {data_type}"


@dataclass
class Weight:
    """One weight as the auditor sees it.

    name: the float weight's name (for a quantized tensor, onnxruntime's
    `_quantized` suffix removed); stored_name: the tensor actually stored;
    shape: ONNX layout of the (dequantized) float weight; stored_dtype: dtype
    of the stored tensor; location: `initializer` | `external:<file>` |
    `constant-node` | `subgraph:<node>` | `folded:<Op>`; quant: None or the
    quantized form; uses: (consumer op type, node name, input index) of the
    float weight; layout: the runtime layout undone on reading (None when
    stored as ONNX lays it out); aliases: other names its layer gives it.
    """

    name: str
    stored_name: str
    shape: tuple[int, ...]
    stored_dtype: str
    location: str
    quant: str | None = None
    uses: list[tuple[str, str, int]] = field(default_factory=list)
    layout: str | None = None      # a runtime layout undone on reading (auditor.read.blocked), e.g. NCHWc
    aliases: list[str] = field(default_factory=list)  # names the layer gives it (an optimizer renamed it)

    @property
    def size(self) -> int:
        """Number of coefficients."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class _Const:
    """A tensor known to be constant: stored (TensorProto) or computed by a node."""

    key: str
    location: str
    tensor: onnx.TensorProto | None = None
    node: onnx.NodeProto | None = None
    inputs: tuple[str, ...] = ()   # keys of the node's inputs ("" for an absent optional input)
    out_index: int = 0
    owner: str | None = None       # subgraph owner node, None in the main graph


def constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a Constant node as a TensorProto (None for sparse/string values)."""
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name == "value_float":
            return helper.make_tensor(node.output[0], onnx.TensorProto.FLOAT, [], [a.f])
        if a.name == "value_floats":
            return helper.make_tensor(node.output[0], onnx.TensorProto.FLOAT, [len(a.floats)], list(a.floats))
        if a.name == "value_int":
            return helper.make_tensor(node.output[0], onnx.TensorProto.INT64, [], [a.i])
        if a.name == "value_ints":
            return helper.make_tensor(node.output[0], onnx.TensorProto.INT64, [len(a.ints)], list(a.ints))
    return None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            try:
                return helper.get_attribute_value(a)
            except Exception:
                raise AuditError(f"node {node.name or node.op_type!r}: attribute {name!r} has no readable value") from None
    return default


def _int(node: onnx.NodeProto, name: str, default: Any = None) -> int:
    """An integer attribute (AuditError when it is missing without a default or of another type)."""
    v = _attr(node, name, default)
    if isinstance(v, bool) or not isinstance(v, int):
        what = "missing" if v is None else f"a {type(v).__name__}"
        raise MalformedAttribute(f"node {node.name or node.op_type!r}: attribute {name!r} must be an integer, is {what}")
    return v


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int = 1, block_size: int = 0) -> np.ndarray:
    """DequantizeLinear as the ONNX reference evaluator computes it, as float32."""
    inputs = ["x", "s"] + (["z"] if zero_point is not None else [])
    attrs: dict[str, int] = {"axis": int(axis)}
    if block_size:
        attrs["block_size"] = int(block_size)
    node = helper.make_node("DequantizeLinear", inputs, ["y"], **attrs)
    feeds = {"x": x, "s": np.asarray(scale)}
    if zero_point is not None:
        feeds["z"] = np.asarray(zero_point).astype(x.dtype) if np.asarray(zero_point).dtype != x.dtype else np.asarray(zero_point)
    (y,) = ReferenceEvaluator(node).run(None, feeds)
    return np.asarray(y, dtype=np.float32)


def _float_name(stored: str) -> str:
    """onnxruntime's name for the float tensor a quantized one replaced
    (`W_quantized` from the int8 quantizers, `W_Q4` from MatMulNBits)."""
    if stored.endswith("_quantized"):
        return stored[: -len("_quantized")]
    m = re.match(r"^(.+)_Q\d+$", stored)
    return m.group(1) if m else stored


def _quant_label(scale_shape: tuple[int, ...], axis: int) -> str:
    n = int(np.prod(scale_shape, dtype=np.int64)) if scale_shape else 1
    return "qdq-per-tensor" if n == 1 else f"qdq-per-channel(axis={axis})"


class WeightStore:
    """All weights of one model; arrays read lazily, one tensor at a time."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | os.PathLike | None = None):
        self.model = model
        self.base_dir = Path(base_dir).resolve() if base_dir is not None else None
        self.path: Path | None = None  # set by open()
        self._consts: dict[str, _Const] = {}
        self._uses: dict[str, list[tuple[str, str, int]]] = {}
        self._nodes: dict[str, onnx.NodeProto] = {}
        self._node_owner: dict[str, str | None] = {}
        self._producer: dict[str, str] = {}          # tensor key -> node name
        self._outputs: dict[str, list[str | None]] = {}  # node name -> key of each output
        self._consumers: dict[str, list[tuple[str, int]]] = {}  # tensor key -> (node name, input index)
        self._folded_cache: dict[str, np.ndarray] = {}
        self._recipes: dict[str, Callable[[], np.ndarray]] = {}
        self._kept: dict[str, np.ndarray] | None = None   # see keep_arrays
        self._prefetch: dict | None = None
        self._reader = None                                # the prefetch thread's executor
        self._touched: set[str] = set()                    # weights asked for since the last release
        self._recent: list[set[str]] = []                  # ... during the releases before
        self._pool = None                                  # buffers of released arrays (BufferPool)
        self.after_read = None     # f(name, array) called once a weight is read, in the reading thread
        self._inferred = self._infer_types(model)
        self._scan(model.graph, {}, None)
        # Layers whose weight is there but in a layout the reader does not understand: a mark in
        # them "could not be read", which is not "not detected" (auditor.marks.whitebox).
        self.unreadable: list[dict[str, Any]] = []
        self.weights: list[Weight] = self._classify()
        self._by_name = {w.name: w for w in self.weights}
        for w in self.weights:  # stored names also find a weight, names win on a clash
            self._by_name.setdefault(w.stored_name, w)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> "WeightStore":
        """Open an ONNX file (external data checked, not loaded)."""
        model = open_model(path)
        store = cls(model, model_dir(path))
        store.path = Path(path)
        return store

    # ------------------------------------------------------------------ queries
    def get(self, name: str) -> Weight:
        """The weight called `name` (float name or stored name); AuditError if absent."""
        try:
            return self._by_name[name]
        except KeyError:
            raise AuditError(f"no weight named {name!r} in the model") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def keep_arrays(self, prefetch: bool = False) -> None:
        """From now on every weight is read once: `array` keeps what it returns (read-only), for
        callers (the forensic scan) that visit each weight from several places. With `prefetch`, one
        background thread reads the plainly stored float weights (initializers and external data,
        in file order) while the caller computes; `array` waits for a weight not read yet and
        raises its error as its own. A caller that walks the file in steps keeps memory bounded
        with `prefetch_names` (read the next step's weights ahead) and `release` (drop what the
        last step did not touch) instead."""
        if self._kept is None:
            self._kept = {}
        if prefetch and self._prefetch is None:
            plain = [w for w in self.weights if w.quant is None and w.size >= 4096
                     and (w.location == "initializer" or w.location.startswith("external:"))]
            if plain:
                self.prefetch_names([w.name for w in plain])

    def prefetch_names(self, names) -> None:
        """Read these weights in one background thread, in the order given, while the caller computes
        (kept once read; `array` waits for one not read yet). Names already kept or pending are skipped."""
        if self._kept is None:
            self._kept = {}
        if self._prefetch is None:
            self._prefetch = {}
        todo = [self.get(n) for n in names]
        todo = [w for w in todo if w.name not in self._kept and w.name not in self._prefetch]
        if not todo:
            return
        if self._reader is None:
            from concurrent.futures import ThreadPoolExecutor

            self._reader = ThreadPoolExecutor(1, thread_name_prefix="wmaudit-read")
        for w in todo:
            self._prefetch[w.name] = self._reader.submit(self._read, w)

    def release(self, steps: int = 2, keep=()) -> int:
        """Drop the kept arrays that no `array` call asked for during the last `steps` releases and
        that are not in `keep` (what the caller will ask for next), so that a caller walking the model
        keeps only its current neighbourhood in memory. Returns the bytes dropped."""
        self._recent = ([set(self._touched)] + self._recent)[:max(1, steps)]
        self._touched = set()
        if not self._kept:
            return 0
        keep_set = self.recent() | {self.get(n).name for n in keep if n in self}
        drop = [n for n in self._kept if n not in keep_set]
        freed = sum(self._kept[n].nbytes for n in drop)
        if self._pool is None:
            from auditor.read.graph import BufferPool

            self._pool = BufferPool()
        for n in drop:
            a = self._kept.pop(n)
            # its buffer is reused for a later read only when nothing else holds the array or any
            # view of it (the name `a` and getrefcount's argument; the array's base link, the name
            # `base` and the argument)
            base = a.base
            if sys.getrefcount(a) == 2 and isinstance(base, np.ndarray) and base.base is None:
                del a
                if sys.getrefcount(base) == 2:
                    self._pool.give(base)
                del base
        return freed

    def recent(self) -> set[str]:
        """The weights asked for since the last release and during the releases `release` remembers."""
        return set(self._touched).union(*self._recent) if self._recent else set(self._touched)

    def kept_bytes(self) -> int:
        """Bytes of the arrays kept now, and of those read ahead (done or being read)."""
        n = sum(a.nbytes for a in (self._kept or {}).values())
        for name, fut in (self._prefetch or {}).items():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                n += fut.result().nbytes
            elif not fut.done():
                n += self.get(name).size * 4
        return n

    def stop_prefetch(self) -> None:
        """Cancel the prefetch reads not started yet (a caller done early, or failing, does not wait
        for the rest of the file)."""
        for fut in (self._prefetch or {}).values():
            fut.cancel()
        self._prefetch = {}
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._reader = None

    def array(self, name: str) -> np.ndarray:
        """The weight as float32 in ONNX layout, dequantized; reads only this tensor's bytes.

        A weight holding NaN or infinite values is refused (AuditError): no verdict can rest on it."""
        w = self.get(name)
        if self._kept is not None:
            self._touched.add(w.name)
            a = self._kept.get(w.name)
            if a is None:
                fut = self._prefetch.pop(w.name, None) if self._prefetch else None
                a = fut.result() if fut is not None else self._read(w)
                a.flags.writeable = False
                self._kept[w.name] = a
            return a
        return self._read(w)

    def _read(self, w: Weight) -> np.ndarray:
        a = np.asarray(self._recipes[w.name](), dtype=np.float32)
        if a.size and not np.isfinite(a).all():
            n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
            raise AuditError(f"weight {w.name!r} holds {n_nan} NaN and {n_inf} infinite values "
                             f"of {a.size}; refusing to judge a mark on it")
        hook = self.after_read
        if hook is not None:    # in the thread that read it (the prefetch thread, when ahead)
            hook(w.name, a)
        return a

    def node(self, node_name: str) -> onnx.NodeProto:
        """A node by name (unnamed nodes are called `<OpType>#<index>`)."""
        return self._nodes[node_name]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        n = self._producer.get(tensor)
        return self._nodes[n] if n is not None else None

    def consumers(self, tensor: str) -> list[tuple[onnx.NodeProto, str, int]]:
        """(node, node name, input index) of every node reading `tensor`."""
        return [(self._nodes[n], n, i) for n, i in self._consumers.get(tensor, [])]

    def is_constant(self, tensor: str) -> bool:
        return tensor in self._consts

    def constant(self, tensor: str) -> np.ndarray:
        """Raw value (stored dtype, not dequantized) of any constant tensor, folded ones included."""
        if tensor not in self._consts:
            raise AuditError(f"tensor {tensor!r} is not a constant of the model")
        return self._value(tensor)

    # ------------------------------------------------------------------ scanning
    def _unique(self, name: str, owner: str | None) -> str:
        if name not in self._consts and name not in self._producer:
            return name
        base = f"{owner}/{name}" if owner else name
        key, i = base, 1
        while key in self._consts or key in self._producer:
            i += 1
            key = f"{base}#{i}"
        return key

    def _scan(self, graph: onnx.GraphProto, outer: dict[str, str], owner: str | None) -> None:
        """Register constants, nodes, producers and consumers of one (sub)graph.

        `outer` maps names visible from enclosing scopes to their keys.
        """
        scope = dict(outer)
        for vi in graph.input:  # a graph input shadows outer names (and is not constant)
            scope.pop(vi.name, None)
        init_loc = f"subgraph:{owner}" if owner else None
        for t in graph.initializer:
            key = self._unique(t.name, owner)
            if init_loc:
                loc = init_loc
            elif t.data_location == onnx.TensorProto.EXTERNAL:
                loc = f"external:{external_info(t).get('location', '')}"
            else:
                loc = "initializer"
            self._consts[key] = _Const(key, loc, tensor=t, owner=owner)
            scope[t.name] = key
        for i, node in enumerate(graph.node):
            nname = node.name or f"{node.op_type}#{len(self._nodes)}"
            if nname in self._nodes:
                nname = f"{owner}/{nname}" if owner else f"{nname}#{len(self._nodes)}"
            self._nodes[nname] = node
            self._node_owner[nname] = owner
            for j, inp in enumerate(node.input):
                if inp and inp in scope:
                    self._consumers.setdefault(scope[inp], []).append((nname, j))
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                t = constant_node_tensor(node)
                if t is not None:
                    key = self._unique(node.output[0], owner)
                    self._consts[key] = _Const(key, init_loc or "constant-node", tensor=t, owner=owner)
                    self._producer[key] = nname
                    self._outputs[nname] = [key]
                    scope[node.output[0]] = key
                    continue
            if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and scope.get(node.input[0]) not in self._consts:
                static = self._static_shape(node)
                if static is not None:
                    # dynamo computes Slice bounds for RNN gates from Shape(zeros)[2:3]: the hidden
                    # size is static even when the batch size is not, so the bounds are constants.
                    key = self._unique(node.output[0], owner)
                    t = helper.make_tensor(node.output[0], onnx.TensorProto.INT64, [len(static)], list(static))
                    self._consts[key] = _Const(key, "folded:Shape", tensor=t, owner=owner)
                    self._producer[key] = nname
                    self._outputs[nname] = [key]
                    scope[node.output[0]] = key
                    continue
            foldable = (
                node.op_type not in _NOT_FOLDABLE and node.domain in ("", "ai.onnx")
                and not _has_subgraph(node)
                and all((not x) or (x in scope and scope[x] in self._consts) for x in node.input)
                and any(node.input)
            )
            self._outputs[nname] = []
            for k, out in enumerate(node.output):
                if not out:
                    self._outputs[nname].append(None)
                    continue
                key = self._unique(out, owner)
                self._outputs[nname].append(key)
                self._producer[key] = nname
                scope[out] = key
                if foldable:
                    self._consts[key] = _Const(
                        key, f"folded:{node.op_type}", node=node,
                        inputs=tuple(scope[x] if x else "" for x in node.input), out_index=k, owner=owner)
            for a in node.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
                for g in subs:
                    # Names the body reads from outer scope count as uses by the owner node.
                    self._scan(g, scope, nname)

    def _static_shape(self, node: onnx.NodeProto) -> tuple[int, ...] | None:
        """The value of Shape(x)[start:end] when shape inference knows those dims statically."""
        known = self._inferred.get(node.input[0])
        if known is None or known[1] is None:
            return None
        dims = known[1]
        start, end = _int(node, "start", 0), (_int(node, "end") if _attr(node, "end") is not None else None)
        sel = dims[start:] if end is None else dims[start:end]
        return None if any(d is None for d in sel) else tuple(sel)

    def _value(self, key: str) -> np.ndarray:
        """Stored-dtype value of a constant (folded ones computed with onnx.reference and cached)."""
        c = self._consts[key]
        if c.tensor is not None:
            return tensor_array(c.tensor, self.base_dir, self._pool)
        if key in self._folded_cache:
            return self._folded_cache[key]
        node = c.node
        feeds = {}
        names = []
        for x, k in zip(node.input, c.inputs):
            names.append(x)
            if x:
                feeds[x] = self._value(k)
        self._check_fold_size(node, key, feeds)
        try:
            opset = self._opset("")
            outs = ReferenceEvaluator(node, opsets={"": opset} if opset else None).run(None, feeds)
        except Exception as e:
            raise AuditError(f"cannot evaluate constant {node.op_type} node producing {key!r}: {type(e).__name__}: {e}") from None
        for k2, kk in enumerate(self._outputs[self._producer[key]]):
            if kk is not None and kk in self._consts:
                self._folded_cache[kk] = np.asarray(outs[k2])
        return self._folded_cache[key]

    def _check_fold_size(self, node: onnx.NodeProto, key: str, feeds: dict[str, np.ndarray]) -> None:
        """Refuse to evaluate a constant node whose output would be larger than the folding limit
        (a ConstantOfShape / Expand / Tile / Range asking for terabytes is a hostile file)."""
        from auditor.read.limits import limits

        cap = limits().max_folded_bytes
        est: int | None = None
        known = self._inferred.get(key)
        if known is not None and known[1] is not None and None not in known[1]:
            est = int(np.prod([max(0, int(d)) for d in known[1]], dtype=object)) if known[1] else 1
        try:
            ins = [feeds.get(x) if x else None for x in node.input]
            op = node.op_type
            if op == "ConstantOfShape" and ins and ins[0] is not None:
                est = int(np.prod([int(d) for d in np.asarray(ins[0]).reshape(-1)], dtype=object))
            elif op == "Expand" and len(ins) > 1 and ins[0] is not None and ins[1] is not None:
                shp = [int(d) for d in np.asarray(ins[1]).reshape(-1)]
                a = list(np.shape(ins[0]))
                n = max(len(a), len(shp))
                a, shp = [1] * (n - len(a)) + a, [1] * (n - len(shp)) + shp
                est = int(np.prod([max(x, y) for x, y in zip(a, shp)], dtype=object))
            elif op == "Tile" and len(ins) > 1 and ins[0] is not None and ins[1] is not None:
                est = int(np.size(ins[0])) * int(np.prod([int(d) for d in np.asarray(ins[1]).reshape(-1)], dtype=object))
            elif op == "Range" and len(ins) > 2 and all(v is not None for v in ins[:3]):
                start, limit_, delta = (float(np.asarray(v).reshape(-1)[0]) for v in ins[:3])
                est = 0 if delta == 0 else int(max(0.0, np.ceil((limit_ - start) / delta)))
                if not np.isfinite((limit_ - start) / delta if delta else 0.0):
                    est = None if delta == 0 else cap + 1
        except (ValueError, TypeError, OverflowError):
            est = None
        if est is not None and est * 8 > cap:
            raise AuditError(f"constant {node.op_type} node producing {key!r} would hold {est} values, over the "
                             f"folding limit of {cap} bytes (WMAUDIT_MAX_FOLDED_BYTES)")

    def _opset(self, domain: str) -> int | None:
        for o in self.model.opset_import:
            if o.domain in (domain, "ai.onnx" if domain == "" else domain):
                return int(o.version)
        return None

    @staticmethod
    def _infer_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...] | None]]:
        """Element type and static shape of every tensor onnx shape inference can type
        (no tensor data is read): folded constants get their shape without evaluation."""
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:
            return {}
        out: dict[str, tuple[int, tuple[int, ...] | None]] = {}
        from auditor.read.graph import iter_graphs
        for g, _ in iter_graphs(inferred.graph):
            for vi in list(g.value_info) + list(g.output):
                tt = vi.type.tensor_type
                if not tt.elem_type:
                    continue
                shape = None
                if tt.HasField("shape"):  # None marks a symbolic / unknown dimension
                    shape = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
                out.setdefault(vi.name, (tt.elem_type, shape))
            for vi in g.input:
                tt = vi.type.tensor_type
                if tt.elem_type and tt.HasField("shape"):
                    out.setdefault(vi.name, (tt.elem_type, tuple(int(d.dim_value) if d.HasField("dim_value") else None
                                                                 for d in tt.shape.dim)))
        return out

    def _shape(self, key: str) -> tuple[int, ...]:
        c = self._consts[key]
        if c.tensor is not None:
            return tensor_shape(c.tensor)
        known = self._inferred.get(key)
        if known is not None and known[1] is not None and None not in known[1]:
            return known[1]
        return tuple(int(d) for d in self._value(key).shape)

    def _elem_type(self, key: str) -> int | None:
        c = self._consts[key]
        if c.tensor is not None:
            return c.tensor.data_type
        known = self._inferred.get(key)
        if known is not None:
            return known[0]
        try:
            return helper.np_dtype_to_tensor_dtype(self._value(key).dtype)
        except Exception:
            return None

    def _dtype(self, key: str) -> str:
        t = self._elem_type(key)
        return dtype_name(t) if t is not None else str(self._value(key).dtype)

    def _is_float(self, key: str) -> bool:
        return self._elem_type(key) in _FLOAT_TYPES

    def _const_key(self, node_name: str, index: int) -> str | None:
        """Key of the node's input `index` if it is a constant, else None."""
        node = self._nodes[node_name]
        if index >= len(node.input) or not node.input[index]:
            return None
        for k, (n, j) in self._input_keys(node_name):
            if j == index:
                return k if k in self._consts else None
        return None

    def _input_keys(self, node_name: str) -> list[tuple[str, tuple[str, int]]]:
        if not hasattr(self, "_inputs_of"):
            inv: dict[str, list[tuple[str, tuple[str, int]]]] = {}
            for k, lst in self._consumers.items():
                for n, j in lst:
                    inv.setdefault(n, []).append((k, (n, j)))
            self._inputs_of = inv
        return self._inputs_of.get(node_name, [])

    def _output_key(self, node_name: str, index: int = 0) -> str | None:
        outs = self._outputs.get(node_name, [])
        return outs[index] if index < len(outs) else None

    # ------------------------------------------------------------------ classification
    def _classify(self) -> list[Weight]:
        quant: dict[str, tuple[str, Callable[[], np.ndarray], tuple[int, ...], list]] = {}
        aux: set[str] = set()        # scales / zero points: never weights themselves
        dq_outputs: set[str] = set()  # DequantizeLinear outputs standing for a listed quantized weight

        def add(wkey: str, label: str, fn: Callable[[], np.ndarray], shape: tuple[int, ...], uses: list, aux_keys: list[str | None]) -> None:
            if wkey in quant:  # one listing per stored tensor, uses merged
                quant[wkey][3].extend(u for u in uses if u not in quant[wkey][3])
            else:
                quant[wkey] = (label, fn, shape, list(uses))
            aux.update(k for k in aux_keys if k)

        for nname, node in self._nodes.items():
            try:
                op, dom = node.op_type, node.domain
                ck = lambda i: self._const_key(nname, i)  # noqa: E731
                if op == "DequantizeLinear" and dom in ("", "ai.onnx", _MS):
                    x, s, z = ck(0), ck(1), ck(2)
                    if x is None or s is None:
                        continue
                    axis = _int(node, "axis", 1)
                    block = _int(node, "block_size", 0)
                    shape = self._shape(x)
                    self._check_qparams(nname, x, s, z, axis, block)
                    if shape and axis < 0:
                        axis += len(shape)
                    out = self._output_key(nname)
                    uses = [(self._nodes[n].op_type, n, j) for n, j in self._consumers.get(out, [])] if out else []
                    label = _quant_label(self._shape(s), axis)
                    if block:
                        label = f"qdq-blocked(axis={axis},block={block})"
                    fn = (lambda x=x, s=s, z=z, axis=axis, block=block:
                          _dequantize(self._value(x), self._value(s), self._value(z) if z else None, axis, block))
                    add(x, label, fn, shape, uses, [s, z])
                    if out:
                        dq_outputs.add(out)
                elif op == "QLinearConv":
                    w, s, z = ck(3), ck(4), ck(5)
                    if w is None or s is None:
                        continue
                    self._check_qparams(nname, w, s, z, 0, 0)
                    fn = lambda w=w, s=s, z=z: _dequantize(self._value(w), self._value(s), self._value(z) if z else None, 0)  # noqa: E731
                    add(w, "QLinearConv", fn, self._shape(w), [(op, nname, 3)], [s, z, ck(1), ck(2), ck(6), ck(7)])
                    b, xs = ck(8), ck(1)
                    if b is not None and xs is not None:
                        fn_b = lambda b=b, xs=xs, s=s: (self._value(b).astype(np.float64) * (self._value(xs).astype(np.float64) * self._value(s).astype(np.float64))).astype(np.float32)  # noqa: E731
                        add(b, "QLinearConv", fn_b, self._shape(b), [(op, nname, 8)], [])
                elif op == "QLinearMatMul" or (op == "QGemm" and dom == _MS):
                    wi, si, zi = 3, 4, 5
                    w, s, z = ck(wi), ck(si), ck(zi)
                    if w is None or s is None:
                        continue
                    shape = self._shape(w)
                    # Per-column scales run along N: axis 1 of B [K,N], axis 0 of B^T [N,K].
                    axis = 0 if (op == "QGemm" and _int(node, "transB", 0)) else len(shape) - 1
                    self._check_qparams(nname, w, s, z, axis, 0)
                    fn = lambda w=w, s=s, z=z, axis=axis: _dequantize(self._value(w), self._value(s), self._value(z) if z else None, axis)  # noqa: E731
                    extra = [ck(1), ck(2)] + ([ck(6), ck(7)] if op == "QLinearMatMul" else [ck(7), ck(8)])
                    add(w, op, fn, shape, [(op, nname, wi)], [s, z] + extra)
                    if op == "QGemm":
                        c, xs = ck(6), ck(1)
                        if c is not None and xs is not None:
                            fn_c = lambda c=c, xs=xs, s=s: (self._value(c).astype(np.float64) * (self._value(xs).astype(np.float64) * self._value(s).astype(np.float64))).astype(np.float32)  # noqa: E731
                            add(c, "QGemm", fn_c, self._shape(c), [(op, nname, 6)], [])
                elif op in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul") and dom == _MS:
                    # onnxruntime's fusion of a dynamically quantized MatMul (saved at extended level):
                    # the int8 weight B with its own scale / zero point as inputs of the fused node
                    si, zi = (3, 5) if op == "MatMulIntegerToFloat" else (2, 3)
                    w, s, z = ck(1), ck(si), ck(zi)
                    if w is None or s is None:
                        continue
                    shape = self._shape(w)
                    axis = len(shape) - 1
                    self._check_qparams(nname, w, s, z, axis, 0)
                    fn = lambda w=w, s=s, z=z, axis=axis: _dequantize(self._value(w), self._value(s), self._value(z) if z else None, axis)  # noqa: E731
                    add(w, op, fn, shape, [(op, nname, 1)], [s, z])
                elif op in ("ConvInteger", "MatMulInteger"):
                    w, z = ck(1), ck(3)
                    if w is None:
                        continue
                    s = self._trace_integer_scale(nname, w)
                    shape = self._shape(w)
                    axis = 0 if op == "ConvInteger" else len(shape) - 1
                    self._check_qparams(nname, w, s, z, axis, 0, scale_any_length=True)
                    fn = lambda w=w, s=s, z=z, axis=axis: self._dequantize_integer(w, s, z, axis)  # noqa: E731
                    add(w, op, fn, shape, [(op, nname, 1)], [s, z, ck(2)])
                elif op == "Gather" and dom in ("", "ai.onnx"):
                    # onnxruntime quantizes an embedding table read by Gather: the integer table is
                    # gathered and the rows' per-tensor scale / zero point sit on the consumer
                    # (DequantizeLinear in QDQ and dynamic mode, QLinearAdd / QLinearMul in QOperator).
                    w = ck(0)
                    out = self._output_key(nname)
                    if w is None or out is None or self._is_float(w):
                        continue
                    sz = None
                    for cname, j in self._consumers.get(out, []):
                        slots = _GATHERED_SCALE.get(self._nodes[cname].op_type, {}).get(j)
                        if slots is not None:
                            sz = (self._const_key(cname, slots[0]), self._const_key(cname, slots[1]))
                            break
                    if sz is None or sz[0] is None or self._value(sz[0]).size != 1:
                        continue
                    s, z = sz
                    fn = lambda w=w, s=s, z=z: _dequantize(self._value(w), self._value(s), self._value(z) if z else None, 0)  # noqa: E731
                    add(w, "quantized-Gather", fn, self._shape(w), [(op, nname, 0)], [s, z])
                elif op == "DynamicQuantizeLSTM" and dom == _MS:
                    for wi, si, zi, tag in ((1, 8, 9, "W"), (2, 10, 11, "R")):
                        w, s, z = ck(wi), ck(si), ck(zi)
                        if w is None or s is None:
                            continue
                        fn = lambda w=w, s=s, z=z: self._dequantize_lstm(w, s, z)  # noqa: E731
                        add(w, "DynamicQuantizeLSTM", fn, self._shape(w), [(op, nname, wi)], [s, z])
                elif op == "MatMulNBits" and dom == _MS:
                    b, s = ck(1), ck(2)
                    if b is None or s is None:
                        continue
                    z = ck(3)
                    self._check_nbits(nname, b, s, z)
                    K, N = _int(node, "K"), _int(node, "N")
                    fn = lambda nname=nname, b=b, s=s, z=z: self._dequantize_nbits(nname, b, s, z)  # noqa: E731
                    add(b, "MatMulNBits", fn, (K, N), [(op, nname, 1)], [s, z, ck(4)])
            except (MalformedQuantization, MalformedAttribute):
                raise
            except AuditError:
                continue  # a quantized form whose constants cannot be evaluated stays unlisted

        self._quantized_keys = set(quant)
        relaid = self._nchwc_weights()
        from auditor.read.packed import packed_inputs
        for p in packed_inputs(self):  # MultiHeadAttention's packed inputs laid out in a way not read
            if p.reason is not None and p.weight_key is not None:
                self._unreadable(p.weight_key, p.attention, p.reason)
        unread = {u["tensor"] for u in self.unreadable}
        weights: list[Weight] = []
        taken: set[str] = set()
        for key, c in self._consts.items():
            if key in unread:
                continue  # not readable in ONNX layout: listed in self.unreadable instead
            if key in relaid:
                for name, layout, fn, shape, uses, aliases in relaid[key]:
                    taken.add(name)
                    self._recipes[name] = fn
                    weights.append(Weight(name=name, stored_name=key, shape=shape, stored_dtype=self._dtype(key),
                                          location=c.location, uses=uses, layout=layout, aliases=aliases))
                continue
            if key in aux and key not in quant:
                continue
            if key in quant:
                label, fn, shape, uses = quant[key]
                name = _float_name(key)
                # onnxruntime may name the DequantizeLinear output after the float tensor it replaces.
                own_output = name in dq_outputs and self._consts[name].inputs[:1] == (key,)
                if name != key and not own_output and (name in self._consts or name in self._producer or name in taken):
                    name = key
                stored_dtype = self._dtype(key)
            else:
                if key in dq_outputs:
                    continue
                uses = [(self._nodes[n].op_type, n, j) for n, j in self._consumers.get(key, [])]
                if c.node is not None:
                    # A folded intermediate (read only by further folding) is not a weight of its own,
                    # nor is a tensor built from scalars and shapes only (zeros for initial states).
                    if uses and all(k2 in self._consts for k2 in self._outputs_of_users(key)):
                        continue
                    if not self._derives_from_weight(key):
                        continue
                elif c.tensor is not None and len(c.tensor.dims) == 0:
                    continue  # 0-d float constants are arithmetic, not weights
                try:
                    if not self._is_float(key):
                        continue
                    label, name, stored_dtype = None, key, self._dtype(key)
                    shape = self._shape(key)
                except AuditError:
                    if c.node is None:
                        raise
                    continue  # a constant the reference evaluator cannot compute is left out, not fatal
                # a folded value is cached: hand out a copy; a stored tensor is read fresh each time
                fn = (lambda key=key, cached=c.node is not None: self._value(key).astype(np.float32, copy=cached))
            taken.add(name)
            self._recipes[name] = fn
            weights.append(Weight(name=name, stored_name=key, shape=tuple(int(d) for d in shape),
                                  stored_dtype=stored_dtype, location=c.location, quant=label, uses=list(uses)))
        return weights

    # ------------------------------------------------------------------ runtime layouts (NCHWc)
    def _nchwc_weights(self) -> dict[str, list[tuple]]:
        """The weights of onnxruntime's NCHWc Convs, unblocked to ONNX (OIHW) layout with the padding
        dropped: stored key -> [(name, layout label, recipe, shape, uses, aliases)]. A Conv whose
        layout is not understood goes to `self.unreadable` instead."""
        from auditor.read import blocked

        convs, other = [], []
        for nname, node in self._nodes.items():
            if node.domain == blocked.NCHWC_DOMAIN:
                (convs if node.op_type == "Conv" else other).append(nname)
        out: dict[str, list[tuple]] = {}
        for nname in other:  # reorder / pooling ops carry no weight; an unknown op with one is not read
            node = self._nodes[nname]
            if node.op_type in ("ReorderInput", "ReorderOutput", "MaxPool", "AveragePool", "GlobalMaxPool",
                                "GlobalAveragePool", "Upsample"):
                continue
            for j in range(len(node.input)):
                k = self._const_key(nname, j)
                if k is not None and self._is_float(k) and len(self._shape(k)) >= 2:
                    self._unreadable(k, nname, f"{blocked.NCHWC_DOMAIN}:{node.op_type} is not an operator "
                                               "onnxruntime writes; its weight's layout is unknown")
        facts = {}
        for nname in convs:
            f = self._nchwc_facts(nname)
            if isinstance(f, str):
                k = self._const_key(nname, 1)
                self._unreadable(k or self._nodes[nname].input[1], nname, f)
            else:
                facts[nname] = f
        if not facts:
            return out
        common = set(blocked.BLOCK_SIZES)
        for f in facts.values():
            common &= set(f["blocks"])
        if len(common) > 1:  # a reading whose channel padding is not zero is not the one onnxruntime wrote
            common = {B for B in common if all(self._zero_padding(f, B) for f in facts.values())} or common
        if not common:
            for nname, f in facts.items():
                self._unreadable(f["w"], nname, "no NCHWc block size (8: AVX2, 16: AVX-512) fits every blocked "
                                                "Conv of this file; the layout is not onnxruntime's")
            return out
        for nname, f in facts.items():
            for B in sorted(common):
                order = f["blocks"][B]
                O = f["channels"] if f["channels"] is not None else f["dims"][0]
                shape = (O,) + tuple(f["dims"][1:])
                name = f["w"] if len(common) == 1 else f"{f['w']}@nchwc{B}"
                label = f"nchwc(block={B},{order}" + (f",{f['dims'][0]}->{O} channels)" if O != f["dims"][0] else ")")
                fn = (lambda key=f["w"], B=B, order=order, O=O: self._unblock(key, B, order, O))
                entries = out.setdefault(f["w"], [])
                same = next((e for e in entries if e[0] == name), None)
                if same is not None:  # one reordered filter shared by several Convs: one weight, every use
                    same[4].append(("Conv", nname, 1))
                    same[5].extend(a for a in f["aliases"] if a not in same[5])
                else:
                    entries.append((name, label, fn, shape, [("Conv", nname, 1)], list(f["aliases"])))
            b = f["bias"]
            if b is not None and f["channels"] is not None and self._shape(b) == (f["dims"][0],) != (f["channels"],):
                fn = (lambda key=b, O=f["channels"]: np.asarray(self._value(key), dtype=np.float32)[:O].copy())
                label = f"nchwc(padded {f['dims'][0]}->{f['channels']} channels)"
                out.setdefault(b, [(b, label, fn, (f["channels"],), [("Conv", nname, 2)], [])])
        return out

    def _unreadable(self, key: str, node_name: str, reason: str) -> None:
        shape = list(self._shape(key)) if key in self._consts else None
        self.unreadable.append({"tensor": key, "node": node_name, "op": f"{self._nodes[node_name].domain}:"
                                f"{self._nodes[node_name].op_type}", "shape": shape, "reason": reason})

    def _nchwc_facts(self, nname: str) -> dict | str:
        """What one NCHWc Conv says about its weight: dims, group, the block sizes (with their filter
        order) it allows, its true output channels where the graph states them, names from its bias.
        A string: why the layout is not understood."""
        from auditor.read import blocked

        node = self._nodes[nname]
        unknown = sorted(a.name for a in node.attribute if a.name not in blocked.KNOWN_CONV_ATTRIBUTES)
        if unknown:
            return (f"attribute {unknown[0]!r} is not one onnxruntime writes on an NCHWc Conv; "
                    "the blocked layout it describes is unknown")
        w = self._const_key(nname, 1)
        if w is None:
            return "its weight is not a constant of the file"
        if self._elem_type(w) != onnx.TensorProto.FLOAT or len(self._shape(w)) != 4:
            return f"its weight is {dtype_name(self._elem_type(w) or 0)} of rank {len(self._shape(w))}, " \
                   "onnxruntime blocks float32 4-D weights only"
        dims = tuple(int(d) for d in self._shape(w))
        try:
            group = _int(node, "group", 1)
        except AuditError as e:
            return str(e)
        channels = self._nchwc_out_channels(nname)
        bias = self._const_key(nname, 2)
        if channels is None and bias is not None and self._shape(bias) == (dims[0],) and not self._stored_name(bias).startswith("reorder"):
            channels = dims[0]  # onnxruntime pads only a bias it renames; an original bias gives the count
        blocked_input = self._nchwc_tensor(node.input[0])
        blocks = {}
        for B in blocked.BLOCK_SIZES:
            if dims[0] % B or (channels is not None and blocked.roundup(channels, B) != dims[0]):
                continue
            order = blocked.filter_order(dims[1], channels if channels is not None else dims[0], group, B)
            if order is None:
                continue
            if (order == "OIHWBiBo" or group > 1) != blocked_input:
                continue  # a blocked filter reads an NCHWc input, the NCHW-input filter does not
            blocks[B] = order
        if not blocks:
            return (f"its weight [{', '.join(map(str, dims))}] (group {group}) fits no NCHWc block size "
                    f"({', '.join(map(str, blocked.BLOCK_SIZES))}) as onnxruntime lays it out")
        aliases = []
        bname = node.input[2] if len(node.input) > 2 else ""
        for suffix, repl in (("_bias", ""), (".bias", ".weight")):
            if bname.endswith(suffix) and not bname.startswith("reorder"):
                aliases.append(bname[: -len(suffix)] + repl)
                break
        return {"w": w, "dims": dims, "group": group, "channels": channels, "blocks": blocks,
                "bias": bias, "aliases": aliases}

    def _stored_name(self, key: str) -> str:
        c = self._consts[key]
        return c.tensor.name if c.tensor is not None else key

    def _nchwc_tensor(self, tensor: str, depth: int = 0) -> bool:
        """Is this tensor in NCHWc layout (made by an NCHWc op, possibly through element-wise ops)?"""
        from auditor.read import blocked

        p = self._producer.get(tensor)
        if p is None or depth > 64:
            return False
        node = self._nodes[p]
        if node.domain == blocked.NCHWC_DOMAIN:
            return node.op_type != "ReorderOutput"
        if node.domain in ("", "ai.onnx") and node.op_type in _NCHWC_PASSTHROUGH and node.input:
            return self._nchwc_tensor(node.input[0], depth + 1)
        return False

    def _nchwc_out_channels(self, nname: str) -> int | None:
        """The true output channels of an NCHWc Conv, where the graph states them downstream:
        ReorderOutput's `channels`, or the input channels of the next NCHWc Conv's weight."""
        from auditor.read import blocked

        frontier, seen = [self._output_key(nname)], set()
        while frontier and len(seen) < 256:
            t = frontier.pop()
            if not t or t in seen:
                continue
            seen.add(t)
            for n, j in self._consumers.get(t, []):
                node = self._nodes[n]
                if node.domain == blocked.NCHWC_DOMAIN and node.op_type == "ReorderOutput":
                    try:
                        return _int(node, "channels")
                    except AuditError:
                        return None
                if node.domain == blocked.NCHWC_DOMAIN and node.op_type == "Conv" and j == 0:
                    w = self._const_key(n, 1)
                    if w is not None and len(self._shape(w)) == 4:
                        try:
                            return int(self._shape(w)[1]) * _int(node, "group", 1)
                        except AuditError:
                            return None
                if (node.domain == blocked.NCHWC_DOMAIN and node.op_type in ("Conv", "MaxPool", "AveragePool", "Upsample")) \
                        or (node.domain in ("", "ai.onnx") and node.op_type in _NCHWC_PASSTHROUGH):
                    frontier.extend(k for k in self._outputs.get(n, []) if k)
        return None

    def _zero_padding(self, f: dict, block: int) -> bool:
        """Is the padding a block-size reading drops from an NCHWc Conv's weight zero (True where the
        reading drops none)?"""
        from auditor.read import blocked

        O = f["channels"]
        if O is None or O >= f["dims"][0]:
            return True
        try:
            self._unblock(f["w"], block, f["blocks"][block], O)
        except blocked.UnknownLayout:
            return False
        return True

    def _unblock(self, key: str, block: int, order: str, channels: int) -> np.ndarray:
        from auditor.read import blocked

        stored = np.asarray(self._value(key), dtype=np.float32)
        if stored.shape[0] > channels:
            real = blocked.block_weight(np.ones((channels,) + stored.shape[1:], np.float32), block, order) != 0
            if np.any(stored[~real]):
                raise blocked.UnknownLayout(f"weight {key!r}: the NCHWc padding of {channels} channels in blocks "
                                            f"of {block} holds non-zero values; not onnxruntime's layout")
        return blocked.unblock_weight(stored, block, order, channels)


    # ------------------------------------------------------------------ quantization parameters
    def _check_qparams(self, nname: str, x: str, s: str | None, z: str | None, axis: int, block: int,
                       scale_any_length: bool = False) -> None:
        """Types, axis, lengths and values of a weight's scale / zero point, as onnxruntime requires
        them; MalformedQuantization (one line) otherwise. Scales are small: their values are read."""
        where = f"node {nname!r}"
        xt = self._elem_type(x)
        if xt in _FLOAT_TYPES:
            raise MalformedQuantization(f"{where}: the quantized tensor {x!r} is {dtype_name(xt)}, not an integer type")
        shape = self._shape(x)
        rank = len(shape)
        if s is None:
            return
        st = self._elem_type(s)
        if st not in _FLOAT_TYPES:
            raise MalformedQuantization(f"{where}: scale {s!r} is {dtype_name(st) if st else 'untyped'}, not a float type")
        sshape = self._shape(s)
        n_s = int(np.prod(sshape, dtype=np.int64)) if sshape else 1
        if z is not None:
            zt = self._elem_type(z)
            if zt != xt:
                raise MalformedQuantization(f"{where}: zero point {z!r} is {dtype_name(zt) if zt else 'untyped'}, "
                                            f"the quantized tensor is {dtype_name(xt)}")
            zshape = self._shape(z)
            n_z = int(np.prod(zshape, dtype=np.int64)) if zshape else 1
            if n_z != n_s and not (scale_any_length and 1 in (n_z, n_s)):
                raise MalformedQuantization(f"{where}: {n_z} zero points for {n_s} scales")
            if n_z == n_s and n_s > 1 and list(zshape) != list(sshape):
                raise MalformedQuantization(f"{where}: zero points of shape {list(zshape)}, scales of shape {list(sshape)}")
        if block:
            if block < 0:
                raise MalformedQuantization(f"{where}: block_size {block} is negative")
            if not -rank <= axis < rank or len(sshape) != rank:
                raise MalformedQuantization(f"{where}: blocked scales {list(sshape)} do not fit a tensor of shape "
                                            f"{list(shape)} along axis {axis}")
            a = axis % rank
            want = [(-(-d // block) if i == a else d) for i, d in enumerate(shape)]
            if list(sshape) != want:
                raise MalformedQuantization(f"{where}: blocked scales have shape {list(sshape)}, blocks of {block} "
                                            f"along axis {a} of {list(shape)} need {want}")
        elif n_s != 1:
            if not rank or not -rank <= axis < rank:
                raise MalformedQuantization(f"{where}: axis {axis} is out of range for a tensor of rank {rank}")
            if len(sshape) != 1 and not scale_any_length:
                raise MalformedQuantization(f"{where}: per-channel scales must be 1-D, got shape {list(sshape)}")
            if n_s != shape[axis % rank]:
                raise MalformedQuantization(f"{where}: {n_s} scales for {shape[axis % rank]} channels along axis "
                                            f"{axis % rank} of {list(shape)}")
        if n_s <= (1 << 20):
            vals = np.asarray(self._value(s), dtype=np.float64)
            bad = ~np.isfinite(vals) | (vals <= 0)
            if bad.any():
                v = vals[bad].flat[0]
                raise MalformedQuantization(f"{where}: scale {s!r} holds {int(bad.sum())} value(s) that are not "
                                            f"finite and positive (e.g. {v!r})")

    def _check_nbits(self, nname: str, b: str, s: str, z: str | None) -> None:
        """MatMulNBits attributes against the shapes of B, scales and zero points."""
        node = self._nodes[nname]
        where = f"MatMulNBits node {nname!r}"
        try:
            K, N = _int(node, "K"), _int(node, "N")
            bits, block = _int(node, "bits", 4), _int(node, "block_size")
        except (TypeError, ValueError, AuditError):
            raise MalformedQuantization(f"{where}: attributes K, N, block_size must be integers") from None
        if K <= 0 or N <= 0:
            raise MalformedQuantization(f"{where}: K={K}, N={N} must be positive")
        if bits not in (2, 4, 8):
            raise MalformedQuantization(f"{where}: bits={bits}; MatMulNBits packs 2, 4 or 8 bits")
        if block < 16 or block & (block - 1):
            raise MalformedQuantization(f"{where}: block_size={block} must be a power of two >= 16")
        n_blocks = -(-K // block)
        blob = block * bits // 8
        bshape = list(self._shape(b))
        if bshape != [N, n_blocks, blob]:
            raise MalformedQuantization(f"{where}: B has shape {bshape}; K={K}, N={N}, bits={bits}, "
                                        f"block_size={block} need {[N, n_blocks, blob]}")
        n_s = int(np.prod(self._shape(s), dtype=np.int64))
        if n_s != N * n_blocks:
            raise MalformedQuantization(f"{where}: {n_s} scales, need N x blocks = {N * n_blocks}")
        if z is not None:
            n_z = int(np.prod(self._shape(z), dtype=np.int64))
            packed = N * (-(-n_blocks * bits // 8))
            if n_z not in (packed, N * n_blocks):
                raise MalformedQuantization(f"{where}: {n_z} zero points, need {packed} (packed) or {N * n_blocks}")
        vals = np.asarray(self._value(s), dtype=np.float64) if n_s <= (1 << 20) else None
        # (blockwise scales may be zero or negative: onnxruntime's 4-bit quantizer writes such blocks)
        if vals is not None and (~np.isfinite(vals)).any():
            raise MalformedQuantization(f"{where}: {int((~np.isfinite(vals)).sum())} scales are NaN or infinite")

    def _derives_from_weight(self, key: str, _memo: dict | None = None) -> bool:
        """True when a folded constant reads (transitively) a stored float tensor of rank >= 1."""
        memo = self._derive_memo if hasattr(self, "_derive_memo") else {}
        self._derive_memo = memo
        if key in memo:
            return memo[key]
        memo[key] = False
        c = self._consts[key]
        if c.tensor is not None:
            r = (c.tensor.data_type in _FLOAT_TYPES or key in self._quantized_keys) and len(c.tensor.dims) >= 1
        else:
            r = any(k and k in self._consts and self._derives_from_weight(k) for k in c.inputs)
        memo[key] = r
        return r

    def _outputs_of_users(self, key: str) -> list[str]:
        """Keys of the outputs of every node that reads `key` (empty string for none)."""
        outs = []
        for n, _ in self._consumers.get(key, []):
            ks = [self._output_key(n, i) for i in range(len(self._nodes[n].output))]
            ks = [k for k in ks if k]
            outs.extend(ks or [""])
        return outs

    def _trace_integer_scale(self, node_name: str, w_key: str) -> str | None:
        """The float scale of a ConvInteger / MatMulInteger weight.

        onnxruntime's dynamic quantization multiplies the int32 result (after a
        Cast) by x_scale * w_scale, computed by a Mul of the dynamic input
        scale and the constant `<w>_scale`: follow Cast/Mul forward and take the
        constant factor. Falls back to the naming convention.
        """
        base = w_key[: -len("_quantized")] if w_key.endswith("_quantized") else w_key
        cand = f"{base}_scale"
        out = self._output_key(node_name)
        frontier = [out] if out else []
        seen = set()
        while frontier:
            t = frontier.pop()
            if t in seen:
                continue
            seen.add(t)
            for n, j in self._consumers.get(t, []):
                node = self._nodes[n]
                if node.op_type == "Cast":
                    o = self._output_key(n)
                    if o:
                        frontier.append(o)
                elif node.op_type == "Mul":
                    other = self._const_key(n, 1 - j)
                    pk = self._input_key_at(n, 1 - j)
                    prod = self._producer.get(pk) if pk else None
                    factors = []
                    if prod and self._nodes[prod].op_type == "Mul":
                        factors = [k2 for jj in range(2)
                                   if (k2 := self._const_key(prod, jj)) is not None and self._is_float(k2)]
                    # x_scale * w_scale with both factors constant (the input was quantized ahead of
                    # time, e.g. a quantized embedding Gather feeding ConvInteger; the product may even
                    # be folded into a constant): take the weight's own scale, not the product
                    if cand in factors:
                        return cand
                    if other is not None and self._is_float(other):
                        return other
                    if factors:
                        return factors[0]
        return cand if cand in self._consts else None

    def _dequantize_integer(self, w: str, s: str | None, z: str | None, axis: int) -> np.ndarray:
        """ConvInteger / MatMulInteger weight: (w - zero_point) * scale along `axis`.

        Without a traceable float scale the unit scale is used: the weight is
        then known up to one positive factor per channel (signs and ranks intact).
        """
        q = self._value(w)
        zp = self._value(z) if z else None
        if s is not None:
            scale = np.asarray(self._value(s), dtype=np.float32)
        else:
            scale = np.ones(zp.shape if zp is not None else (), dtype=np.float32)
        scale = scale.reshape(-1) if scale.size > 1 else scale.reshape(())
        if zp is not None:
            zp = zp.reshape(-1) if zp.size > 1 else zp.reshape(())
            if scale.ndim == 0 and zp.ndim == 1:
                scale = np.full(zp.shape, scale, dtype=np.float32)
            elif zp.ndim == 0 and scale.ndim == 1:
                zp = np.full(scale.shape, zp, dtype=zp.dtype)
        return _dequantize(q, scale, zp, axis)

    def _input_key_at(self, node_name: str, index: int) -> str | None:
        for k, (_, j) in self._input_keys(node_name):
            if j == index:
                return k
        # A non-constant input produced in scope: find by name.
        node = self._nodes[node_name]
        name = node.input[index] if index < len(node.input) else ""
        return name if name in self._producer else None

    def _dequantize_lstm(self, w: str, s: str, z: str | None) -> np.ndarray:
        """DynamicQuantizeLSTM W [D, in, 4H] / R [D, H, 4H]; scale [D] (per tensor) or [D, 4H] (per channel)."""
        q = self._value(w)
        scale = self._value(s)
        zp = self._value(z) if z else None
        out = np.empty(q.shape, dtype=np.float32)
        for d in range(q.shape[0]):
            sd = scale[d] if scale.ndim >= 1 else scale
            zd = (zp[d] if zp.ndim >= 1 else zp) if zp is not None else None
            out[d] = _dequantize(q[d], np.asarray(sd), None if zd is None else np.asarray(zd), axis=1)
        return out

    def _dequantize_nbits(self, node_name: str, b: str, s: str, z: str | None) -> np.ndarray:
        """com.microsoft MatMulNBits: B [N, n_blocks, blob] packed low nibble first -> float [K, N]."""
        node = self._nodes[node_name]
        K, N = _int(node, "K"), _int(node, "N")
        bits = _int(node, "bits", 4)
        block = _int(node, "block_size")
        if bits != 4:
            raise AuditError(f"MatMulNBits with bits={bits} is not supported (4-bit only)")
        packed = self._value(b).astype(np.uint8)
        n_blocks = (K + block - 1) // block
        packed = packed.reshape(N, n_blocks, -1)
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, n_blocks, -1)[:, :, :block].astype(np.float32)
        scales = self._value(s).astype(np.float32).reshape(N, n_blocks)
        if z is None:
            zp = np.full((N, n_blocks), 8.0, dtype=np.float32)
        else:
            zraw = self._value(z)
            if np.issubdtype(zraw.dtype, np.floating):
                zp = zraw.astype(np.float32).reshape(N, n_blocks)
            else:
                zb = zraw.astype(np.uint8).reshape(N, -1)
                zp = np.stack([zb & 0x0F, zb >> 4], axis=-1).reshape(N, -1)[:, :n_blocks].astype(np.float32)
        deq = (q - zp[:, :, None]) * scales[:, :, None]
        return np.ascontiguousarray(deq.reshape(N, n_blocks * block)[:, :K].T)

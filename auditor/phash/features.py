"""Features of any named tensor of an ONNX model: expose it as a graph output, run, flatten.

``expose(model, layer)`` returns a copy of the model with one more output, an
Identity of ``layer`` (any tensor a node produces) named ``<layer>.phash``;
``layer=None`` means the model's first output. The Identity keeps the tensor
itself internal, so a conversion that rewrites graph outputs (fp16 with
``keep_io_types`` casts them) does not change the types its consumers see. ``features(model, x, layer)`` runs onnxruntime (CPU) and returns the
tensor flattened to [N, D] float32. Deployment attacks are applied to the
exposed model, so the layer stays a graph output, which every onnxruntime
quantizer keeps as a float tensor of the same name.
"""
from __future__ import annotations

import numpy as np
import onnx

from auditor.errors import AuditError

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


def input_info(model: onnx.ModelProto) -> tuple[str, list]:
    """Name and declared shape (ints, or the symbolic name / None) of the model's one data input."""
    inits = {i.name for i in model.graph.initializer}
    ins = [i for i in model.graph.input if i.name not in inits]
    if len(ins) != 1:
        raise AuditError(f"perceptual hashes need a model with one input; this one has {len(ins)}")
    dims = []
    for d in ins[0].type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return ins[0].name, dims


def produced_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of every tensor a node of the main graph produces, in graph order."""
    return [o for n in model.graph.node for o in n.output if o]


def _elem_type(model: onnx.ModelProto, name: str) -> int | None:
    for vi in list(model.graph.value_info) + list(model.graph.output):
        if vi.name == name and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a hint here, not a requirement
        return None
    for vi in inferred.graph.value_info:
        if vi.name == name and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    return None


def expose(model: onnx.ModelProto, layer: str | None) -> tuple[onnx.ModelProto, str]:
    """(copy of ``model`` with ``layer`` among its outputs, output name to read)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outputs = [o.name for o in m.graph.output]
    if layer is None:
        if not outputs:
            raise AuditError("the model has no outputs")
        return m, outputs[0]
    if layer in outputs:
        return m, layer
    produced = produced_tensors(m)
    if layer not in produced and f"{layer}_quantized" in produced:
        return _expose_quantized(m, layer)
    if layer not in produced:
        hint = ", ".join(produced[-5:])
        raise AuditError(f"no tensor named {layer!r} in the model (last tensors: {hint})")
    et = _elem_type(m, layer)
    if et is not None and et not in _FLOAT_TYPES:
        raise AuditError(f"tensor {layer!r} is {onnx.TensorProto.DataType.Name(et)}, not a float tensor; "
                         f"name the dequantized tensor instead")
    out = f"{layer}.phash"
    if out in produced:
        raise AuditError(f"the model already has a tensor named {out!r}")
    m.graph.node.append(onnx.helper.make_node("Identity", [layer], [out], name=f"{layer}.phash/Identity"))
    m.graph.output.append(onnx.helper.make_tensor_value_info(out, et or onnx.TensorProto.FLOAT, None))
    return m, out


# QOperator consumers whose quantized operand at input i has its scale and zero point at i+1, i+2.
_QLINEAR_OPS = {"DequantizeLinear", "QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearMul",
                "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid",
                "QLinearLeakyRelu", "QLinearSoftmax"}


def _expose_quantized(m: onnx.ModelProto, layer: str) -> tuple[onnx.ModelProto, str]:
    """onnxruntime's QOperator format renames a float tensor X to X_quantized (uint8/int8):
    expose DequantizeLinear(X_quantized, scale, zero point) with the parameters its consumer uses."""
    q = f"{layer}_quantized"
    for n in m.graph.node:
        if n.op_type in _QLINEAR_OPS and n.op_type != "QLinearConcat":
            for i, name in enumerate(n.input):
                if name == q and len(n.input) > i + 2 and n.input[i + 1]:
                    out = f"{layer}.phash"
                    m.graph.node.append(onnx.helper.make_node(
                        "DequantizeLinear", [q, n.input[i + 1], n.input[i + 2]], [out], name=f"{layer}.phash/Dequantize"))
                    m.graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
                    return m, out
    raise AuditError(f"tensor {layer!r} is quantized ({q}) and no consumer names its scale and zero point")


def run(model: onnx.ModelProto, x: np.ndarray, output: str, batch_size: int = 64, target: str = "native",
        hardware: dict | None = None) -> np.ndarray:
    """``output`` of ``model`` on ``x`` on ``target`` (the model runs in the target's limited child:
    auditor.data.accuracy.outputs), flattened to [N, D] float32. ``hardware``, when given, receives
    the record of the process that ran it."""
    from auditor.data.accuracy import outputs
    from auditor.data.inputs import from_arrays

    data = from_arrays(model, np.ascontiguousarray(x, dtype=np.float32), source="hash inputs",
                       batch_size=batch_size)
    outs, hw = outputs(model, data, threads=1, backend=target, with_hardware=True)
    if output not in outs:
        raise AuditError(f"the model has no output {output!r}")
    if hardware is not None:
        hardware.update(hw)
    y = np.asarray(outs[output], dtype=np.float32).reshape(len(x), -1)
    if not np.isfinite(y).all():
        raise AuditError(f"tensor {output!r} holds non-finite values on these inputs")
    return y


def features(model: onnx.ModelProto, x: np.ndarray, layer: str | None) -> np.ndarray:
    """[N, D] features of ``layer`` (None: the first output) for inputs ``x``."""
    m, out = expose(model, layer)
    return run(m, x, out)

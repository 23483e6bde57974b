"""Lower-precision weights: fp16 conversion and int4 weight-only MatMulNBits.

* ``fp16``: ``onnxconverter_common.float16.convert_float_to_float16`` with
  ``keep_io_types=True`` (inputs/outputs stay float32, Casts at the edges),
  the conversion deployers use for onnxruntime / TensorRT fp16.
* ``int4``: onnxruntime's ``MatMulNBitsQuantizer`` (default weight-only
  algorithm, symmetric, blocks of ``block_size`` along K) on every MatMul
  with a constant weight -> com.microsoft MatMulNBits. Conv and Gemm weights
  are not touched by this quantizer; the notes say how many MatMuls were
  quantized (none = model unchanged).
"""
from __future__ import annotations

import onnx

from auditor.errors import AuditError
from auditor.attacks import AttackResult, cap_ir_version, copy_model
from auditor.attacks.quantize import _quiet


def to_fp16(model: onnx.ModelProto, *, keep_io_types: bool = True) -> AttackResult:
    """Every float32 initializer and op converted to float16 (io types kept by default)."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise AuditError("fp16 conversion needs onnxconverter-common (pip install onnxconverter-common)") from None
    m = copy_model(model)
    with _quiet() as caught:
        out = float16.convert_float_to_float16(m, keep_io_types=keep_io_types)
    n16 = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in out.graph.initializer)
    notes = [f"onnxconverter_common.float16: {n16} initializers stored as float16"]
    fixed = _retarget_casts(out)
    if fixed:
        notes.append(f"{fixed} Cast node(s) to float retargeted to float16 (onnxconverter_common typed their "
                     f"outputs float16 but left Cast(to=float), which onnxruntime refuses)")
    clamped = sum("will be truncated" in str(w.message) for w in caught)
    if clamped:
        # one library warning per tensor end; summarised here instead of printed (WMAUDIT_DEBUG shows them)
        notes.append(f"{clamped} tensor extremes outside the float16 range (|x| < 1e-7 or > 1e4) were clamped "
                     f"by onnxconverter_common")
    return AttackResult(cap_ir_version(out), {"mode": "fp16", "keep_io_types": bool(keep_io_types)}, notes)


def _retarget_casts(model: onnx.ModelProto) -> int:
    """Cast(to=FLOAT) whose output the converter declared FLOAT16 (e.g. an int attention mask cast to
    float): make the Cast produce float16, as the rest of the converted graph expects. In place."""
    f16 = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    done = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or not node.output or node.output[0] not in f16:
            continue
        for a in node.attribute:
            if a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                a.i = onnx.TensorProto.FLOAT16
                done += 1
    return done


def _matmul_with_constant_weight(model: onnx.ModelProto) -> int:
    inits = {i.name for i in model.graph.initializer}
    return sum(n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits for n in model.graph.node)


def _int4_model(m: onnx.ModelProto, block_size: int, symmetric: bool) -> onnx.ModelProto:
    """onnxruntime's MatMulNBitsQuantizer on m (run in an isolated process)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=4)
    with _quiet():
        q = MatMulNBitsQuantizer(m, algo_config=cfg)
        q.process()
    return q.model.model


def to_int4(model: onnx.ModelProto, *, block_size: int = 32, symmetric: bool = True) -> AttackResult:
    """int4 weight-only quantization of MatMul weights (MatMulNBits, QOperator form)."""

    if block_size < 16 or block_size & (block_size - 1):
        raise AuditError(f"int4 block size must be a power of two >= 16, got {block_size}")
    params = {"mode": "int4", "block_size": int(block_size), "symmetric": bool(symmetric)}
    m = copy_model(model)
    n = _matmul_with_constant_weight(m)
    if n == 0:
        return AttackResult(m, params, ["int4: no MatMul with a constant weight; model unchanged "
                                        "(Conv and Gemm weights are not quantized by MatMulNBits)"])
    from auditor.backends import isolate

    out = isolate.call(_int4_model, m, block_size, symmetric, what="onnxruntime's MatMulNBitsQuantizer")
    done = sum(nd.op_type == "MatMulNBits" for nd in out.graph.node)
    return AttackResult(cap_ir_version(out), params,
                        [f"int4 MatMulNBits: {done} of {n} MatMul weights quantized (block {block_size})"])

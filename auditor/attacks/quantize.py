"""int8 quantization with onnxruntime's own tools (``onnxruntime.quantization``).

Modes (``quantize(model, mode, ...)``):

* ``dynamic``: ``quantize_dynamic`` -> ConvInteger / MatMulInteger /
  DynamicQuantizeLSTM; weights int8 (or uint8), activations quantized at run
  time, no calibration. onnxruntime ignores per-channel for Conv here.
* ``static-qdq`` / ``static-qdq-per-channel``: ``quantize_static`` with
  ``QuantFormat.QDQ`` (DequantizeLinear before float ops), per-tensor or
  per-channel weights.
* ``static-qop`` / ``static-qop-per-channel``: ``quantize_static`` with
  ``QuantFormat.QOperator`` (QLinearConv, com.microsoft QGemm, ...).

Static modes need a ``Calibration`` (auditor.data.calibration): activation ranges
are computed once per float model and method and read back through
``quantize_static(calibration_cache_path=...)``.

Pre-processing (default on): stale ``graph.value_info`` is dropped (new-exporter
files can carry shapes that no longer hold) and ``quant_pre_process`` runs
shape inference with ``skip_optimization=True``, so BatchNorm stays a separate
node, as it was exported. ``keep_batchnorm=False`` lets it run onnxruntime's
optimizer, which folds BatchNorm into the conv weights (what a deployer
following onnxruntime's recipe gets); the notes say which happened.
"""
from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import onnx

from auditor.errors import AuditError
from auditor.attacks import AttackResult, cap_ir_version, copy_model, load, save, workdir
from auditor.backends import isolate

DYNAMIC = "dynamic"
STATIC_MODES = {
    "static-qdq": ("qdq", False),
    "static-qdq-per-channel": ("qdq", True),
    "static-qop": ("qop", False),
    "static-qop-per-channel": ("qop", True),
}
MODES = (DYNAMIC, *STATIC_MODES)
TYPES = ("int8", "uint8")


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    if name not in TYPES:
        raise AuditError(f"unknown quantized type {name!r} (int8 or uint8)")
    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


@contextlib.contextmanager
def _quiet():
    """Keep library chatter out of our stdout/stderr: onnxruntime's quantizer logs warnings
    ('consider pre-processing') to the root logger and prints; onnxconverter_common warns once
    per clamped tensor. Yields the list of Python warnings caught, for callers that summarise
    them in their notes. With WMAUDIT_DEBUG set, everything goes through as the library wrote it."""
    import os
    import warnings

    if os.environ.get("WMAUDIT_DEBUG"):
        yield []
        return
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        root.setLevel(level)


def constants_as_tensors(model: onnx.ModelProto) -> int:
    """Rewrite Constant nodes given by value_float(s)/value_int(s) as a `value` tensor, in place.

    onnxruntime's symbolic shape inference (inside quant_pre_process) reads only
    the `value` attribute; torch's dynamo exporter without optimisation writes
    shape constants as value_ints. Returns how many nodes were rewritten.
    """
    from onnx import helper

    from auditor.read.graph import iter_graphs
    from auditor.read.weights import constant_node_tensor

    done = 0
    for g, _ in iter_graphs(model.graph):
        for node in g.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            if not any(a.name in ("value_float", "value_floats", "value_int", "value_ints") for a in node.attribute):
                continue
            t = constant_node_tensor(node)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", t))
            done += 1
    return done


def fold_constant_subgraphs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold nodes whose inputs are all constant (onnxscript's constant folder).

    Unoptimised exports (torch dynamo with optimize=False) compute e.g. a zero
    conv bias as Expand(Cast(scalar)); onnxruntime's QOperator quantizer then
    fails on a bias that is not an initializer. Folding touches no node with a
    runtime input, so BatchNormalization and the marked weights stay as they are.
    """
    import onnx_ir as ir
    from onnxscript.optimizer import fold_constants

    from auditor.read.graph import iter_graphs

    before = sum(len(g.node) for g, _ in iter_graphs(model.graph))
    irm = ir.from_proto(model)
    fold_constants(irm)
    ir.passes.common.RemoveUnusedNodesPass()(irm)
    out = ir.to_proto(irm)
    out.ir_version = min(out.ir_version, model.ir_version)
    after = sum(len(g.node) for g, _ in iter_graphs(out.graph))
    return out, max(0, before - after)


@contextlib.contextmanager
def _inside(folder):
    """Run with `folder` as working directory: onnxruntime's symbolic shape inference
    dumps sym_shape_infer_temp.onnx (+ external data) into the working directory
    when it gives up; that must land in our private folder, not the user's."""
    import os

    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def _pre_process_files(src: str, dst: str, keep_batchnorm: bool, folder: str) -> str | None:
    """quant_pre_process src -> dst (in an isolated process); a note when it fell back to ONNX shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet(), _inside(folder):
        try:
            quant_pre_process(src, dst, skip_optimization=keep_batchnorm)
            return None
        except Exception as e:
            # Unoptimised dynamo graphs (Shape of weights, symbolic Reshape chains) defeat
            # onnxruntime's symbolic shape inference; its own switch falls back to ONNX's.
            try:
                quant_pre_process(src, dst, skip_optimization=keep_batchnorm, skip_symbolic_shape=True)
            except Exception as e2:
                raise AuditError(f"quant_pre_process failed: {type(e2).__name__}: {_line(e2)}") from None
            return (f"symbolic shape inference failed ({type(e).__name__}: {_line(e)}); "
                    f"used ONNX shape inference (skip_symbolic_shape=True)")


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def _quantize_dynamic_files(src: str, dst: str, weight_type: str, per_channel: bool, reduce_range: bool) -> None:
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    with _quiet():
        try:
            ort_quantize_dynamic(src, dst, weight_type=_qtype(weight_type), per_channel=per_channel,
                                 reduce_range=reduce_range)
        except AuditError:
            raise
        except Exception as e:
            raise AuditError(f"quantize_dynamic failed: {type(e).__name__}: {_line(e)}") from None


def _quantize_static_files(src: str, dst: str, quant_format: str, per_channel: bool, reduce_range: bool,
                           activation_type: str, weight_type: str, method: str, ranges: str) -> None:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    from auditor.data.calibration import ort_method

    fmt = QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator
    with _quiet():
        try:
            ort_quantize_static(src, dst, None, quant_format=fmt, per_channel=per_channel,
                                reduce_range=reduce_range, activation_type=_qtype(activation_type),
                                weight_type=_qtype(weight_type), calibrate_method=ort_method(method),
                                calibration_cache_path=ranges)
        except AuditError:
            raise
        except Exception as e:
            raise AuditError(f"quantize_static failed: {type(e).__name__}: {_line(e)}") from None


def preprocess(model: onnx.ModelProto, keep_batchnorm: bool = True) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` ready for quantization, and what was done to it."""
    m = copy_model(model)
    notes = []
    m, n_folded = fold_constant_subgraphs(m)
    if n_folded:
        notes.append(f"folded {n_folded} constant-only nodes (onnxscript fold_constants; BatchNorm untouched)")
    n_const = constants_as_tensors(m)
    if n_const:
        notes.append(f"rewrote {n_const} Constant nodes (value_int(s)/value_float(s)) as tensors for shape inference")
    if len(m.graph.value_info):
        notes.append(f"dropped {len(m.graph.value_info)} graph.value_info entries before shape inference")
        del m.graph.value_info[:]
    with workdir() as d:
        src, dst = save(m, d / "in.onnx"), d / "pre.onnx"
        fallback = isolate.call(_pre_process_files, str(src), str(dst), keep_batchnorm, str(d),
                                what="onnxruntime's quant_pre_process")
        if fallback:
            notes.append(fallback)
        out = load(dst)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    if keep_batchnorm:
        notes.append("quant_pre_process: shape inference, skip_optimization=True (BatchNorm kept)")
    else:
        left = sum(n.op_type == "BatchNormalization" for n in out.graph.node)
        notes.append(f"quant_pre_process: shape inference and onnxruntime optimization "
                     f"({n_bn - left} of {n_bn} BatchNormalization folded into conv weights)")
    return out, notes


def quantize_dynamic(model: onnx.ModelProto, *, weight_type: str = "int8", per_channel: bool = False,
                     reduce_range: bool = False, pre_process: bool = True,
                     keep_batchnorm: bool = True) -> AttackResult:
    """``onnxruntime.quantization.quantize_dynamic`` on a copy of ``model`` (in an isolated process)."""

    params = {"mode": DYNAMIC, "weight_type": weight_type, "per_channel": bool(per_channel),
              "reduce_range": bool(reduce_range), "pre_process": bool(pre_process),
              "keep_batchnorm": bool(keep_batchnorm)}
    m, notes = preprocess(model, keep_batchnorm) if pre_process else (copy_model(model), [])
    _qtype(weight_type)
    with workdir() as d:
        src, dst = save(m, d / "float.onnx"), d / "int8.onnx"
        isolate.call(_quantize_dynamic_files, str(src), str(dst), weight_type, bool(per_channel), bool(reduce_range),
                     what="onnxruntime's quantize_dynamic")
        out = load(dst)
    if per_channel and any(n.op_type == "ConvInteger" for n in out.graph.node):
        notes.append("onnxruntime's dynamic mode quantizes Conv weights per tensor even with per_channel")
    return AttackResult(cap_ir_version(out), params, notes)


def quantize_static(model: onnx.ModelProto, calibration, *, quant_format: str = "qdq",
                    per_channel: bool = False, reduce_range: bool = False, weight_type: str = "int8",
                    activation_type: str = "uint8", method: str = "minmax", pre_process: bool = True,
                    keep_batchnorm: bool = True) -> AttackResult:
    """``onnxruntime.quantization.quantize_static`` (QDQ or QOperator) on a copy of ``model``.

    ``calibration`` is an ``auditor.data.calibration.Calibration``; ranges are computed once
    per (pre-processed float model, method) and reused through onnxruntime's cache file.
    """
    if quant_format not in ("qdq", "qop"):
        raise AuditError(f"unknown quantization format {quant_format!r} (qdq or qop)")
    if calibration is None:
        raise AuditError("static quantization needs calibration data")
    from auditor.data.calibration import ort_method

    params = {"mode": "static-" + quant_format + ("-per-channel" if per_channel else ""),
              "quant_format": quant_format, "per_channel": bool(per_channel),
              "reduce_range": bool(reduce_range), "weight_type": weight_type,
              "activation_type": activation_type, "calibration": method,
              "calibration_data": calibration.data.describe(), "pre_process": bool(pre_process),
              "keep_batchnorm": bool(keep_batchnorm)}
    m, notes = preprocess(model, keep_batchnorm) if pre_process else (copy_model(model), [])
    ranges = calibration.ranges(m, method)
    _qtype(weight_type), _qtype(activation_type), ort_method(method)
    with workdir() as d:
        src, dst = save(m, d / "float.onnx"), d / "int8.onnx"
        isolate.call(_quantize_static_files, str(src), str(dst), quant_format, bool(per_channel), bool(reduce_range),
                     activation_type, weight_type, method, str(ranges), what="onnxruntime's quantize_static")
        out = load(dst)
    notes.append(f"activation ranges: {method} calibration on {calibration.data.source} "
                 f"({calibration.data.n} samples, seed {calibration.data.seed}), cached"
                 + (" [synthetic: ranges do not reflect deployment data]" if calibration.data.synthetic else ""))
    return AttackResult(cap_ir_version(out), params, notes)


def quantize(model: onnx.ModelProto, mode: str, calibration=None, **options: Any) -> AttackResult:
    """One of ``MODES`` (see the module docstring)."""
    if mode == DYNAMIC:
        options.pop("method", None)
        options.pop("activation_type", None)
        return quantize_dynamic(model, **options)
    if mode in STATIC_MODES:
        fmt, per_channel = STATIC_MODES[mode]
        return quantize_static(model, calibration, quant_format=fmt, per_channel=per_channel, **options)
    raise AuditError(f"unknown quantization mode {mode!r} (one of {', '.join(MODES)})")

"""The files deployers ship instead of the exporter's: onnxruntime's saved optimized graph, the ORT
format, onnxruntime's transformer optimizer, and graph simplifiers. Each is a deployment step, and an
attack on a white-box mark: it renames, fuses, folds (BatchNorm into Conv) and re-lays out weights.

* ``ort-optimize:basic|extended|all``: an onnxruntime CPU session at that graph optimization level
  with ``optimized_model_filepath`` (onnxruntime's offline mode). ``all`` writes NCHWc Convs in
  this machine's block size (8 with AVX2, 16 with AVX-512): the result is hardware specific.
* ``ort-format``: the ORT format of mobile and minimal builds (what
  ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` writes: ``session.save_model_format=ORT``,
  basic optimizations by default), read back through auditor.read.ortformat.
* ``transformers-optimize`` / ``transformers-optimize:fp16``: ``onnxruntime.transformers.optimizer``
  (model type bert, heads and hidden size detected by the optimizer), optionally its own float16
  conversion (``convert_float_to_float16(keep_io_types=True)``).
* ``simplify`` (onnxslim), ``simplify:onnxsim`` (onnxsim, where it installs).
"""
from __future__ import annotations

import onnx

from auditor.errors import AuditError
from auditor.attacks import AttackResult, cap_ir_version, copy_model, load, save, workdir

LEVELS = ("basic", "extended", "all")
TRANSFORMER_MODES = ("fp16",)
SIMPLIFIERS = ("onnxslim", "onnxsim")


def _session_options(level: str, out: str, ort_format: bool = False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.optimized_model_filepath = out
    so.log_severity_level = 3  # the NCHWc "hardware specific" warning is stated in the notes instead
    so.intra_op_num_threads = 1
    if ort_format:
        so.add_session_config_entry("session.save_model_format", "ORT")
    return so


def _optimize_file(src: str, level: str, out: str, ort_format: bool) -> None:
    """onnxruntime loads ``src`` and saves its optimized graph to ``out`` (run in an isolated process)."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(src, _session_options(level, out, ort_format), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise AuditError(f"onnxruntime could not load the model to optimize it: {str(e).splitlines()[0][:200]}") from None


def _run_session(src: str, level: str, out: str, ort_format: bool = False) -> None:
    """``_optimize_file`` where a crash, hang or memory blow-up of onnxruntime is one line."""
    from auditor.backends import isolate

    isolate.call(_optimize_file, src, level, out, ort_format, what="onnxruntime's graph optimizer")


def _ops(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        k = f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def ort_optimize(model: onnx.ModelProto, level: str) -> AttackResult:
    """The graph onnxruntime saves at `level` (offline optimization mode)."""
    if level not in LEVELS:
        raise AuditError(f"unknown optimization level {level!r} (one of {', '.join(LEVELS)})")
    with workdir() as d:
        src = save(cap_ir_version(copy_model(model)), d / "in.onnx")
        out = d / "optimized.onnx"
        _run_session(str(src), level, str(out))
        m = load(out)
    notes = [f"onnxruntime {_ort_version()} ORT_ENABLE_{level.upper()} graph saved: {_ops_line(m)}"]
    if any(n.domain == "com.microsoft.nchwc" for n in m.graph.node):
        notes.append("NCHWc Convs in this machine's block size (8 with AVX2, 16 with AVX-512): the file is "
                     "hardware specific, as onnxruntime warns")
    return AttackResult(cap_ir_version(m), {"mode": "ort-optimize", "level": level, "ops": _ops(m)}, notes)


def ort_format(model: onnx.ModelProto, level: str = "basic") -> AttackResult:
    """The ORT-format file onnxruntime writes (as convert_onnx_models_to_ort does), read back."""
    from auditor.read.ortformat import to_onnx

    if level not in LEVELS:
        raise AuditError(f"unknown optimization level {level!r} (one of {', '.join(LEVELS)})")
    with workdir() as d:
        src = save(cap_ir_version(copy_model(model)), d / "in.onnx")
        out = d / "model.ort"
        _run_session(str(src), level, str(out), ort_format=True)
        data = out.read_bytes()
    m = to_onnx(data, "ort-format")
    notes = [f"ORT format ({len(data)} bytes, ORT_ENABLE_{level.upper()}) written by onnxruntime "
             f"{_ort_version()} and read back as ONNX: {_ops_line(m)}"]
    return AttackResult(cap_ir_version(m), {"mode": "ort-format", "level": level, "bytes": len(data),
                                            "ops": _ops(m)}, notes)


def transformers_optimize(model: onnx.ModelProto, mode: str | None = None,
                          model_type: str = "bert") -> AttackResult:
    """onnxruntime.transformers.optimizer on the model (and its float16 conversion with mode fp16)."""
    if mode not in (None, *TRANSFORMER_MODES):
        raise AuditError(f"unknown transformers-optimize mode {mode!r} (fp16 or none)")
    from auditor.attacks.quantize import _quiet

    try:
        from onnxruntime.transformers import optimizer
    except ImportError as e:
        raise AuditError(f"onnxruntime's transformer optimizer is not importable ({e})") from None
    with workdir() as d, _quiet():
        src = save(cap_ir_version(copy_model(model)), d / "in.onnx")
        try:
            opt = optimizer.optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0,
                                           opt_level=0)
            if mode == "fp16":
                opt.convert_float_to_float16(keep_io_types=True)
                opt.topological_sort()  # the conversion appends its input Casts after their readers
        except Exception as e:
            raise AuditError(f"onnxruntime.transformers.optimizer failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
        m = copy_model(opt.model)
    fused = {k: v for k, v in _ops(m).items() if k.startswith("com.microsoft:")}
    notes = [f"onnxruntime.transformers.optimizer (model type {model_type}{', float16' if mode else ''}): "
             + (", ".join(f"{k.split(':')[1]} {v}" for k, v in fused.items()) or "no fusion applied")]
    return AttackResult(cap_ir_version(m), {"mode": "transformers-optimize", "model_type": model_type,
                                            "float16": mode == "fp16", "fused": fused}, notes)


def simplify(model: onnx.ModelProto, tool: str = "onnxslim") -> AttackResult:
    """The graph a simplifier writes (constant folding, redundant nodes removed)."""
    if tool not in SIMPLIFIERS:
        raise AuditError(f"unknown simplifier {tool!r} (one of {', '.join(SIMPLIFIERS)})")
    m = copy_model(model)
    from auditor.attacks.quantize import _quiet

    with _quiet():
        if tool == "onnxslim":
            try:
                import onnxslim
            except ImportError:
                raise AuditError("simplify needs onnxslim (pip install onnxslim)") from None
            try:
                out = onnxslim.slim(m)
            except Exception as e:
                raise AuditError(f"onnxslim failed: {type(e).__name__}: {str(e)[:200]}") from None
            version = getattr(onnxslim, "__version__", "?")
        else:
            try:
                import onnxsim
            except ImportError:
                raise AuditError("simplify:onnxsim needs onnxsim (pip install onnxsim)") from None
            try:
                out, ok = onnxsim.simplify(m)
            except Exception as e:
                raise AuditError(f"onnxsim failed: {type(e).__name__}: {str(e)[:200]}") from None
            if not ok:
                raise AuditError("onnxsim could not validate its simplified model")
            version = getattr(onnxsim, "__version__", "?")
    notes = [f"{tool} {version}: {len(model.graph.node)} -> {len(out.graph.node)} nodes"]
    return AttackResult(cap_ir_version(out), {"mode": "simplify", "tool": tool, "nodes": len(out.graph.node)}, notes)


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def _ops_line(m: onnx.ModelProto) -> str:
    return ", ".join(f"{k} {v}" for k, v in _ops(m).items())


__all__ = ["LEVELS", "SIMPLIFIERS", "ort_optimize", "ort_format", "transformers_optimize", "simplify"]

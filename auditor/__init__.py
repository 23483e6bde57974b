"""wmaudit auditor: reads ONNX files only (onnx, onnxruntime, numpy); never imports torch.

onnxruntime keeps a telemetry database under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime``
(a device id, the process path, machine facts, one event per process and session) unless
``ORT_DISABLE_TELEMETRY=1`` is in the environment when onnxruntime is imported;
``onnxruntime.disable_telemetry_events()`` does not stop it. Every ``auditor`` module imports
this package first, so the variable is set here, before any onnxruntime import, and every child
process (isolated onnxruntime calls, grid workers, sweep children) inherits it. An auditor of
confidential models writes nothing but its outputs: the opt-in ``WMAUDIT_ALLOW_ORT_TELEMETRY=1``
leaves onnxruntime's own default (and ``ORT_DISABLE_TELEMETRY`` as the caller set it).
"""
import os as _os

__version__ = "0.1.0"

TELEMETRY_OPT_IN = "WMAUDIT_ALLOW_ORT_TELEMETRY"

if _os.environ.get(TELEMETRY_OPT_IN) != "1":
    _os.environ["ORT_DISABLE_TELEMETRY"] = "1"

"""wmaudit auditor: reads ONNX files only (onnx, onnxruntime, numpy); never imports torch."""

__version__ = "0.1.0"

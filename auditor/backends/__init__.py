"""Inference backends: a loader builds a session/engine, a runner queries it.

Backends (names used on the command line):

* ``ort-cpu``  onnxruntime, CPUExecutionProvider (fp32, fp16 and int8 models);
* ``ort-cuda`` onnxruntime, CUDAExecutionProvider;
* ``ort-trt``  onnxruntime, TensorrtExecutionProvider (CUDA as fallback for
  unsupported nodes);
* ``tensorrt`` native TensorRT (``auditor/backends/tensorrt.py``, the only
  module that imports ``tensorrt``, lazily).

Every runner is a context manager with ``infer(feed) -> {output name: array}``
and ``infer_batches(x, batch_size) -> array`` (the first output, rows in the
order of ``x``). Optional packages are imported when a runner is opened, so a
missing GPU stack never breaks the CLI; an unavailable backend raises
``AuditError("backend NAME is not available: why")``.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from auditor.errors import AuditError

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt")

_ORT_PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def availability(backend: str) -> tuple[bool, str]:
    """(usable here, why not) without building anything."""
    if backend not in BACKENDS:
        return False, f"unknown backend (expected one of {', '.join(BACKENDS)})"
    if backend == "tensorrt":
        from auditor.backends.tensorrt import availability as trt_availability

        return trt_availability()
    from auditor.backends.onnxruntime import provider_available

    return provider_available(_ORT_PROVIDERS[backend][0])


def open_runner(model_path: str | os.PathLike, backend: str = "ort-cpu", **options: Any):
    """A runner (not yet entered) for ``model_path`` on ``backend``.

    Raises AuditError for an unknown or unavailable backend.
    """
    ok, why = availability(backend)
    if not ok:
        raise AuditError(f"backend {backend} is not available: {why}")
    if backend == "tensorrt":
        from auditor.backends.tensorrt import EngineFromOnnx, TrtRunner

        return TrtRunner(EngineFromOnnx(model_path, **options), name=backend)
    from auditor.backends.onnxruntime import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(model_path, providers=_ORT_PROVIDERS[backend], **options),
                        name=backend)


def split_batches(n: int, batch_size: int):
    """Slices [start, stop) covering 0..n in order, each at most batch_size long."""
    if batch_size < 1:
        raise AuditError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def label_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement of two backends' outputs on the same queries."""
    la, lb = np.asarray(a).argmax(axis=1), np.asarray(b).argmax(axis=1)
    if la.shape != lb.shape:
        raise AuditError(f"outputs differ in shape: {list(np.shape(a))} vs {list(np.shape(b))}")
    diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return {"n": int(la.size), "agree": int((la == lb).sum()),
            "agreement": float((la == lb).mean()) if la.size else 1.0,
            "max_abs_diff": float(diff.max()) if diff.size else 0.0}

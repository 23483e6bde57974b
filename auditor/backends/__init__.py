"""Inference backends: a loader builds a session/engine, a runner queries it.

Runners are opened on a *target* (``auditor.backends.targets``: ``native``,
the emulated CPUs ``x86-64-v3``, ``x86-64-v2`` and ``aarch64``, and the GPU
targets ``ort-cuda``, ``ort-trt``, ``tensorrt``; the old backend name
``ort-cpu`` is ``native``). Every onnxruntime target runs the model in a child
process of its own (``targets.TargetRunner``), so a crash or hang during
inference is one line; native TensorRT (``auditor/backends/tensorrt.py``, the
only module that imports ``tensorrt``, lazily) runs in-process.

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

from auditor.backends.targets import CHOICES as BACKENDS  # targets, and ort-cpu (= native)

def availability(backend: str) -> tuple[bool, str]:
    """(usable here, why not) without building anything."""
    from auditor.backends import targets

    try:
        targets.resolve(backend)
    except AuditError as e:
        return False, str(e)
    ok, why, fix = targets.availability(backend)
    return ok, why + (f" (run: {fix})" if fix and not ok else "")


def open_runner(model_path: str | os.PathLike, backend: str = "native", **options: Any):
    """A runner (not yet entered) for ``model_path`` on the target ``backend``.

    Raises AuditError for an unknown or unavailable target.
    """
    from auditor.backends import targets

    t = targets.resolve(backend)
    ok, why = availability(t.name)
    if not ok:
        raise AuditError(f"target {t.name} is not available: {why}")
    if t.name == "tensorrt":
        from auditor.backends.tensorrt import EngineFromOnnx, TrtRunner

        return TrtRunner(EngineFromOnnx(model_path, **options), name=t.name)
    return targets.TargetRunner(model_path, t.name, threads=options.get("intra_op_threads"))


def split_batches(n: int, batch_size: int):
    """Slices [start, stop) covering 0..n in order, each at most batch_size long."""
    if batch_size < 1:
        raise AuditError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def infer_batches(runner, x: np.ndarray, batch_size: int = 64, output: str | None = None) -> np.ndarray:
    """Feed ``x`` (rows = queries) through ``runner``'s only input in batches of ``batch_size`` (or
    the batch size the model fixes, padding the last batch with repeats of its last row); the rows
    of ``output`` (default: the first output) in the order of ``x``. Every runner's
    ``infer_batches`` is this."""
    if len(runner.inputs) != 1:
        raise AuditError(f"batched queries need a model with one input, this one has {len(runner.inputs)}")
    fixed = runner.fixed_batch()
    bs = fixed if fixed is not None else batch_size
    name = runner.inputs[0][0]
    out_name = output or runner.output_names[0]
    parts = []
    for sl in split_batches(len(x), bs):
        chunk = x[sl]
        if fixed is not None and len(chunk) < fixed:
            pad = np.repeat(chunk[-1:], fixed - len(chunk), axis=0)
            parts.append(runner.infer({name: np.concatenate([chunk, pad])})[out_name][:len(chunk)])
        else:
            parts.append(runner.infer({name: chunk})[out_name])
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def label_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement of two backends' outputs on the same queries."""
    la, lb = np.asarray(a).argmax(axis=1), np.asarray(b).argmax(axis=1)
    if la.shape != lb.shape:
        raise AuditError(f"outputs differ in shape: {list(np.shape(a))} vs {list(np.shape(b))}")
    diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return {"n": int(la.size), "agree": int((la == lb).sum()),
            "agreement": float((la == lb).mean()) if la.size else 1.0,
            "max_abs_diff": float(diff.max()) if diff.size else 0.0}

"""onnxruntime backends: CPU, CUDA and TensorRT execution providers.

``SessionFromOnnx`` is the loader (a lazy callable returning an
``InferenceSession``); ``OnnxrtRunner`` the runner. Inputs are cast to the
type each model input declares (an fp16 model takes float16), outputs come
back as numpy arrays, as float32 when the model returns float16.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import AuditError
from auditor.backends import split_batches

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def provider_available(provider: str) -> tuple[bool, str]:
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - a dependency of wmaudit
        return False, f"onnxruntime cannot be imported ({e})"
    have = ort.get_available_providers()
    if provider not in have:
        return False, (f"onnxruntime {ort.__version__} has no {provider} "
                       f"(available: {', '.join(have)})")
    return True, ""


def _load_session(path: str, providers: list[str], threads: int | None, keep: bool = False):
    """An InferenceSession on path (keep=False: only prove that it loads, return nothing)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        sess = ort.InferenceSession(path, sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AuditError(f"onnxruntime cannot load {Path(path).name}: {msg}") from None
    return sess if keep else None


class SessionFromOnnx:
    """Loader: ``loader()`` -> onnxruntime.InferenceSession on the given providers.

    Refuses a session where onnxruntime silently fell back from the requested
    first provider to another one (the result would not be about that backend).
    """

    def __init__(self, model_path: str | os.PathLike, providers=("CPUExecutionProvider",),
                 intra_op_threads: int | None = None):
        self.model_path = Path(model_path)
        self.providers = list(providers)
        self.intra_op_threads = intra_op_threads

    def __call__(self):
        if not self.model_path.is_file():
            raise AuditError(f"model not found: {self.model_path}")
        from auditor.backends import isolate

        # First in an isolated process: a graph that crashes, hangs or exhausts onnxruntime
        # while loading does it there (the session used below is then built from a file that loads).
        isolate.call(_load_session, str(self.model_path), self.providers, self.intra_op_threads,
                     what="onnxruntime")
        sess = _load_session(str(self.model_path), self.providers, self.intra_op_threads, keep=True)
        used = sess.get_providers()
        if used[0] != self.providers[0]:
            raise AuditError(f"onnxruntime did not start {self.providers[0]} for {self.model_path.name} "
                             f"(it runs on {used[0]})")
        return sess


class OnnxrtRunner:
    """Runner over an onnxruntime session. Use as a context manager."""

    def __init__(self, loader: SessionFromOnnx, name: str = "ort-cpu"):
        self.loader = loader
        self.name = name
        self.session = None

    # -- lifecycle
    def __enter__(self) -> "OnnxrtRunner":
        self.session = self.loader()
        self.inputs = [(i.name, _ORT_TYPES.get(i.type, np.float32), list(i.shape))
                       for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        return self

    def __exit__(self, *exc) -> None:
        self.session = None

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.inputs]

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"backend": self.name, "onnxruntime": ort.__version__,
                "providers": self.session.get_providers() if self.session else self.loader.providers,
                "inputs": [{"name": n, "dtype": np.dtype(t).name, "shape": [str(s) for s in sh]}
                           for n, t, sh in self.inputs]}

    # -- queries
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run: {input name: array} -> {output name: array} (float16 outputs as float32)."""
        if self.session is None:
            raise RuntimeError("runner is not active; use it in a `with` block")
        cast = {}
        for name, dtype, _ in self.inputs:
            if name not in feed:
                raise AuditError(f"model input {name!r} is not in the feed (have {sorted(feed)})")
            cast[name] = np.ascontiguousarray(feed[name], dtype=dtype)
        try:
            outs = self.session.run(None, cast)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AuditError(f"{self.name}: inference failed: {msg}") from None
        return {n: (o.astype(np.float32) if o.dtype == np.float16 else o)
                for n, o in zip(self.output_names, outs)}

    def fixed_batch(self) -> int | None:
        """The batch size the first input is fixed to, or None when it is dynamic."""
        dim = self.inputs[0][2][0] if self.inputs and self.inputs[0][2] else None
        return int(dim) if isinstance(dim, int) and dim > 0 else None

    def infer_batches(self, x: np.ndarray, batch_size: int = 64, output: str | None = None) -> np.ndarray:
        """Feed ``x`` (rows = queries) through the first input in batches; the rows of
        ``output`` (default: the first output) in the order of ``x``."""
        from auditor.backends import infer_batches

        return infer_batches(self, x, batch_size, output)

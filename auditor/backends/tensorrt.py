"""Native TensorRT backend (TensorRT 10 / 11 Python API).

The only module of wmaudit that imports ``tensorrt``, and only inside
functions, so that the CLI and the tests load on machines without it.

* ``EngineFromOnnx`` (loader): ``Builder`` -> network created with
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` -> ``OnnxParser`` ->
  ``build_serialized_network`` -> ``Runtime.deserialize_cuda_engine``. Networks
  are strongly typed (TensorRT 11 removed the FP16 / INT8 builder flags): the
  precision is the ONNX model's own -- fp16 through an fp16 ONNX model, int8
  through explicit QuantizeLinear / DequantizeLinear pairs. A dynamic batch
  axis gets one optimisation profile (1, opt_batch, max_batch).
* ``TrtRunner`` (runner): an execution context; every I/O tensor is bound with
  ``set_input_shape`` / ``set_tensor_address`` and run with
  ``execute_async_v3`` on one CUDA stream.

Device memory goes through the CUDA runtime bindings of NVIDIA's
``cuda-python`` package (``cuda.bindings.runtime``, or ``cuda.cudart`` in
releases before 12.6): cudaMalloc / cudaMemcpyAsync / cudaStreamSynchronize /
cudaFree on raw pointers, with host data in numpy arrays -- no torch, no
pycuda, no cupy.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import AuditError
from auditor.backends import split_batches


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def availability() -> tuple[bool, str]:
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed"
    if importlib.util.find_spec("cuda") is None:
        return False, "the cuda-python package (CUDA runtime bindings) is not installed"
    try:
        cudart = _cudart()
        err, n = cudart.cudaGetDeviceCount()
    except Exception as e:  # driver libraries missing or broken
        return False, f"the CUDA runtime cannot be used ({type(e).__name__}: {e})"
    if err != cudart.cudaError_t.cudaSuccess or n < 1:
        return False, "no CUDA device is visible"
    return True, ""


def _check(result, what: str):
    """cuda-python calls return (error, *values); raise on error, return the values."""
    cudart = _cudart()
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise AuditError(f"tensorrt: {what} failed: {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


class EngineFromOnnx:
    """Loader: ``loader()`` -> (runtime, engine) built from an ONNX file."""

    def __init__(self, model_path: str | os.PathLike, *, opt_batch: int = 64, max_batch: int = 256,
                 workspace_bytes: int = 1 << 30):
        self.model_path = Path(model_path)
        self.opt_batch, self.max_batch = int(opt_batch), int(max_batch)
        self.workspace_bytes = int(workspace_bytes)

    def __call__(self):
        import tensorrt as trt

        if not self.model_path.is_file():
            raise AuditError(f"model not found: {self.model_path}")
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(self.model_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise AuditError(f"tensorrt cannot parse {self.model_path.name}: {errors or 'unknown error'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        profile = None
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = list(t.shape)
            if any(d < 0 for d in shape[1:]):
                raise AuditError(f"tensorrt: input {t.name} has dynamic non-batch axes {shape}; "
                                 "export the model with fixed image sizes")
            if shape and shape[0] < 0:
                profile = profile or builder.create_optimization_profile()
                rest = shape[1:]
                profile.set_shape(t.name, [1] + rest, [min(self.opt_batch, self.max_batch)] + rest,
                                  [self.max_batch] + rest)
        if profile is not None:
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise AuditError(f"tensorrt could not build an engine for {self.model_path.name}")
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise AuditError(f"tensorrt could not deserialize the engine for {self.model_path.name}")
        return runtime, engine


class TrtRunner:
    """Runner over a TensorRT engine. Use as a context manager."""

    def __init__(self, loader: EngineFromOnnx, name: str = "tensorrt"):
        self.loader = loader
        self.name = name
        self.context = None

    def __enter__(self) -> "TrtRunner":
        import tensorrt as trt

        cudart = _cudart()
        self.runtime, self.engine = self.loader()
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self.inputs, self.output_names = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append((name, dtype, list(self.engine.get_tensor_shape(name))))
            else:
                self.output_names.append(name)
        self.version = trt.__version__
        return self

    def __exit__(self, *exc) -> None:
        cudart = _cudart()
        for ptr, _ in self.buffers.values():
            cudart.cudaFree(ptr)
        self.buffers = {}
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = self.engine = self.runtime = None

    @property
    def input_names(self) -> list[str]:
        return [n for n, _, _ in self.inputs]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "tensorrt": getattr(self, "version", None), "strongly_typed": True,
                "inputs": [{"name": n, "dtype": t.name, "shape": [int(s) for s in sh]} for n, t, sh in self.inputs]}

    def fixed_batch(self) -> int | None:
        dim = self.inputs[0][2][0] if self.inputs and self.inputs[0][2] else None
        return int(dim) if dim is not None and dim > 0 else None

    def _device(self, name: str, nbytes: int) -> int:
        """A device buffer of at least nbytes for tensor ``name`` (grown, never shrunk)."""
        cudart = _cudart()
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cudart.cudaFree(ptr)
            ptr = int(_check(cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self.buffers[name] = (ptr, nbytes)
        return ptr

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorrt as trt

        if self.context is None:
            raise RuntimeError("runner is not active; use it in a `with` block")
        cudart = _cudart()
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_inputs = []
        for name, dtype, _ in self.inputs:
            if name not in feed:
                raise AuditError(f"model input {name!r} is not in the feed (have {sorted(feed)})")
            arr = np.ascontiguousarray(feed[name], dtype=dtype)
            host_inputs.append(arr)  # keep alive until the stream is synchronised
            if not self.context.set_input_shape(name, arr.shape):
                raise AuditError(f"tensorrt: input shape {list(arr.shape)} of {name} is outside the engine's profile")
            ptr = self._device(name, arr.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream), "cudaMemcpyAsync")
            self.context.set_tensor_address(name, ptr)
        outs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            out = np.empty(shape, dtype=dtype)
            self.context.set_tensor_address(name, self._device(name, out.nbytes))
            outs[name] = out
        if not self.context.execute_async_v3(self.stream):
            raise AuditError(f"{self.name}: execute_async_v3 failed")
        for name, out in outs.items():
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[name][0], out.nbytes, d2h, self.stream),
                   "cudaMemcpyAsync")
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return {n: (o.astype(np.float32) if o.dtype == np.float16 else o) for n, o in outs.items()}

    def infer_batches(self, x: np.ndarray, batch_size: int = 64, output: str | None = None) -> np.ndarray:
        from auditor.backends import infer_batches

        # an engine's profile caps the batch: larger requests are split
        return infer_batches(self, x, min(batch_size, self.loader.max_batch), output)

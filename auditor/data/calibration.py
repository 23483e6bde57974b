"""Calibration data for static quantization, and calibration computed once.

``CalibrationData`` is a seeded subset of real inputs: Fashion-MNIST (the
*train* split, so calibration never sees the test images that accuracy is
measured on) or a user ``.npy`` array of model inputs. ``ArrayReader`` serves
it to onnxruntime as a ``CalibrationDataReader``.

``Calibration`` computes activation ranges with onnxruntime's own calibrators
(``create_calibrator`` -> ``collect_data`` -> ``compute_data``) and stores
them with ``save_tensors_data`` in a cache folder, one file per
(float model content, calibration method, data digest). ``quantize_static``
then reads that file through its supported ``calibration_cache_path``
argument, so a grid of configs that quantize the same float model
(QDQ / QOperator, per-tensor / per-channel, int8 / uint8 weights) calibrates
it once. Activation ranges do not depend on those choices: onnxruntime
calibrates per tensor and applies per-channel only to weights. A model that
was pruned first is a different float model and gets its own entry, as it
would for a real deployer.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from auditor.errors import AuditError

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_SAMPLES = 256
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class CalibrationData:
    """Model inputs used for calibration (float32, first axis = examples)."""

    inputs: np.ndarray
    source: str
    seed: int
    batch_size: int = DEFAULT_BATCH

    @property
    def digest(self) -> str:
        a = np.ascontiguousarray(self.inputs)
        h = hashlib.sha256(str((a.dtype.str, a.shape, self.batch_size)).encode())
        h.update(a.tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "samples": int(self.inputs.shape[0]), "seed": int(self.seed),
                "batch_size": int(self.batch_size), "sha256": self.digest}


def fashion_mnist_calibration(n: int = DEFAULT_SAMPLES, seed: int = 0, batch_size: int = DEFAULT_BATCH) -> CalibrationData:
    """n seeded Fashion-MNIST *train* images, normalised as every exporter model expects."""
    from auditor.data import datasets

    images, _ = datasets.fashion_mnist("train")
    idx = np.sort(np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False))
    x = datasets.fashion_mnist_normalized(images[idx])
    return CalibrationData(np.ascontiguousarray(x, dtype=np.float32), "fashion-mnist:train", seed, batch_size)


def npy_calibration(path: str | os.PathLike, n: int = DEFAULT_SAMPLES, seed: int = 0,
                    batch_size: int = DEFAULT_BATCH) -> CalibrationData:
    """A seeded subset of n rows of a user .npy array of model inputs."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"calibration inputs not found: {path}")
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for corrupt files
        raise AuditError(f"cannot read {path} as .npy: {e}") from None
    if a.ndim < 1 or a.shape[0] == 0 or not np.issubdtype(a.dtype, np.number):
        raise AuditError(f"{path}: expected a numeric array with examples on the first axis")
    if a.shape[0] > n:
        a = a[np.sort(np.random.default_rng(seed).choice(a.shape[0], size=n, replace=False))]
    return CalibrationData(np.ascontiguousarray(a, dtype=np.float32), f"npy:{path.name}", seed, batch_size)


def calibration_data(spec: str, n: int = DEFAULT_SAMPLES, seed: int = 0) -> CalibrationData:
    """``fashion-mnist`` or the path of a .npy array of inputs."""
    if spec == "fashion-mnist":
        return fashion_mnist_calibration(n, seed)
    if spec.endswith(".npy"):
        return npy_calibration(spec, n, seed)
    raise AuditError(f"unknown calibration data {spec!r} (fashion-mnist or a .npy file of inputs)")


def _ort_calibration():
    from onnxruntime.quantization import calibrate

    return calibrate


class ArrayReader:
    """onnxruntime ``CalibrationDataReader`` over an array, in fixed batches, rewindable."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int = DEFAULT_BATCH):
        self.input_name = input_name
        self.inputs = inputs
        self.batch_size = int(batch_size)
        self._start, self._end = 0, len(inputs)
        self._pos = 0

    def get_next(self) -> dict | None:
        if self._pos >= self._end:
            return None
        batch = self.inputs[self._pos: min(self._pos + self.batch_size, self._end)]
        self._pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = self._start

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = int(start_index), min(int(end_index), len(self.inputs))
        self._pos = self._start

    def __len__(self) -> int:
        return len(self.inputs)

    def __iter__(self):
        while (b := self.get_next()) is not None:
            yield b


# CalibrationDataReader is an ABC with a metaclass; register rather than subclass so
# importing this module does not import onnxruntime.quantization.
def _register_reader() -> None:
    try:
        _ort_calibration().CalibrationDataReader.register(ArrayReader)
    except Exception:  # pragma: no cover - onnxruntime without quantization tools
        pass


_register_reader()


def model_input_name(model: onnx.ModelProto) -> str:
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise AuditError(f"calibration supports models with one input; this one has {len(names)}: {names}")
    return names[0]


def model_digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    if method not in table:
        raise AuditError(f"unknown calibration method {method!r} (one of {', '.join(METHODS)})")
    return table[method]


@dataclass
class Calibration:
    """Calibration data plus a cache of computed ranges (one folder; shared by worker processes).

    ``folder=None`` uses a private temporary folder that lives as long as this object.
    ``computed`` / ``reused`` count cache misses and hits in this process.
    """

    data: CalibrationData
    folder: Path | None = None
    computed: int = 0
    reused: int = 0
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        if self.folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="wmaudit-calib-")
            self.folder = Path(self._tmp.name)
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def __getstate__(self):  # picklable for worker processes: they share the folder, not the temp handle
        d = dict(self.__dict__)
        d["_tmp"], d["_lock"] = None, None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def cache_path(self, model: onnx.ModelProto, method: str) -> Path:
        ort_method(method)
        return self.folder / f"{model_digest(model)[:24]}-{method}-{self.data.digest[:16]}.json"

    def ranges(self, model: onnx.ModelProto, method: str = "minmax") -> Path:
        """Path of the cached activation ranges of ``model`` (computed now if absent)."""
        path = self.cache_path(model, method)
        with self._lock:
            if path.is_file():
                self.reused += 1
                return path
            self._compute(model, method, path)
            self.computed += 1
            return path

    def _compute(self, model: onnx.ModelProto, method: str, path: Path) -> None:
        from auditor.backends import isolate

        name = model_input_name(model)
        if self.data.inputs.ndim < 1:
            raise AuditError("calibration inputs have no example axis")
        isolate.call(_compute_ranges, model, method, str(path), name, self.data.inputs, self.data.batch_size,
                     self.data.source, what="onnxruntime's calibrator")


def _compute_ranges(model: onnx.ModelProto, method: str, path: str, name: str, inputs: np.ndarray,
                    batch_size: int, source: str) -> None:
    """onnxruntime's calibrator on model -> ranges saved at path (run in an isolated process)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    cal = _ort_calibration()
    with tempfile.TemporaryDirectory(prefix="wmaudit-calib-run-") as d:
        mpath = Path(d) / "model.onnx"
        onnx.save_model(model, str(mpath))
        # The same operator set quantize_static calibrates by default.
        ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
        try:
            calibrator = cal.create_calibrator(mpath, ops, augmented_model_path=str(Path(d) / "augmented.onnx"),
                                               calibrate_method=ort_method(method))
            calibrator.collect_data(ArrayReader(name, inputs, batch_size))
            tensors = calibrator.compute_data()
        except AuditError:
            raise
        except Exception as e:
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise AuditError(f"calibration failed on {source}: {type(e).__name__}: {text}") from None
        del calibrator
    tmp = Path(path).with_name(Path(path).name + f".tmp{os.getpid()}")
    cal.save_tensors_data(tensors, tmp)
    os.replace(tmp, path)

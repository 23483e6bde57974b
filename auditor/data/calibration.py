"""Calibration data for static quantization, and calibration computed once.

The data is an ``auditor.data.inputs.Dataset`` (the one data layer: user
.npy / .npz / images / IDX, Fashion-MNIST's *train* split so calibration never
sees the test images accuracy is measured on, or synthetic noise), bound to
the model's inputs; ``DatasetReader`` serves it to onnxruntime as a
``CalibrationDataReader`` (multi-input feeds, the model's fixed batch size).

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

import onnx

from auditor.data.inputs import Dataset
from auditor.errors import AuditError

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_SAMPLES = 256


def _ort_calibration():
    from onnxruntime.quantization import calibrate

    return calibrate


class DatasetReader:
    """onnxruntime ``CalibrationDataReader`` over a ``Dataset``: {input name: batch} feeds in
    the data set's batches (a fixed batch dimension is honoured), rewindable."""

    def __init__(self, data):
        self.data = data
        self._batches = list(data.batches())
        self._start, self._end = 0, len(self._batches)
        self._pos = 0

    def get_next(self) -> dict | None:
        if self._pos >= self._end:
            return None
        self._pos += 1
        return self._batches[self._pos - 1]

    def rewind(self) -> None:
        self._pos = self._start

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = int(start_index), min(int(end_index), len(self._batches))
        self._pos = self._start

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        while (b := self.get_next()) is not None:
            yield b


# CalibrationDataReader is an ABC with a metaclass; register rather than subclass so
# importing this module does not import onnxruntime.quantization.
def _register_reader() -> None:
    try:
        _ort_calibration().CalibrationDataReader.register(DatasetReader)
    except Exception:  # pragma: no cover - onnxruntime without quantization tools
        pass


_register_reader()


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

    data: Dataset  # auditor.data.inputs.Dataset
    folder: Path | None = None
    computed: int = 0
    reused: int = 0
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        # a fixed batch is not padded for calibration (repeats would weigh some examples twice):
        # the remainder is dropped and counted, unless not even one batch is full
        self.data = self.data.without_remainder()
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

        isolate.call(_compute_ranges, model, method, str(path), self.data, what="onnxruntime's calibrator")


def _compute_ranges(model: onnx.ModelProto, method: str, path: str, data) -> None:
    """onnxruntime's calibrator on model over ``data`` (a Dataset) -> ranges saved at path
    (run in an isolated process: auditor.backends.isolate)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    cal = _ort_calibration()
    source = data.source
    with tempfile.TemporaryDirectory(prefix="wmaudit-calib-run-") as d:
        mpath = Path(d) / "model.onnx"
        onnx.save_model(model, str(mpath))
        # The same operator set quantize_static calibrates by default.
        ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
        try:
            calibrator = cal.create_calibrator(mpath, ops, augmented_model_path=str(Path(d) / "augmented.onnx"),
                                               calibrate_method=ort_method(method))
            calibrator.collect_data(DatasetReader(data))
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

"""Running a model over a ``Dataset`` (auditor.data.inputs) and its top-1 accuracy.

``outputs(model, data)`` feeds the data set's batches (every input of a
multi-input model; a fixed batch dimension honoured) through onnxruntime CPU
in an isolated process (``auditor.backends.isolate``: a crash, hang or memory
blow-up of onnxruntime on a stranger's graph is one line), or through an ``auditor.backends`` runner for any other backend, and returns
every output, examples first, as float32 where the model returns floats.
``accuracy(model, data)`` is the top-1 accuracy of the first output against the
data set's labels. Label-free measures live in ``auditor.data.fidelity``.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from auditor.errors import AuditError

EVAL_BATCH = 256


def session(model: onnx.ModelProto | str | os.PathLike, threads: int = 0):
    """An onnxruntime CPU session (threads=0: onnxruntime's default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else (
        model if isinstance(model, bytes) else str(model))
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise AuditError(f"onnxruntime cannot load the model: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def tensor_values(model: bytes, tensor: str, feeds: dict) -> np.ndarray:
    """``tensor`` (a graph output) of a serialized model on ``feeds``, onnxruntime CPU, one thread.
    Meant to run in an isolated process (``isolate.call(tensor_values, ...)``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return sess.run([tensor], feeds)[0]
    except Exception as e:  # onnxruntime's own exception types
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise AuditError(f"onnxruntime cannot run the model to read {tensor!r}: {msg}") from None


def _as_float(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _ort_outputs(model, data, threads: int) -> dict[str, np.ndarray]:
    """The onnxruntime CPU run of ``outputs`` (in an isolated process: auditor.backends.isolate)."""
    sess = session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {}
    for feed, count in data.counted_batches():
        try:
            res = sess.run(None, feed)
        except Exception as e:
            msg = " ".join(str(e).split()) or type(e).__name__
            raise AuditError(f"onnxruntime cannot run the model on {data.source}: {msg[:300]}") from None
        for n, r in zip(names, res):
            parts.setdefault(n, []).append(unpad(n, _as_float(np.asarray(r)), count, data))
    return {n: np.concatenate(p) for n, p in parts.items()}


def unpad(name: str, r: np.ndarray, count: int, data) -> np.ndarray:
    """The rows of a padded batch's output that belong to real examples."""
    if not data.fixed_batch or count == data.batch_size:
        return r
    if r.ndim == 0 or r.shape[0] != data.batch_size:
        raise AuditError(f"output {name!r} of shape {list(r.shape)} has no batch axis first, so the padding of "
                         f"the last batch cannot be removed: give a number of examples divisible by the "
                         f"model's fixed batch size {data.batch_size}")
    return r[:count]


def outputs(model, data, threads: int = 0, backend: str = "native", *, with_hardware: bool = False):
    """{output name: array} over every example of ``data``, in order, on ``backend`` (a target
    name of ``auditor.backends.targets``; ``ort-cpu`` = ``native``). With ``with_hardware``:
    (outputs, the hardware record of the process that ran the model)."""
    from auditor.backends import targets

    target = targets.resolve(backend)
    if target.name == "native":
        from auditor.backends import isolate, hardware

        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        outs = isolate.call(_ort_outputs, src, data, threads, what="onnxruntime")
        return (outs, hardware.native_record(threads=threads)) if with_hardware else outs
    if target.name == "tensorrt":
        from auditor.backends import open_runner, hardware

        if isinstance(model, onnx.ModelProto):
            raise AuditError(f"target {backend} runs model files")
        parts: dict[str, list[np.ndarray]] = {}
        with open_runner(model, backend) as runner:
            for feed, count in data.counted_batches():
                for n, r in runner.infer(feed).items():
                    parts.setdefault(n, []).append(unpad(n, _as_float(np.asarray(r)), count, data))
        outs = {n: np.concatenate(p) for n, p in parts.items()}
        return (outs, hardware.gpu_target_record(target)) if with_hardware else outs
    parts: dict[str, list[np.ndarray]] = {}
    with _model_file(model) as path, targets.TargetRunner(path, target.name, threads=threads or None) as runner:
        for feed, count in data.counted_batches():
            for n, r in runner.infer(feed).items():
                parts.setdefault(n, []).append(unpad(n, np.asarray(r), count, data))
        hw = runner.hardware
    outs = {n: np.concatenate(p) for n, p in parts.items()}
    return (outs, hw) if with_hardware else outs


class _model_file:
    """A model as a file path: the path itself, or an in-memory model written to a private temp folder."""

    def __init__(self, model):
        self.model, self.tmp = model, None

    def __enter__(self) -> str:
        if not isinstance(self.model, onnx.ModelProto):
            return str(self.model)
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="wmaudit-target-")
        path = os.path.join(self.tmp.name, "model.onnx")
        big = self.model.ByteSize() > (1 << 31) - (1 << 26)
        onnx.save_model(self.model, path, save_as_external_data=big)
        return path

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def top1(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).argmax(axis=-1)


def accuracy_of(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of [N, classes] logits against N labels."""
    if logits.ndim != 2 or logits.shape[0] != len(labels):
        raise AuditError(f"accuracy needs logits [N, classes] for {len(labels)} labels, got shape "
                         f"{list(logits.shape)}")
    return float(np.mean(top1(logits) == labels))


def predict(model, data, threads: int = 0, backend: str = "native") -> np.ndarray:
    """The first output of the model for every example of ``data`` (on the target ``backend``)."""
    return next(iter(outputs(model, data, threads, backend).values()))


def accuracy(model, data, threads: int = 0, backend: str = "native") -> float:
    """Top-1 accuracy of the model's first output on a labelled data set."""
    if data.labels is None:
        raise AuditError(f"accuracy needs labels; {data.source} has none (give --labels)")
    return accuracy_of(next(iter(outputs(model, data, threads, backend).values())), data.labels)

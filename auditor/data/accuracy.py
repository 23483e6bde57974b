"""Task accuracy of an ONNX classifier on a held-out set, through onnxruntime.

The default held-out set is a seeded subset of the Fashion-MNIST *test*
split (calibration uses the train split, so the two never overlap).
Fidelity of an attacked model = its accuracy minus the unattacked model's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx

from auditor.errors import AuditError

DEFAULT_HELDOUT = 2000


@dataclass(frozen=True)
class HeldOut:
    """Inputs (float32, examples first) and integer labels."""

    inputs: np.ndarray
    labels: np.ndarray
    source: str
    seed: int

    def describe(self) -> dict:
        return {"source": self.source, "samples": int(len(self.labels)), "seed": int(self.seed)}


def fashion_mnist_heldout(n: int = DEFAULT_HELDOUT, seed: int = 0) -> HeldOut:
    """n seeded examples of the Fashion-MNIST test split (all 10,000 when n >= 10,000)."""
    from auditor.data import datasets

    images, labels = datasets.fashion_mnist("test")
    if n < len(labels):
        idx = np.sort(np.random.default_rng(seed).choice(len(labels), size=n, replace=False))
        images, labels = images[idx], labels[idx]
    return HeldOut(np.ascontiguousarray(datasets.fashion_mnist_normalized(images), dtype=np.float32),
                   labels.astype(np.int64), "fashion-mnist:test", seed)


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


def predict(model, inputs: np.ndarray, batch: int = 500, threads: int = 0) -> np.ndarray:
    """Logits of the model's first output for every row of inputs (onnxruntime in an isolated
    process: auditor.backends.isolate)."""
    from auditor.backends import isolate

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return isolate.call(_predict, src, inputs, batch, threads, what="onnxruntime")


def _predict(model, inputs: np.ndarray, batch: int, threads: int) -> np.ndarray:
    sess = session(model, threads)
    feeds = [i for i in sess.get_inputs()]
    if len(feeds) != 1:
        raise AuditError(f"accuracy needs a model with one input; this one has {len(feeds)}")
    name = feeds[0].name
    outs = [sess.run(None, {name: inputs[i: i + batch]})[0] for i in range(0, len(inputs), batch)]
    return np.concatenate(outs)


def accuracy(model, heldout: HeldOut, batch: int = 500, threads: int = 0) -> float:
    """Top-1 accuracy of the model on the held-out set."""
    logits = predict(model, heldout.inputs, batch, threads)
    if logits.ndim != 2 or logits.shape[0] != len(heldout.labels):
        raise AuditError(f"expected logits [N, classes], got shape {list(logits.shape)}")
    return float(np.mean(logits.argmax(axis=1) == heldout.labels))

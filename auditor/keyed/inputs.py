"""Model inputs and labels for the keyed commands, read through the shared data layer.

``read_data(spec, model)`` accepts every form ``auditor.data.inputs.load_data``
does (``fashion-mnist[:train|test]``, ``.npy``, ``.npz`` with labels under ``y``,
image folders, IDX images with their sibling labels file, ``synthetic``), checked
against the model's declared input. Images (folders, IDX) are normalised with the
Fashion-MNIST mean and std unless a preprocessing is given, because the keyed
ViTs are trained on inputs normalised that way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from auditor.data.datasets import FASHION_MEAN, FASHION_STD
from auditor.data.inputs import InputSpec, Preprocess, load_data, only_input

# what the keyed exporters train on (auditor.data.datasets.fashion_mnist_normalized)
DEFAULT_PREPROCESS = Preprocess(mean=(FASHION_MEAN,), std=(FASHION_STD,))


@dataclass
class Data:
    inputs: np.ndarray           # float32 [n, C, H, W]
    labels: np.ndarray | None    # int64 [n] or None
    source: str
    input_name: str


def image_input(name: str, channels: int, height: int, width: int) -> list[InputSpec]:
    """The declared input of a keyed model, for commands that have the key but no model file."""
    return [InputSpec(name, np.dtype(np.float32), ("N", channels, height, width))]


def read_data(spec: str, model: onnx.ModelProto | list[InputSpec] | None = None, limit: int | None = None,
              seed: int = 0, preprocess: Preprocess | None = None, labels: str | None = None) -> Data:
    """Inputs and labels from ``spec`` for ``model`` (default: one [N, 1, 28, 28] input named
    ``input``); ``limit`` keeps a seeded subset (``seed``)."""
    target = model if model is not None else image_input("input", 1, 28, 28)
    ds = load_data(str(spec), target, purpose="evaluation", samples=limit, seed=seed,
                   preprocess=preprocess or DEFAULT_PREPROCESS,
                   labels=Path(labels) if labels else None)
    x = only_input(ds)
    source = str(spec) if limit is None else f"{spec} (seeded subset of at most {limit}, seed {seed})"
    return Data(np.ascontiguousarray(x, dtype=np.float32), ds.labels, source, next(iter(ds.inputs)))

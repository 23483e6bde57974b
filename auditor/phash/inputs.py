"""Images for perceptual hashes, read through the shared data layer (``auditor.data.inputs``).

Every data form the other commands accept works here: ``.npy``, ``.npz`` (the
model's input array, or the only non-label array, with labels under ``y``
ignored), image folders (preprocessed as ``--preprocess`` says; by default
resized to the model's H x W and scaled to [0, 1]), IDX files, ``fashion-mnist``
and ``synthetic``, with the same checks and one-line errors.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from auditor.data.inputs import Preprocess, load_data, only_input


def read_images(spec: str | os.PathLike, model: onnx.ModelProto, preprocess: Preprocess | None = None,
                *, purpose: str = "evaluation", seed: int = 0) -> np.ndarray:
    """The model's input array [N, ...] from ``spec`` (every example; checked against ``model``'s input)."""
    return only_input(load_data(str(spec), model, purpose=purpose, seed=seed, preprocess=preprocess))

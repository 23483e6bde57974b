"""Reading model inputs and labels for the keyed commands: one small function.

``read_data(spec, input_name)`` understands

* ``fashion-mnist`` / ``fashion-mnist:test`` / ``fashion-mnist:train``: the
  built-in offline set ($WMAUDIT_DATA), normalised as every exporter model expects;
* ``.npy``: an array of model inputs [n, C, H, W] (no labels);
* ``.npz``: one array per model input name (or the only non-label array) and
  the labels under ``y``;
* IDX images (``*-images-idx3-ubyte[.gz]``): uint8 [n, H, W] images normalised
  with the Fashion-MNIST mean and std; labels from the sibling
  ``*-labels-idx1-ubyte[.gz]`` file when it exists.

It is kept to this one function so that it can be switched to the shared data
layer (``auditor/data``) without touching the keyed commands.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from auditor.errors import AuditError


@dataclass
class Data:
    inputs: np.ndarray           # float32 [n, C, H, W]
    labels: np.ndarray | None    # int64 [n] or None
    source: str
    input_name: str


def read_data(spec: str, input_name: str = "input", limit: int | None = None, seed: int = 0) -> Data:
    """Inputs and labels from ``spec`` (see the module docstring); ``limit`` keeps a seeded subset."""
    from auditor.data import datasets

    spec = str(spec)
    labels = None
    if spec.startswith("fashion-mnist"):
        split = spec.split(":", 1)[1] if ":" in spec else "test"
        images, labels = datasets.fashion_mnist(split)
        x = datasets.fashion_mnist_normalized(images)
    else:
        path = Path(spec)
        if not path.is_file():
            raise AuditError(f"data file not found: {spec}")
        name = path.name
        if name.endswith(".npy"):
            x = _load_npy(path)
        elif name.endswith(".npz"):
            try:
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            except Exception as e:
                raise AuditError(f"cannot read {path} as .npz: {e}") from None
            labels = arrays.pop("y", None)
            if input_name in arrays:
                x = arrays[input_name]
            elif len(arrays) == 1:
                input_name, x = next(iter(arrays.items()))
            else:
                raise AuditError(f"{path}: no array named {input_name!r} (has {sorted(arrays)})")
        elif "idx3" in name or "-images-" in name:
            images = datasets.read_idx(path)
            if images.ndim != 3:
                raise AuditError(f"{path}: IDX images must be [n, H, W], got {list(images.shape)}")
            x = datasets.fashion_mnist_normalized(images)
            lab = path.with_name(name.replace("images-idx3", "labels-idx1"))
            if lab != path and lab.is_file():
                labels = datasets.read_idx(lab)
        else:
            raise AuditError(f"unknown data format {spec!r} (fashion-mnist[:split], .npy, .npz, IDX images)")
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.number):
        raise AuditError(f"{spec}: inputs must be a non-empty numeric array [n, C, H, W], got {list(x.shape)}")
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(x):
            raise AuditError(f"{spec}: {len(labels)} labels for {len(x)} inputs")
    if limit is not None and limit < len(x):
        idx = np.sort(np.random.default_rng(seed).choice(len(x), size=limit, replace=False))
        x, labels = x[idx], (labels[idx] if labels is not None else None)
        spec = f"{spec} (seeded subset of {limit}, seed {seed})"
    return Data(np.ascontiguousarray(x, dtype=np.float32), labels, spec, input_name)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise AuditError(f"cannot read {path} as .npy: {e}") from None

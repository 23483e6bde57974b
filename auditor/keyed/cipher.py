"""Block-wise image encryption (source document 003, section 3), numpy only.

An input x [n, C, H, W] (the model's input tensor, i.e. after the model's
normalisation) is cut into N = (H/B)(W/B) blocks of B x B in raster order; a
block is the vector of its L = C*B*B values in (channel, row, column) C order,
which is the order of a Conv patch embedding's weight [D, C, B, B] seen as
[D, L]. Encrypted block k = M @ plain block perm[k].

Why after normalisation: per-channel normalisation subtracts a constant that
an orthogonal M does not preserve (M @ 1 != 1), so encrypting raw pixels and
normalising afterwards would not be absorbed exactly by the model.
"""
from __future__ import annotations

import numpy as np

from auditor.errors import AuditError
from auditor.keyed.keys import KeyedKey


def to_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """[n, C, H, W] -> [n, N, L] (blocks in raster order, values in (c, row, col) order)."""
    n, c, h, w = x.shape
    gh, gw = h // block, w // block
    t = x.reshape(n, c, gh, block, gw, block).transpose(0, 2, 4, 1, 3, 5)
    return t.reshape(n, gh * gw, c * block * block)


def from_blocks(blocks: np.ndarray, c: int, h: int, w: int, block: int) -> np.ndarray:
    """Inverse of ``to_blocks``."""
    n = blocks.shape[0]
    gh, gw = h // block, w // block
    t = blocks.reshape(n, gh, gw, c, block, block).transpose(0, 3, 1, 4, 2, 5)
    return t.reshape(n, c, h, w)


def check_inputs(x: np.ndarray, key: KeyedKey) -> None:
    if x.ndim != 4:
        raise AuditError(f"images must be [n, C, H, W], got shape {list(x.shape)}")
    _, c, h, w = x.shape
    if h % key.block or w % key.block:
        raise AuditError(f"image size {h}x{w} is not a multiple of the block size {key.block}")
    if (c, h, w) != (key.channels, key.height, key.width):
        raise AuditError(f"images are {c}x{h}x{w}, the key is for {key.channels}x{key.height}x{key.width}")


def encrypt(x: np.ndarray, key: KeyedKey) -> np.ndarray:
    """Encrypted copy of x [n, C, H, W] (float32 out; computed in float64)."""
    x = np.asarray(x)
    check_inputs(x, key)
    blocks = to_blocks(x.astype(np.float64), key.block)[:, key.perm, :]
    enc = blocks @ key.matrix.T
    return from_blocks(enc, key.channels, key.height, key.width, key.block).astype(np.float32)


def decrypt(x: np.ndarray, key: KeyedKey) -> np.ndarray:
    """Inverse of ``encrypt`` (M orthogonal: M^-1 = M^T)."""
    x = np.asarray(x)
    check_inputs(x, key)
    blocks = to_blocks(x.astype(np.float64), key.block) @ key.matrix
    out = np.empty_like(blocks)
    out[:, key.perm, :] = blocks
    return from_blocks(out, key.channels, key.height, key.width, key.block).astype(np.float32)

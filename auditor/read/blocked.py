"""onnxruntime's NCHWc blocked Conv weights, read back in torch layout.

With ``ORT_ENABLE_ALL`` onnxruntime rewrites float Convs as
``com.microsoft.nchwc:Conv`` and stores each weight reordered into blocks of
B output channels (B follows the CPU: 8 with AVX2, 16 with AVX-512), the
output channels padded with zeros up to a multiple of B. The stored tensor
keeps the dims ``[roundup(O, B), I, kH, kW]``; its bytes are in one of two
orders (onnxruntime's NchwcTransformer, MLAS ``MlasReorderFilter*``):

* ``OIHWBiBo`` (the input is NCHWc: group 1 with I a multiple of B, or a
  grouped conv with blocked groups): ``[O/B][I/B][kH][kW][Bi][Bo]``;
* ``OIHWBo`` (a depthwise conv, or group 1 with I < B reading its NCHW input
  directly): ``[O/B][I][kH][kW][Bo]``.

The block size is not written in the file. It is inferred for the whole file
(one machine wrote it) from what each Conv allows: the padded channel count
is a multiple of B, the order rules above, and the true channel count where
the graph states it (``ReorderOutput``'s ``channels``, the next Conv's input
channels): ``roundup(O, B)`` must equal the stored dims. `block_weight` does
the forward reordering (used to build files for another machine's block
size); `unblock_weight` undoes it.
"""
from __future__ import annotations

import numpy as np

from auditor.errors import AuditError

__all__ = ["NCHWC_DOMAIN", "BLOCK_SIZES", "KNOWN_CONV_ATTRIBUTES", "UnknownLayout", "filter_order",
           "block_weight", "unblock_weight", "roundup"]

NCHWC_DOMAIN = "com.microsoft.nchwc"
BLOCK_SIZES = (8, 16)   # MlasNchwcGetBlockSize: AVX2 / AVX-512 (x86); anything else is not understood
# The attributes onnxruntime writes on an NCHWc Conv (those of the Conv / FusedConv it replaced).
KNOWN_CONV_ATTRIBUTES = frozenset({"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides",
                                   "activation", "activation_params"})


class UnknownLayout(AuditError):
    """A blocked weight whose layout the reader does not understand."""


def roundup(n: int, block: int) -> int:
    return -(-int(n) // block) * block


def filter_order(in_channels: int, out_channels: int, group: int, block: int) -> str | None:
    """`OIHWBiBo` or `OIHWBo` as onnxruntime chooses for a Conv weight [O, I, kH, kW] and `group`,
    or None when onnxruntime would not block this Conv with this block size."""
    if group > 1:
        if out_channels % block:
            return None
        if in_channels == 1 and out_channels == group:
            return "OIHWBo"
        if in_channels % block or out_channels % group or (out_channels // group) % block:
            return None
        return "OIHWBiBo"
    if in_channels < block:
        return "OIHWBo"
    return None if in_channels % block else "OIHWBiBo"


def block_weight(w: np.ndarray, block: int, order: str) -> np.ndarray:
    """OIHW float weight -> the stored tensor [roundup(O, B), I, kH, kW] in `order` (zero padded)."""
    w = np.asarray(w, dtype=np.float32)
    O, I, kh, kw = w.shape
    Op = roundup(O, block)
    padded = np.zeros((Op, I, kh, kw), np.float32)
    padded[:O] = w
    if order == "OIHWBo":
        d = padded.reshape(Op // block, block, I, kh, kw).transpose(0, 2, 3, 4, 1)
    elif order == "OIHWBiBo":
        if I % block:
            raise UnknownLayout(f"OIHWBiBo needs input channels in blocks of {block}, got {I}")
        d = padded.reshape(Op // block, block, I // block, block, kh, kw).transpose(0, 2, 4, 5, 3, 1)
    else:
        raise UnknownLayout(f"unknown filter order {order!r}")
    return np.ascontiguousarray(d).reshape(Op, I, kh, kw)


def unblock_weight(stored: np.ndarray, block: int, order: str, out_channels: int) -> np.ndarray:
    """The stored tensor [Op, I, kH, kW] in `order` -> OIHW [out_channels, I, kH, kW], padding dropped."""
    Op, I, kh, kw = stored.shape
    flat = np.ascontiguousarray(stored, dtype=np.float32).reshape(-1)
    if Op % block or not 0 < out_channels <= Op:
        raise UnknownLayout(f"{Op} stored output channels do not hold {out_channels} channels in blocks of {block}")
    if order == "OIHWBo":
        w = flat.reshape(Op // block, I, kh, kw, block).transpose(0, 4, 1, 2, 3)
    elif order == "OIHWBiBo":
        if I % block:
            raise UnknownLayout(f"OIHWBiBo needs input channels in blocks of {block}, got {I}")
        w = flat.reshape(Op // block, I // block, kh, kw, block, block).transpose(0, 5, 1, 4, 2, 3)
    else:
        raise UnknownLayout(f"unknown filter order {order!r}")
    return np.ascontiguousarray(w.reshape(Op, I, kh, kw)[:out_channels])

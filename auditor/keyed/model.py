"""The model transformation of source document 003 on an ONNX file (no torch).

``locate(model, key)`` finds the two embeddings, whatever the exporter named them:

* the patch embedding: a ``Conv`` on the model input with kernel = stride = B
  (no padding, dilation 1, one group; weight [D, C, B, B], tokens in raster
  order), or a ``MatMul`` whose data operand is a patchify of the model input
  (Reshape / Transpose ...) and whose weight is an initializer [L, D], possibly
  behind a ``Transpose``. For the MatMul form the patchify is *measured*: the
  sub-graph from the input to the MatMul is run by onnxruntime on a probe image
  whose pixels hold their own index, which gives, for every token, the block it
  holds and, for every feature, the pixel offset inside the block.
* the position embedding: the first ``Add`` downstream of the patch embedding
  with a constant operand of T x D values, T = N (no class token) or N + 1;
  the class token's row is the one before the patches (or after them when the
  patch tokens come first in the Concat on the way).

``encrypt_model(model, key)`` returns a keyed copy: the patch weight seen as
[D, L] ((channel, row, column) order) times M^T, the N patch rows of the
position embedding permuted by the block permutation. ``parity`` compares the
keyed model on encrypted inputs with the plain model on plain inputs through
onnxruntime.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from auditor.errors import AuditError
from auditor.keyed import cipher
from auditor.keyed.keys import KeyedKey

PARITY_ATOL = 1e-4


@dataclass
class Embeddings:
    """Where the key acts in one ONNX graph."""

    kind: str                 # "conv" | "matmul"
    node: str                 # patch-embedding node name (or output name when unnamed)
    weight: str               # initializer holding the patch weight
    weight_transposed: bool   # MatMul weight stored [D, L'] behind a Transpose
    pos: str                  # initializer holding the position embedding
    pos_offset: int           # index of the first patch row (1 with a leading class token)
    dim: int                  # D
    token_block: np.ndarray   # [N] block (raster index) held by token t
    feature_offset: np.ndarray  # [L] offset inside the block ((c, row, col) index) of feature l

    def describe(self) -> dict:
        return {"patch_embedding": {"kind": self.kind, "node": self.node, "weight": self.weight,
                                    "transposed": self.weight_transposed, "dim": self.dim,
                                    "token_order": "raster" if np.array_equal(self.token_block, np.arange(len(self.token_block))) else "measured"},
                "position_embedding": {"initializer": self.pos, "patch_rows_from": self.pos_offset}}


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input_name(model: onnx.ModelProto) -> str:
    inits = set(_inits(model))
    real = [i.name for i in model.graph.input if i.name not in inits]
    if len(real) != 1:
        raise AuditError(f"a keyed model needs exactly one image input; this one has {len(real)}")
    return real[0]


def _weight_source(model: onnx.ModelProto, name: str) -> tuple[str, bool] | None:
    """(initializer, transposed) behind a MatMul weight operand, or None."""
    inits = _inits(model)
    if name in inits:
        return name, False
    for n in model.graph.node:
        if name in n.output and n.op_type == "Transpose" and n.input[0] in inits:
            perm = _attr(n, "perm")
            if len(inits[n.input[0]].dims) == 2 and (perm is None or list(perm) == [1, 0]):
                return n.input[0], True
    return None


def _probe_patchify(model: onnx.ModelProto, input_name: str, data_name: str, key: KeyedKey):
    """Run input -> data_name on an index image; (token_block [N], feature_offset [L]) or None."""
    # The intermediate tensor is exposed as an extra graph output of a copy of the model
    # (onnx.utils.Extractor needs value_info, which exporters do not always write).
    probe_model = onnx.ModelProto()
    probe_model.CopyFrom(model)
    probe_model.graph.output.append(onnx.helper.make_tensor_value_info(data_name, onnx.TensorProto.FLOAT, None))
    from auditor.backends import isolate
    from auditor.data.accuracy import tensor_values

    c, h, w, b = key.channels, key.height, key.width, key.block
    probe = (np.arange(c * h * w, dtype=np.float32) + 1).reshape(1, c, h, w)
    try:  # in an isolated process: a graph that crashes onnxruntime is one line, not a dead audit
        out = isolate.call(tensor_values, probe_model.SerializeToString(), data_name, {input_name: probe},
                           what="onnxruntime")
    except AuditError:
        return None
    if out.ndim != 3 or out.shape[0] != 1 or out.shape[1:] != (key.n_blocks, key.size):
        return None
    idx = out[0].astype(np.int64) - 1
    if not np.array_equal(np.sort(idx.reshape(-1)), np.arange(c * h * w)):
        return None
    ch, rem = np.divmod(idx, h * w)
    r, col = np.divmod(rem, w)
    gw = w // b
    blk = (r // b) * gw + col // b
    off = ch * b * b + (r % b) * b + col % b
    if not (blk == blk[:, :1]).all() or not (off == off[:1, :]).all():
        return None
    return blk[:, 0], off[0]


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _find_patch(model: onnx.ModelProto, key: KeyedKey, input_name: str):
    inits = _inits(model)
    found, wrong_block = [], []
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[0] == input_name and len(n.input) > 1 and n.input[1] in inits:
            w = inits[n.input[1]]
            ks, st = list(_attr(n, "kernel_shape", list(w.dims[2:]))), list(_attr(n, "strides", [1, 1]))
            pads, groups = list(_attr(n, "pads", [0, 0, 0, 0])), _attr(n, "group", 1)
            dil = list(_attr(n, "dilations", [1, 1]))
            if len(ks) == 2 and ks[0] == ks[1] == st[0] == st[1] and not any(pads) and groups == 1 and dil == [1, 1]:
                if ks[0] != key.block:
                    wrong_block.append(ks[0])
                    continue
                if list(w.dims) != [w.dims[0], key.channels, key.block, key.block]:
                    continue
                n_tok = key.n_blocks
                found.append(("conv", n, n.input[1], False, int(w.dims[0]), np.arange(n_tok),
                              np.arange(key.size)))
    if found:
        return found[0]
    for n in model.graph.node:
        if n.op_type != "MatMul" or len(n.input) != 2:
            continue
        src = _weight_source(model, n.input[1])
        if src is None:
            continue
        name, transposed = src
        dims = list(inits[name].dims)
        lin = dims[1] if transposed else dims[0]
        if lin != key.size:
            continue
        probe = _probe_patchify(model, input_name, n.input[0], key)
        if probe is None:
            continue
        d = dims[0] if transposed else dims[1]
        found.append(("matmul", n, name, transposed, int(d), probe[0], probe[1]))
        break
    if found:
        return found[0]
    if wrong_block:
        raise AuditError(f"the model's patch embedding has block size {wrong_block[0]}, the key's is {key.block}")
    raise AuditError(f"no patch embedding found for block {key.block} on {key.channels}x{key.height}x{key.width} "
                     f"inputs (a Conv with kernel = stride = {key.block}, or a MatMul of {key.size} features "
                     f"after a patchify of the input)")


def locate(model: onnx.ModelProto, key: KeyedKey) -> Embeddings:
    """The patch and position embeddings the key acts on (AuditError when absent or mismatched)."""
    input_name = _input_name(model)
    dims = [d.dim_value for d in model.graph.input[[i.name for i in model.graph.input].index(input_name)]
            .type.tensor_type.shape.dim]
    if len(dims) == 4 and all(dims[1:]) and tuple(dims[1:]) != (key.channels, key.height, key.width):
        raise AuditError(f"the model takes {dims[1]}x{dims[2]}x{dims[3]} inputs, the key is for "
                         f"{key.channels}x{key.height}x{key.width}")
    kind, node, weight, transposed, d, token_block, feature_offset = _find_patch(model, key, input_name)
    inits, cons = _inits(model), _consumers(model)
    n = key.n_blocks
    # Breadth-first from the patch embedding to the Add with the position table.
    start = node.output[0]
    seen, queue = {start}, deque([(start, None)])
    while queue:
        name, concat_idx = queue.popleft()
        for c in cons.get(name, []):
            if c.op_type == "Add":
                other = c.input[1] if c.input[0] == name else c.input[0]
                if other in inits:
                    t = inits[other]
                    size = int(np.prod(t.dims)) if t.dims else 1
                    if t.dims and t.dims[-1] == d and size in (n * d, (n + 1) * d):
                        rows = size // d
                        offset = 0 if rows == n else (0 if concat_idx == 0 else 1)
                        return Embeddings(kind, node.name or node.output[0], weight, transposed, other, offset, d,
                                          np.asarray(token_block), np.asarray(feature_offset))
            idx = concat_idx
            if c.op_type == "Concat" and idx is None:
                idx = list(c.input).index(name)
            for o in c.output:
                if o not in seen:
                    seen.add(o)
                    queue.append((o, idx))
    raise AuditError(f"no position embedding ({n} or {n + 1} rows of {d}) is added after the patch embedding")


def key_weight_dl(emb: Embeddings, stored: np.ndarray) -> np.ndarray:
    """The patch weight as [D, L] in the key's (channel, row, column) order."""
    if emb.kind == "conv":
        return stored.reshape(stored.shape[0], -1)
    w_op = stored.T if emb.weight_transposed else stored      # [L', D]
    out = np.empty((w_op.shape[1], w_op.shape[0]), dtype=stored.dtype)
    out[:, emb.feature_offset] = w_op.T
    return out


def stored_weight(emb: Embeddings, w_dl: np.ndarray, shape) -> np.ndarray:
    """Inverse of ``key_weight_dl``."""
    if emb.kind == "conv":
        return w_dl.reshape(shape)
    w_op = w_dl[:, emb.feature_offset].T
    return w_op.T if emb.weight_transposed else w_op


def pos_rows(emb: Embeddings, stored: np.ndarray, n: int) -> np.ndarray:
    """The N patch rows of the position embedding, in token order [N, D]."""
    table = stored.reshape(-1, emb.dim)
    return table[emb.pos_offset: emb.pos_offset + n]


def keyed_pos_order(emb: Embeddings, perm: np.ndarray) -> np.ndarray:
    """Row permutation q: keyed patch row t = plain patch row q[t].

    Token t holds block beta(t) of the encrypted image, i.e. plain block
    perm[beta(t)], which the plain model sees at token beta^-1(perm[beta(t)]).
    """
    beta = emb.token_block
    inv = np.empty_like(beta)
    inv[beta] = np.arange(len(beta))
    return inv[perm[beta]]


def transform(model: onnx.ModelProto, key: KeyedKey, emb: Embeddings | None = None) -> onnx.ModelProto:
    """A keyed copy of a float model (the input is not modified)."""
    emb = emb or locate(model, key)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = _inits(out)
    wt = inits[emb.weight]
    w = numpy_helper.to_array(wt)
    if w.dtype.kind != "f":
        raise AuditError(f"patch weight {emb.weight} is {w.dtype}: keyed models are made from the float "
                         f"model, before deployment quantization")
    w_dl = key_weight_dl(emb, w.astype(np.float64)) @ key.matrix.T
    wt.CopyFrom(numpy_helper.from_array(stored_weight(emb, w_dl, w.shape).astype(w.dtype), wt.name))
    pt = inits[emb.pos]
    p = numpy_helper.to_array(pt)
    table = p.reshape(-1, emb.dim).copy()
    rows = table[emb.pos_offset: emb.pos_offset + key.n_blocks]
    table[emb.pos_offset: emb.pos_offset + key.n_blocks] = rows[keyed_pos_order(emb, key.perm)]
    pt.CopyFrom(numpy_helper.from_array(table.reshape(p.shape).astype(p.dtype), pt.name))
    return out


def run(model, x: np.ndarray, batch: int = 500, target: str = "native") -> np.ndarray:
    """Logits of the model's first output (onnxruntime on ``target``, one thread)."""
    from auditor.data.accuracy import predict
    from auditor.data.inputs import from_arrays

    data = from_arrays(model, np.ascontiguousarray(x, dtype=np.float32), source="keyed-model inputs",
                       batch_size=batch)
    return predict(model, data, threads=1, backend=target)


def parity(plain, keyed, key: KeyedKey, x: np.ndarray, atol: float = PARITY_ATOL) -> dict:
    """Keyed model on encrypted x vs plain model on x: max |diff| of logits and top-1 agreement."""
    a = run(plain, x)
    b = run(keyed, cipher.encrypt(x, key))
    diff = float(np.abs(a.astype(np.float64) - b).max())
    agree = float(np.mean(a.argmax(1) == b.argmax(1)))
    return {"max_abs_diff": diff, "top1_agreement": agree, "samples": int(len(x)), "atol": atol,
            "holds": bool(diff <= atol and agree == 1.0)}


def probe_inputs(key: KeyedKey, n: int = 32, seed: int = 0) -> np.ndarray:
    """Seeded standard-normal model inputs (the normalised-image scale), for parity checks without data."""
    return np.random.default_rng(seed).standard_normal((n, key.channels, key.height, key.width)).astype(np.float32)

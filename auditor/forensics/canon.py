"""Undo function-preserving transformations of one layer without the owner's model.

What the algebra gives back (auditor.read.channels finds the layer's neighbours):

* dummy neurons: output channels whose outgoing columns (in every next layer) are
  zero are removed;
* NeuronClique: output channels with identical incoming rows (after the
  BatchNorm that follows, if any) whose outgoing columns cancel are removed;
* neuron split: output channels with identical incoming rows (up to a positive
  factor) are merged into one, keeping the first copy;
* the same on the layer's input side, through the layer feeding it: its dummy,
  clique and split channels become zero, cancelling or shared input columns of
  this layer, which are dropped or summed (weighted by the copies' factors).

Input-side scales (the feeding layer's output scaled after its BatchNorm, this layer's
input columns divided by the same factor) leave gamma_c * column_c unchanged: the scanner
also tries that product (`in_gamma`), which equals the original columns times the
original gammas (near 1 for many trained networks, but not in general: a heuristic
variant, paid for like any other).

What it cannot give back (said in every result): a permutation of the output
channels of the original order (the Uchida `mean` reduction is invariant to it;
`flatten` is not), a permutation of the input channels (fitted against the key
by the scanner, and paid for in its Bonferroni count), positive per-channel scales
(recoverable from the key's BatchNorm anchors, see `anchor_unfold`; otherwise
only with the owner's reference model).
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from auditor.errors import AuditError
from auditor.read import channels as ch

COS_EQUAL = 1.0 - 1e-5     # rows this close in cosine are copies of one neuron
COS_EQUAL_QUANT = 1.0 - 1e-3   # ... when the layer's weight is stored quantized: copies quantized per channel
                               # stay parallel; magnitude pruning before quantization zeroes other entries of a
                               # scaled copy (cosine 0.84-0.99998 after prune:0.2 then int8, bench/
                               # bench_pruned_copies.py): those are compared where both keep entries
                               # (pruned_copy_pairs), this tolerance then on the common entries
ZERO_REL = 1e-6            # outgoing columns this small (relative) are zero
PRUNED_SHARE = 0.1         # a layer whose non-zero rows and columns hold this share of exact zeros was pruned
                           # (int8 rounding alone zeroes the entries below half a step: at most 3.8 % on the
                           # 59 weights of the forensics-blocks* int8 files; 20 % after prune:0.2)
PRUNED_COMMON = 6          # pruned copies are compared on at least this many entries both rows keep
PRUNED_LEVELS = 24         # mask levels (factors of 2) of the pruned-copy search
QUANT_LEVELS = 127         # steps between 0 and a quantized row's largest |entry| (8-bit, per channel)
PRUNE_DIRECTIONS = 8       # random directions that must all agree before a cosine is computed
GRID_DIMS = 3              # of which the copy search grids the first three (canon._pairs)


class GraphValues:
    """Values of graph tensors through a WeightStore (dequantized float), by graph tensor name.

    A file onnxruntime saved at ORT_ENABLE_ALL (NCHWc nodes, FusedConv) is traced as the plain NCHW
    graph it computes (auditor.read.nchwc_plain): `block` picks the NCHWc block-size reading (default:
    the first of `nchwc_plain.readings(store)`, 8 before 16). An int8 file in onnxruntime's QOperator
    or dynamic form (also saved at ORT_ENABLE_EXTENDED / ALL: NHWC QLinearConv in Transpose pairs) is
    traced as the float graph it computes with the dequantized weights (auditor.read.qop_plain)."""

    def __init__(self, store, block: int | None = None):
        from auditor.read import nchwc_plain, qop_plain

        self.store = store
        self.model = store.model
        self.block = None
        plain_alias: dict[str, str] = {}
        trimmed: dict[str, np.ndarray] = {}
        if nchwc_plain.has_nchwc(store.model):
            if block is not None:
                self.block = block
                self.model, plain_alias, trimmed = nchwc_plain.plain_model(store, block)
            else:  # the first reading that reads (a wrong one may show non-zero padding); else the file as is
                for b in nchwc_plain.readings(store) or [None]:
                    try:
                        self.model, plain_alias, trimmed = nchwc_plain.plain_model(store, b)
                    except AuditError:
                        continue
                    self.block = b
                    break
        self.unread: str | None = None   # why the int8 graph was not written as float (traced as it is)
        if qop_plain.has_quantized_ops(self.model):
            try:
                self.model, qop_alias = qop_plain.plain_model(self.model, store)
                plain_alias = {**qop_alias, **plain_alias}
            except AuditError as e:   # as before: the layers in float / QDQ form are still traced
                self.unread = str(e)
        self.graph = ch._Graph(self.model)
        self._alias: dict[str, str] = {}
        for w in store.weights:
            for op, node_name, idx in w.uses:
                try:
                    node = store.node(node_name)
                except Exception:  # a use inside a subgraph: not traced
                    continue
                if idx < len(node.input):
                    self._alias.setdefault(node.input[idx], w.name)
            self._alias.setdefault(w.name, w.name)
            self._alias.setdefault(w.stored_name, w.name)
        self._alias.update(plain_alias)   # the unblocked weights of this block-size reading
        self._cache: dict[str, np.ndarray] = {}
        # ... with a residual stream's padding dropped: by graph tensor and by weight name
        self._trimmed = {k: np.asarray(a, dtype=np.float32) for t, a in trimmed.items()
                         for k in {t, self._alias.get(t, t)}}

    def value(self, name: str) -> np.ndarray:
        if name not in self._cache:
            if name in self._trimmed:
                v = self._trimmed[name]
            elif name in self._alias:
                v = self.store.array(self._alias[name])
            else:
                v = self.graph.value(name)
                if v is None:
                    p = self.graph.producer.get(name)
                    if p is not None and p[1].op_type == "DequantizeLinear":
                        v = self.store.array(self._alias.get(p[1].input[0], p[1].input[0]))
                if v is None:
                    raise KeyError(name)
            self._cache[name] = np.asarray(v, dtype=np.float64)
        return self._cache[name]

    def raw(self, name: str) -> np.ndarray:
        """A weight's values as stored-and-dequantized float32 (WeightStore.array: read once when the
        store keeps arrays, see WeightStore.keep_arrays); other graph tensors as `value` gives them."""
        if name in self._trimmed:
            return self._trimmed[name]
        wn = self._alias.get(name)
        if wn is None:
            return self.value(name)
        return self.store.array(wn)

    def flow(self, lay: ch.Layer) -> ch.Flow:
        """ch.trace of a layer, cached."""
        cache = self.__dict__.setdefault("_flows", {})
        if lay.weight not in cache:
            cache[lay.weight] = ch.trace(self.model, lay, self.graph)
        return cache[lay.weight]

    def input_flow(self, lay: ch.Layer) -> ch.Flow | None:
        """ch.input_flow of a layer (the flow of the channels it reads), cached."""
        cache = self.__dict__.setdefault("_input_flows", {})
        if lay.weight not in cache:
            cache[lay.weight] = ch.input_flow(self.model, lay, self.graph)
        return cache[lay.weight]

    def weight_name(self, graph_tensor: str) -> str | None:
        return self._alias.get(graph_tensor)

    def layer_of_weight(self, weight_name: str) -> ch.Layer | None:
        """The first layer (graph order) reading `weight_name` (float or graph tensor name)."""
        if "_by_weight" not in self.__dict__:
            by: dict[str, ch.Layer] = {}
            for lay in ch.layers(self.model, self.graph):
                by.setdefault(lay.weight, lay)
                a = self._alias.get(lay.weight)
                if a is not None:
                    by.setdefault(a, lay)
            self._by_weight = by
        return self._by_weight.get(weight_name)


_LAYER_CACHES = ("_copies", "_groups", "_live", "_rowsq")


def forget_layers(gv: GraphValues, keep) -> int:
    """Drop what the neuron analysis cached for layers whose weight is not in `keep` (store weight
    names): a caller walking the file keeps only its neighbourhood (copies of a layer of many parallel
    rows are millions of pairs). Returns the entries dropped."""
    keep = set(keep)
    n = 0
    for name in _LAYER_CACHES:
        cache = gv.__dict__.get(name)
        if not cache:
            continue
        for k in [k for k in cache if (gv.weight_name(k[0]) or k[0]) not in keep]:
            del cache[k]
            n += 1
    return n


def torch_rows(gv: GraphValues, lay: ch.Layer) -> np.ndarray:
    """The layer's weight in torch layout (output channels first), float64."""
    w = gv.value(lay.weight)
    return np.moveaxis(w, lay.out_axis, 0) if lay.out_axis else w


def bn_affine(gv: GraphValues, flow: ch.Flow) -> tuple[np.ndarray, np.ndarray] | None:
    """(factor, shift) of the first BatchNorm after the layer: y = factor * x + shift."""
    if not flow.batchnorms:
        return None
    bn = flow.batchnorms[0]
    eps = float(next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5))
    g, b, m, v = (gv.value(t) for t in bn.input[1:5])
    f = g / np.sqrt(v + eps)
    return f, b - m * f


def _consumer_rows(gv: GraphValues, c: ch.Consumer, channels: int) -> np.ndarray:
    """The consumer's weight block read by the traced channels: [channels * spatial, out, k...]
    (a view of the stored float32 array where the layout allows)."""
    V = np.moveaxis(gv.raw(c.layer.weight), c.layer.in_axis, 0)
    return V[c.offset: c.offset + channels * c.spatial]


def _consumer_rowsq(gv: GraphValues, c: ch.Consumer, channels: int, live: np.ndarray | None) -> np.ndarray:
    """[channels * spatial]: per row of the consumer's block, the sum of squares over its live
    outputs and kernel axes (one pass, no copy of the weight; cached when every output is live)."""
    every = live is None or bool(live.all())
    key = (c.layer.weight, c.offset, c.spatial, channels)
    cache = gv.__dict__.setdefault("_rowsq", {})
    if every and key in cache:      # (the weight is not asked for again: a walk may drop it)
        return cache[key]
    blk = _consumer_rows(gv, c, channels)
    V3 = blk.reshape(blk.shape[0], blk.shape[1] if blk.ndim > 1 else 1, -1)
    if not every:
        V3 = V3[:, live]
        return np.einsum("iok,iok->i", V3, V3).astype(np.float64)
    cache[key] = np.einsum("iok,iok->i", V3, V3).astype(np.float64)
    return cache[key]


def outgoing_norms(gv: GraphValues, flow: ch.Flow, depth: int = 3) -> np.ndarray:
    """Per output channel, the norm of its columns in every next layer (as `outgoing` builds them),
    computed from sums of squares without building the columns."""
    tot = np.zeros(flow.channels)
    for c in flow.consumers:
        live = live_outputs(gv, c.layer, depth - 1) if depth > 0 else None
        per = _consumer_rowsq(gv, c, flow.channels, live)
        tot += per.reshape(flow.channels, c.spatial).sum(axis=1)
    return np.sqrt(tot)


def outgoing(gv: GraphValues, flow: ch.Flow, depth: int = 3, rows=None) -> np.ndarray:
    """C x K matrix (or len(rows) x K for the channels in `rows`): for each output channel, its
    columns in every next layer, concatenated, restricted to the next layer's live outputs (a dummy
    neuron's column may be non-zero where it feeds only other dummy neurons: an attacker adding
    dummies to consecutive layers)."""
    idx = np.arange(flow.channels) if rows is None else np.asarray(rows, dtype=int)
    parts = []
    for c in flow.consumers:
        V = _consumer_rows(gv, c, flow.channels)
        sel = (idx[:, None] * c.spatial + np.arange(c.spatial)[None, :]).reshape(-1)
        blk = np.asarray(V[sel], dtype=np.float64)
        if depth > 0 and blk.ndim >= 2:
            live = live_outputs(gv, c.layer, depth - 1)
            if live is not None:
                blk = blk[:, live]
        parts.append(blk.reshape(len(idx), -1))
    return np.concatenate(parts, axis=1)


def live_outputs(gv: GraphValues, lay: ch.Layer, depth: int) -> np.ndarray | None:
    """Boolean mask of the layer's output channels that reach anything (None: all, or unknown):
    neither dummy (zero outgoing columns) nor a clique member (copies whose columns cancel). A
    clique added to the next layer has random columns on this layer's dummy channels too, so
    counting clique neurons as live would hide those dummies."""
    key = (lay.weight, depth)
    cache = gv.__dict__.setdefault("_live", {})
    if key not in cache:
        flow = gv.flow(lay)
        if flow.blocked:
            cache[key] = None
        else:
            g = neuron_groups(gv, flow, depth=depth)
            live = np.zeros(flow.channels, dtype=bool)
            live[g.keep if isinstance(g.members, _Solo) else [j for mem in g.members for j, _ in mem]] = True
            cache[key] = live
    return cache[key]


class _Solo:
    """members of a layer whose every neuron is one channel: [(channel, 1.0)] each, built on access."""

    def __init__(self, keep: list[int]):
        self.keep = keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [[(r, 1.0)] for r in self.keep[i]]
        return [(self.keep[i], 1.0)]

    def __iter__(self):
        return ([(r, 1.0)] for r in self.keep)


@dataclass
class Groups:
    """Output channels of a layer as neurons: keep[i] = representative channel of neuron i,
    members[i] = [(channel, factor)] whose activations are factor * the representative's."""

    keep: list[int]
    members: Any   # list[list[tuple[int, float]]] (or _Solo, the same read lazily)
    dummies: int = 0
    cliques: int = 0
    splits: int = 0
    channels: int = 0


def _row_affine(gv: GraphValues, flow: ch.Flow) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W2, f, shift): the layer's incoming rows [C, N] (stored float32, possibly a view), and the
    per-row factor and constant with which the next layers see them: effective row c is
    [W2[c] * f[c], shift[c]] (BN factor, BN shift, the bias and any bias Add folded in)."""
    lay = flow.layer
    w = gv.raw(lay.weight)
    W2 = (np.moveaxis(w, lay.out_axis, 0) if lay.out_axis else w).reshape(flow.channels, -1)
    bias = np.zeros(flow.channels)
    if lay.bias and gv.graph.is_const(lay.bias):
        try:
            bias = gv.value(lay.bias).reshape(-1)
        except KeyError:
            pass
    for b in flow.writers[0].biases:    # a converter's bias Add (before any BatchNorm)
        try:
            v = gv.value(b.const).reshape(-1)
        except KeyError:
            continue
        bias = bias + (v if v.size == flow.channels else float(v[0]))
    aff = bn_affine(gv, flow)
    if aff is None:
        return W2, np.ones(flow.channels), bias
    f, sh = aff
    return W2, f, bias * f + sh


def effective_rows(gv: GraphValues, flow: ch.Flow) -> np.ndarray:
    """Incoming rows as the next layers see them: W * BN factor, with the BN shift and bias."""
    W2, f, sh = _row_affine(gv, flow)
    return np.concatenate([np.asarray(W2, np.float64) * f[:, None], sh[:, None]], axis=1)


def _directions(dim: int) -> np.ndarray:
    dirs = np.random.default_rng(0).standard_normal((dim, PRUNE_DIRECTIONS))
    return dirs / np.linalg.norm(dirs, axis=0, keepdims=True)


def _pairs(ps: np.ndarray, unit_rows, dummy: np.ndarray, cos_equal: float = COS_EQUAL,
           label: np.ndarray | None = None, accept=None) -> dict[int, set[int]]:
    """Copies among rows whose unit vectors project to `ps` (C x PRUNE_DIRECTIONS) on
    `_directions`: `unit_rows(indices)` gives those rows (float64), whose cosines verify the candidate
    pairs in blocks of dot products (a layer of many parallel rows costs array work, not a Python
    call per pair). Pairs must share their `label` (when given) and pass `accept(i, j)` (when given);
    `dummy` rows are never compared."""
    # copies lie within sqrt(2 (1 - COS_EQUAL)) of each other on the unit sphere, so within that
    # distance `tol` along every unit direction. Rows are put in a grid of cells of side tol on the
    # first GRID_DIMS directions (rows within tol of each other lie in the same or adjacent cells),
    # each row compared with the rows of its own cell and of half of its neighbours (every adjacent
    # pair of cells once), those within tol along every direction kept (one vectorised test per block),
    # and the cosine of the few that remain verified. Exact (no pair of copies is missed) and close
    # to O(C N): one direction is not enough in high dimension, where projections of unit rows
    # spread only about 1/sqrt(N).
    tol = float(np.sqrt(2.0 * (1.0 - cos_equal))) * 1.01
    partners: dict[int, set[int]] = {}
    live = np.flatnonzero(~np.asarray(dummy, bool))   # rows left out are never compared
    C = live.size
    if C < 2:
        return partners
    P = ps[live]
    D = min(GRID_DIMS, P.shape[1])
    cells = np.floor(P[:, :D] / tol).astype(np.int64)
    cells -= cells.min(axis=0)
    width = cells.max(axis=0) + 3                 # cell + 1 +- 1 stays inside its row of the grid
    radix = np.concatenate([np.cumprod(width[::-1])[::-1][1:], [1]]).astype(np.int64)
    key = (cells + 1) @ radix
    order = np.argsort(key, kind="stable")
    ks, Ps = key[order], P[order]
    rows = np.arange(C)
    block = 1 << 19                               # candidate pairs tested at once (bounded memory)
    # one's own cell, then every neighbouring cell once: the offsets lexicographically after zero.
    # Every (offset, row) is one "virtual row"; they are handled in chunks of whole offsets, so the
    # array work is paid once per chunk, not once per offset
    offsets = [(0,) * D] + [d for d in itertools.product((-1, 0, 1), repeat=D) if d > (0,) * D]
    shift = np.array([int(np.dot(d, radix)) for d in offsets], dtype=np.int64)
    # the directions not gridded first (the grid's own already agree to within two cells)
    test_cols = [np.ascontiguousarray(Ps[:, k]) for k in list(range(D, Ps.shape[1])) + list(range(D))]
    per_chunk = max(1, (1 << 20) // C)
    for o0 in range(0, len(offsets), per_chunk):
        sh = shift[o0:o0 + per_chunk]
        tgt = (ks[None, :] + sh[:, None]).reshape(-1)
        lo = np.searchsorted(ks, tgt, side="left")
        hi = np.searchsorted(ks, tgt, side="right")
        if o0 == 0:
            lo[:C] = np.maximum(lo[:C], rows + 1)  # one's own cell: each pair once
        src = np.tile(rows, sh.size)
        cnt = np.maximum(hi - lo, 0)
        ends = np.cumsum(cnt)
        V = cnt.size
        a0 = 0
        while a0 < V:
            base = int(ends[a0 - 1]) if a0 else 0
            a1 = max(a0 + 1, int(np.searchsorted(ends, base + block, side="right")))
            a1 = min(a1, V)
            n = cnt[a0:a1]
            tot = int(n.sum())
            if tot:
                a_idx = np.repeat(src[a0:a1], n)
                b_idx = np.repeat(lo[a0:a1], n) + (np.arange(tot) - np.repeat(np.cumsum(n) - n, n))
                for col in test_cols:              # one direction at a time, on the pairs left
                    keep = np.abs(col[b_idx] - col[a_idx]) <= tol
                    a_idx, b_idx = a_idx[keep], b_idx[keep]
                I, J = live[order[a_idx]], live[order[b_idx]]
                if label is not None:
                    ok = label[I] == label[J]
                    I, J = I[ok], J[ok]
                if I.size:
                    ok = _batched_cosines(unit_rows, I, J) >= cos_equal
                    I, J = I[ok], J[ok]
                for i, j in zip(I.tolist(), J.tolist()):
                    if accept is None or accept(i, j):
                        partners.setdefault(i, set()).add(j)
                        partners.setdefault(j, set()).add(i)
            a0 = a1
    return partners


def _batched_cosines(unit_rows, I: np.ndarray, J: np.ndarray, budget: int = 1 << 24) -> np.ndarray:
    """cos(I[k], J[k]) for every candidate pair: the rows involved fetched once, then the pairs' dot
    products in blocks of at most `budget` numbers."""
    S, inv = np.unique(np.concatenate([I, J]), return_inverse=True)
    U = unit_rows(S)
    ia, jb = inv[:I.size], inv[I.size:]
    out = np.empty(I.size)
    step = max(1, budget // max(U.shape[1], 1))
    for k in range(0, I.size, step):
        out[k:k + step] = np.einsum("ij,ij->i", U[ia[k:k + step]], U[jb[k:k + step]])
    return out


def copy_pairs(unit: np.ndarray, dummy: np.ndarray) -> dict[int, set[int]]:
    """{row: rows it copies}: pairs of non-dummy unit rows whose cosine is >= COS_EQUAL."""
    if unit.shape[0] < 2 or unit.shape[1] == 0:
        return {}
    return _pairs(unit @ _directions(unit.shape[1]), lambda idx: np.asarray(unit[idx], np.float64), dummy)


PATH_REL = 1e-4    # per-channel parameters this close (relative) are equal


def _path_params(gv: GraphValues, flow: ch.Flow) -> list[tuple[np.ndarray, bool]] | None:
    """The per-channel parameters between the layer and its readers after its first BatchNorm:
    each depthwise conv's kernel rows [C, k] (multiplicative) and bias (additive), each
    BatchNorm after one as factor (multiplicative) and shift (additive). None: no depthwise conv."""
    dws = [d for w in flow.writers for d in w.depthwise] + flow.stream_depthwise   # a stream: every writer's
    if not dws:
        return None
    out: list[tuple[np.ndarray, bool]] = []
    for dw in dws:
        out.append((gv.value(dw.input[1]).reshape(flow.channels, -1), True))
        if len(dw.input) > 2 and dw.input[2]:
            out.append((gv.value(dw.input[2]).reshape(flow.channels, 1), False))
    for bn in [b for w in flow.writers for b in w.depthwise_batchnorms]:
        eps = float(next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5))
        g, b, m, v = (gv.value(t).reshape(-1) for t in bn.input[1:5])
        f = g / np.sqrt(v + eps)
        out += [(f.reshape(-1, 1), True), ((b - m * f).reshape(-1, 1), False)]
    return out


def _same_path(path: list[tuple[np.ndarray, bool]], i: int, j: int, r: float) -> bool:
    """Channel j's activation is r times channel i's before the depthwise stages; it still is after
    them when every multiplicative parameter is equal and every additive one is r times i's."""
    for arr, mult in path:
        a, b = arr[i], arr[j]
        ref = a if mult else r * a
        tol = PATH_REL * (float(np.abs(ref).max()) + float(np.abs(b).max())) + 1e-6 * PATH_REL * float(
            np.abs(arr).max())
        if float(np.abs(b - ref).max()) > tol:
            return False
    return True


def _flow_key(flow: ch.Flow) -> tuple:
    return (flow.layer.weight, flow.channels, tuple(b.name or b.output[0] for b in flow.batchnorms),
            tuple((c.layer.weight, c.offset, c.spatial) for c in flow.consumers))


def neuron_groups(gv: GraphValues, flow: ch.Flow, cols: np.ndarray | None = None, depth: int = 3) -> Groups:
    """Dummy, clique and split neurons of a layer, from its rows and next-layer columns, the
    columns restricted to the next layers' live outputs `depth` layers on (cached per layer,
    trace, columns and depth: a layer's output side is the next layer's input side).
    `cols`: compare rows on these columns only (see `input_columns`)."""
    cache = gv.__dict__.setdefault("_groups", {})
    key = _flow_key(flow) + (None if cols is None else cols.tobytes(), depth)
    if key not in cache:
        cache[key] = _neuron_groups(gv, flow, cols, depth)
    return cache[key]


def input_columns(gv: GraphValues, lay: ch.Layer) -> np.ndarray | None:
    """Mask over the layer's flattened rows: False for the input columns of channels that the
    feeding layer's cleaning drops (dummy, clique, split copies). When both layers were obfuscated,
    the feeding layer's new channels get a column of their own in every row of this layer
    (a clique pair random ones), which makes this layer's copies differ there. None: keep all."""
    pflow = gv.input_flow(lay)
    if pflow is None or pflow.blocked or pflow.layer.node is lay.node:
        return None
    cons = [c for c in pflow.consumers if c.layer.node is lay.node]
    if len(cons) != 1 or cons[0].offset != 0:
        return None
    n_in = int(gv.graph.dims(lay.weight)[lay.in_axis]) if lay.op == "Conv" else None
    if n_in is not None and n_in != pflow.channels:
        return None
    g = neuron_groups(gv, pflow)
    if len(g.keep) == pflow.channels:
        return None
    live = np.zeros(pflow.channels, bool)
    live[g.keep] = True
    dims = gv.graph.dims(lay.weight)
    per_row = int(np.prod(dims)) // int(dims[lay.out_axis])
    if per_row % pflow.channels or (n_in is None and per_row != pflow.channels * cons[0].spatial):
        return None
    return np.repeat(live, per_row // pflow.channels)


def _row_norms(gv: GraphValues, flow: ch.Flow) -> np.ndarray:
    """Norms of the layer's effective rows [W2 * f, shift] (as `_copies` computed them for the
    neuron groups, when it did: one pass over the weight less)."""
    hit = gv.__dict__.get("_copies", {}).get(_flow_key(flow) + (None,))
    if hit is not None:
        return hit[0]
    W2, f, sh = _row_affine(gv, flow)
    return np.sqrt(f * f * np.einsum("ij,ij->i", W2, W2).astype(np.float64) + sh * sh)


def _copies(gv: GraphValues, flow: ch.Flow, W2: np.ndarray, f: np.ndarray, sh: np.ndarray):
    """(row norms, {row: rows it copies}, {(row, copy): factor} where pruning set the factor) of the
    effective rows [W2 * f, sh], every channel taken as live (the caller drops the dummies)."""
    C = flow.channels
    cos_equal = COS_EQUAL_QUANT if _stored_rounded(gv, flow.layer.weight) else COS_EQUAL
    sq = np.einsum("ij,ij->i", W2, W2).astype(np.float64)
    rn = np.sqrt(f * f * sq + sh * sh)
    safe = np.where(rn > 0, rn, 1.0)
    partners: dict[int, set[int]] = {}
    if C > 1:
        dirs = _directions(W2.shape[1] + 1)
        ps = ((W2 @ dirs[:-1].astype(W2.dtype)).astype(np.float64) * f[:, None] + sh[:, None] * dirs[-1]) / safe[:, None]

        def unit_rows(idx: np.ndarray) -> np.ndarray:
            return np.concatenate([np.asarray(W2[idx], np.float64) * f[idx, None], sh[idx, None]], axis=1) / safe[idx, None]

        # attention values: a copy is one only within its head
        heads = flow.heads if flow.heads > 1 and C % flow.heads == 0 else 0
        label = np.arange(C) // (C // heads) if heads else None
        accept = None
        path = _path_params(gv, flow)
        if path is not None:   # copies through a depthwise conv: its per-channel parameters agree too
            def accept(i: int, j: int) -> bool:
                return _same_path(path, i, j, rn[j] / rn[i] if rn[i] > 0 else 1.0)

        # a zero row has no direction and copies nothing (an all-zero layer would otherwise put every
        # pair of rows in one cell)
        partners = _pairs(ps, unit_rows, rn <= 0, cos_equal, label, accept)
    ratios: dict[tuple[int, int], float] = {}
    quant = _stored_rounded(gv, flow.layer.weight) == "quant"
    got: dict[tuple[int, int], float] = {}
    if C > 1 and W2.size and _may_be_pruned(W2):
        # the rows holding any weight (a layer of many zero rows, dummies or pruned filters, is
        # analysed on the others only: the same threshold, the same pairs)
        kept = np.count_nonzero(W2, axis=1)
        rows = np.flatnonzero(kept)
        sub = theta = None
        if np.count_nonzero(kept >= PRUNED_COMMON) > 1:   # else no pair could be verified
            sub = W2 if rows.size == C else W2[rows]
            theta = pruned_threshold(sub, quant)
        if theta is not None:   # magnitude-pruned: scaled copies lost different small entries
            found = pruned_copy_pairs(sub, f[rows], sh[rows], theta, quant, cos_equal,
                                      None if label is None else label[rows])
            got = {(int(rows[i]), int(rows[j])): r for (i, j), r in found.items()}
    for (i, j), r in got.items():
        if j not in partners.get(i, ()) and path is not None and not _same_path(path, i, j, r):
            continue
        # (a pair parallel as it is too: its factor from the entries both keep, not the norms)
        ratios[(i, j)], ratios[(j, i)] = r, 1.0 / r
        partners.setdefault(i, set()).add(j)
        partners.setdefault(j, set()).add(i)
    return rn, partners, ratios


def _row_blocks(C: int, N: int, budget: int = 1 << 22):
    """Slices of rows holding at most `budget` entries each (at least one row): a layer is read in
    blocks, never copied whole."""
    step = max(1, budget // max(N, 1))
    for a in range(0, C, step):
        yield slice(a, min(C, a + step))


PRUNED_SAMPLE = 8192    # entries looked at before the exact count of zeros (see `_may_be_pruned`)


def _may_be_pruned(W2: np.ndarray) -> bool:
    """False when a sample of PRUNED_SAMPLE entries holds fewer than a quarter of PRUNED_SHARE zeros:
    then the layer is not pruned, except with probability below e^-350 (Chernoff: a layer with at
    least PRUNED_SHARE zeros shows under a quarter of that share in a uniform sample of 8192 with
    probability exp(-8192 KL(0.025 || 0.1))). The positions are drawn from a generator seeded with a
    digest of the layer's values, so they are reproducible and no file can place its zeros around
    them without changing them. A dense layer costs this sample instead of a count over the weight."""
    if W2.size < 8 * PRUNED_SAMPLE:
        return True
    C, N = W2.shape
    grid = np.ascontiguousarray(W2[::max(1, C // 64), ::max(1, N // 64)])
    seed = int.from_bytes(hashlib.sha256(grid.tobytes()).digest()[:8], "little")
    flat = np.random.default_rng(seed).integers(0, W2.size, PRUNED_SAMPLE)
    zeros = int(np.count_nonzero(W2[flat // N, flat % N] == 0))
    return zeros >= PRUNED_SHARE / 4 * PRUNED_SAMPLE


def pruned_threshold(W2: np.ndarray, quant: bool = False) -> float | None:
    """An upper bound of the largest |w| magnitude pruning zeroed in this layer, or None when the layer
    does not look pruned: fewer than PRUNED_SHARE of the entries of its non-zero rows and columns are
    exact zeros (a pruned entry stays 0 after quantization; zero rows are dummies or pruned filters,
    zero columns read dummy inputs). Every entry pruning kept was at least the threshold, so each row's
    smallest kept |w| bounds it (after quantization: plus half the row's step, its largest |w| /
    QUANT_LEVELS); the least bound over the rows is returned."""
    C, N = W2.shape
    # a pruned layer holds at least PRUNED_SHARE of C x N zeros (its dead rows and columns are all
    # zeros, the rest has that share): a dense layer is told apart by one count, without the pass below
    if W2.size == 0 or not _may_be_pruned(W2):
        return None
    if W2.size - np.count_nonzero(W2) < PRUNED_SHARE * W2.size:     # (-0 counts as 0)
        return None
    cnt = np.zeros(C, dtype=np.int64)
    cols = np.zeros(N, dtype=bool)
    low = np.full(C, np.inf)
    for sl in _row_blocks(C, N):
        A = np.abs(np.asarray(W2[sl], np.float64))
        nz = A > 0
        cnt[sl] = nz.sum(axis=1)
        cols |= nz.any(axis=0)
        low[sl] = np.where(nz, A, np.inf).min(axis=1) if N else np.inf
        if quant:
            low[sl] += 0.5 * A.max(axis=1, initial=0.0) / QUANT_LEVELS
    live = cnt > 0
    total = int(live.sum()) * int(cols.sum())
    if total == 0 or total - int(cnt.sum()) < PRUNED_SHARE * total:
        return None
    return float(low[live].min())


def pruned_copy_pairs(W2: np.ndarray, f: np.ndarray, sh: np.ndarray, theta: float, quant: bool,
                      cos_equal: float = COS_EQUAL, label: np.ndarray | None = None,
                      candidates: list[tuple[int, int]] | None = None) -> dict[tuple[int, int], float]:
    """Scaled copies among the effective rows [W2 * f, sh] of a magnitude-pruned layer (threshold
    `theta` on |W2|, see `pruned_threshold`): {(i, j): r} with row j = r * row i (r > 0) on the entries
    both keep, i < j.

    Pruning zeroes the entries of each row below theta, so of two copies the smaller (in W2 units)
    loses entries the larger keeps, and they stop being parallel. A pair is a copy when
    * they are proportional on the entries both keep and the shift (cosine >= cos_equal there, over at
      least PRUNED_COMMON kept entries);
    * every entry only one row keeps, scaled to the other row, lies below the other row's threshold
      (theta * |f| in effective units; plus one quantization step of that row when `quant`, a step being
      its largest |entry| / QUANT_LEVELS): the other row would have pruned it.

    Candidates (no pair of rows is compared unless it passes the grid of `_pairs`): each row
    normalised by its largest |entry| (kept by pruning; the same entry of every copy), its own threshold
    t_i there (theta |f_i| / max_i, plus 1/QUANT_LEVELS when quantized). Copies i, j agree on every
    entry above max(t_i, t_j) (the smaller copy keeps them all, equal) and on the shift, so masked
    at any level tau >= both thresholds (entries below tau zeroed) they are parallel (int8 copies hold
    the same integers there, so the same entries are masked; float ones differ by rounding, which
    masks an entry in one copy only if it lies within that rounding of tau). Levels
    tau = t_min * 2^L: at level L the rows with t_i <= tau are masked and searched with `_pairs`,
    the pairs whose larger threshold falls in (tau / 2, tau] kept (each pair at one level). Cost: one
    `_pairs` per level, O(log2(t_max / t_min)) levels; the weight is read in row blocks. `candidates`
    (pairs i < j): verify these instead of searching (every pair: what the search must find)."""
    C, N = W2.shape
    mx = np.zeros(C)
    for sl in _row_blocks(C, N):
        if N:
            mx[sl] = np.abs(np.asarray(W2[sl], np.float64)).max(axis=1) * np.abs(f[sl])
    ok = mx > 0
    scale = np.where(ok, f / np.where(ok, mx, 1.0), 0.0)     # row i normalised: W2[i] * scale[i]
    bias = np.where(ok, sh / np.where(ok, mx, 1.0), 0.0)
    step = 1.0 / QUANT_LEVELS if quant else 0.0
    t = theta * np.abs(f) / np.where(ok, mx, 1.0) + step
    for sl in _row_blocks(C, N):   # rows keeping too few entries above their own threshold cannot be verified
        V = np.abs(np.asarray(W2[sl], np.float64) * scale[sl, None])
        ok[sl] &= (V >= t[sl, None]).sum(axis=1) >= PRUNED_COMMON
    out: dict[tuple[int, int], float] = {}
    if candidates is not None:
        cand = set(candidates)
    elif ok.sum() < 2:
        return out
    else:
        cand = _pruned_candidates(W2, scale, bias, t, ok, cos_equal, label)
    if not cand:
        return out
    I, J = (np.array(x, dtype=np.int64) for x in zip(*sorted(cand)))
    th = theta * np.abs(f)                       # each row's threshold and quantization step, effective units
    qs = mx / QUANT_LEVELS if quant else np.zeros(C)
    good = np.zeros(I.size, dtype=bool)
    r = np.ones(I.size)
    for sl in _row_blocks(I.size, 2 * N):
        i, j = I[sl], J[sl]
        A = np.asarray(W2[i], np.float64) * f[i, None]
        B = np.asarray(W2[j], np.float64) * f[j, None]
        nzA, nzB = A != 0, B != 0
        S = nzA & nzB
        dot = (A * B * S).sum(axis=1) + sh[i] * sh[j]
        na = (A * A * S).sum(axis=1) + sh[i] ** 2
        nb = (B * B * S).sum(axis=1) + sh[j] ** 2
        g = (S.sum(axis=1) >= PRUNED_COMMON) & (na > 0) & (nb > 0)
        cos = np.where(g, dot / np.sqrt(np.where(g, na * nb, 1.0)), -1.0)
        g &= cos >= cos_equal
        rr = np.sqrt(np.where(g, nb, 1.0) / np.where(g, na, 1.0))
        # kept by i only: scaled to j, below j's threshold; and the other way round
        over_a = (np.abs(A) * rr[:, None] > (th[j] + qs[j])[:, None]) & nzA & ~nzB
        over_b = (np.abs(B) / rr[:, None] > (th[i] + qs[i])[:, None]) & nzB & ~nzA
        good[sl] = g & ~over_a.any(axis=1) & ~over_b.any(axis=1)
        r[sl] = rr
    return {(int(I[k]), int(J[k])): float(r[k]) for k in np.flatnonzero(good).tolist()}


def _pruned_candidates(W2: np.ndarray, scale: np.ndarray, bias: np.ndarray, t: np.ndarray, ok: np.ndarray,
                       cos_equal: float, label: np.ndarray | None) -> set[tuple[int, int]]:
    """Pairs (i < j) of rows `ok` parallel at the mask level of the larger of their thresholds `t`
    (rows W2 * scale, normalised by their largest |entry|, shifts `bias` likewise; see
    `pruned_copy_pairs`)."""
    C, N = W2.shape
    t_lo = max(float(t[ok].min()), 2.0 ** -PRUNED_LEVELS)
    lev = np.zeros(C, dtype=np.int64)
    lev[ok] = np.maximum(0, np.ceil(np.log2(np.maximum(t[ok], t_lo) / t_lo) - 1e-12)).astype(np.int64)
    lev = np.minimum(lev, PRUNED_LEVELS)
    dirs = _directions(N + 1)
    cand: set[tuple[int, int]] = set()
    for L in np.unique(lev[ok]).tolist():
        tau = t_lo * 2.0 ** L if L < PRUNED_LEVELS else float(t[ok].max())
        rows = np.flatnonzero(ok & (lev <= L))
        if rows.size < 2:
            continue

        def masked(idx: np.ndarray, tau=tau, rows=rows) -> np.ndarray:
            """The rows rows[idx] masked at tau, with their shift, as unit vectors (zero rows stay 0)."""
            g = rows[idx]
            V = np.asarray(W2[g], np.float64) * scale[g, None]
            U = np.concatenate([np.where(np.abs(V) >= tau, V, 0.0), bias[g, None]], axis=1)
            n = np.linalg.norm(U, axis=1)
            return U / np.where(n > 0, n, 1.0)[:, None]

        ps = np.empty((rows.size, dirs.shape[1]))
        zero = np.zeros(rows.size, dtype=bool)
        for sl in _row_blocks(rows.size, N + 1):
            U = masked(np.arange(rows.size)[sl])
            ps[sl] = U @ dirs
            zero[sl] = ~U.any(axis=1)
        got = _pairs(ps, masked, zero, cos_equal, None if label is None else label[rows])
        for a, bs in got.items():
            for b in bs:
                i, j = int(rows[a]), int(rows[b])
                if i < j and max(lev[i], lev[j]) == L:
                    cand.add((i, j))
    return cand


CANCEL_REL = 1e-4          # copies whose merged outgoing columns are this small (relative) cancel: a clique
CANCEL_REL_FP16 = 1e-3     # ... when a next layer's weight is stored as float16
CANCEL_REL_INT = 0.2       # ... when it is stored quantized: each entry off by up to half a step of its output
                           # channel's scale, which the channel's largest entries set (measured on int8 static
                           # QDQ per channel, tests/test_forensics_blocks.py: cliques 0-0.026 after convs, up to
                           # 0.135 before an attention output projection; split copies 0.32-0.6)


def _stored_rounded(gv: GraphValues, weight: str) -> str | None:
    """'quant' or 'fp16' when the layer weight `weight` is stored quantized or as float16, else None."""
    try:
        w = gv.store.get(gv.weight_name(weight) or weight)
    except AuditError:  # a weight the store does not list: float
        return None
    if w.quant is not None:
        return "quant"
    return "fp16" if str(w.stored_dtype) in ("float16", "bfloat16") else None


def _cancel_tolerance(gv: GraphValues, flow: ch.Flow) -> float:
    """How small the merged outgoing columns of a group of copies must be, relative to the sum of
    their norms, to call the group a clique: rounding of the stored next-layer weights (a clique's
    columns cancel exactly in float, up to a quantization step once quantized)."""
    tol = CANCEL_REL
    for c in flow.consumers:
        r = _stored_rounded(gv, c.layer.weight)
        tol = max(tol, CANCEL_REL_INT if r == "quant" else CANCEL_REL_FP16 if r == "fp16" else CANCEL_REL)
    return tol


def _neuron_groups(gv: GraphValues, flow: ch.Flow, cols: np.ndarray | None = None, depth: int = 3) -> Groups:
    C = flow.channels
    # the rows' copies do not depend on `depth` (only which channels are dummies does): found once
    # per layer and columns, then restricted to the non-dummy channels. Found first, before the next
    # layers are looked at: a scan walking the file works on this layer while they are read
    ckey = _flow_key(flow) + (None if cols is None else cols.tobytes(),)
    cache = gv.__dict__.setdefault("_copies", {})
    if ckey not in cache:     # the layer's weight is read only here (a scan walking the file drops it after)
        W2, f, sh = _row_affine(gv, flow)
        if cols is not None and cols.size == W2.shape[1]:
            W2 = W2[:, cols]
        cache[ckey] = _copies(gv, flow, W2, f, sh)
    rn, all_partners, ratios = cache[ckey]
    cn = outgoing_norms(gv, flow, depth)
    scale = float(cn.max()) if cn.size else 0.0
    dummy = cn <= ZERO_REL * max(scale, 1e-30)
    partners = {i: {j for j in js if not dummy[j]} for i, js in all_partners.items() if not dummy[i]}
    partners = {i: js for i, js in partners.items() if js}
    # a channel with no copy is a neuron of its own (factor 1); only channels with copies are grouped
    # one by one: each takes the copies after it not taken yet (in channel order)
    assigned = np.full(C, -1)
    special: dict[int, list[tuple[int, float]]] = {}
    for i in sorted(partners):
        if assigned[i] >= 0:
            continue
        same = sorted({i} | {j for j in partners[i] if assigned[j] < 0 and j > i})
        assigned[same] = i
        # the factor of a pruned copy is its ratio on the entries both keep (norms count the lost ones)
        special[i] = [(j, ratios[(i, j)] if (i, j) in ratios else float(rn[j] / rn[i]) if rn[i] > 0 else 1.0)
                      for j in same]
    solo = np.flatnonzero(~dummy & (assigned < 0))
    reps = np.union1d(solo, np.fromiter(special, dtype=int, count=len(special))) if special else solo
    out = Groups([], [], dummies=int(dummy.sum()), channels=C)
    if not special:
        out.keep = reps.tolist()
        out.members = _Solo(out.keep)
        return out
    multi = sorted({j for g in special.values() if len(g) > 1 for j, _ in g})
    cols = dict(zip(multi, outgoing(gv, flow, depth, rows=multi))) if multi else {}
    for r in reps.tolist():
        g = special.get(r)
        if g is None:
            out.keep.append(r)
            out.members.append([(r, 1.0)])
            continue
        if len(g) > 1:
            merged = sum(fj * cols[j] for j, fj in g)
            total = sum(abs(fj) * cn[j] for j, fj in g)
            if np.linalg.norm(merged) <= _cancel_tolerance(gv, flow) * max(total, 1e-30):
                out.cliques += len(g)
                continue
        out.splits += len(g) - 1
        out.keep.append(g[0][0])
        out.members.append(g)
    return out


@dataclass
class Cleaned:
    """A layer's weight (torch layout) with dummy / clique / split neurons undone on both sides."""

    weight: np.ndarray
    layer: ch.Layer | None
    undone: list[str] = field(default_factory=list)
    out_groups: Groups | None = None
    in_groups: Groups | None = None
    flow: ch.Flow | None = None
    in_spatial: int = 1
    in_gamma: np.ndarray | None = None   # |gamma| of the BatchNorm after the feeding layer, per input
    in_rownorm: np.ndarray | None = None  # norm of the feeding layer's effective row, per input (BN folded)
    blocked: list[str] = field(default_factory=list)


def clean(gv: GraphValues, lay: ch.Layer) -> Cleaned:
    """Remove dummy / clique neurons and merge split neurons of `lay` (outputs) and of the
    layer feeding it (this layer's inputs)."""
    w = gv.raw(lay.weight)
    W = np.moveaxis(w, lay.out_axis, 0) if lay.out_axis else w   # a view: copied only when changed
    res = Cleaned(W, lay)
    flow = gv.flow(lay)
    res.flow = flow
    if flow.blocked:
        res.blocked.append(f"output side: {flow.blocked}")
    else:
        g = neuron_groups(gv, flow, input_columns(gv, lay))
        res.out_groups = g
        if g.dummies or g.cliques or g.splits:
            W = W[g.keep]
            res.undone.append(f"output neurons: {g.dummies} dummy and {g.cliques} clique removed, "
                              f"{g.splits} split copies merged ({g.channels} -> {len(g.keep)})")
    pflow = gv.input_flow(lay)
    prev = pflow.layer if pflow is not None else None
    if prev is None:
        res.blocked.append("input side: no layer feeds this layer's input channels")
    else:
        cons = [c for c in pflow.consumers if c.layer.node is lay.node]
        sp = cons[0].spatial if len(cons) == 1 else 0
        if pflow.blocked or len(cons) != 1 or cons[0].offset != 0 or W.shape[1] != pflow.channels * (
                sp if W.ndim == 2 else 1):
            res.blocked.append(f"input side: channels of {prev.name} do not map one-to-one onto this layer's inputs")
        else:
            g = neuron_groups(gv, pflow)
            res.in_groups = g
            res.in_spatial = sp
            if pflow.batchnorms and sp == 1 and not pflow.residual:  # a stream sums several writers
                last = (pflow.depthwise_batchnorms or pflow.batchnorms)[-1 if pflow.depthwise_batchnorms else 0]
                res.in_gamma = np.abs(gv.value(last.input[1]))[g.keep]
            elif sp == 1 and not pflow.residual and not pflow.batchnorms and _path_params(gv, pflow) is None:
                # BatchNorm folded (or none): a positive scale of input channel c multiplies the feeding
                # layer's effective row c (weights and bias) and divides this layer's column c, so
                # their product is unchanged; it equals the original column times the original row norm
                rn = _row_norms(gv, pflow)
                if np.all(rn[g.keep] > 0):
                    res.in_rownorm = rn[g.keep]
            if g.dummies or g.cliques or g.splits:
                Wv = W.reshape(W.shape[0], pflow.channels, -1) if W.ndim == 2 else W
                cols = [sum(f * Wv[:, j] for j, f in mem) for mem in g.members]
                W = np.stack(cols, axis=1)
                if Wv is not W and W.ndim == 3 and len(res.weight.shape) == 2:
                    W = W.reshape(W.shape[0], -1)
                res.undone.append(f"input neurons (via {prev.name}): {g.dummies} dummy and {g.cliques} clique "
                                  f"removed, {g.splits} split copies merged ({g.channels} -> {len(g.keep)})")
    res.weight = W
    return res


def stored_column_sq(gv: GraphValues, cleaned: Cleaned) -> np.ndarray | None:
    """Per input channel of the layer's stored weight, the sum of squares over every output and tap,
    when the input side's analysis already computed it (the layer as its feeding layer's consumer,
    every output live); None otherwise."""
    lay, g = cleaned.layer, cleaned.in_groups
    if lay is None or g is None or cleaned.in_spatial != 1:
        return None
    # (the input side is cleaned only when the feeding layer's channels map one-to-one, offset 0)
    return gv.__dict__.get("_rowsq", {}).get((lay.weight, 0, 1, g.channels))


def anchor_unfold(gv: GraphValues, cleaned: Cleaned, anchors: dict) -> tuple[np.ndarray, str] | None:
    """Undo positive per-channel scales (and BN folding) of the output channels with the key's
    BatchNorm anchors, matching channels by what scaling leaves invariant: (gamma, beta) of a
    kept BatchNorm, or the folded shift beta - mean * gamma / sqrt(var + eps) when folded.
    Returns (weight, how) or None when the anchors do not fit."""
    from scipy.optimize import linear_sum_assignment

    g0 = np.asarray(anchors["gamma"], float)
    b0 = np.asarray(anchors["beta"], float)
    f0 = g0 / np.sqrt(np.asarray(anchors["running_var"], float) + float(anchors["eps"]))
    sh0 = b0 - np.asarray(anchors["running_mean"], float) * f0
    W = cleaned.weight
    flow = cleaned.flow
    if flow is None or flow.blocked or W.shape[0] != g0.size:
        return None
    keep = cleaned.out_groups.keep if cleaned.out_groups else list(range(flow.channels))
    _, f_all, sh_all = _row_affine(gv, flow)
    # the cleaned weight (its input side merged through the producer too) times the per-row factor
    # the next layers see it through: effective rows with the input-side cleaning kept
    eff = np.asarray(W, np.float64) * f_all[keep].reshape((-1,) + (1,) * (W.ndim - 1))
    rows_eff = sh_all[keep]
    if flow.batchnorms:
        bn = flow.batchnorms[0]
        g1 = gv.value(bn.input[1])[keep]
        b1 = gv.value(bn.input[2])[keep]
        cost = np.abs(g1[:, None] - g0[None, :]) + np.abs(b1[:, None] - b0[None, :])
        how = "BatchNorm kept: channels matched to the key's anchors by (gamma, beta)"
    else:
        sh1 = rows_eff
        cost = np.abs(sh1[:, None] - sh0[None, :])
        how = "BatchNorm folded: channels matched to the key's anchors by the folded shift"
    r, c = linear_sum_assignment(cost)
    if float(cost[r, c].max()) > 1e-3 * (1.0 + float(np.abs(cost).max())):
        return None  # the anchors do not describe this layer
    out = np.empty_like(W)
    out[c] = eff[r] / f0[c].reshape((-1,) + (1,) * (W.ndim - 1))
    return out, how + "; per-channel scale undone with the anchors"

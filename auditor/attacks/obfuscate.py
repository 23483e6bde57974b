"""Function-preserving obfuscation: the transformations known to defeat white-box marks
(Yan et al., USENIX Security 2023; Li et al., IEEE TIFS 2023), on the ONNX graph.

Steps (applied in the order given, to one layer or, without a layer, to every
layer whose channels can be traced to their consumers; see auditor.read.channels):

* ``perm-out``: permute the layer's output channels (rows, bias, the BatchNorm
  after it, the input columns of the next layers, through pooling, Flatten/Reshape
  and Concat; through a residual Add, the rows of every layer writing into the
  stream and the columns of every layer reading it; a bias Add's constant with the
  rows; through a squeeze-excitation Mul, the gate layer's rows and bias too).
* ``perm-in``: permute the output channels of the layer feeding it (or of the residual
  stream it reads), which permutes this layer's input channels.
* ``scale``: multiply each output channel of the layer by a positive factor in
  [1/4, 4] (log-uniform), absorbed by a following BatchNorm (running mean * s, running
  var -> s^2 (var + eps) - eps) or divided out of the next layers' columns; and scale
  the output of the layer feeding it *after* its BatchNorm (gamma, beta * s), divided
  out of this layer's input columns (only through positively homogeneous ops).
* ``split:K``: K output neurons are duplicated; the next layers' columns of a neuron
  are shared as alpha and 1 - alpha (alpha uniform in [0.2, 0.8]); the copies go last.
* ``dummy:K``: K new neurons with random incoming rows and zero outgoing columns.
* ``clique:K``: K/2 pairs of new neurons with identical random incoming rows and
  outgoing columns v and -v (NeuronClique), which cancel.

Through a depthwise conv (a per-channel op, see auditor.read.channels) its kernel rows,
bias, ``group`` and the BatchNorm after it are rewritten with the channel map; a scale passes
it (bias times the scale), not a ReLU6 (``Clip``) after it.

The result is checked function-preserving before it is returned: the original and
the obfuscated model run in onnxruntime on seeded standard-normal inputs of the
model's input shape (dynamic axes = 2); max |difference| must be <= 1e-4 + 1e-4 max |y|.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from auditor.attacks import AttackResult, cap_ir_version, copy_model
from auditor.errors import AuditError
from auditor.read import channels as ch

STEPS = ("perm-in", "perm-out", "scale", "split", "dummy", "clique")
SCALE_RANGE = 4.0
ATOL, RTOL = 1e-4, 1e-4


@dataclass(frozen=True)
class ObStep:
    kind: str
    count: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.count}" if self.kind in ("split", "dummy", "clique") else self.kind


def _rewritable(f) -> bool:
    """A traced layer obfuscate rewrites by default (not the values of multi-head attention)."""
    return not f.blocked and not f.heads

def parse(spec: str) -> list[ObStep]:
    """``perm-in,perm-out,scale,split:4,dummy:4`` (``+`` also separates steps)."""
    out = []
    for part in [p.strip() for p in str(spec).replace("+", ",").split(",") if p.strip()]:
        kind, _, arg = part.partition(":")
        if kind not in STEPS:
            raise AuditError(f"unknown obfuscation step {part!r} (one of {', '.join(STEPS)})")
        if kind in ("split", "dummy", "clique"):
            try:
                k = int(arg)
            except ValueError:
                raise AuditError(f"step {part!r}: expected {kind}:K with K a positive integer") from None
            if k < 1 or (kind == "clique" and k % 2):
                raise AuditError(f"step {part!r}: K must be >= 1" + (" and even" if kind == "clique" else ""))
            out.append(ObStep(kind, k))
        else:
            if arg:
                raise AuditError(f"step {part!r}: {kind} takes no argument")
            out.append(ObStep(kind))
    if not out:
        raise AuditError("no obfuscation steps given")
    return out


def _set(consts, name: str, arr: np.ndarray) -> None:
    t = consts[name]
    dtype = numpy_helper.to_array(t).dtype
    t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr.astype(dtype)), t.name))


def _unshare(model: onnx.ModelProto, flow: ch.Flow) -> None:
    """Give every constant that a node of `flow` reads, and that another node input also reads
    (an exporter may share identical BatchNorm biases), its own copy, so each is rewritten once."""
    nodes = {id(w.layer.node) for w in flow.writers} | {id(c.layer.node) for c in flow.consumers}
    nodes |= {id(b) for w in flow.writers for b in w.batchnorms} | {id(b) for b in flow.stream_batchnorms}
    nodes |= {id(d) for w in flow.writers for d in w.depthwise + w.depthwise_batchnorms}
    nodes |= {id(d) for d in flow.stream_depthwise}
    nodes |= {id(gt.layer.node) for gt in flow.gates}
    biases = [b for w in flow.writers for b in w.biases] + [b for gt in flow.gates for b in gt.biases]
    nodes |= {id(b.node) for b in biases} | {id(b.reshape) for b in biases if b.reshape is not None}
    inits = {t.name: t for t in model.graph.initializer}
    # a bias Add's constant (and the shape of a Reshape of it) may be a Constant node's output:
    # copied as an initializer when shared
    consts = ch.constant_tensors(model)
    for x in [b.const for b in biases] + [b.reshape.input[1] for b in biases
                                          if b.reshape is not None and len(b.reshape.input) > 1]:
        if x in consts and x not in inits:
            inits[x] = consts[x]
    uses: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ("Shape", "Size"):
            continue  # reads only the shape
        for x in n.input:
            if x in inits:
                uses[x] = uses.get(x, 0) + 1
    weights = ({w.layer.weight for w in flow.writers} | {c.layer.weight for c in flow.consumers}
               | {gt.layer.weight for gt in flow.gates})
    weights |= {d.input[1] for w in flow.writers for d in w.depthwise} | {d.input[1] for d in flow.stream_depthwise}
    for w in weights:
        if uses.get(w, 0) > 1:
            raise AuditError(f"weight {w} is shared by several nodes; rewriting it for one would change the others")
    taken = set(inits)
    for n in model.graph.node:
        if id(n) not in nodes:
            continue
        for k, x in enumerate(n.input):
            if x in inits and x not in weights and uses.get(x, 0) > 1:
                name, j = f"{x}.{n.name or k}", 0
                while name in taken:
                    j += 1
                    name = f"{x}.{n.name or k}.{j}"
                t = onnx.TensorProto()
                t.CopyFrom(inits[x])
                t.name = name
                model.graph.initializer.append(t)
                taken.add(name)
                uses[x] -= 1
                n.input[k] = name


def _edit(model: onnx.ModelProto, flow: ch.Flow, src: list[int], a: np.ndarray, c: np.ndarray,
          rng: np.random.Generator, clique: list[int] | None = None, post: bool = False) -> None:
    """Rewrite `flow.layer`'s output channels: new channel j is old channel src[j] (-1 = a new
    neuron) with incoming scale a[j] and outgoing coefficient c[j]; `clique` gives, for new
    neurons, the pair id (-1 = dummy with zero outgoing columns). The scale is applied to the
    rows and absorbed by a following BatchNorm, or, with `post`, applied after the BatchNorm
    (gamma and beta times a) and divided out of the next layers' columns.

    Through a residual Add every layer writing into the stream (`flow.writers`) is rewritten
    the same way: permuted, duplicated, given new rows; a scale is absorbed by each writer's
    BatchNorm when every writer has one, otherwise applied to every writer's output (rows and
    bias, or gamma and beta) and divided out of the readers' columns (the stream must then be
    positively homogeneous, with no BatchNorm after the Add)."""
    consts = ch.constant_tensors(model)
    for b in [b for w in flow.writers for b in w.biases] + [b for gt in flow.gates for b in gt.biases]:
        if b.const not in consts:   # checked before anything is rewritten
            raise AuditError(f"the bias constant of {b.name} is not a plain constant (quantized?); "
                             f"it cannot be rewritten")
    _unshare(model, flow)
    consts = ch.constant_tensors(model)
    src = np.asarray(src)
    new = src < 0
    ones = np.ones(len(src))
    absorbed = all(w.batchnorms for w in flow.writers) and not post
    out_scale = ones if absorbed else a     # the readers see the stream times out_scale
    if not np.allclose(out_scale, 1.0):
        if not flow.homogeneous:
            act = next((o for o in flow.ops if o in ch.ELEMENTWISE or o == "PRelu"), None)
            raise AuditError(f"cannot scale {flow.layer.name}: its channels pass a non-homogeneous activation"
                             + (f" ({act}: a positive scale does not pass it)" if act else ""))
        if flow.stream_batchnorms:
            raise AuditError(f"cannot scale {flow.layer.name}: a BatchNorm sits on the residual stream after "
                             f"{flow.residual[0]} (its shift does not scale)")
    for w in flow.writers:
        row_a = ones if (post and w.batchnorms) else a
        _edit_rows(consts, w.layer, w.biases, src, row_a, flow.channels, rng, clique)
        bn_out = ones if absorbed else a
        for bn in w.batchnorms:
            _edit_bn(consts, bn, src, row_a, bn_out)
        for dw in w.depthwise:      # sees the writer's output times out_scale
            _edit_depthwise(consts, dw, src, out_scale, rng, clique)
        for bn in w.depthwise_batchnorms:
            _edit_bn(consts, bn, src, out_scale, out_scale)
    for gt in flow.gates:
        # the gate's channels follow x's (a split copy's gate equals the original's, a clique
        # pair's are equal); x's scale passes the product, so the gate is not scaled
        _edit_rows(consts, gt.layer, gt.biases, src, ones, flow.channels, rng, clique)
    for bn in flow.stream_batchnorms:
        _edit_bn(consts, bn, src, ones, ones)
    for dw in flow.stream_depthwise:    # sees the stream times out_scale
        _edit_depthwise(consts, dw, src, out_scale, rng, clique)
    pair_cols: dict[tuple[int, int], np.ndarray] = {}
    for ci, cons in enumerate(flow.consumers):
        cname = _current(cons.layer, consts)[0]
        V = np.moveaxis(numpy_helper.to_array(consts[cname]).astype(np.float64), cons.layer.in_axis, 0)
        sp, off, C = cons.spatial, cons.offset, flow.channels
        blocks = V[off: off + C * sp].reshape((C, sp) + V.shape[1:])
        vstd = float(blocks.std()) or 1.0
        nblocks = np.zeros((len(src), sp) + V.shape[1:])
        div = out_scale
        nblocks[~new] = blocks[src[~new]] * (c[~new] / div[~new]).reshape((-1,) + (1,) * (blocks.ndim - 1))
        for j in np.flatnonzero(new):
            pid = clique[j] if clique is not None else -1
            if pid < 0:
                continue
            if (ci, pid) in pair_cols:
                nblocks[j] = -pair_cols[(ci, pid)]
            else:
                nblocks[j] = rng.standard_normal(blocks.shape[1:]) * vstd
                pair_cols[(ci, pid)] = nblocks[j]
        NV = np.concatenate([V[:off], nblocks.reshape((-1,) + V.shape[1:]), V[off + C * sp:]], axis=0)
        _set(consts, cname, np.moveaxis(NV, 0, cons.layer.in_axis))
    delta = len(src) - flow.channels
    if delta:
        for gt in flow.gates:
            for node in gt.reshapes:   # a target of -1 needs nothing
                _resize_reshape(model, node, flow.channels, len(src))
        for b in [b for w in flow.writers for b in w.biases] + [b for gt in flow.gates for b in gt.biases]:
            if b.reshape is not None and b.reshape.op_type == "Reshape":
                _resize_reshape(model, b.reshape, flow.channels, len(src))
        for node, flat in flow.reshapes:
            sp = next(cc.spatial for cc in flow.consumers)
            if not _resize_reshape(model, node, flat, flat + delta * sp):
                raise AuditError(f"cannot update the target shape of Reshape {node.name} "
                                 f"(no constant holding {flat} on its shape input)")
    del model.graph.value_info[:]  # shapes changed; onnxruntime infers them again


def _edit_depthwise(consts, dw: onnx.NodeProto, src: np.ndarray, s: np.ndarray, rng: np.random.Generator,
                    clique: list[int] | None) -> None:
    """Reindex a depthwise Conv's channels (kernel rows and bias) by src and set its group to the
    new channel count. Its input channel j is scaled by s[j] (positive): conv is linear per channel,
    so the kernel stays and the bias is multiplied by s[j], and its output is scaled by s[j] too.
    A new channel gets a random kernel (a clique pair one kernel) and bias 0; a split copy the
    kernel and bias of the channel it copies."""
    new = src < 0
    if dw.input[1] not in consts:
        raise AuditError(f"depthwise Conv {dw.name}: its weight is not a stored constant")
    K = numpy_helper.to_array(consts[dw.input[1]]).astype(np.float64)
    std = float(K.std()) or 1.0
    rows = np.empty((len(src),) + K.shape[1:])
    rows[~new] = K[src[~new]]
    _fill_new(rows, new, clique, std, rng)
    _set(consts, dw.input[1], rows)
    if len(dw.input) > 2 and dw.input[2] and dw.input[2] in consts:
        b = numpy_helper.to_array(consts[dw.input[2]]).astype(np.float64)
        nb = np.zeros(len(src))
        nb[~new] = b[src[~new]] * s[~new]
        _set(consts, dw.input[2], nb)
    for a in dw.attribute:
        if a.name == "group":
            a.i = len(src)


def _fill_new(rows: np.ndarray, new: np.ndarray, clique: list[int] | None, std: float,
              rng: np.random.Generator) -> None:
    """Rows of new neurons: random (scale std), the two members of a clique pair equal."""
    pair: dict[int, np.ndarray] = {}
    for j in np.flatnonzero(new):
        pid = clique[j] if clique is not None else -1
        if pid >= 0 and pid in pair:
            rows[j] = pair[pid]
        else:
            rows[j] = rng.standard_normal(rows.shape[1:]) * std
            if pid >= 0:
                pair[pid] = rows[j]


def _edit_rows(consts, lay: ch.Layer, biases: list[ch.Bias], src: np.ndarray, row_a: np.ndarray, channels: int,
               rng: np.random.Generator, clique: list[int] | None) -> None:
    """Reindex a layer's output rows, its bias and its bias Adds' constants by src, scaled by row_a;
    new rows random (equal within a clique pair), new biases 0."""
    new = src < 0
    wname, bname = _current(lay, consts)
    W = np.moveaxis(numpy_helper.to_array(consts[wname]).astype(np.float64), lay.out_axis, 0)
    std = float(W.std()) or 1.0
    rows = np.empty((len(src),) + W.shape[1:])
    rows[~new] = W[src[~new]] * row_a[~new].reshape((-1,) + (1,) * (W.ndim - 1))
    _fill_new(rows, new, clique, std, rng)
    _set(consts, wname, np.moveaxis(rows, 0, lay.out_axis))
    if bname and bname in consts:
        b = numpy_helper.to_array(consts[bname]).astype(np.float64)
        nb = np.zeros(len(src))
        nb[~new] = b[src[~new]] * row_a[~new]
        _set(consts, bname, nb)
    for bias in biases:
        arr = numpy_helper.to_array(consts[bias.const]).astype(np.float64)
        v = arr.reshape(-1) if arr.size == channels else np.full(channels, float(arr.reshape(-1)[0]))
        nb = np.zeros(len(src))
        nb[~new] = v[src[~new]] * row_a[~new]
        dims, k = list(arr.shape), arr.ndim
        if bias.reshape is not None:   # a 1-D constant; its Reshape target follows in _edit
            dims = [len(src)]
        elif k > bias.from_end:
            dims[k - 1 - bias.from_end] = len(src)
        else:   # a scalar becomes one value per channel, broadcast along the channel axis
            dims = [len(src)] + [1] * bias.from_end
        _set(consts, bias.const, nb.reshape(dims))


def _current(lay: ch.Layer, consts) -> tuple[str, str | None]:
    """The layer's weight and bias names now (after _unshare may have given them copies)."""
    n = lay.node
    w = n.input[1] if n.input[1] in consts else lay.weight
    b = n.input[2] if len(n.input) > 2 and n.input[2] else None
    return w, b


def _edit_bn(consts, bn: onnx.NodeProto, src: np.ndarray, row_a: np.ndarray, out: np.ndarray) -> None:
    """Reindex a BatchNorm's channels by src (new channels: identity), absorb an input scale
    row_a (running mean * a, running var -> a^2 (var + eps) - eps) and scale its output by out."""
    new = src < 0
    eps = float(next((x.f for x in bn.attribute if x.name == "epsilon"), 1e-5))
    g, be, mu, var = (numpy_helper.to_array(consts[n]).astype(np.float64) for n in bn.input[1:5])
    s = src[~new]
    n = len(src)
    ng, nbe, nmu, nvar = np.ones(n), np.zeros(n), np.zeros(n), np.ones(n)
    ng[~new], nbe[~new] = g[s] * out[~new], be[s] * out[~new]
    nmu[~new] = mu[s] * row_a[~new]
    nvar[~new] = row_a[~new] ** 2 * (var[s] + eps) - eps
    for name, arr in zip(bn.input[1:5], (ng, nbe, nmu, nvar)):
        _set(consts, name, arr)


def _resize_reshape(model: onnx.ModelProto, node: onnx.NodeProto, old: int, new: int) -> bool:
    g = ch._Graph(model)
    frontier, found = [node.input[1]], False
    for _ in range(8):
        nxt = []
        for t in frontier:
            if t in g.consts:
                arr = numpy_helper.to_array(g.consts[t])
                if arr.dtype.kind == "i" and (arr == old).any():
                    _set(g.consts, t, np.where(arr == old, new, arr))
                    found = True
            elif t in g.producer:
                nxt.extend(x for x in g.producer[t][1].input if x)
        frontier = nxt
    return found


def find_layer(model: onnx.ModelProto, name: str) -> ch.Layer:
    cands = ch.layers(model)
    for lay in cands:
        if name in (lay.node.name, lay.weight, lay.node.output[0]) or lay.weight == name + ".weight":
            return lay
    raise AuditError(f"no Conv/Gemm/MatMul with a constant weight named {name!r} "
                     f"(layers: {', '.join(l.weight for l in cands[:12])})")


def _flow(model, lay: ch.Layer) -> ch.Flow:
    f = ch.trace(model, lay)
    if f.blocked:
        raise AuditError(f"cannot obfuscate {lay.weight}: {f.blocked}")
    if f.heads:
        raise AuditError(f"cannot obfuscate {lay.weight}: its channels are the values of {f.heads}-head attention "
                         f"(they move only within a head; not rewritten here)")
    return f


def _refresh(model, lay: ch.Layer) -> ch.Layer:
    return find_layer(model, lay.weight)


def apply_one(model: onnx.ModelProto, lay: ch.Layer, step: ObStep, rng: np.random.Generator) -> dict:
    """One step on `model` (in place) for layer `lay`; returns what was done (counts, no secrets)."""
    if step.kind in ("perm-in", "scale"):
        pf = ch.input_flow(model, lay)     # the producer's channels, or the residual stream read
        prev = pf.layer if pf is not None else None
    if step.kind == "perm-in":
        if prev is None:
            raise AuditError(f"perm-in on {lay.weight}: no layer feeds its input channels")
        f = _flow(model, prev)
        _edit(model, f, list(rng.permutation(f.channels)), np.ones(f.channels), np.ones(f.channels), rng)
        return {"step": str(step), "layer": lay.weight, "via": prev.weight, "channels": f.channels}
    f = _flow(model, lay)
    C = f.channels
    if step.kind == "perm-out":
        _edit(model, f, list(rng.permutation(C)), np.ones(C), np.ones(C), rng)
        return {"step": str(step), "layer": lay.weight, "channels": C}
    if step.kind == "scale":
        s = np.exp(rng.uniform(-np.log(SCALE_RANGE), np.log(SCALE_RANGE), C))
        _edit(model, f, list(range(C)), s, np.ones(C), rng)
        done = {"step": str(step), "layer": lay.weight, "channels": C, "scale_range": [1 / SCALE_RANGE, SCALE_RANGE]}
        if prev is not None:
            fp = _flow(model, find_layer(model, prev.weight))
            sp = np.exp(rng.uniform(-np.log(SCALE_RANGE), np.log(SCALE_RANGE), fp.channels))
            try:
                _edit(model, fp, list(range(fp.channels)), sp, np.ones(fp.channels), rng, post=True)
                done["input_side"] = prev.weight
            except AuditError as e:  # refused before anything was rewritten: the input side stays
                done["input_side"] = f"not scaled: {e}"
        return done
    k = step.count
    if step.kind == "split":
        if k > C:
            raise AuditError(f"split:{k} on {lay.weight}: only {C} output channels")
        chosen = rng.choice(C, size=k, replace=False)
        alpha = rng.uniform(0.2, 0.8, size=k)
        c = np.ones(C + k)
        c[chosen] = alpha
        c[C:] = 1 - alpha
        _edit(model, f, list(range(C)) + [int(x) for x in chosen], np.ones(C + k), c, rng)
        return {"step": str(step), "layer": lay.weight, "channels": C, "after": C + k}
    clique = None
    if step.kind == "clique":
        clique = [-1] * C + [i // 2 for i in range(k)]
    _edit(model, f, list(range(C)) + [-1] * k, np.ones(C + k), np.ones(C + k), rng, clique)
    return {"step": str(step), "layer": lay.weight, "channels": C, "after": C + k}


def _inputs(model: onnx.ModelProto, seed: int, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else batch for d in t.shape.dim]
        if t.elem_type != onnx.TensorProto.FLOAT:
            raise AuditError(f"function check needs float inputs; input {vi.name!r} is not float32")
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run_pair(a: bytes, b: bytes, feeds: dict) -> list:
    """Every output of the original ``a`` and the obfuscated ``b`` on ``feeds`` (an isolated process)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    outs = []
    for m, what in ((a, "original"), (b, "obfuscated")):
        try:
            sess = ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise AuditError(f"onnxruntime cannot load the {what} model: {str(e).splitlines()[0][:200]}") from None
        outs.append(sess.run(None, feeds))
    return outs


def function_diff(a: onnx.ModelProto, b: onnx.ModelProto, seed: int = 0) -> tuple[float, float]:
    """(max |y_a - y_b|, max |y_a|) over every output, onnxruntime CPU in an isolated process
    (auditor.backends.isolate), seeded inputs."""

    from auditor.backends import isolate

    feeds = _inputs(a, seed)
    outs = isolate.call(_run_pair, a.SerializeToString(), b.SerializeToString(), feeds, what="onnxruntime")
    diff = max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(*outs))
    scale = max(float(np.max(np.abs(x))) for x in outs[0])
    return diff, scale


def obfuscate(model: onnx.ModelProto, steps: str | list[ObStep], *, layer: str | None = None,
              seed: int = 0, check: bool = True) -> AttackResult:
    """Apply obfuscation steps to a copy of `model`; refuses (AuditError) unless function-preserving."""
    if isinstance(steps, str):
        steps = parse(steps)
    m = copy_model(model)
    from auditor.attacks.quantize import constants_as_tensors

    constants_as_tensors(m)  # value_ints Constants (Reshape targets) become rewritable tensors
    rng = np.random.default_rng(seed)
    if layer is not None:
        targets = [find_layer(m, layer).weight]
    else:
        targets = [lay.weight for lay in ch.layers(m) if _rewritable(ch.trace(m, lay))]
        if not targets:
            raise AuditError("no layer whose output channels can be traced to the next layer")
    done = []
    for st in steps:
        for w in targets:
            lay = find_layer(m, w)
            if layer is None and st.kind == "perm-in" and ch.input_flow(m, lay) is None:
                continue  # every layer: the first one's inputs are the model's, left alone
            done.append(apply_one(m, lay, st, rng))
    params = {"steps": [str(s) for s in steps], "layers": targets, "seed": int(seed), "done": done}
    notes = [f"{len(done)} obfuscation edits on {len(targets)} layer(s)"]
    if check:
        diff, scale = function_diff(model, m, seed)
        params["max_abs_diff"] = diff
        params["output_max_abs"] = scale
        if not diff <= ATOL + RTOL * scale:
            raise AuditError(f"obfuscation is not function-preserving on this model "
                             f"(max |diff| {diff:.3g} with outputs up to {scale:.3g})")
        notes.append(f"function-preserving: max |diff| {diff:.3g} on seeded inputs (outputs up to {scale:.3g})")
    return AttackResult(cap_ir_version(m), params, notes)


def remove_filters(model: onnx.ModelProto, count: int, *, layer: str | None = None) -> AttackResult:
    """Structured pruning that shrinks the file: the `count` output channels of smallest L1 norm
    are removed from the layer (default every traceable layer), with their BatchNorm entries
    and the next layers' columns. Not function-preserving (a removed channel's constant
    BatchNorm output is lost), so no function check; the layer's shape changes."""
    m = copy_model(model)
    from auditor.attacks.quantize import constants_as_tensors

    constants_as_tensors(m)
    if count < 1:
        raise AuditError("prune-filters: K must be >= 1")
    targets = [find_layer(m, layer).weight] if layer else [l.weight for l in ch.layers(m) if _rewritable(ch.trace(m, l))]
    rng = np.random.default_rng(0)
    done = []
    for w in targets:
        lay = find_layer(m, w)
        f = _flow(m, lay)
        if count >= f.channels:
            raise AuditError(f"prune-filters:{count} on {w}: only {f.channels} output channels")
        W = np.moveaxis(numpy_helper.to_array(ch.constant_tensors(m)[w]).astype(np.float64), lay.out_axis, 0)
        norms = np.abs(W.reshape(W.shape[0], -1)).sum(axis=1)
        keep = sorted(int(i) for i in np.argsort(norms, kind="stable")[count:])
        _edit(m, f, keep, np.ones(len(keep)), np.ones(len(keep)), rng)
        done.append({"layer": w, "channels": f.channels, "after": len(keep)})
    return AttackResult(cap_ir_version(m), {"count": count, "layers": done},
                        [f"removed the {count} filters of smallest L1 norm from {len(done)} layer(s)"])


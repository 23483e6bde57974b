"""Align a suspect model to the owner's reference model, layer by layer.

The chain of layers feeding the marked layer (each layer's producer, back to the
model input) is aligned from the input on, git-re-basin style (weight matching):

1. the suspect layer is cleaned of dummy / clique / split neurons
   (auditor.forensics.canon), on both sides;
2. its input columns are put in the reference's order, and rescaled, with the
   permutation and the per-channel scales found for the layer before;
3. its output rows, as the next layer sees them (times the factor of the BatchNorm
   that follows, if any), are matched to the reference's rows by cosine
   similarity with an assignment solver (scipy.optimize.linear_sum_assignment);
   a reference row with no partner (a filter removed by structured pruning)
   gets zeros;
4. the matched rows are divided by the reference's BatchNorm factor: this undoes
   positive per-channel scales and BatchNorm folding without anchors.

When the weights do not settle the matching (median matched cosine below
ACTIVATION_FALLBACK), the output channels are matched on their activations instead:
both models run in onnxruntime on seeded probe inputs with the layer's output
exposed as a graph output, and channels are matched by correlation.

`align_chain` returns, per layer, the aligned suspect rows and the reference rows;
`provenance` uses it with the matching fitted on half of the coefficients only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from auditor.errors import AuditError
from auditor.forensics import canon
from auditor.read import channels as ch

ACTIVATION_FALLBACK = 0.2
PROBES = 64


@dataclass
class LayerAlignment:
    ref_layer: ch.Layer
    sus_layer: ch.Layer
    recovered: np.ndarray          # suspect weight in the reference's torch layout and channel order
    ref_weight: np.ndarray         # reference weight (torch layout)
    perm: np.ndarray               # ref channel o <- suspect (cleaned) channel perm[o], -1 = none
    scale: np.ndarray              # suspect / reference activation scale per ref channel
    cosine: np.ndarray             # matched cosine per ref channel
    method: str = "weights"
    undone: list[str] = field(default_factory=list)


def chain(gv: canon.GraphValues, lay: ch.Layer) -> list[ch.Layer]:
    """The layer and its producers back to the input, input first."""
    out = [lay]
    for _ in range(256):
        p = ch.producer(gv.model, out[-1], gv.graph)
        if p is None:
            break
        out.append(p)
    return out[::-1]


def _bn_factor(gv, flow: ch.Flow | None, n: int, keep=None) -> np.ndarray:
    if flow is None or flow.blocked:
        return np.ones(n)
    aff = canon.bn_affine(gv, flow)
    if aff is None:
        return np.ones(n)
    f = aff[0]
    return f[keep] if keep is not None else f


def _apply_inputs(W: np.ndarray, pin: np.ndarray | None, sin: np.ndarray | None, n_in: int) -> np.ndarray:
    """Reorder and rescale W's input channels (axis 1, in blocks when W is 2-D over flattened maps)."""
    if pin is None:
        return W
    O = W.shape[0]
    Wv = W.reshape(O, -1, *W.shape[2:]) if W.ndim > 2 else W.reshape(O, n_in, -1)
    C = Wv.shape[1]
    out = np.zeros((O, len(pin)) + Wv.shape[2:])
    ok = (pin >= 0) & (pin < C)
    out[:, ok] = Wv[:, pin[ok]] * sin[ok].reshape((1, -1) + (1,) * (Wv.ndim - 2))
    return out.reshape(O, -1) if W.ndim == 2 else out


def _match(eff_s: np.ndarray, eff_r: np.ndarray, fit: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    a = eff_s if fit is None else eff_s[:, fit]
    b = eff_r if fit is None else eff_r[:, fit]
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
    cos = bn @ an.T                      # ref x suspect
    r, c = linear_sum_assignment(-cos)
    perm = np.full(eff_r.shape[0], -1)
    perm[r] = c
    mc = np.zeros(eff_r.shape[0])
    mc[r] = cos[r, c]
    return perm, mc


STREAM_DEPTH = 8   # residual streams followed back before the chain's first layer


def _stream_order(sus, s_first: ch.Layer, ref, r_first: ch.Layer, fit_half: bool, probe_models,
                  depth: int) -> tuple[np.ndarray, np.ndarray, str, list] | None:
    """When the chain's first layer reads a residual stream: the stream's channel order (and
    scales) in the reference's terms, from aligning the chain of a layer writing into it."""
    if depth >= STREAM_DEPTH:
        return None
    rf = ref.input_flow(r_first)
    sf = sus.input_flow(s_first)
    if rf is None or sf is None or rf.blocked or sf.blocked or not rf.residual:
        return None
    try:
        sub = align_chain(sus, sf.layer, ref, rf.layer, fit_half, probe_models, _depth=depth + 1, streams=True)
    except AuditError:
        return None
    return sub[-1].perm, sub[-1].scale, (f"input stream of {s_first.name} put in the reference's order by "
                                         f"aligning {sf.layer.name}, which writes into it, through {len(sub)} layers"), sub


def align_chain(sus: canon.GraphValues, s_layer: ch.Layer, ref: canon.GraphValues, r_layer: ch.Layer,
                fit_half: bool = False, probe_models=None, _depth: int = 0,
                streams: bool = False) -> list[LayerAlignment]:
    """Align every layer of the chain ending at r_layer (reference) / s_layer (suspect). When the
    chain starts at a layer reading a residual stream, the stream is first aligned through one of
    the layers writing into it (recursively, up to STREAM_DEPTH streams back); with `streams`
    those layers' alignments come first in the result."""
    rch, sch = chain(ref, r_layer), chain(sus, s_layer)
    if len(rch) != len(sch):
        raise AuditError(f"the suspect's chain to {s_layer.name} has {len(sch)} layers, the reference's {len(rch)}")
    out: list[LayerAlignment] = []
    pin = sin = None
    stream = _stream_order(sus, sch[0], ref, rch[0], fit_half, probe_models, _depth)
    stream_note = None
    if stream is not None:
        pin, sin, stream_note, sub = stream
        if streams:
            out.extend(sub)
    for rl, sl in zip(rch, sch):
        Wr = canon.torch_rows(ref, rl)
        rflow = ref.flow(rl)
        cl = canon.clean(sus, sl)
        Ws = cl.weight
        keep = cl.out_groups.keep if cl.out_groups else None
        if pin is not None:
            n_src = len(cl.in_groups.keep) if cl.in_groups else (Ws.shape[1] if Ws.ndim > 2 else
                                                                   _n_channels_prev(sus, sl, Ws))
            Ws = _apply_inputs(Ws, pin, sin, n_src)
        if Ws.shape[1:] != Wr.shape[1:]:
            raise AuditError(f"layer {sl.name}: suspect {list(Ws.shape)} and reference {list(Wr.shape)} "
                             f"do not align on their inputs")
        fs = _bn_factor(sus, cl.flow, Ws.shape[0], keep)
        fr = _bn_factor(ref, rflow, Wr.shape[0])
        eff_s = Ws.reshape(Ws.shape[0], -1) * fs[:, None]
        eff_r = Wr.reshape(Wr.shape[0], -1) * fr[:, None]
        last = rflow.blocked is not None and "graph output" in (rflow.blocked or "")
        fit = None
        if fit_half:
            fit = np.arange(eff_r.shape[1]) % 2 == 0
        method = "weights"
        if last and Ws.shape[0] == Wr.shape[0]:
            perm = np.arange(Wr.shape[0])   # the model's outputs keep their order
            a, b = eff_s, eff_r
            mc = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
            method = "outputs (order fixed)"
        else:
            perm, mc = _match(eff_s, eff_r, fit)
            if probe_models is not None and np.median(mc) < ACTIVATION_FALLBACK:
                ap = activation_match(probe_models, sl, rl, keep)
                if ap is not None:
                    perm, method = ap, "activations on probe inputs"
        ok = perm >= 0
        rec = np.zeros((Wr.shape[0], eff_s.shape[1]))
        rec[ok] = eff_s[perm[ok]]
        scale = np.ones(Wr.shape[0])
        nr = np.linalg.norm(eff_r, axis=1)
        scale[ok] = np.linalg.norm(eff_s[perm[ok]], axis=1) / np.maximum(nr[ok], 1e-30)
        recovered = (rec / np.where(fr == 0, 1.0, fr)[:, None]).reshape(Wr.shape)
        undone = list(cl.undone)
        if stream_note and sl is sch[0]:
            undone.append(stream_note)
        undone.append(f"{sl.name}: output channels matched to the reference ({method}; median cosine "
                      f"{float(np.median(mc[ok])) if ok.any() else 0.0:.3f}"
                      + (f"; {int((~ok).sum())} reference channels have no partner (pruned filters), zero-filled"
                         if (~ok).any() else "") + ")")
        out.append(LayerAlignment(rl, sl, recovered, Wr, perm, scale, mc, method, undone))
        # next layer: its input column for ref channel o is the suspect's column perm[o] times
        # scale (the suspect's activation is scale times the reference's, its column 1/scale)
        pin, sin = perm, scale.copy()
    return out


def _n_channels_prev(gv, lay, W) -> int:
    f = gv.input_flow(lay)
    return W.shape[1] if f is None else f.channels


def activation_match(probe_models, s_layer: ch.Layer, r_layer: ch.Layer, keep) -> np.ndarray | None:
    """Match output channels by the correlation of their activations on seeded probe inputs."""
    import onnx

    from auditor.attacks.obfuscate import _inputs
    from auditor.backends import isolate
    from auditor.data.accuracy import tensor_values

    s_model, r_model = probe_models
    acts = []
    for m, lay in ((s_model, s_layer), (r_model, r_layer)):
        mm = onnx.ModelProto()
        mm.CopyFrom(m)
        t = lay.node.output[0]
        mm.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        try:
            a = isolate.call(tensor_values, mm.SerializeToString(), t, _inputs(m, 0, PROBES), what="onnxruntime")
        except AuditError:  # onnxruntime cannot run the probe: the weight match stands
            return None
        ax = a.ndim - 1 if lay.op == "MatMul" else 1   # MatMul on [B, T, C]: channels last
        a = np.moveaxis(a, ax, 0).reshape(a.shape[ax], -1)
        acts.append(a)
    a_s, a_r = acts
    if a_s.shape[1] != a_r.shape[1]:
        return None  # layers at different resolutions (another position in the network): no pairing of values
    if keep is not None:
        a_s = a_s[keep]
    zs = (a_s - a_s.mean(1, keepdims=True)) / np.maximum(a_s.std(1, keepdims=True), 1e-12)
    zr = (a_r - a_r.mean(1, keepdims=True)) / np.maximum(a_r.std(1, keepdims=True), 1e-12)
    corr = zr @ zs.T / zs.shape[1]
    r, c = linear_sum_assignment(-corr)
    perm = np.full(a_r.shape[0], -1)
    perm[r] = c
    return perm


def reference_layer(ref_store, ref_gv: canon.GraphValues, mark, alpha: float) -> ch.Layer:
    """The layer of the reference model that carries `mark` (found by extraction)."""
    from auditor.marks.whitebox import extract_mark

    r = extract_mark(ref_store, mark, alpha=alpha)
    if r.location is None:
        raise AuditError(f"the reference has no weight of the mark's shape {list(mark.shape)}")
    lay = ref_gv.layer_of_weight(r.location.weight)
    if lay is None:
        raise AuditError(f"the reference's marked weight {r.location.weight} is not a traceable layer")
    return lay


def depth(gv: canon.GraphValues, lay: ch.Layer, _streams: int = 0) -> int:
    """Layers align_chain(..., streams=True) aligns for `lay`: its chain and, when the chain
    starts at a residual stream, the chain of the layer writing into it, recursively."""
    ch_ = chain(gv, lay)
    if _streams >= STREAM_DEPTH:
        return len(ch_)
    f = gv.input_flow(ch_[0])
    if f is None or f.blocked or not f.residual:
        return len(ch_)
    return len(ch_) + depth(gv, f.layer, _streams + 1)


def _kind(op: str) -> str:
    """Gemm and MatMul are one kind of layer: quantize_dynamic (and some converters) write a Gemm as
    MatMul + bias Add; canon.torch_rows reads both as [out, in] rows."""
    return "linear" if op in ("Gemm", "MatMul") else op


def suspect_layers_like(gv: canon.GraphValues, ref_gv: canon.GraphValues, r_layer: ch.Layer) -> list[ch.Layer]:
    """Suspect layers at the same depth as r_layer, of the same op and kernel."""
    depth = len(chain(ref_gv, r_layer))
    rdims = ref_gv.graph.dims(r_layer.weight)
    out = []
    for lay in ch.layers(gv.model, gv.graph):
        d = gv.graph.dims(lay.weight)
        if _kind(lay.op) != _kind(r_layer.op) or len(d) != len(rdims) or d[2:] != rdims[2:]:
            continue
        if len(chain(gv, lay)) == depth:
            out.append(lay)
    return out


def align_to_reference(gv: canon.GraphValues, cands, ref_path, mark, alpha: float) -> list[dict]:
    """Variants of the suspect's weights aligned to the reference's marked layer (for the scanner)."""
    from auditor.read.weights import WeightStore

    ref_store = WeightStore.open(ref_path)
    ref_gv = canon.GraphValues(ref_store)
    r_layer = reference_layer(ref_store, ref_gv, mark, alpha)
    out = []
    probe = (gv.model, ref_gv.model) if _inline(gv.model) and _inline(ref_gv.model) else None
    for sl in suspect_layers_like(gv, ref_gv, r_layer):
        try:
            al = align_chain(gv, sl, ref_gv, r_layer, probe_models=probe)
        except AuditError:
            continue
        last = al[-1]
        idx = next((i for i, c in enumerate(cands) if c.view.weight.name == gv.weight_name(sl.weight)), 0)
        undone = [u for a in al[:-1] for u in a.undone
                  if "dummy" in u or "split" in u or u.startswith("input stream")] + last.undone
        undone.append(f"aligned to the reference {Path(ref_path).name} through {len(al)} layers; "
                      f"per-channel scales and BatchNorm folding undone with the reference's BatchNorm")
        out.append({"weight": last.recovered, "candidate": idx, "undone": undone})
    return out


def _inline(model) -> bool:
    """True when every initializer's data is in the ModelProto (probe runs need it)."""
    return all(t.data_location != 1 for t in model.graph.initializer)

"""White-box (Uchida) extraction: find the marked parameter in an ONNX file,
project it with the key, and judge the result with exact statistics.

Locating the parameter (the key names a torch parameter and its torch shape):
  1. the exporter's manifest, when given (ONNX tensor + layout transform);
  2. a name match: the ONNX tensor's name equals the torch name after
     normalisation (separators, exporter/quantizer prefixes and suffixes);
  3. the dynamo exporter's node metadata: a renamed weight (``val_143``, a
     transposed Linear weight read by MatMul) is found through the node that
     reads it, whose ``pkg.torch.onnx.name_scopes`` names the torch module
     owning the parameter (``located_by: name-scope``);
  3b. with ``--reference`` (the owner's file), the tensor name the marked weight has there, when
     it is found there by name or name scope (``located_by: reference-name``): onnxruntime's
     optimizer keeps tensor names but drops the exporter's node metadata;
  4. otherwise every torch-layout view of every weight with the key's shape
     is tried, the best is reported, and its p-value is Bonferroni-corrected
     for the number of distinct candidates tried (a forensic search must pay
     for looking in many places).

BatchNorm folding: if the key says a BatchNormalization followed the marked
conv at embedding time (anchors stored in the key, or a reference model),
and the graph no longer has one after that conv, the weight was folded:
W' = W * gamma / sqrt(var + eps) per output channel. The audit says so and
divides the scale back out before extraction. Where no anchors exist but the
graph shows signs of folding (the exporter's metadata records a BatchNorm
fusion on the conv, the conv's scope names a BatchNorm module, the conv has a
bias although the key names a conv followed by BN), the result says so and
what to give (``--reference`` or a key with anchors).

Key secrecy: the extracted bit string and the per-bit signed margins
together give away the key's bits, so results carry counts, BER, p and
margin statistics (min / median, a histogram of the signed margins with
bins fixed at extraction time) and the per-bit values only when asked
(``to_json(reveal_bits=True)``, ``--reveal-bits`` on the command line).

Margins: ``margin_*`` are |x_i . w| in weight units (they change with BN
folding and with the weight's scale); ``normalized_margin_*`` are
(2 b_i - 1) x_i . w / (||x_i|| ||w||), a cosine in [-1, 1] that one policy
threshold can serve for a BN-folded and a BN-kept export alike.
"""
from __future__ import annotations

import ast
import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from auditor.marks import evidence, stats
from auditor.marks.score import HISTOGRAM_BINS, margin_histogram, score  # noqa: F401 (re-exported)
from auditor.errors import AuditError
from auditor.marks.keys import Key, WhiteboxMark, reduce_weight

# Names exporters and quantizers give to a tensor derived from a parameter.
_SUFFIXES = ("_quantized", "_dequantizelinear_output", "_dequantized", "_dequantizelinear",
             "_fp16", "_float16", "_qdq", "_transposed", "_weight_only", "_q4", "_q8",
             "_prequant", "_fused", "_folded")
_PREFIXES = ("onnx__", "model_", "module_", "_orig_mod_", "p_", "l__self___", "self_")


@dataclass
class Location:
    weight: str               # ONNX tensor (as listed by WeightStore)
    transform: str            # layout transform to torch layout (auditor.read.layout label)
    how: str                  # manifest | reference-name | name | name-scope | shape-search
    candidates: int           # distinct candidates tried (Bonferroni m)
    stored_dtype: str = ""
    location: str = ""        # where the tensor lives (initializer, external:..., ...)
    quant: str | None = None  # quantized form it was dequantized from


@dataclass
class MarkResult:
    id: str
    param: str
    shape: list[int]
    reduce: str
    n_bits: int
    matches: int
    ber: float | None             # None: the mark could not be read (verdict UNREADABLE)
    p_value: float
    log10_p: float
    p_corrected: float
    alpha: float
    verdict: str
    reason: str
    margin_min: float
    margin_median: float
    margin_mean: float
    signed_margin_min: float
    signed_margins: list[float]   # (2b_i - 1) x_i.w per key bit: negative = wrong bit (secret)
    wrong_bits: int
    bits: str                     # the extracted bit string (secret: equals the key where detected)
    location: Location | None
    normalized_margin_min: float = 0.0     # min_i (2b_i - 1) x_i.w / (|x_i| |w|)
    normalized_margin_median: float = 0.0
    margin_histogram: dict[str, Any] = field(default_factory=dict)  # signed margins: edges, counts
    batchnorm: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)  # committed | uncommitted (auditor.marks.evidence)
    null: dict[str, Any] = field(default_factory=dict)      # the null the p-value is computed under

    def to_json(self, reveal_bits: bool = False) -> dict[str, Any]:
        """The result without per-bit values unless ``reveal_bits`` (they give the key away)."""
        d = asdict(self)
        if not reveal_bits:
            del d["bits"], d["signed_margins"]
        return d


@dataclass
class ExtractionResult:
    marks: list[MarkResult]
    verdict: str
    p_value: float            # min over marks, Bonferroni over marks
    alpha: float
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return stats.exit_code(self.verdict)

    def to_json(self, reveal_bits: bool = False) -> dict[str, Any]:
        return {"verdict": self.verdict, "p_value": self.p_value, "alpha": self.alpha,
                "reason": self.reason, "evidence": self.evidence, "bits_revealed": bool(reveal_bits),
                "marks": [m.to_json(reveal_bits) for m in self.marks]}


# ---------------------------------------------------------------- core maths
def project(mark: WhiteboxMark, w_torch: np.ndarray) -> np.ndarray:
    """y = X . reduce(w): the pre-sigmoid values whose signs are the bits."""
    w = reduce_weight(w_torch, mark.reduce)
    if w.size != mark.n_coeffs:
        raise AuditError(f"mark {mark.id!r}: reduced weight has {w.size} values, key expects {mark.n_coeffs}")
    return mark.matrix() @ w


# scoring lives in auditor.marks.score (evidence.py uses it too, and whitebox uses evidence)


# ---------------------------------------------------------------- locating
def normalize_name(name: str) -> str:
    n = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
    changed = True
    while changed:
        changed = False
        for s in _SUFFIXES:
            if n.endswith(s):
                n, changed = n[: -len(s)], True
        for p in _PREFIXES:
            if n.startswith(p) and len(n) > len(p):
                n, changed = n[len(p):], True
    return n


def names_match(param: str, tensor_name: str) -> bool:
    a, b = normalize_name(param), normalize_name(tensor_name)
    if not a or not b:
        return False
    return a == b or b.endswith("_" + a) or a.endswith("_" + b)


# Consumers that read only a tensor's metadata: a weight used only by them is a
# leftover (e.g. the float original kept for a Shape op beside its quantized copy).
_METADATA_OPS = frozenset({"Shape", "Size"})


def _computes(view) -> bool:
    uses = getattr(view.weight, "uses", None) or []
    return not uses or any(u[0] not in _METADATA_OPS for u in uses)


def _rnn_hint(param: str) -> tuple[str | None, int | None]:
    """torch RNN parameter names tell which ONNX input (W/R) and direction."""
    m = re.search(r"weight_(ih|hh)_l\d+(_reverse)?$", param)
    if not m:
        return None, None
    return ("W" if m.group(1) == "ih" else "R"), (1 if m.group(2) else 0)


def _views(store):
    from auditor.read.layout import torch_views

    return torch_views(store)


def candidate_views(store, mark: WhiteboxMark):
    """Torch-layout views whose shape equals the key's, without reading values."""
    shape = tuple(int(s) for s in mark.shape)
    return [v for v in _views(store) if tuple(v.shape) == shape]


def _name_of(view) -> list[str]:
    """Names under which a view's tensor is known (its graph name, stored name, and the names its
    layer gives it where an optimizer renamed it: onnxruntime's NCHWc weights keep their bias's name)."""
    w = view.weight
    return [n for n in (w.name, w.stored_name, *getattr(w, "aliases", ())) if n]


def node_metadata(store, node_name: str) -> dict[str, str]:
    """The exporter's metadata_props of a node (dynamo: name scopes, namespace, rewrite rules)."""
    try:
        node = store.node(node_name)
    except (KeyError, AttributeError):
        return {}
    return {p.key: p.value for p in getattr(node, "metadata_props", [])}


def _name_scopes(meta: dict[str, str]) -> list[str]:
    raw = meta.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return []
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    return [str(x) for x in scopes] if isinstance(scopes, (list, tuple)) else []


def _scope_reads(store, view, module: str) -> bool:
    """Does a node reading this view's weight carry `module` among its torch name scopes?"""
    for _, node_name, _ in getattr(view.weight, "uses", None) or []:
        if module in _name_scopes(node_metadata(store, node_name)):
            return True
    return False


def locate(store, mark: WhiteboxMark, manifest: dict | None = None,
           reference_tensor: tuple[str, str] | None = None) -> tuple[list, str]:
    """Candidate views for a mark and how they were chosen. `reference_tensor`: (stored name, layout
    transform) of the marked weight in the owner's reference file, located there by name (an
    optimizer that keeps tensor names but drops the exporter's node metadata is followed by it)."""
    views = candidate_views(store, mark)
    if not views:
        return [], "none"
    if manifest:
        entry = (manifest.get("params") or {}).get(mark.param)
        if entry:
            hit = [v for v in views if entry.get("onnx") in _name_of(v) and v.transform == entry.get("transform", v.transform)]
            if len(hit) == 1:
                return hit, "manifest"
    live = [v for v in views if _computes(v)]
    views = live or views
    named = [v for v in views if any(names_match(mark.param, n) for n in _name_of(v))]
    gate, direction = _rnn_hint(mark.param)
    if len(named) > 1:
        # prefer the torch-native layout for a named tensor: identity first
        ident = [v for v in named if v.transform == "identity"]
        if len(ident) == 1:
            named = ident
    if len(named) == 1:
        return named, "name"
    if reference_tensor is not None:
        hit = [v for v in views if v.weight.stored_name == reference_tensor[0] and v.transform == reference_tensor[1]]
        if len(hit) == 1:
            return hit, "reference-name"
    if len(named) > 1 and len({v.weight.stored_name for v in named}) == 1 \
            and len({v.transform for v in named}) == 1 and all(v.weight.layout for v in named):
        # one stored tensor read under several runtime layouts the file does not tell apart
        # (NCHWc block 8 or 16): every reading is a candidate, and the p-value pays for them
        return named, "name"
    if not named and gate is None:
        module = mark.param.rpartition(".")[0]
        scoped = [v for v in views if module and v.kind in ("linear", "conv", "tensor") and _scope_reads(store, v, module)]
        if scoped:
            # a layer reads the weight in its torch layout: MatMul / Gemm(transB=0) -> transpose view
            kinds = [v for v in scoped if v.kind != "tensor"] or scoped
            if len(kinds) == 1:
                return kinds, "name-scope"
    pool = named or views
    if gate is not None:
        hinted = [v for v in pool if f":{gate}:dir={direction}" in v.transform
                  or (v.transform == "identity" and any(names_match(mark.param, n) for n in _name_of(v)))]
        if hinted:
            pool = hinted
    return pool, "shape-search"


# ---------------------------------------------------------------- BN folding
def _bn_scale(bn: dict[str, Any]) -> np.ndarray:
    gamma = np.asarray(bn["gamma"], dtype=np.float64)
    var = np.asarray(bn["running_var"], dtype=np.float64)
    return gamma / np.sqrt(var + float(bn["eps"]))


FOLDED_HINT = ("give --reference REF.onnx (the owner's model with BatchNorm kept) or a key with anchors "
               "(wmaudit key import --anchors-from REF.onnx)")


def folding_evidence(store, view, mark: WhiteboxMark) -> list[str]:
    """What the graph shows of a BatchNorm folded into the conv reading this view's weight."""
    found: list[str] = []
    for op, node_name, _ in getattr(view.weight, "uses", None) or []:
        if op not in ("Conv", "ConvInteger", "QLinearConv", "FusedConv"):
            continue
        meta = node_metadata(store, node_name)
        rules = meta.get("pkg.onnxscript.rewriter.rule_name", "")
        if "BatchNorm" in rules:
            found.append(f"the exporter's metadata records {', '.join(r.strip() for r in rules.split(',') if 'BatchNorm' in r)} "
                         f"on node {node_name}")
        bn_scopes = [sc for sc in _name_scopes(meta) if re.search(r"(^|\.)(bn|batchnorm|norm)\w*$", sc.lower())]
        if not rules and bn_scopes:
            found.append(f"the conv's torch scope is the BatchNorm module {bn_scopes[-1]!r}")
        node = store.node(node_name)
        bias = node.input[2] if op in ("Conv", "FusedConv") and len(node.input) > 2 and node.input[2] else ""
        torch_bias = mark.param.rpartition(".")[0] + ".bias"
        if bias and not names_match(torch_bias, bias):
            found.append(f"the conv has a bias {bias!r} that is not its torch bias {torch_bias!r} "
                         f"(folding adds one)")
        break
    return found


def batchnorm_status(store, view, mark: WhiteboxMark, reference_bn: dict | None) -> dict[str, Any]:
    """Was the marked conv folded with its BatchNorm? Returns status and the scale to undo."""
    anchors = reference_bn or mark.batchnorm
    if not _is_conv(view):
        return {"status": "not-applicable"}
    following = None
    try:
        from auditor.read.layout import following_batchnorm

        following = following_batchnorm(store, view.weight.name)
    except (ImportError, AttributeError):
        following = None
    if following is not None:
        return {"status": "kept", "detail": "a BatchNormalization still follows the marked conv"}
    if anchors is None:
        signs = folding_evidence(store, view, mark)
        if signs:
            return {"status": "probably-folded", "evidence": signs,
                    "detail": "no BatchNormalization follows this conv and the conv was probably folded ("
                              + "; ".join(signs) + "): " + FOLDED_HINT}
        return {"status": "unknown",
                "detail": "no BatchNormalization follows this conv; the key holds no BN anchors, "
                          "so folding cannot be ruled out (if the model had one: " + FOLDED_HINT + ")"}
    scale = _bn_scale(anchors)
    if scale.size != mark.shape[0]:
        raise AuditError(f"mark {mark.id!r}: BN anchors have {scale.size} channels, weight has {mark.shape[0]}")
    src = (reference_bn or {}).get("source") or ("reference model" if reference_bn is not None
                                                 else "anchors stored in the key")
    return {"status": "folded", "scale": scale, "anchors_from": src,
            "detail": f"no BatchNormalization follows the marked conv although one did at embedding time: "
                      f"the weight was folded (W' = W * gamma/sqrt(var+eps)); undone with the {src}"}


def reference_batchnorm(reference_path: str | Path, mark: WhiteboxMark, *, required: bool = True,
                        source: str = "reference model") -> dict | None:
    """BN parameters following the marked conv in the owner's reference ONNX model.

    With ``required=False`` (the unattacked model a gate or grid holds), None
    when the model does not identify the conv or no BN follows it."""
    from auditor.read.layout import following_batchnorm
    from auditor.read.weights import WeightStore

    ref = reference_path if not isinstance(reference_path, (str, Path)) else WeightStore.open(reference_path)
    views, how = locate(ref, mark)
    if len(views) != 1:
        if not required:
            return None
        raise AuditError(f"reference model: cannot identify {mark.param!r} uniquely ({len(views)} candidates)")
    bn = following_batchnorm(ref, views[0].weight.name)
    if bn is None:
        if not required:
            return None
        raise AuditError(f"reference model: no BatchNormalization follows {mark.param!r} "
                         f"(give the owner's model exported with BatchNorm kept)")
    out = {k: np.asarray(v).tolist() if not isinstance(v, float) else v for k, v in bn.items()}
    out["source"] = source
    return out


def resolve_anchors(key: Key, reference: str | Path | None = None,
                    unattacked: str | Path | None = None) -> dict[str, dict]:
    """BN anchors per mark id for undoing folding in attacked copies: from the owner's
    ``reference`` (required to identify the conv and its BN), else, for marks whose key
    holds no anchors, from the ``unattacked`` model when a BN still follows the conv there
    (a grid or gate folds BN in the attacked copies, e.g. quant_pre_process)."""
    out: dict[str, dict] = {}
    for mk in key.whitebox:
        if len(mk.shape) != 4:
            continue
        if reference is not None:
            out[mk.id] = reference_batchnorm(reference, mk)
        elif unattacked is not None and mk.batchnorm is None:
            bn = reference_batchnorm(unattacked, mk, required=False, source="unattacked model")
            if bn is not None:
                out[mk.id] = bn
    return out


# ---------------------------------------------------------------- extraction
def extract_mark(store, mark: WhiteboxMark, *, manifest=None, alpha=stats.DEFAULT_ALPHA,
                 reference_bn=None, null_corpus=None, reference_tensor=None) -> MarkResult:
    views, how = locate(store, mark, manifest, reference_tensor)
    base = dict(id=mark.id, param=mark.param, shape=list(mark.shape), reduce=mark.reduce, alpha=alpha)
    unread = unreadable_for(store, mark)
    if not views:
        if unread:
            why = (f"the weight of its layer could not be read: {describe_unreadable(unread)}; "
                   f"{UNREADABLE_HINT}")
        else:
            why = (f"no tensor with torch shape {list(mark.shape)} was found in the model, so the marked layer "
                   f"could not be located; give the exporter's --manifest, or check that the key's shape "
                   f"{list(mark.shape)} is the layer's torch shape (wmaudit inspect lists every layer)")
        return _unread_result(base, mark, why)
    if unread and how == "shape-search":
        # the layer was not found by name, and a weight the reader could not read may be it
        return _unread_result(base, mark, f"the key's layer was not located by name and "
                                          f"{describe_unreadable(unread)}; it may be the marked layer. "
                                          f"{UNREADABLE_HINT}")
    # identical tensors seen through several names (e.g. an initializer and the
    # W built from it by Slice/Concat) are one candidate, not several.
    distinct: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for v in views:
        a = np.ascontiguousarray(v.array(), dtype=np.float32)
        h = hashlib.sha256(a.tobytes()).hexdigest()
        if h not in distinct:
            distinct[h] = v
            arrays[h] = a
    m = len(distinct) if how == "shape-search" or len(views) > 1 else 1
    best = None
    for h, v in distinct.items():
        w = arrays[h].astype(np.float64)
        bn = batchnorm_status(store, v, mark, reference_bn)
        if bn.get("status") == "folded":
            w = w / bn["scale"].reshape((-1,) + (1,) * (w.ndim - 1))
        wr = reduce_weight(w, mark.reduce)
        s = score(mark, project(mark, w), alpha, m, wr)
        if best is None or s["p_value"] < best[0]["p_value"]:
            best = (s, v, bn)
    s, v, bn = best
    null = evidence.null_checks(mark)
    null.update(kind="fair-coin", fair_coin_p=s["p_value"], best_possible_p=stats.bonferroni(
        stats.min_achievable_p_half(mark.n_bits), m))
    if not null["fair_coin"]:
        s = _empirical(mark, s, store, set(distinct), null, alpha, m, null_corpus)
    wt = v.weight
    bn_out = {k: val for k, val in bn.items() if k != "scale"}
    notes = []
    if bn.get("status") in ("probably-folded", "unknown") and s["verdict"] != stats.DETECTED:
        notes.append(bn["detail"])
    if wt.quant:
        notes.append(f"weight stored quantized ({wt.quant}); extracted from its dequantized float values")
    if how == "reference-name":
        notes.append(f"located through the owner's reference file: the marked weight is {wt.stored_name!r} there "
                     f"(found by name), and this file keeps that tensor name")
    if how == "name-scope":
        notes.append(f"{wt.name} was renamed by the exporter; located through the node reading it, whose "
                     f"torch name scope is {mark.param.rpartition('.')[0]!r}")
    if how == "shape-search" and m > 1:
        notes.append(f"{m} distinct tensors have the key's shape; best reported, p Bonferroni-corrected")
    if wt.layout:
        notes.append(f"weight stored in onnxruntime's {wt.layout} layout; read back in torch layout")
    if how == "name" and m > 1:
        notes.append(f"the file does not record its NCHWc block size and {m} readings fit "
                     f"({', '.join(sorted(v.weight.layout for v in distinct.values()))}); best reported, "
                     f"p Bonferroni-corrected for {m}")
    if how == "name" and wt.name != mark.param and mark.param in getattr(wt, "aliases", ()):
        notes.append(f"{wt.name} was renamed by onnxruntime; located through its layer's bias name")
    return MarkResult(**base, **{k: s[k] for k in s if k not in ("alpha",)},
                      location=Location(weight=wt.name, transform=v.transform, how=how, candidates=m,
                                        stored_dtype=wt.stored_dtype, location=wt.location, quant=wt.quant),
                      batchnorm=bn_out, notes=notes, evidence=evidence.classify_mark(mark), null=null)


UNREADABLE_HINT = ("give the file onnxruntime started from (before its optimizer or format conversion), "
                   "or the exporter's --manifest; a mark in an unread weight is neither detected nor absent")


def unreadable_for(store, mark: WhiteboxMark) -> list[dict]:
    """Weights the reader could not read that could hold this mark (as many coefficients or more)."""
    need = int(np.prod(mark.shape))
    out = []
    for u in getattr(store, "unreadable", None) or []:
        shape = u.get("shape")
        if shape is None or int(np.prod(shape)) >= need:
            out.append(u)
    return out


def describe_unreadable(unread: list[dict]) -> str:
    u = unread[0]
    more = f" (and {len(unread) - 1} more)" if len(unread) > 1 else ""
    shape = f" {u['shape']}" if u.get("shape") is not None else ""
    return f"{u['tensor']}{shape} of {u['op']} node {u['node']!r}: {u['reason']}{more}"


def _unread_result(base: dict, mark: WhiteboxMark, why: str) -> MarkResult:
    """A mark that was not read: no bits, no p-value claim (p = 1 stands for 'no evidence')."""
    T = mark.n_bits
    return MarkResult(**base, n_bits=T, matches=0, ber=None, p_value=1.0, log10_p=0.0, p_corrected=1.0,
                      verdict=stats.UNREADABLE, reason=why, margin_min=0.0, margin_median=0.0, margin_mean=0.0,
                      signed_margin_min=0.0, signed_margins=[], wrong_bits=0, bits="", location=None,
                      evidence=evidence.classify_mark(mark))


def _empirical(mark, s, store, exclude, null, alpha, m, null_corpus) -> dict[str, Any]:
    """Re-judge a score under the empirical null (the key failed the fair-coin checks)."""
    corpus = evidence.default_null_corpus() if null_corpus is None else evidence.expand_corpus(null_corpus)
    stores = [("suspect file (other layers)", store)] + [(p.name, p) for p in corpus]
    emp = evidence.empirical_null(mark, s["matches"], stores, exclude)
    null.update(kind="empirical", empirical=emp, best_possible_p=stats.bonferroni(emp["resolution"], m))
    s = dict(s)
    p = emp["p_value"]
    p_corr = stats.bonferroni(p, m)
    if emp["refused"]:
        dec = stats.Decision(stats.INSUFFICIENT, alpha, "refused: " + emp["reason"])
    else:
        dec = stats.decide(p_corr, null["best_possible_p"], alpha)
    s.update(p_value=p, log10_p=math.log10(p), p_corrected=p_corr, verdict=dec.verdict,
             reason=f"empirical null, n = {emp['n']}: {dec.reason}")
    return s


def reference_tensor(ref_store, mark: WhiteboxMark) -> tuple[str, str] | None:
    """(stored name, transform) of the marked weight in the owner's reference file when it is located
    there without a search (manifest, name, name scope); None otherwise."""
    if ref_store is None:
        return None
    views, how = locate(ref_store, mark)
    if len(views) != 1 or how not in ("name", "name-scope", "manifest"):
        return None
    return views[0].weight.stored_name, views[0].transform


def _is_conv(view) -> bool:
    return getattr(view, "kind", "") == "conv"


def extract(model, key: Key, *, manifest: dict | None = None, alpha: float = stats.DEFAULT_ALPHA,
            reference: str | Path | None = None, marks: list[str] | None = None,
            anchors: dict[str, dict] | None = None, null_corpus=None) -> ExtractionResult:
    """Extract every white-box mark of `key` from `model` (a path or a WeightStore).

    ``reference``: the owner's model with BatchNorm kept; ``anchors``: BN anchors per
    mark id already resolved (``resolve_anchors``), used where no reference is given.
    Keys that fail the fair-coin checks (``auditor.marks.evidence.null_checks``)
    are judged under an empirical null built from the other layers of `model`
    and the files of ``null_corpus`` (default: the third-party files under
    $WMAUDIT_DATA/thirdparty)."""
    from auditor.read.weights import WeightStore

    store = model if not isinstance(model, (str, Path)) else WeightStore.open(model)
    selected = [mk for mk in key.whitebox if not marks or mk.id in marks or mk.param in marks]
    if not selected:
        raise AuditError("the key holds no white-box mark" + (f" named {', '.join(marks)}" if marks else ""))
    results = []
    ref_store = WeightStore.open(reference) if reference is not None else None
    for mk in selected:
        if reference is not None and len(mk.shape) == 4:
            ref_bn = reference_batchnorm(ref_store, mk)
        else:
            ref_bn = (anchors or {}).get(mk.id)
        results.append(extract_mark(store, mk, manifest=manifest, alpha=alpha, reference_bn=ref_bn,
                                    null_corpus=null_corpus, reference_tensor=reference_tensor(ref_store, mk)))
    M = len(results)
    unread = [r for r in results if r.verdict == stats.UNREADABLE]
    if unread and len(unread) == M:
        return ExtractionResult(marks=results, verdict=stats.UNREADABLE, p_value=1.0, alpha=alpha,
                                reason="; ".join(f"{r.id}: {r.reason}" for r in unread),
                                evidence=evidence.key_evidence(key))
    p = stats.bonferroni(min(r.p_corrected for r in results), M)
    best_possible = stats.bonferroni(min(r.null.get("best_possible_p", stats.bonferroni(
        stats.min_achievable_p_half(r.n_bits), r.location.candidates if r.location else 1))
        for r in results), M)
    dec = stats.decide(p, best_possible, alpha)
    reason = dec.reason + (f" (best of {M} marks, Bonferroni-corrected)" if M > 1 else "")
    if unread and dec.verdict != stats.DETECTED:
        # the marks that were read do not show it; the unread ones say nothing either way
        return ExtractionResult(marks=results, verdict=stats.UNREADABLE, p_value=p, alpha=alpha,
                                reason=reason + "; could not read " + "; ".join(f"{r.id}: {r.reason}" for r in unread),
                                evidence=evidence.key_evidence(key))
    return ExtractionResult(marks=results, verdict=dec.verdict, p_value=p, alpha=alpha, reason=reason,
                            evidence=evidence.key_evidence(key))

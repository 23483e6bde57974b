"""Scan a file of unknown history for every mark of every key.

No manifest and no names: every weight view of rank >= 2 is a candidate, in
whatever shape a transformation could have produced. For each candidate the
scanner builds *variants* (each one an attempt to undo what may have been done):

* ``as stored``: the torch-layout view itself;
* ``neurons cleaned`` (auditor.forensics.canon): dummy / clique neurons removed and
  split neurons merged, on the output side and (through the layer feeding it)
  the input side;
* ``anchors``: per-channel scales and BatchNorm folding undone with the key's BN
  anchors, channels matched to the anchors by what scaling leaves invariant;
* ``input permutation fitted``: for ``mean`` marks the output order does not matter
  (the mean over output channels is invariant to it), but a permutation of the
  input channels does; it is fitted to the key with an assignment solver
  (maximising sum_i (2b_i - 1) x_i . w) and paid for: the search covers I!
  permutations, all counted in the Bonferroni correction. ``flatten`` marks need
  both permutations (O! I!, fitted by alternating assignments);
* ``aligned to REF`` (auditor.forensics.align), one per reference model given.

A candidate variant fits a mark when its reduced length equals the key's
(``mean``: the trailing axes [I, k...] equal; ``flatten``: the whole shape).
Weights are read once (one WeightStore); for each mark the reduced vectors of all
fitting variants form one matrix R and the projections are one product X R.

Statistics: for each variant, p = P[Bin(T, 1/2) >= k] (the key's projection and bits
were fixed without looking at this file). Aligning to a reference uses the owner's model,
not the key; the reference carries the mark, so for a file unrelated to it the fair-coin
null after alignment is an assumption: measured, independently trained twins aligned to the
marked reference stay at 119-140 of 256 matches (best variant) and are never detected.

Correction for everything tried (every key, mark, candidate and variant): a weighted
Bonferroni (see `_corrections`): half of alpha is shared by the direct variants (one
hypothesis each), half by the key-fitted permutation searches, each search's share split
over every permutation it covers (32! for a 32-channel input permutation). The weights sum
to one, so the family-wise error rate stays <= alpha. Reported with its parts, in log10
where it leaves the range of a double.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from auditor.errors import AuditError
from auditor.marks import stats
from auditor.marks.keys import Key, WhiteboxMark

LN10 = math.log(10.0)


def log10_factorial(n: int) -> float:
    return math.lgamma(n + 1) / LN10


@dataclass
class Variant:
    weight: np.ndarray | None     # torch layout; None once reduced (or when `parent` gives it)
    candidate: int                # index into the candidate list
    undone: list[str] = field(default_factory=list)
    log10_family: float = 0.0     # log10 of how many hypotheses this variant stands for
    source: str = "suspect"
    out_fixed: bool = False       # output channels already in the key's order (anchors)
    reduced: dict = field(default_factory=dict)   # reduce -> reduced vector (float64), cached
    shape: tuple = ()             # torch-layout shape (kept when the weight is dropped)
    parent: "Variant | None" = None       # weight = parent's weight, input columns times col_scale
    col_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.shape and self.weight is not None:
            self.shape = tuple(self.weight.shape)

    def array(self) -> np.ndarray:
        """The variant's weight (built from its parent's when it has one)."""
        if self.weight is None and self.parent is not None:
            g = self.col_scale.reshape((1, -1) + (1,) * (len(self.shape) - 2))
            return self.parent.array() * g
        if self.weight is None:
            raise RuntimeError("the variant's weight was dropped before every mark was reduced")
        return self.weight

    def drop(self) -> None:
        """Forget the weight (the reduced vectors stay): memory is bounded by the step at hand."""
        self.weight = None
        self.parent = None


@dataclass
class Candidate:
    view: Any                     # auditor.read.layout.TorchView
    array: Any = None             # its values (float32), read once
    cleaned: Any = None           # canon.Cleaned or None
    notes: list[str] = field(default_factory=list)
    bases: Any = None             # mark-independent variants, built on first use
    mean: Any = None              # the view's mean over outputs, computed by the reading thread
    colsq: Any = None             # the stored view's per-input sums of squares, when the cleaning had them


def _log10_sum(values: list[float]) -> float:
    if not values:
        return float("-inf")
    m = max(values)
    return m + math.log10(sum(10.0 ** (v - m) for v in values))


def _threads_ok() -> bool:
    """Threads only where the address space is not limited (a sweep child under RLIMIT_AS): each
    thread's malloc arena reserves tens of MB of it."""
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        return False


def _fingerprint(a: np.ndarray) -> bytes:
    """A cheap digest of an array's values (a strided sample of at most ~64k entries); equal
    digests are confirmed by comparing the arrays."""
    k = max(1, int(65536 ** (1.0 / max(a.ndim, 1))))
    sample = np.ascontiguousarray(a[tuple(slice(None, None, max(1, d // k)) for d in a.shape)])
    return hashlib.sha256(sample.tobytes()).digest()


def _scannable(v) -> bool:
    return not (len(v.shape) < 2 or v.kind in ("rnn",) and v.transform.startswith("rnn:") and ":B" in v.transform)


def _cleanable(v) -> bool:
    return v.kind in ("conv", "linear") and v.transform in ("identity", "transpose")


def may_fit(mark: WhiteboxMark, v) -> bool:
    """Could any variant of view `v` fit `mark`? Decided from shapes alone, before reading: the
    cleaning only removes or merges channels (outputs, and inputs in whole channels), the other
    variants keep the shape."""
    shape, want = tuple(v.shape), tuple(mark.shape)
    if _fits(mark, shape):
        return True
    if not _cleanable(v) or len(shape) != len(want) or shape[2:] != want[2:]:
        return False
    if mark.reduce == "mean":
        return shape[1] > want[1]
    return shape[0] >= want[0] and shape[1] >= want[1]


def _view_array(store, v) -> np.ndarray:
    # a transposed view stays a view of the stored array (no copy of a large weight)
    return store.array(v.weight.name).T if v.transform == "transpose" else np.asarray(v.array(), np.float32)


def _make_candidate(store, gv, v, a) -> Candidate:
    from auditor.forensics import canon

    cand = Candidate(v, a)
    if _cleanable(v):
        lay = gv.layer_of_weight(v.weight.name)
        if lay is not None:
            torch_is_rows = (lay.out_axis == 0) == (v.transform == "identity")
            if torch_is_rows:
                try:
                    cand.cleaned = canon.clean(gv, lay)
                    cand.colsq = canon.stored_column_sq(gv, cand.cleaned)
                except (KeyError, ValueError) as e:
                    cand.notes.append(f"neighbours not read: {e}")
    return cand


class _Distinct:
    """Identical arrays under several views or names are one candidate: a sampled digest, confirmed
    by comparing the arrays (the earlier one read again when it was released)."""

    def __init__(self, store):
        self.store = store
        self.seen: dict[tuple, list[Any]] = {}

    def first(self, a: np.ndarray, v) -> bool:
        """True the first time these values are seen (then remembered under view `v`)."""
        views = self.seen.setdefault((a.shape, _fingerprint(a)), [])
        if any(np.array_equal(_view_array(self.store, u), a) for u in views):
            return False
        views.append(v)
        return True


def candidates(store, gv) -> list[Candidate]:
    """Distinct weights of rank >= 2 in every torch view, each cleaned of dummy / split neurons where
    its layer's neighbours can be traced. Every array is kept (the alignment to a reference visits
    them all); `scan` without references walks the file instead (`_walk`)."""
    from auditor.read.layout import torch_views

    store.keep_arrays(prefetch=_threads_ok())
    distinct = _Distinct(store)
    out: list[Candidate] = []
    for v in torch_views(store):
        if not _scannable(v):
            continue
        a = _view_array(store, v)
        if distinct.first(a, v):
            out.append(_make_candidate(store, gv, v, a))
    return out


def _fits(mark: WhiteboxMark, shape: tuple[int, ...]) -> bool:
    if mark.reduce == "mean":
        return tuple(shape[1:]) == tuple(mark.shape[1:])
    return tuple(shape) == tuple(mark.shape)


def _fit_input_perm_flat(W: np.ndarray, sx: np.ndarray) -> np.ndarray:
    O, I = W.shape[:2]
    S = sx.reshape(O, I, -1)
    _, c = linear_sum_assignment(-np.einsum("ock,ojk->cj", S, W.reshape(O, I, -1)))
    return W[:, c]


def _fit_both_perms(mark: WhiteboxMark, W: np.ndarray, sx: np.ndarray, rounds: int = 4) -> np.ndarray:
    O, I = W.shape[:2]
    S = sx.reshape(O, I, -1)
    Wk = W.reshape(O, I, -1)
    pin = np.arange(I)
    pout = np.arange(O)
    for _ in range(rounds):
        Wi = Wk[:, pin]
        _, pout = linear_sum_assignment(-(S.reshape(O, -1) @ Wi.reshape(O, -1).T))
        Wo = Wk[pout]
        _, pin = linear_sum_assignment(-np.einsum("ock,ojk->cj", S, Wo))
    return W[pout][:, pin]


def search_reachable(n_bits: int, log10_family: float, alpha: float) -> bool:
    """Whether a key-fitted search over 10^log10_family permutations could ever be detected with
    `n_bits` bits: even every bit read (p = 2^-T) times its share of the correction (at least
    2 x the permutations searched) must stay below alpha. Decided from shapes and T alone, before
    any weight is looked at, so leaving a search out changes no null distribution: it is neither
    run nor paid for, and the finding says so."""
    return stats.log10_binom_tail_half(n_bits, n_bits) + log10_family + math.log10(2.0) < math.log10(alpha)


def _bases(c: Candidate, i: int) -> list[Variant]:
    """The mark-independent variants of candidate `i` (as stored, neurons cleaned, input scales
    canonicalised), built once per candidate and shared by every mark."""
    if c.bases is None:
        base = [Variant(c.array, i, [], reduced={} if c.mean is None else {"mean": c.mean})]
        cl = c.cleaned
        if cl is not None and cl.undone and 0 not in cl.weight.shape:   # (a layer of dummies only: nothing left)
            base.append(Variant(cl.weight, i, list(cl.undone)))
        c.bases = base + _gamma_variants(c, i, base)
    return c.bases


def _gamma_variants(c: Candidate, i: int, base: list[Variant]) -> list[Variant]:
    """Input scales canonicalised: each base's columns times a per-input vector. Built lazily from
    the base (a mean reduction is the base's times the vector; no copy of the weight)."""
    cl = c.cleaned
    out = []
    if cl is None:
        return out
    for vec, what in ((cl.in_gamma, "input scales canonicalised: columns times the feeding BatchNorm's |gamma|"),
                      (cl.in_rownorm, "input scales canonicalised: columns times the feeding layer's row norms")):
        if vec is None:
            continue
        for b in base:
            if len(b.shape) >= 2 and b.shape[1] == vec.size:
                out.append(Variant(None, i, b.undone + [what], out_fixed=b.out_fixed, shape=b.shape, parent=b,
                                   col_scale=np.asarray(vec, np.float64)))
    if cl.in_gamma is not None or cl.in_rownorm is not None:
        # a positive scale of input channel c divides this layer's column c (every output, every tap):
        # the column over its own norm is unchanged by it, and equals the original column over the
        # original column norm (norms over all outputs, which vary less between channels than the
        # feeding layer's rows once a BatchNorm factor is folded into them)
        for b in base:
            if len(b.shape) >= 2:
                as_stored = b.weight is c.array and c.colsq is not None and c.colsq.shape == (b.shape[1],)
                n = np.sqrt(c.colsq) if as_stored else column_norms(b.array())
                out.append(Variant(None, i, b.undone + ["input scales canonicalised: columns over their own norms"],
                                   out_fixed=b.out_fixed, shape=b.shape, parent=b,
                                   col_scale=np.where(n > 0, 1.0 / np.where(n > 0, n, 1.0), 0.0)))
    return out


def column_norms(W: np.ndarray) -> np.ndarray:
    """Per input channel (axis 1 of a torch-layout weight), the norm over every output and tap."""
    V = np.asarray(W).reshape(W.shape[0], W.shape[1], -1)
    return np.sqrt(np.einsum("oik,oik->i", V, V, dtype=np.float64))


def _candidate_variants(mark: WhiteboxMark, c: Candidate, i: int, gv, alpha: float, skip: dict[str, int],
                        sx_box: list) -> list[Variant]:
    """Every variant of candidate `i` that fits `mark`, with the key-fitted permutation searches
    that can reach `alpha` (those that cannot are counted in `skip`). `sx_box` caches the key's
    signed projection sum (computed on the first search)."""
    from auditor.forensics import canon

    out: list[Variant] = []
    base = [b for b in _bases(c, i) if _fits(mark, b.shape)]
    cl = c.cleaned
    if cl is not None and mark.batchnorm and c.view.kind == "conv" and cl.weight is not None \
            and _fits(mark, cl.weight.shape):
        try:
            un = canon.anchor_unfold(gv, cl, mark.batchnorm)
        except (KeyError, ValueError):
            un = None
        if un is not None:
            anch = Variant(un[0], i, list(cl.undone) + [un[1]], out_fixed=True)
            base += [anch] + _gamma_variants(c, i, [anch])
    for b in base:
        out.append(b)
        O, I = b.shape[0], b.shape[1]
        if mark.reduce == "mean" and I > 1:
            what, fam, kind = f"input permutation fitted to the key ({I}! tried)", log10_factorial(I), "mean"
        elif mark.reduce == "flatten" and b.out_fixed and I > 1:
            what, fam, kind = f"input permutation fitted to the key ({I}! tried)", log10_factorial(I), "flat-in"
        elif mark.reduce == "flatten" and len(b.shape) >= 2 and (O > 1 or I > 1):
            what = f"output and input permutations fitted to the key ({O}! x {I}! tried)"
            fam, kind = log10_factorial(O) + log10_factorial(I), "flat-both"
        else:
            continue
        if not search_reachable(mark.n_bits, fam, alpha):
            label = what.replace(" tried)", ")").replace("fitted to the key ", "") + f": 10^{fam:.1f} permutations"
            skip[label] = skip.get(label, 0) + 1
            continue
        if not sx_box:
            sx_box.append((2.0 * mark.bits.astype(np.float64) - 1.0) @ mark.matrix())
        sx = sx_box[0]
        if kind == "mean":   # the mean over outputs is all the mark reads: permute its rows, no weight copy
            w = _reduce(mark, b).reshape(I, -1)
            _, perm = linear_sum_assignment(-(sx.reshape(I, -1) @ w.T))
            out.append(Variant(None, i, b.undone + [what], fam, shape=b.shape,
                               reduced={"mean": np.ascontiguousarray(w[perm]).reshape(-1)}))
        elif kind == "flat-in":
            out.append(Variant(_fit_input_perm_flat(b.array(), sx), i, b.undone + [what], fam))
        else:
            out.append(Variant(_fit_both_perms(mark, b.array(), sx), i, b.undone + [what], fam))
    return out


def _skip_notes(mark: WhiteboxMark, skip: dict[str, int], alpha: float) -> list[str]:
    T = mark.n_bits
    return [f"{what} x {n} view(s) not searched: with {T} bits even a perfect read "
            f"(p = 10^{stats.log10_binom_tail_half(T, T):.1f}) times the permutations searched "
            f"stays above alpha = {alpha:g}" for what, n in skip.items()]


def mark_variants(mark: WhiteboxMark, cands: list[Candidate], gv, extra: list[Variant],
                  alpha: float = stats.DEFAULT_ALPHA, skip_counts: dict[str, int] | None = None) -> list[Variant]:
    """Every variant of every candidate that fits `mark` (and the aligned ones in `extra`).
    Permutation searches that could not reach `alpha` with the mark's bits are left out and counted
    per kind in `skip_counts` (see `_skip_notes`)."""
    out: list[Variant] = []
    skip: dict[str, int] = {} if skip_counts is None else skip_counts
    sx_box: list = []
    for i, c in enumerate(cands):
        out.extend(_candidate_variants(mark, c, i, gv, alpha, skip, sx_box))
    out.extend(v for v in extra if _fits(mark, v.shape))
    return out


def _reduce(mark: WhiteboxMark, v: Variant) -> np.ndarray:
    """The variant's reduced vector (float64), cached on the variant: marks of one shape share it."""
    r = v.reduced.get(mark.reduce)
    if r is None:
        if mark.reduce == "mean" and v.parent is not None:
            pr = _reduce(mark, v.parent).reshape(v.shape[1], -1)
            r = (pr * v.col_scale[:, None]).reshape(-1)
        else:
            W = v.array()
            r = mean_over_outputs(W) if mark.reduce == "mean" else np.asarray(W, np.float64).reshape(-1)
        v.reduced[mark.reduce] = r
    return r


MEAN_BLOCK = 256    # values summed in float32 per matrix-vector product (the partial sums added in float64)


def mean_over_outputs(W: np.ndarray) -> np.ndarray:
    """W.mean(axis=0) flattened, float64: the vector a `mean` mark reads. A float32 weight stored
    either way round (a torch-layout view of a MatMul weight is its transpose) is summed by
    matrix-vector products over blocks of MEAN_BLOCK rows (or, transposed, columns), each block's
    float32 sum added in float64: one pass at BLAS speed (numpy's float64 reduction of a float32
    array is about three times slower), within a block's float32 roundings of the float64 mean."""
    O = W.shape[0]
    if W.dtype != np.float32 or O < 2 * MEAN_BLOCK or W.size == 0:
        return W.mean(axis=0, dtype=np.float64).reshape(-1)
    W2 = W.reshape(O, -1)             # a view when W is contiguous either way, else a copy
    ones = np.ones(MEAN_BLOCK, np.float32)
    acc = np.zeros(W2.shape[1])
    full = O - O % MEAN_BLOCK
    if W2.flags.f_contiguous and not W2.flags.c_contiguous:
        S = W2.T                      # rows of S are what is averaged: sums over column blocks of S
        for k in range(0, full, MEAN_BLOCK):
            acc += S[:, k:k + MEAN_BLOCK] @ ones
    else:
        for k in range(0, full, MEAN_BLOCK):
            acc += ones @ W2[k:k + MEAN_BLOCK]
    if full < O:
        acc += W2[full:].sum(axis=0, dtype=np.float64)
    return acc / O


def _evidence(key: Key, mark: WhiteboxMark) -> dict[str, Any]:
    """Committed or uncommitted evidence (``auditor.marks.evidence``), as extract reports it."""
    from auditor.marks import evidence

    return evidence.classify_mark(mark)


def scan(model_path, keys: list[Key], references=(), alpha: float = stats.DEFAULT_ALPHA) -> dict[str, Any]:
    """Scan `model_path` for every white-box mark of every key. Returns the result body:
    findings (one per mark), what was tried (counts), and the verdict.

    Without references the file is walked one candidate weight at a time: each is read once (the
    next one read ahead in a background thread), reduced to what the marks read, and dropped with
    the neighbours its cleaning needed, so memory is bounded by a few of the largest weights a mark
    could fit, not by the file. The keys' projections are generated meanwhile, within a budget of
    the same size. A file that changes while it is scanned is refused (AuditError)."""
    from auditor.read.weights import WeightStore

    if not keys:
        raise AuditError("no keys given")
    marks = [(k, m) for k in keys for m in k.whitebox]
    if not marks:
        raise AuditError("the keys hold no white-box mark")
    had_matrix = {id(m) for _, m in marks if m._X is not None}
    before = _file_state(model_path, [])
    store = WeightStore.open(model_path)
    try:
        before.update(_file_state(model_path, _external_files(store)))
        out = _scan(store, keys, marks, had_matrix, references, alpha)
    finally:
        store.stop_prefetch()
    after = _file_state(model_path, [n for n in before if n != Path(model_path).name])
    if after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        raise AuditError(f"{', '.join(changed[:3])} changed while it was scanned (size or modification time); "
                         f"no verdict: scan a copy that nothing writes to")
    return out


def _file_state(model_path, external: list[str]) -> dict[str, tuple | None]:
    """(size, modification time, inode) of the model file and of the `external` data files beside
    it, never following a link."""
    p = Path(model_path)
    out: dict[str, tuple | None] = {}
    for n in [p.name] + list(external):
        try:
            st = os.stat(p.parent / n, follow_symlinks=False)
        except OSError:
            out[n] = None
            continue
        out[n] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _external_files(store) -> list[str]:
    """The external data files the model's weights live in (as the store located them)."""
    return sorted({w.location.removeprefix("external:") for w in store.weights
                   if w.location.startswith("external:") and w.location != "external:"})


@dataclass
class _MarkState:
    key: Key
    mark: WhiteboxMark
    vs: list = field(default_factory=list)
    skip: dict = field(default_factory=dict)
    sx_box: list = field(default_factory=list)
    ref_notes: list = field(default_factory=list)


def _walk(store, gv, states: list[_MarkState], alpha: float) -> tuple[list[Candidate], dict[str, int]]:
    """One pass over the candidate weights (graph order): each read once, the next read ahead,
    every fitting mark's variants built and reduced, then the weights dropped (see `scan`).
    Returns the candidates and what the walk read and held (for the result's `tried`)."""
    from auditor.read.layout import torch_views

    every = [v for v in torch_views(store) if _scannable(v)]
    views = [v for v in every if any(may_fit(st.mark, v) for st in states)]
    store.keep_arrays()
    ahead = _threads_ok()
    names = [v.weight.name for v in views]
    if ahead and names:
        store.prefetch_names(_next_distinct(names, 0, LOOKAHEAD))
    gen = _Projections(states, 2 * max((int(np.prod(v.shape)) * 4 for v in views), default=0), ahead)
    means = _ReadMeans(store, views, [st.mark for st in states])
    distinct = _Distinct(store)
    cands: list[Candidate] = []
    peak = 0
    try:
        for n, v in enumerate(views):
            # the next weights in graph order (the cleaning reads up to LOOKAHEAD layers on): read
            # ahead, and kept when this step releases the others
            following = _next_distinct(names, n + 1, LOOKAHEAD)
            if ahead:
                store.prefetch_names(following)
            peak = max(peak, store.kept_bytes())
            a = _view_array(store, v)
            if not distinct.first(a, v):
                _release(store, gv, names, n, following)
                continue
            i = len(cands)
            c = _make_candidate(store, gv, v, a)
            c.mean = means.take(v)
            cands.append(c)
            made: list[Variant] = []
            for st in states:
                if not may_fit(st.mark, v):
                    continue
                vs = _candidate_variants(st.mark, c, i, gv, alpha, st.skip, st.sx_box)
                for x in vs:
                    _reduce(st.mark, x)
                st.vs.extend(vs)
                made.extend(vs)
            for x in made + list(c.bases or ()):
                x.drop()
            c.array, c.bases, c.mean, c.colsq = None, None, None, None
            if c.cleaned is not None:    # what the result still reads of it: undone, blocked
                cl = c.cleaned
                cl.weight = cl.out_groups = cl.in_groups = cl.flow = cl.in_gamma = cl.in_rownorm = None
            peak = max(peak, store.kept_bytes())
            _release(store, gv, names, n, following)
    finally:
        gen.stop()
        store.after_read = None
    return cands, {"weight_views": len(every), "weight_views_read": len(views), "peak_weight_bytes_held": peak}


class _ReadMeans:
    """The means over outputs that `mean` marks read off the as-stored views of 2-D weights, computed
    by the thread that read the weight (the prefetch thread, otherwise idle while the walk computes),
    so the walk's own thread does not."""

    MIN_SIZE = 1 << 16     # smaller weights are cheaper to reduce where they are used

    def __init__(self, store, views, marks):
        self.want: dict[str, set[str]] = {}
        for v in views:
            if v.transform in ("identity", "transpose") and len(v.shape) == 2 and any(
                    m.reduce == "mean" and _fits(m, tuple(v.shape)) for m in marks):
                self.want.setdefault(v.weight.name, set()).add(v.transform)
        self.done: dict[tuple[str, str], np.ndarray] = {}
        if self.want:
            store.after_read = self.compute

    def compute(self, name: str, a: np.ndarray) -> None:
        if a.dtype != np.float32 or a.ndim != 2 or a.size < self.MIN_SIZE:
            return
        for t in self.want.get(name, ()):
            self.done[(name, t)] = mean_over_outputs(a.T if t == "transpose" else a)

    def take(self, v) -> np.ndarray | None:
        m = self.done.pop((v.weight.name, v.transform), None)
        return m if m is not None and m.shape == (int(np.prod(v.shape[1:])),) else None


LOOKAHEAD = 5   # distinct weights read ahead: the cleaning's depth (canon.live_outputs, 3) + the layer + 1


def _next_distinct(names: list[str], start: int, n: int, step: int = 1) -> list[str]:
    """The first `n` distinct names from index `start` on, going forward (`step` 1) or back (-1)."""
    out: list[str] = []
    for k in range(start, len(names) if step > 0 else -1, step):
        x = names[k]
        if x not in out:
            out.append(x)
            if len(out) == n:
                break
    return out


def _release(store, gv, names: list[str], n: int, ahead: list[str]) -> None:
    """After view `n` of the walk (`names`: the views' weights in walk order; `ahead`: the next
    LOOKAHEAD distinct ones, read ahead and visited next): drop the weights this step did not touch,
    except those ahead; drop what the neuron analysis cached for layers outside the window of
    LOOKAHEAD distinct weights either side (a layer's groups are its successor's input side); drop
    large cached graph values."""
    from auditor.forensics import canon

    behind = _next_distinct(names, n, LOOKAHEAD + 1, step=-1)
    store.release(steps=1, keep=ahead)
    canon.forget_layers(gv, store.recent() | set(ahead) | set(behind))
    cache = gv.__dict__.get("_cache")
    if cache:
        for k in [k for k, v in cache.items() if getattr(v, "nbytes", 0) > (1 << 20)]:
            del cache[k]


class _Projections:
    """The keys' projections X, generated in a background thread while the file is read, in mark
    order, holding at most `budget` bytes of them (at least 64 MiB) at a time; the rest are
    generated when projected."""

    def __init__(self, states: list[_MarkState], budget: int, threads: bool):
        self.futures = []
        if not threads:
            return
        from concurrent.futures import ThreadPoolExecutor

        budget = max(budget, 64 << 20)
        todo, used = [], 0
        for st in states:
            m = st.mark
            if m._X is not None:
                continue
            nb = int(m.n_bits) * int(m.n_coeffs) * 8
            if used + nb > budget:
                break
            used += nb
            todo.append(m)
        if todo:
            self.ex = ThreadPoolExecutor(1, thread_name_prefix="wmaudit-keys")
            self.futures = [self.ex.submit(_matrix_or_none, m) for m in todo]

    def stop(self) -> None:
        if self.futures:
            for f in self.futures:
                f.cancel()
            self.ex.shutdown(wait=True)


def _matrix_or_none(mark):
    try:
        return mark.matrix()
    except AuditError:     # a bad projection: reported when the mark is judged
        return None


def _scan(store, keys, marks, had_matrix, references, alpha) -> dict[str, Any]:
    from auditor.forensics import align, canon

    gv = canon.GraphValues(store)
    states = [_MarkState(k, m) for k, m in marks]
    walked: dict[str, int | None] = dict.fromkeys(("weight_views", "weight_views_read", "peak_weight_bytes_held"))
    if references:       # alignment visits every layer of the file: all weights kept
        cands = candidates(store, gv)
        for st in states:
            extra: list[Variant] = []
            for ref in references:
                try:
                    al = align.align_to_reference(gv, cands, ref, st.mark, alpha)
                except AuditError as e:
                    st.ref_notes.append(f"{Path(ref).name}: {e}")
                    continue
                for a in al:
                    extra.append(Variant(a["weight"], a["candidate"], a["undone"], 0.0,
                                         source=f"reference {Path(ref).name}"))
                if not al:
                    st.ref_notes.append(f"{Path(ref).name}: no layer of this file aligns with the marked layer")
            st.vs = mark_variants(st.mark, cands, gv, extra, alpha, skip_counts=st.skip)
    else:
        cands, walked = _walk(store, gv, states, alpha)
    per_mark = [(st.key, st.mark, st.vs, st.ref_notes, _skip_notes(st.mark, st.skip, alpha)) for st in states]
    direct = sum(1 for _, _, vs, _, _ in per_mark for v in vs if v.log10_family == 0.0)
    searched = [v.log10_family for _, _, vs, _, _ in per_mark for v in vs if v.log10_family > 0.0]
    corr = _corrections(direct, searched)
    for _, mark, vs, _, _ in per_mark:          # reduced vectors, shared by marks of one shape
        for v in vs:
            _reduce(mark, v)
    findings = []
    for (key, mark, vs, ref_notes, skipped), Y in zip(per_mark, _projections(per_mark, had_matrix)):
        f = _judge(key, mark, vs, cands, corr, alpha, ref_notes, Y)
        if skipped:
            f["not_searched"] = skipped
        _mark_unreadable(f, store, mark)
        findings.append(f)
    detected = [f for f in findings if f["verdict"] == stats.DETECTED]
    best = min((f.get("log10_p_corrected", 0.0) for f in findings), default=0.0)
    tried = {"keys": len(keys), "marks": len(marks), "candidate_tensors": len(cands), **walked,
             "variants": sum(len(vs) for _, _, vs, _, _ in per_mark),
             "search_kinds_left_out": sum(len(sk) for *_, sk in per_mark),
             "direct_variants": direct, "searched_hypotheses_log10": _log10_sum(searched) if searched else None,
             "correction": corr["how"]}
    verdict = stats.DETECTED if detected else (
        stats.UNREADABLE if any(f["verdict"] == stats.UNREADABLE for f in findings) else
        stats.INSUFFICIENT if all(f["verdict"] == stats.INSUFFICIENT for f in findings) else stats.NOT_DETECTED)
    return {"verdict": verdict, "alpha": alpha, "detected": len(detected), "findings": findings, "tried": tried,
            "log10_p_best": best,
            "cannot_recover": _limits(cands, references)}


def _corrections(direct: int, searched: list[float]) -> dict[str, Any]:
    """Weighted Bonferroni over everything tried: half of alpha is shared equally by the direct
    variants (stored, cleaned, anchors, aligned to a reference; one hypothesis each), half equally
    by the key-fitted permutation searches, each search's share split over every permutation it
    searched; all of alpha to one group when the other is empty. The weights sum to 1, so the
    family-wise error stays <= alpha. Returns log10 of the factors p is multiplied by."""
    has_d, has_s = direct > 0, bool(searched)
    w = 0.5 if (has_d and has_s) else 1.0
    out = {"direct": math.log10(max(direct, 1)) - math.log10(w),
           "searched": (math.log10(len(searched)) - math.log10(w)) if has_s else 0.0}
    out["how"] = (f"weighted Bonferroni: {direct} direct hypotheses share {w:g} of alpha (p x {direct / w:g})"
                  + (f"; {len(searched)} permutation searches share {w:g} (p x {len(searched) / w:g} x the "
                     f"permutations each searched, up to 10^{max(searched):.1f})" if has_s else ""))
    return out


def _limits(cands, references) -> list[str]:
    out = []
    if not references:
        out.append("without the owner's reference: positive per-channel scales of the input channels are only "
                   "canonicalised (columns times the feeding BatchNorm's |gamma|, or once it is folded times the "
                   "feeding layer's row norms; and columns over their own norms: each exact only where those "
                   "gammas or norms were equal before the scaling), "
                   "and scales of the output channels are undone only with the key's BatchNorm anchors")
    blocked = sorted({b for c in cands if c.cleaned is not None for b in c.cleaned.blocked})
    out.extend(blocked[:8])
    return out


def _projections(per_mark, had_matrix: set[int]):
    """Y = X R for every mark (T x variants), in a small thread pool (generating a key's X and the
    product release the GIL). A projection not generated yet is written into a buffer its thread
    reuses for the next key of that shape, and one generated ahead (`_Projections`) that the caller
    had not is dropped once used: memory stays at a few keys' X however many keys are scanned."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def buffer_for(shape):
        bufs = local.__dict__.setdefault("bufs", {})
        if shape not in bufs:
            bufs[shape] = np.empty(shape)
        return bufs[shape]

    stacked: dict[tuple, np.ndarray] = {}      # marks of one shape share their variants' matrix R

    def matrix_of(mark, vs) -> np.ndarray:
        k = (mark.reduce,) + tuple(id(v) for v in vs)
        R = stacked.get(k)
        if R is None:
            R = stacked[k] = np.stack([_reduce(mark, v) for v in vs], axis=1)
        return R

    def one(item):
        _, mark, vs, _, _ = item
        if not vs:
            return None
        Y = mark.projection_into(buffer_for) @ matrix_of(mark, vs)
        if id(mark) not in had_matrix:
            mark._X = None
        return Y

    workers = max(1, min(len(per_mark), os.cpu_count() or 1, 4)) if _threads_ok() else 1
    if workers == 1:
        return [one(it) for it in per_mark]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, per_mark))


def _mark_unreadable(f: dict[str, Any], store, mark) -> None:
    """A mark not detected in the weights that were read, while a weight that could hold it was not
    read (a layout the reader does not understand): 'could not read', not 'not detected'. In place."""
    from auditor.marks.whitebox import UNREADABLE_HINT, describe_unreadable, unreadable_for

    unread = unreadable_for(store, mark)
    if f["verdict"] in (stats.DETECTED, stats.INSUFFICIENT) or not unread:
        return
    f["unreadable"] = unread
    f["verdict"] = stats.UNREADABLE
    f["reason"] = (f"not detected in the weights that were read, but {describe_unreadable(unread)}; "
                   f"{UNREADABLE_HINT}")


def _judge(key, mark, vs, cands, corr, alpha, ref_notes, Y=None) -> dict[str, Any]:
    T = mark.n_bits
    base = {"key_commitment": key.commitment, "mark": mark.id, "param": mark.param, "shape": list(mark.shape),
            "reduce": mark.reduce, "n_bits": T, "evidence": _evidence(key, mark), "alpha": alpha}
    from auditor.marks import evidence

    null = evidence.null_checks(mark)
    if not null["fair_coin"]:
        # the binomial p (and every search it pays for) assumes sign-symmetric dense rows
        # and balanced bits; a key that fails those checks is not judged here
        failed = ", ".join(n for n, c in null["checks"].items() if not c["passed"])
        return {**base, "verdict": stats.INSUFFICIENT, "variants": len(vs), "notes": ref_notes,
                "null": {"kind": "refused", "failed_checks": failed},
                "reason": (f"refused: the key fails the fair-coin checks ({failed}); scan's searches have no "
                           "valid null for it: judge it with `wmaudit extract`, which uses an empirical null")}
    if not vs:
        best_possible = stats.log10_binom_tail_half(T, T) + corr["direct"]
        dec = stats.decide(1.0, min(1.0, 10 ** min(0.0, best_possible)), alpha)
        return {**base, "verdict": stats.INSUFFICIENT if dec.verdict == stats.INSUFFICIENT else stats.NOT_DETECTED,
                "reason": "no weight of this file fits the mark's shape, even after undoing transformations",
                "variants": 0, "notes": ref_notes}
    if Y is None:
        Y = mark.matrix() @ np.stack([_reduce(mark, v) for v in vs], axis=1)   # T x V: one product
    k = ((Y > 0) == mark.bits[:, None].astype(bool)).sum(axis=0)
    factor = np.array([corr["searched"] + v.log10_family if v.log10_family > 0 else corr["direct"] for v in vs])
    l10s = np.array([stats.log10_binom_tail_half(T, int(kk)) for kk in k])
    l10c_all = np.minimum(0.0, l10s + factor)
    # ties (often several variants read every bit) go to the one that undid the most
    # (ranked before clipping at p = 1, so a search that paid more than it found does not win)
    raw = l10s + factor
    j = min(range(len(vs)), key=lambda i: (round(float(raw[i]), 9), -len(vs[i].undone), i))
    v = vs[j]
    y = Y[:, j]
    kk = int(k[j])
    l10, l10c = float(l10s[j]), float(l10c_all[j])
    p = stats.binom_tail_half(T, kk)
    pc = min(1.0, 10.0 ** l10c)
    best_possible = min(0.0, stats.log10_binom_tail_half(T, T) + float(factor.min()))
    dec = stats.decide(pc, 10.0 ** best_possible, alpha)
    signed = (2.0 * mark.bits - 1.0) * y
    c = cands[v.candidate]
    w = c.view.weight
    also = int(sum(1 for i in range(len(vs)) if i != j and l10c_all[i] < math.log10(alpha)))
    return {**base, "verdict": dec.verdict, "reason": dec.reason.replace("p = ", "corrected p = ", 1),
            "matches": kk, "ber": (T - kk) / T, "p_value": p, "log10_p": l10,
            "p_corrected": pc, "log10_p_corrected": l10c,
            "margin_min": float(np.abs(y).min()), "margin_median": float(np.median(np.abs(y))),
            "signed_margin_min": float(signed.min()),
            "found": {"weight": w.name, "transform": c.view.transform, "shape_in_file": list(c.view.shape),
                      "location": w.location, "stored_dtype": w.stored_dtype, "quant": w.quant,
                      "source": v.source},
            "undone": v.undone or ["nothing (the mark reads off the stored weight)"],
            "variants": len(vs), "other_variants_detecting": also, "notes": ref_notes + c.notes}

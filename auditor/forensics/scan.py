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
    weight: np.ndarray            # torch layout
    candidate: int                # index into the candidate list
    undone: list[str] = field(default_factory=list)
    log10_family: float = 0.0     # log10 of how many hypotheses this variant stands for
    source: str = "suspect"
    out_fixed: bool = False       # output channels already in the key's order (anchors)
    reduced: dict = field(default_factory=dict)   # reduce -> reduced vector (float64), cached


@dataclass
class Candidate:
    view: Any                     # auditor.read.layout.TorchView
    array: Any = None             # its values (float32), read once
    cleaned: Any = None           # canon.Cleaned or None
    notes: list[str] = field(default_factory=list)
    bases: Any = None             # mark-independent variants, built on first use


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


def candidates(store, gv) -> list[Candidate]:
    """Distinct weights of rank >= 2 in every torch view, each cleaned of dummy / split neurons
    where its layer's neighbours can be traced."""
    from auditor.forensics import canon
    from auditor.read.layout import torch_views

    # each weight read once (in a background thread, unless the address space is limited), shared
    # by the views, the cleaning and the alignment
    store.keep_arrays(prefetch=_threads_ok())
    seen: dict[tuple, list[int]] = {}
    out: list[Candidate] = []
    for v in torch_views(store):
        if len(v.shape) < 2 or v.kind in ("rnn",) and v.transform.startswith("rnn:") and ":B" in v.transform:
            continue
        # a transposed view stays a view of the stored array (no copy of a large weight)
        a = store.array(v.weight.name).T if v.transform == "transpose" else np.asarray(v.array(), np.float32)
        h = (a.shape, _fingerprint(a))
        if any(np.array_equal(out[j].array, a) for j in seen.get(h, ())):
            continue
        seen.setdefault(h, []).append(len(out))
        cand = Candidate(v, a)
        if v.kind in ("conv", "linear") and v.transform in ("identity", "transpose"):
            lay = gv.layer_of_weight(v.weight.name)
            if lay is not None:
                torch_is_rows = (lay.out_axis == 0) == (v.transform == "identity")
                if torch_is_rows:
                    try:
                        cand.cleaned = canon.clean(gv, lay)
                    except (KeyError, ValueError) as e:
                        cand.notes.append(f"neighbours not read: {e}")
        out.append(cand)
    return out


def _fits(mark: WhiteboxMark, shape: tuple[int, ...]) -> bool:
    if mark.reduce == "mean":
        return tuple(shape[1:]) == tuple(mark.shape[1:])
    return tuple(shape) == tuple(mark.shape)


def _fit_input_perm(mark: WhiteboxMark, W: np.ndarray, sx: np.ndarray) -> np.ndarray:
    I = W.shape[1]
    w = W.mean(axis=0, dtype=np.float64).reshape(I, -1)
    S = sx.reshape(I, -1)
    r, c = linear_sum_assignment(-(S @ w.T))
    return W[:, c]


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
        base = [Variant(c.array, i, [])]
        cl = c.cleaned
        if cl is not None and cl.undone:
            base.append(Variant(cl.weight, i, list(cl.undone)))
        c.bases = base + _gamma_variants(c, i, base)
    return c.bases


def _gamma_variants(c: Candidate, i: int, base: list[Variant]) -> list[Variant]:
    cl = c.cleaned
    out = []
    if cl is None:
        return out
    for vec, what in ((cl.in_gamma, "input scales canonicalised: columns times the feeding BatchNorm's |gamma|"),
                      (cl.in_rownorm, "input scales canonicalised: columns times the feeding layer's row norms")):
        if vec is None:
            continue
        for b in base:
            if b.weight.ndim >= 2 and b.weight.shape[1] == vec.size:
                g = vec.reshape((1, -1) + (1,) * (b.weight.ndim - 2))
                out.append(Variant(b.weight * g, i, b.undone + [what], out_fixed=b.out_fixed))
    return out


def mark_variants(mark: WhiteboxMark, cands: list[Candidate], gv, extra: list[Variant],
                  alpha: float = stats.DEFAULT_ALPHA, skipped: list[str] | None = None) -> list[Variant]:
    """Every variant of every candidate that fits `mark` (and the aligned ones in `extra`).
    Permutation searches that could not reach `alpha` with the mark's bits are left out and
    described in `skipped`."""
    from auditor.forensics import canon

    sx = None
    out: list[Variant] = []
    skip: dict[str, int] = {}
    for i, c in enumerate(cands):
        base = [b for b in _bases(c, i) if _fits(mark, b.weight.shape)]
        cl = c.cleaned
        if cl is not None and mark.batchnorm and c.view.kind == "conv" and _fits(mark, cl.weight.shape):
            try:
                un = canon.anchor_unfold(gv, cl, mark.batchnorm)
            except (KeyError, ValueError):
                un = None
            if un is not None:
                anch = Variant(un[0], i, list(cl.undone) + [un[1]], out_fixed=True)
                base += [anch] + _gamma_variants(c, i, [anch])
        for b in base:
            out.append(b)
            O, I = b.weight.shape[0], b.weight.shape[1]
            if mark.reduce == "mean" and I > 1:
                what, fam = f"input permutation fitted to the key ({I}! tried)", log10_factorial(I)
                fit = lambda W, sx: _fit_input_perm(mark, W, sx)  # noqa: E731
            elif mark.reduce == "flatten" and b.out_fixed and I > 1:
                what, fam = f"input permutation fitted to the key ({I}! tried)", log10_factorial(I)
                fit = _fit_input_perm_flat
            elif mark.reduce == "flatten" and b.weight.ndim >= 2 and (O > 1 or I > 1):
                what = f"output and input permutations fitted to the key ({O}! x {I}! tried)"
                fam = log10_factorial(O) + log10_factorial(I)
                fit = lambda W, sx: _fit_both_perms(mark, W, sx)  # noqa: E731
            else:
                continue
            if not search_reachable(mark.n_bits, fam, alpha):
                label = what.replace(" tried)", ")").replace("fitted to the key ", "") + f": 10^{fam:.1f} permutations"
                skip[label] = skip.get(label, 0) + 1
                continue
            if sx is None:
                sx = (2.0 * mark.bits.astype(np.float64) - 1.0) @ mark.matrix()
            out.append(Variant(fit(b.weight, sx), i, b.undone + [what], fam))
    out.extend(v for v in extra if _fits(mark, v.weight.shape))
    if skipped is not None:
        T = mark.n_bits
        for what, n in skip.items():
            skipped.append(f"{what} x {n} view(s) not searched: with {T} bits even a perfect read "
                           f"(p = 10^{stats.log10_binom_tail_half(T, T):.1f}) times the permutations searched "
                           f"stays above alpha = {alpha:g}")
    return out


def _reduce(mark: WhiteboxMark, v: Variant) -> np.ndarray:
    """The variant's reduced vector (float64), cached on the variant: marks of one shape share it."""
    r = v.reduced.get(mark.reduce)
    if r is None:
        W = v.weight
        r = (W.mean(axis=0, dtype=np.float64).reshape(-1) if mark.reduce == "mean"
             else np.asarray(W, np.float64).reshape(-1))
        v.reduced[mark.reduce] = r
    return r


def _evidence(key: Key, mark: WhiteboxMark) -> dict[str, Any]:
    """Committed or uncommitted evidence (``auditor.marks.evidence``), as extract reports it."""
    from auditor.marks import evidence

    return evidence.classify_mark(mark)


def scan(model_path, keys: list[Key], references=(), alpha: float = stats.DEFAULT_ALPHA) -> dict[str, Any]:
    """Scan `model_path` for every white-box mark of every key. Returns the result body:
    findings (one per mark), what was tried (counts), and the verdict."""
    from auditor.read.weights import WeightStore

    if not keys:
        raise AuditError("no keys given")
    marks = [(k, m) for k in keys for m in k.whitebox]
    if not marks:
        raise AuditError("the keys hold no white-box mark")
    had_matrix = {id(m) for _, m in marks if m._X is not None}
    store = WeightStore.open(model_path)
    try:
        return _scan(store, keys, marks, had_matrix, references, alpha)
    finally:
        store.stop_prefetch()


def _scan(store, keys, marks, had_matrix, references, alpha) -> dict[str, Any]:
    from auditor.forensics import align, canon

    gv = canon.GraphValues(store)
    cands = candidates(store, gv)
    per_mark = []
    for key, mark in marks:
        extra: list[Variant] = []
        ref_notes: list[str] = []
        for ref in references:
            try:
                al = align.align_to_reference(gv, cands, ref, mark, alpha)
            except AuditError as e:
                ref_notes.append(f"{Path(ref).name}: {e}")
                continue
            for a in al:
                extra.append(Variant(a["weight"], a["candidate"], a["undone"], 0.0, source=f"reference {Path(ref).name}"))
            if not al:
                ref_notes.append(f"{Path(ref).name}: no layer of this file aligns with the marked layer")
        skipped: list[str] = []
        vs = mark_variants(mark, cands, gv, extra, alpha, skipped)
        per_mark.append((key, mark, vs, ref_notes, skipped))
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
    tried = {"keys": len(keys), "marks": len(marks), "candidate_tensors": len(cands),
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
                   "feeding layer's row norms: exact only where those were equal before the scaling), "
                   "and scales of the output channels are undone only with the key's BatchNorm anchors")
    blocked = sorted({b for c in cands if c.cleaned is not None for b in c.cleaned.blocked})
    out.extend(blocked[:8])
    return out


def _projections(per_mark, had_matrix: set[int]):
    """Y = X R for every mark (T x variants), in a small thread pool (generating a key's X and the
    product release the GIL). A projection the caller had not generated is dropped again once used,
    so memory stays at a few keys' X however many keys are scanned."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        _, mark, vs, _, _ = item
        if not vs:
            return None
        Y = mark.matrix() @ np.stack([_reduce(mark, v) for v in vs], axis=1)
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

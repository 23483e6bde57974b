"""Is a suspect model derived from the reference (quantized, pruned, fine-tuned, obfuscated),
or trained independently?

Per layer, after alignment (auditor.forensics.align: dummy / split neurons removed,
permutations and per-channel scales undone) with the matching fitted on the even
coefficient positions of each row only, each matched row o gets c_o, the correlation
of the suspect's and the reference's row on the *odd* positions (held out from the fit).

Test per layer (exact sign test): H0 "the median held-out row correlation is at most
RHO0" (RHO0 = 0.5, a similarity that independently trained networks of one
architecture do not reach: they learn similar features, so their matched rows
correlate, but weakly; measured below). Under H0, with rows independent, each row
exceeds RHO0 with probability <= 1/2, so p = P[Bin(n, 1/2) >= #{c_o > RHO0}] (exact,
integers); a reference row with no partner (pruned filter) counts as not exceeding.
What "derived" means: the weights share the reference's initialisation or training history. A
model trained on its own from the reference's initial weights is derived too (the layers training
moved little still match): measured on the basic-block net (bench/bench_blocks.py), 0 of 6 models
from other initialisations and 5 of 6 from the same initialisation with other batch orders (plus
the same-order twin) are called derived at alpha = 1e-6.
Layers are combined with Fisher's method (X^2 = -2 sum ln p_l, chi-square with 2L
degrees of freedom). When several suspect layers could end the chain (layers of the reference's
last layer's shape), every one is aligned and tested and the best is kept, its combined p
multiplied by their number (Bonferroni). Derived when the combined p < alpha (default 1e-6).

A relabelling (permutation) null was tried first and rejected: after alignment,
independently trained twins have held-out correlations of 0.03-0.2, small but far
above relabelled rows, because matched neurons compute similar functions; it called
independent twins derived. The false-positive rate of the sign test is measured on
independently trained models of the same architecture (`null_models`, different
seeds), each run through the same test: the result reports how many were called
derived and their smallest combined p (the margin to alpha).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import AuditError
from auditor.forensics import align, canon
from auditor.read import channels as ch

RHO0 = 0.5
DEFAULT_ALPHA = 1e-6
# What the test detects, stated in every result (measured in tests/test_forensics_blocks.py and
# bench/bench_blocks.py on the basic-block net: 0 of 6 models from other initialisations called
# derived, 5 of 6 from the reference's initialisation with other batch orders, and the twin).
DERIVED_MEANS = ("derived = after undoing permutations, scalings and added neurons, the suspect's weights still "
                 "carry the reference's initialisation or training history: copies and their fine-tuned, pruned, "
                 "quantized or obfuscated descendants, but also a model trained separately from the same initial "
                 "weights (layers that training moved little keep them); it does not tell copying from a shared "
                 "initialisation, and it is no evidence of a watermark")


def _layer_test(al: align.LayerAlignment, rho0: float) -> dict[str, Any]:
    from auditor.marks import stats

    O = al.ref_weight.shape[0]
    ok = al.perm >= 0
    A = al.recovered.reshape(O, -1)
    B = al.ref_weight.reshape(O, -1)
    held = np.arange(A.shape[1]) % 2 == 1
    a = A[:, held] - A[:, held].mean(axis=1, keepdims=True)
    b = B[:, held] - B[:, held].mean(axis=1, keepdims=True)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    c = np.where((den > 0) & ok, (a * b).sum(axis=1) / np.where(den > 0, den, 1.0), 0.0)
    k = int((c > rho0).sum())
    lp = stats.log10_binom_tail_half(O, k)
    return {"layer": al.ref_layer.name, "weight": al.ref_layer.weight, "suspect_layer": al.sus_layer.name,
            "rows": O, "unmatched": int((~ok).sum()), "rows_above_rho0": k,
            "median_r": float(np.median(c)), "p_value": stats.binom_tail_half(O, k), "log10_p": lp,
            "matching": al.method, "median_cosine_fit": float(np.median(al.cosine[ok])) if ok.any() else 0.0,
            "undone": al.undone}


def _fisher(log10_ps: list[float]) -> tuple[float, float, float]:
    """Fisher's X^2 and its chi-square tail. With df = 2L even the tail is exact in closed form,
    sf(x) = exp(-x/2) sum_{i<L} (x/2)^i / i!, summed in logs (scipy's logsf gives -inf past ~1e-300)."""
    from scipy.special import gammaln, logsumexp

    x2 = -2.0 * math.log(10.0) * sum(log10_ps)
    df = 2 * len(log10_ps)
    h = x2 / 2.0
    if h <= 0.0:
        return x2, df, 0.0
    i = np.arange(len(log10_ps))
    lp = float(-h + logsumexp(i * math.log(h) - gammaln(i + 1))) / math.log(10.0)
    return x2, df, min(0.0, lp)


def _deepest(gv: canon.GraphValues) -> ch.Layer:
    lays = ch.layers(gv.model, gv.graph)
    if not lays:
        raise AuditError("no Conv/Gemm/MatMul layer with a constant weight in the model")
    return max(lays, key=lambda l: (align.depth(gv, l), l.index))


def _best_chain(sgv, rgv, r_last: ch.Layer, rho0: float, probe, skip=frozenset()) -> dict[str, Any] | None:
    """The chain ending at r_last aligned from every suspect layer that could end it; the layers not in
    `skip` tested; the best chain kept, its Fisher p multiplied by the number of chains tried (Bonferroni).
    None when every aligned layer is in `skip`."""
    cands = align.suspect_layers_like(sgv, rgv, r_last)
    if not cands:
        why = getattr(sgv, "unread", None)
        raise AuditError("the suspect has no layer chain like the reference's "
                         + (f"(its int8 graph was not read as float: {why})" if why else "(different architecture?)"))
    best, err, tested = None, "", False
    for sl in cands:
        try:
            als = align.align_chain(sgv, sl, rgv, r_last, fit_half=True, probe_models=probe, streams=True)
        except AuditError as e:
            err = str(e)
            continue
        layers = [_layer_test(a, rho0) for a in als if a.ref_layer.weight not in skip]
        tested = True
        if not layers:
            continue
        x2, df, lp = _fisher([l["log10_p"] for l in layers])
        if best is None or lp < best["log10_p_combined"]:
            best = {"layers": layers, "fisher_x2": x2, "df": df, "log10_p_combined": lp}
    if not tested:
        raise AuditError(f"cannot align the suspect to the reference: {err}")
    if best is None:
        return None
    # the best of several suspect chains is kept: Bonferroni over every chain tried
    best["candidates"] = len(cands)
    best["log10_p_best_chain"] = best["log10_p_combined"]
    best["log10_p_combined"] = min(0.0, best["log10_p_combined"] + math.log10(len(cands)))
    return best


def test(suspect, reference, *, rho0: float = RHO0, all_layers: bool = False) -> dict[str, Any]:
    """The per-layer tests and their Fisher combination for one suspect (paths or WeightStores).

    Default: the deepest chain of the reference (streams included). ``all_layers``: then every
    reference layer that chain leaves out (other branches of residual blocks, the classifier),
    deepest first, each as the chain ending at it (layers already tested are aligned again, for
    the input order, but not tested twice); each chain's p is Bonferroni-corrected for its
    suspect candidates and the chains are combined by Fisher's method."""
    from auditor.read.weights import WeightStore

    s_store = suspect if not isinstance(suspect, (str, Path)) else WeightStore.open(suspect)
    r_store = reference if not isinstance(reference, (str, Path)) else WeightStore.open(reference)
    # a file saved at ORT_ENABLE_ALL is traced as the plain graph it computes, once per NCHWc block-size
    # reading (both 8 and 16 fit where every channel count is a multiple of 16): the best reading is
    # kept, its p multiplied by their number (Bonferroni)
    s_blocks, r_blocks = _readings(s_store), _readings(r_store)
    if len(s_blocks) * len(r_blocks) == 1:
        return _test(canon.GraphValues(s_store, s_blocks[0]), canon.GraphValues(r_store, r_blocks[0]),
                     rho0, all_layers)
    best, err, tried = None, None, 0
    for sb in s_blocks:
        for rb in r_blocks:
            tried += 1
            try:
                res = _test(canon.GraphValues(s_store, sb), canon.GraphValues(r_store, rb), rho0, all_layers)
            except AuditError as e:
                err = err or e
                continue
            if best is None or res["log10_p_combined"] < best["log10_p_combined"]:
                best = {**res, "nchwc_block": {"suspect": sb, "reference": rb}}
    if best is None:
        raise err
    best["nchwc_readings"] = tried
    best["log10_p_best_reading"] = best["log10_p_combined"]
    best["log10_p_combined"] = min(0.0, best["log10_p_combined"] + math.log10(tried))
    return best


def _blocks(chosen: dict) -> str:
    return ", ".join(f"{k} block {v}" for k, v in chosen.items() if v is not None)


def _readings(store) -> list[int | None]:
    """The NCHWc block sizes to read a file under (None: a file without NCHWc nodes)."""
    from auditor.read import nchwc_plain

    if not nchwc_plain.has_nchwc(store.model):
        return [None]
    return nchwc_plain.readings(store) or [None]


def _test(sgv, rgv, rho0: float, all_layers: bool) -> dict[str, Any]:
    r_last = _deepest(rgv)
    probe = (sgv.model, rgv.model) if align._inline(sgv.model) and align._inline(rgv.model) else None
    best = _best_chain(sgv, rgv, r_last, rho0, probe)
    if not all_layers:
        return best
    covered = {l["weight"] for l in best["layers"]}
    branches, untested = [], []
    order = sorted(ch.layers(rgv.model, rgv.graph), key=lambda l: (-align.depth(rgv, l), l.index))
    for r in order:
        if r.weight in covered:
            continue
        try:
            b = _best_chain(sgv, rgv, r, rho0, probe, skip=frozenset(covered))
        except AuditError as e:
            untested.append({"weight": r.weight, "reason": str(e)})
            covered.add(r.weight)
            continue
        covered.add(r.weight)
        if b is None:
            continue
        covered |= {l["weight"] for l in b["layers"]}
        branches.append({"last": r.weight, **b})
    chains = [best["log10_p_combined"]] + [b["log10_p_combined"] for b in branches]
    x2, df, lp = _fisher(chains)
    return {**best, "log10_p_main_chain": best["log10_p_combined"], "branches": branches, "untested": untested,
            "chains": len(chains), "fisher_x2_chains": x2, "df_chains": df, "log10_p_combined": lp}


def provenance(suspect_path, reference_path, *, null_models=(), alpha: float = DEFAULT_ALPHA,
               rho0: float = RHO0, all_layers: bool = False) -> dict[str, Any]:
    """Result body: per-layer tests, combined p, verdict, and the measured false-positive rate."""
    res = test(suspect_path, reference_path, rho0=rho0, all_layers=all_layers)
    lp = res["log10_p_combined"]
    derived = lp < math.log10(alpha)
    out = {"verdict": "derived" if derived else "not derived", "alpha": alpha, **res,
           "p_combined": 10.0 ** lp, "rho0": rho0,
           "null": (f"per layer: the median held-out row correlation is at most {rho0:g} (exact sign test); "
                    f"layers combined by Fisher's method; Bonferroni over the {res['candidates']} suspect "
                    f"chain(s) tried" + (f"; {res['chains']} chains (every layer) combined by Fisher's method, "
                                          f"each Bonferroni-corrected for its suspect chains" if all_layers else "")
                    + (f"; Bonferroni over the {res['nchwc_readings']} NCHWc block-size readings of the "
                       f"ORT_ENABLE_ALL file(s) (best: {_blocks(res['nchwc_block'])})" if res.get("nchwc_readings") else "")),
           "fit": "rows matched on even coefficient positions, tested on the odd ones (held out)",
           "derived_means": DERIVED_MEANS}
    if null_models:
        nulls = []
        for m in null_models:
            r = test(m, reference_path, rho0=rho0, all_layers=all_layers)
            nulls.append({"path": str(m), "log10_p_combined": r["log10_p_combined"],
                          "derived": r["log10_p_combined"] < math.log10(alpha)})
        fp = sum(1 for n in nulls if n["derived"])
        out["calibration"] = {"independent_models": nulls, "false_positives": fp, "n": len(nulls),
                              "false_positive_rate": fp / len(nulls),
                              "min_log10_p": min(n["log10_p_combined"] for n in nulls)}
    return out

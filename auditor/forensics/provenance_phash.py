"""Provenance from behaviour (``wmaudit provenance --method phash``): is a suspect derived from the
reference, judged by the perceptual hashes of one tensor on a probe set, when the weights cannot
be aligned (another architecture imitating the reference, a distilled copy, a file whose layers
the channel trace refuses).

Per probe (auditor.phash.fingerprint's hash: the probe's features at one tensor, centred per
unit). The probes are split by position: the even ones fit the per-unit centres of each model,
the odd ones are tested (held out, as the weights method holds out odd coefficients). For a
held-out probe i the agreement c_i is the cosine of the two models' centred feature vectors.
The score is the median of c_i; the decision rule is score >= threshold (default 0.5, the
fingerprint's threshold).

What the statistics say, and what they do not:

* Agreement test (always): H0 "the median per-probe agreement is at most the threshold", with
  the probes an i.i.d. sample of the probe distribution; given the fit half, the held-out c_i
  are then i.i.d. and each exceeds the threshold with probability <= 1/2, so
  p = P[Bin(n, 1/2) >= #{c_i > threshold}] (exact). This is a statement about the agreement,
  not about independence: models trained on one task agree on their outputs (measured: the
  logits of independently trained SmallCNNs on Fashion-MNIST images agree at 0.94), so it is
  evidence of derivation only where independent models stay below the threshold, which only
  null models measure.
* With null models (``--null``, independently trained models, i.e. the population H0 speaks
  of): the suspect's score ranked among theirs, p = (1 + #{null score >= score}) / (n + 1),
  exact when the suspect is exchangeable with the null models under H0, resolution 1/(n + 1);
  the false-positive rate at the threshold is #{null score >= threshold} / n. Derived when the
  score reaches the threshold and exceeds every null model's score (rank p = 1/(n + 1)).
* Without null models: no p-value for "independently trained" is given; the verdict is the
  decision rule at the false-positive rate it was measured at (``CALIBRATED``), and the output
  says so.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import AuditError

DEFAULT_THRESHOLD = 0.5
MIN_PROBES = 8
CALIBRATED = ("threshold 0.5 measured at 0 false positives of 2 independently trained models (phash "
              "fixture, 512-unit pooling tensor, its 64 probes) and 0 of 4 (forensics-twin-seed1/2 and "
              "their obfuscated copies, the SmallCNN's outputs on 64 uniform-noise probes); "
              "tests/test_forensics_provenance_phash.py")
AGREEMENT_NULL = ("the median per-probe agreement (cosine of centred features, held-out probes) is at most "
                  "the threshold; probes i.i.d. (exact sign test)")


def read_probes(path: str | os.PathLike, model) -> tuple[np.ndarray, dict[str, Any]]:
    """Probe inputs for ``model`` through the data layer (shape / dtype checked) and their description."""
    from auditor.data.inputs import load_data
    from auditor.results import file_sha256

    ds = load_data(str(path), model, purpose="evaluation")
    if len(ds.inputs) != 1:
        raise AuditError(f"--method phash needs a model with one input; this one has {len(ds.inputs)}")
    x = next(iter(ds.inputs.values()))
    if not np.issubdtype(x.dtype, np.floating):
        raise AuditError(f"--method phash feeds float images; the model's input is {x.dtype}")
    if x.shape[0] < MIN_PROBES:
        raise AuditError(f"{path}: {x.shape[0]} probes; the phash method needs at least {MIN_PROBES} "
                         f"(half fit the centres, half are tested)")
    p = Path(path)
    desc = {"path": str(path), "count": int(x.shape[0]), "source": ds.source,
            "sha256": file_sha256(p) if p.is_file() else ds.digest,
            "sha256_of": "the probe file" if p.is_file() else "the decoded probe arrays (a folder)"}
    return x, desc


def features(model, x: np.ndarray, layer: str | None) -> tuple[np.ndarray, str]:
    """[N, D] features of ``x`` at ``layer`` (None: the model's first output) and the tensor's name;
    ``model`` is a path or a loaded ModelProto."""
    import onnx

    from auditor.attacks import load_model
    from auditor.phash import features as F

    m = model if isinstance(model, onnx.ModelProto) else load_model(model)
    name = layer if layer is not None else (m.graph.output[0].name if m.graph.output else None)
    if name is None:
        raise AuditError("the model has no outputs")
    return F.features(m, x, layer), name


def agreement(fr: np.ndarray, fs: np.ndarray) -> np.ndarray:
    """Per held-out (odd) probe: cosine of the two models' features centred by the fit (even) probes."""
    n = fr.shape[0]
    fit = np.arange(n) % 2 == 0
    fr, fs = np.asarray(fr, np.float64), np.asarray(fs, np.float64)
    # auditor.phash.fingerprint.probe_hash centres by every probe, which couples the tested probes;
    # centres from the fit half leave the held-out agreements independent given that half
    a = fr[~fit] - fr[fit].mean(0)
    b = fs[~fit] - fs[fit].mean(0)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    ok = (na > 0) & (nb > 0)
    c = np.zeros(a.shape[0])
    c[ok] = np.sum(a[ok] * b[ok], axis=1) / (na[ok] * nb[ok])
    return c


def score_one(model_path, ref_feats: np.ndarray, x: np.ndarray, layer: str | None,
              threshold: float, model=None) -> dict[str, Any]:
    """The per-probe agreement of one model with the reference's features, its score and sign test
    (``model``: the loaded ModelProto of ``model_path``, when the caller has it)."""
    from auditor.marks import stats

    fs, name = features(model if model is not None else model_path, x, layer)
    if fs.shape[1] != ref_feats.shape[1]:
        raise AuditError(f"{model_path}: tensor {name!r} has {fs.shape[1]} values per probe, the reference's "
                         f"{ref_feats.shape[1]}; compare the outputs (no --layer) or name a tensor of the same "
                         f"size with --suspect-layer")
    c = agreement(ref_feats, fs)
    n, k = int(c.size), int((c > threshold).sum())
    return {"layer": name, "units": int(fs.shape[1]), "score": float(np.median(c)),
            "per_probe": {"tested": n, "above_threshold": k, "median": float(np.median(c)),
                          "p05": float(np.quantile(c, 0.05)), "min": float(c.min())},
            "agreement_test": {"null": AGREEMENT_NULL, "above": k, "n": n,
                               "p_value": stats.binom_tail_half(n, k), "log10_p": stats.log10_binom_tail_half(n, k)}}


def provenance(suspect_path, reference_path, probes_path, *, layer: str | None = None,
               suspect_layer: str | None = None, null_models=(), threshold: float = DEFAULT_THRESHOLD
               ) -> dict[str, Any]:
    """Result body of ``wmaudit provenance --method phash`` (see the module docstring)."""
    from auditor.attacks import load_model

    if not -1.0 <= threshold < 1.0:
        raise AuditError(f"--threshold must be in [-1, 1), got {threshold}")
    ref_model, sus_model = load_model(reference_path), load_model(suspect_path)
    x_ref, probes = read_probes(probes_path, ref_model)
    x_sus, _ = read_probes(probes_path, sus_model)
    fr, r_name = features(ref_model, x_ref, layer)
    s_layer = suspect_layer if suspect_layer is not None else layer
    sus = score_one(suspect_path, fr, x_sus, s_layer, threshold, model=sus_model)
    out: dict[str, Any] = {
        "method": "phash", "probes": {**probes, "fit": int((np.arange(probes["count"]) % 2 == 0).sum()),
                                      "tested": sus["per_probe"]["tested"],
                                      "split": "even probes fit the per-unit centres, odd probes are tested"},
        "layers": {"reference": r_name, "suspect": sus["layer"]}, "units": sus["units"],
        "score": sus["score"], "statistic": "median over held-out probes of the cosine of centred features",
        "threshold": float(threshold), "per_probe": sus["per_probe"], "agreement_test": sus["agreement_test"]}
    if null_models:
        nulls = []
        for m in null_models:
            null_model = load_model(m)
            x_m, _ = read_probes(probes_path, null_model)
            r = score_one(m, fr, x_m, s_layer, threshold, model=null_model)
            nulls.append({"path": str(m), "layer": r["layer"], "score": r["score"]})
        n = len(nulls)
        ge = sum(1 for v in nulls if v["score"] >= sus["score"])
        fp = sum(1 for v in nulls if v["score"] >= threshold)
        p = (1 + ge) / (n + 1)
        derived = sus["score"] >= threshold and ge == 0
        out.update({
            "null": (f"the suspect is one more independently trained model like the {n} null models "
                     f"(exchangeable): p = (1 + #null scores >= the suspect's) / (n + 1), exact, "
                     f"resolution 1/{n + 1}"),
            "p_value": p, "log10_p": math.log10(p), "p_resolution": 1.0 / (n + 1),
            "calibration": {"independent_models": nulls, "n": n, "rank_above": n - ge,
                            "false_positives": fp, "false_positive_rate": fp / n,
                            "max_null_score": max(v["score"] for v in nulls)},
            "decision": (f"derived when the score reaches {threshold:g} and exceeds every null model's score "
                         f"(rank p = 1/{n + 1})")})
    else:
        derived = sus["score"] >= threshold
        out.update({
            "null": "none given: no p-value for 'independently trained' without --null models",
            "p_value": None, "log10_p": None,
            "calibration": {"n": 0, "measured_elsewhere": CALIBRATED},
            "decision": (f"decision rule only: derived when the score reaches {threshold:g}; its false-positive "
                         f"rate was measured elsewhere ({CALIBRATED}), not on this model's population")})
    out["verdict"] = "derived" if derived else "not derived"
    return out

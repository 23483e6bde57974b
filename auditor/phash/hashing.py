"""Building and matching perceptual hashes through ONNX models.

Latent of an image: features of the hash's tensor, then the reduction
(``none``; ``pca``: (f - mean) @ components.T; ``encoder``: an ONNX file run on
the features). Hash: centroid = mean latent of the Signal images used for the
centroid; R = the q-quantile (default 0.95, numpy ``higher``: an observed
distance) of the distances to the centroid of *held-out* Signal images, so the
expected rate of held-out Signal edits within R is about q. Held-out images are
either given (``heldout``) or a seeded split of ``signal`` (``holdout``
fraction, default 0.5). An image matches when distance / R <= 1.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from auditor.errors import AuditError
from auditor.phash import features as F
from auditor.phash.hashfile import PerceptualHash

DEFAULT_Q = 0.95
DEFAULT_HOLDOUT = 0.5


def parse_reduce(spec: str) -> tuple[str, int | None]:
    """``none`` or ``pca:K``."""
    if spec == "none":
        return "none", None
    if spec.startswith("pca:"):
        try:
            k = int(spec[4:])
        except ValueError:
            k = 0
        if k >= 1:
            return "pca", k
    raise AuditError(f"--reduce must be none or pca:K with K >= 1, got {spec!r}")


def fit_pca(f: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], components [K, D]) of ``f`` by SVD; the sign of each component is fixed
    (largest coefficient positive) so that the same data always gives the same hash."""
    if k > min(f.shape):
        raise AuditError(f"pca:{k} needs at least {k} images and {k} features (have {f.shape[0]} x {f.shape[1]})")
    mean = f.mean(0, dtype=np.float64)
    _, _, vt = np.linalg.svd(f.astype(np.float64) - mean, full_matrices=False)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    return mean, comps * signs[:, None]


def encoder_io(model: onnx.ModelProto) -> tuple[str, str]:
    name, _ = F.input_info(model)
    if not model.graph.output:
        raise AuditError("the encoder has no outputs")
    return name, model.graph.output[0].name


def reduce_features(f: np.ndarray, reduce: dict[str, Any], encoder: onnx.ModelProto | None = None) -> np.ndarray:
    """Latents [N, K] from features [N, D] under the hash's reduction."""
    kind = reduce["kind"]
    if kind == "none":
        return f.astype(np.float64)
    if kind == "pca":
        mean = np.asarray(reduce["mean"], np.float64)
        comps = np.asarray(reduce["components"], np.float64)
        if f.shape[1] != mean.shape[0]:
            raise AuditError(f"features have {f.shape[1]} values, the hash's PCA expects {mean.shape[0]}")
        return (f.astype(np.float64) - mean) @ comps.T
    if kind == "encoder":
        if encoder is None:
            raise AuditError("the hash needs its encoder")
        _, out = encoder_io(encoder)
        _, shape = F.input_info(encoder)
        if len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0 and shape[1] != f.shape[1]:
            raise AuditError(f"features have {f.shape[1]} values, the encoder expects {shape[1]}")
        return F.run(encoder, f, out).astype(np.float64)
    raise AuditError(f"unknown reduction {kind!r}")


def load_encoder(h: PerceptualHash) -> onnx.ModelProto | None:
    if h.reduce["kind"] != "encoder":
        return None
    from auditor.attacks import load_model

    return load_model(h.encoder_path())


def latents(model: onnx.ModelProto, x: np.ndarray, h: PerceptualHash, encoder: onnx.ModelProto | None = None) -> np.ndarray:
    f = F.features(model, x, h.layer)
    if h.feature_dim is not None and f.shape[1] != h.feature_dim:
        raise AuditError(f"tensor {h.layer!r} has {f.shape[1]} values per image, the hash was built on {h.feature_dim}")
    return reduce_features(f, h.reduce, encoder if encoder is not None else load_encoder(h))


def distances(z: np.ndarray, h: PerceptualHash) -> np.ndarray:
    """Distance of each latent to the centroid, in units of R."""
    c = np.asarray(h.centroid, np.float64)
    if z.shape[1] != c.shape[0]:
        raise AuditError(f"latents have {z.shape[1]} values, the hash's centroid {c.shape[0]}")
    return np.linalg.norm(z - c, axis=1) / h.radius


def auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """P[score(pos) > score(neg)] + P[tie]/2 (Mann-Whitney); scores: higher = more Signal-like."""
    pos, neg = np.asarray(pos_scores, np.float64), np.asarray(neg_scores, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    from scipy.stats import rankdata

    ranks = rankdata(allv)
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def roc(pos_dist: np.ndarray, neg_dist: np.ndarray, points: int = 21) -> list[dict[str, float]]:
    """TPR / FPR when the radius is scaled by t (match when distance/R <= t), t from 0 to 2."""
    out = []
    for t in np.linspace(0.0, 2.0, points):
        out.append({"t": round(float(t), 4), "tpr": float(np.mean(pos_dist <= t)) if len(pos_dist) else float("nan"),
                    "fpr": float(np.mean(neg_dist <= t)) if len(neg_dist) else float("nan")})
    return out


def _describe(x: np.ndarray, source: str) -> dict[str, Any]:
    import hashlib

    return {"source": source, "n": int(x.shape[0]),
            "sha256": "sha256:" + hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes()).hexdigest()}


def build(model_path: str | os.PathLike, signal: np.ndarray, *, noise: np.ndarray | None = None,
          heldout: np.ndarray | None = None, layer: str | None = None, reduce: str = "none",
          encoder_path: str | os.PathLike | None = None, out_folder: str | os.PathLike | None = None,
          q: float = DEFAULT_Q, holdout: float = DEFAULT_HOLDOUT, seed: int = 0,
          sources: dict[str, str] | None = None) -> PerceptualHash:
    """A hash of ``signal`` through ``model_path`` at ``layer`` (see the module docstring).

    With ``noise``, PCA is fitted on the centroid Signal images and the Noise images
    (without, on the Signal images alone), and the build records the in-sample
    Noise match rate and AUC. ``encoder_path`` must lie in ``out_folder`` (the hash
    file's folder), where the hash records it by a relative path and its sha256."""
    from auditor.attacks import load_model
    from auditor.results import file_sha256

    if not 0.0 < q <= 1.0:
        raise AuditError(f"quantile q must be in (0, 1], got {q}")
    sources = sources or {}
    kind, k = parse_reduce(reduce) if encoder_path is None else ("encoder", None)
    if encoder_path is not None and reduce != "none":
        raise AuditError("give either --reduce pca:K or --encoder, not both")
    if encoder_path is not None:
        folder = Path(out_folder or ".").resolve()
        enc = Path(encoder_path).resolve()
        if folder != enc.parent and folder not in enc.parents:
            raise AuditError(f"the encoder {encoder_path} must lie in the hash file's folder {folder}")
    model = load_model(model_path)
    input_name, input_shape = F.input_info(model)
    if heldout is None:
        if not 0.0 < holdout < 1.0:
            raise AuditError(f"holdout fraction must be in (0, 1), got {holdout}")
        n_hold = int(round(len(signal) * holdout))
        if n_hold < 1 or len(signal) - n_hold < 1:
            raise AuditError(f"{len(signal)} Signal images cannot be split into centroid and held-out parts")
        perm = np.random.default_rng(seed).permutation(len(signal))
        cent_x, held_x = signal[np.sort(perm[n_hold:])], signal[np.sort(perm[:n_hold])]
        split = f"seeded permutation (seed {seed}): {len(cent_x)} for the centroid, {len(held_x)} held out"
    else:
        cent_x, held_x = signal, heldout
        split = "held-out Signal images given separately"
    f_cent = F.features(model, cent_x, layer)
    f_held = F.features(model, held_x, layer)
    f_noise = F.features(model, noise, layer) if noise is not None else None
    enc_model = None
    if kind == "none":
        red: dict[str, Any] = {"kind": "none"}
    elif kind == "pca":
        fit_on = f_cent if f_noise is None else np.concatenate([f_cent, f_noise])
        mean, comps = fit_pca(fit_on, k)
        red = {"kind": "pca", "k": k, "mean": mean.tolist(), "components": comps.tolist(),
               "fitted_on": "centroid Signal images" + (" and Noise images" if f_noise is not None else "")}
    else:
        enc_model = load_model(enc)
        e_in, e_out = encoder_io(enc_model)
        red = {"kind": "encoder", "path": enc.relative_to(folder).as_posix(), "sha256": file_sha256(enc),
               "input": e_in, "output": e_out}
    z_cent = reduce_features(f_cent, red, enc_model)
    z_held = reduce_features(f_held, red, enc_model)
    centroid = z_cent.mean(0)
    d_held = np.linalg.norm(z_held - centroid, axis=1)
    radius = float(np.quantile(d_held, q, method="higher"))
    if not radius > 0:
        raise AuditError(f"radius R = {radius} (held-out Signal latents coincide with the centroid); R must be > 0")
    h = PerceptualHash(model_sha256=file_sha256(model_path), input_name=input_name, input_shape=input_shape,
                       layer=layer, reduce=red, centroid=centroid, radius=radius,
                       radius_rule={"kind": "quantile-of-heldout-signal", "q": float(q), "n_centroid": int(len(cent_x)),
                                    "n_heldout": int(len(held_x)), "split": split, "seed": int(seed)},
                       feature_dim=int(f_cent.shape[1]),
                       signal=_describe(signal, sources.get("signal", "signal")),
                       noise=_describe(noise, sources.get("noise", "noise")) if noise is not None else None,
                       folder=Path(out_folder).resolve() if out_folder else None)
    build_info: dict[str, Any] = {"heldout_signal_match_rate": float(np.mean(d_held <= radius))}
    if f_noise is not None:
        d_noise = np.linalg.norm(reduce_features(f_noise, red, enc_model) - centroid, axis=1)
        build_info["noise_match_rate_in_sample"] = float(np.mean(d_noise <= radius))
        build_info["auc_heldout_signal_vs_noise"] = auc(-d_held, -d_noise)
    h.build = build_info
    return h


def check_model(model_path: str | os.PathLike, h: PerceptualHash) -> None:
    """Refuse a hash made for another model."""
    from auditor.results import file_sha256

    got = file_sha256(model_path)
    if got != h.model_sha256:
        raise AuditError(f"the hash was built for model {h.model_sha256[:19]}…, "
                         f"{Path(model_path).name} is {got[:19]}…")


def decide(model: onnx.ModelProto, x: np.ndarray, h: PerceptualHash, encoder: onnx.ModelProto | None = None) -> np.ndarray:
    """Distances in units of R for every image of ``x``."""
    return distances(latents(model, x, h, encoder), h)


def match(model_path: str | os.PathLike, h: PerceptualHash, x: np.ndarray) -> dict[str, Any]:
    """Per image: distance / R and the decision; ``match_rate``."""
    from auditor.attacks import load_model

    check_model(model_path, h)
    d = decide(load_model(model_path), x, h)
    return {"n": int(len(d)), "matched": int((d <= 1.0).sum()), "match_rate": float(np.mean(d <= 1.0)),
            "images": [{"index": i, "distance_r": float(v), "match": bool(v <= 1.0)} for i, v in enumerate(d)]}

"""Black-box watermarks: trigger sets and visual logos, judged from queries only.

Key section (``key.json`` -> ``"blackbox"``; schema in
``auditor/schemas/key.schema.json``)::

    "blackbox": {
      "triggers": {                      # Adi / Zhang style trigger set
        "images": {"path": "triggers.npy", "sha256": "..."},   # N x C x H x W
        "labels": [3, 7, ...],           # target label of every key image
        "num_classes": 10,
        "kind": "content|noise|pattern|imported",
        "preprocess": {...},             # see Preprocess
        "outputs": "auto|logits|probabilities",
        "null_rate": {"value": 0.1, "source": "1/C"}        # optional
      },
      "logo": {                          # Sakazawa et al. (MIPR 2019)
        "images": {"path": "logo_keys.npy", "sha256": "..."},
        "groups": [0, 0, ..., 9],        # which part of the logo each key image carries
        "logo": {"path": "logo.npy", "sha256": "..."},      # H x W in [0, 1]
        "num_classes": 10, "layout": [10, 10],
        "preprocess": {...}, "outputs": "logits"
      }
    }

Sidecar paths are relative to the key's folder (``keys.safe_sidecar``) and
checked against their sha256.

Logo layout: the logo is flattened row-major into H*W values and cut into
G = ceil(H*W / C) consecutive chunks of C values (zero-padded); the key images
of group g were trained towards the soft label chunk_g / sum(chunk_g) (uniform
when the chunk is all zero). Decoding queries the key images, sums the output
probabilities of the first k images of each group and lays the sums out
2-D again (seed 4.2, fig. 4-5).

Statistics: trigger hits against a null rate p0 (exact binomial tail,
``stats.binom_tail``); logo by Pearson r with a seeded permutation p-value
(sequential Monte Carlo: stops after ``h`` exceedances, Besag & Clifford 1991)
reported per k, and the verdict by the exact permutation distribution of the
rank sum over the logo's on-pixels within class columns (van Elteren; no Monte
Carlo resolution limit).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from auditor.marks import keys as keys_mod
from auditor.marks import stats
from auditor.errors import AuditError

DEFAULT_COUNTS = (1, 3, 5, 10, 20)
DEFAULT_PERMUTATIONS = 10_000
REFERENCE_CONFIDENCE = 0.95


# ---------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocess:
    """How key images become model inputs, and back to pixels for query attacks.

    Key images are stored N x C x H x W. ``stored`` says what they hold:
    ``"input"`` (default) -- already the model's input values, fed as they are;
    ``"pixels"`` -- pixel values, mapped to the input by (pixels*scale - mean)/std
    (per channel). In both cases pixels = (input*std + mean)/scale, which query
    attacks use; ``pixel_range`` is the range pixels live in (e.g. [0, 255]).
    ``layout`` is the model input layout (NCHW or NHWC).
    """

    stored: str = "input"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    pixel_range: tuple[float, float] | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "Preprocess":
        d = dict(d or {})
        mean, std = d.get("mean", 0.0), d.get("std", 1.0)
        p = cls(stored=d.get("stored", "input"), scale=float(d.get("scale", 1.0)),
                mean=tuple(float(v) for v in np.atleast_1d(mean)),
                std=tuple(float(v) for v in np.atleast_1d(std)),
                layout=d.get("layout", "NCHW"),
                pixel_range=tuple(float(v) for v in d["pixel_range"]) if d.get("pixel_range") else None)
        if p.stored not in ("input", "pixels"):
            raise AuditError(f"preprocess.stored must be 'input' or 'pixels', got {p.stored!r}")
        if p.layout not in ("NCHW", "NHWC"):
            raise AuditError(f"preprocess.layout must be NCHW or NHWC, got {p.layout!r}")
        if p.scale == 0 or any(s == 0 for s in p.std):
            raise AuditError("preprocess scale and std must be non-zero")
        if p.pixel_range is not None and (len(p.pixel_range) != 2 or not p.pixel_range[0] < p.pixel_range[1]):
            raise AuditError(f"preprocess.pixel_range must be [low, high] with low < high, got {list(p.pixel_range)}")
        return p

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"stored": self.stored, "scale": self.scale, "mean": list(self.mean),
                             "std": list(self.std), "layout": self.layout}
        if self.pixel_range is not None:
            d["pixel_range"] = list(self.pixel_range)
        return d

    def _stats(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(self.mean, np.float64)
        std = np.asarray(self.std, np.float64)
        if mean.size not in (1, c) or std.size not in (1, c):
            raise AuditError(f"preprocess mean/std have {mean.size}/{std.size} values for {c} channels")
        return mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)

    def to_pixels(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, np.float64)
        if self.stored == "pixels":
            return x
        mean, std = self._stats(x.shape[1])
        return (x * std + mean) / self.scale

    def from_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels -> values in the stored space of the key images."""
        x = np.asarray(pixels, np.float64)
        if self.stored == "pixels":
            return x
        mean, std = self._stats(x.shape[1])
        return (x * self.scale - mean) / std

    def model_input(self, images: np.ndarray) -> np.ndarray:
        """Stored key images -> float32 model input in the model's layout."""
        x = np.asarray(images, np.float64)
        if self.stored == "pixels":
            mean, std = self._stats(x.shape[1])
            x = (x * self.scale - mean) / std
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def range_of_pixels(self, pixels: np.ndarray) -> tuple[float, float]:
        """The stated pixel range, else [0, 1] or [0, 255] when the pixels fit one."""
        if self.pixel_range is not None:
            return self.pixel_range
        lo, hi = float(np.min(pixels)), float(np.max(pixels))
        for r in ((0.0, 1.0), (0.0, 255.0)):
            if lo >= r[0] - 1e-6 and hi <= r[1] + 1e-6:
                return r
        raise AuditError("query attacks need the pixel range: add preprocess.pixel_range to the key")


# ---------------------------------------------------------------- key sections
@dataclass
class TriggerSet:
    images: np.ndarray  # N x C x H x W, stored space
    labels: np.ndarray  # int64 [N]
    num_classes: int
    preprocess: Preprocess
    outputs: str = "auto"
    null_rate: dict[str, Any] | None = None
    kind: str = "imported"


@dataclass
class LogoMark:
    images: np.ndarray  # N x C x H x W
    groups: np.ndarray  # int64 [N]
    logo: np.ndarray  # H x W float64 in [0, 1]
    num_classes: int
    preprocess: Preprocess
    outputs: str = "auto"

    @property
    def n_groups(self) -> int:
        return n_groups(self.logo.shape, self.num_classes)


def _sidecar(base: Path, ref: dict[str, Any], what: str) -> np.ndarray:
    path = keys_mod.safe_sidecar(base, ref["path"])
    arr = keys_mod._load_npy(path, ref.get("sha256"))
    if arr.dtype.kind not in "biuf":
        raise AuditError(f"{what} sidecar {ref['path']} holds {arr.dtype}, expected numbers")
    return arr


def _base(key) -> Path:
    return Path(key.path).parent if getattr(key, "path", None) else Path(".")


def load_triggers(key) -> TriggerSet:
    """The key's trigger set, sidecars read and checked. AuditError when absent or inconsistent."""
    sec = (key.blackbox or {}).get("triggers")
    if not sec:
        raise AuditError("the key has no black-box trigger set (blackbox.triggers)")
    images = _sidecar(_base(key), sec["images"], "trigger images")
    labels = np.asarray(sec["labels"], dtype=np.int64)
    C = int(sec["num_classes"])
    if images.ndim != 4:
        raise AuditError(f"trigger images must be N x C x H x W, got shape {list(images.shape)}")
    if len(labels) != len(images):
        raise AuditError(f"{len(images)} trigger images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= C):
        raise AuditError(f"trigger labels must lie in 0..{C - 1}")
    return TriggerSet(images=images, labels=labels, num_classes=C,
                      preprocess=Preprocess.from_json(sec.get("preprocess")),
                      outputs=sec.get("outputs", "auto"), null_rate=sec.get("null_rate"),
                      kind=sec.get("kind", "imported"))


def load_logo(key) -> LogoMark:
    sec = (key.blackbox or {}).get("logo")
    if not sec:
        raise AuditError("the key has no logo mark (blackbox.logo)")
    base = _base(key)
    images = _sidecar(base, sec["images"], "logo key images")
    logo = np.asarray(_sidecar(base, sec["logo"], "logo"), dtype=np.float64)
    groups = np.asarray(sec["groups"], dtype=np.int64)
    C = int(sec["num_classes"])
    if logo.ndim != 2 or list(logo.shape) != [int(v) for v in sec.get("layout", logo.shape)]:
        raise AuditError(f"logo must be a 2-D array of the stated layout, got {list(logo.shape)}")
    if not np.isfinite(logo).all() or logo.min() < 0 or logo.max() > 1:
        raise AuditError("logo values must lie in [0, 1]")
    if images.ndim != 4 or len(groups) != len(images):
        raise AuditError(f"logo key images ({list(images.shape)}) and groups ({len(groups)}) disagree")
    G = n_groups(logo.shape, C)
    if groups.size and (groups.min() < 0 or groups.max() >= G):
        raise AuditError(f"logo groups must lie in 0..{G - 1} ({logo.shape[0]}x{logo.shape[1]} logo, {C} outputs)")
    return LogoMark(images=images, groups=groups, logo=logo, num_classes=C,
                    preprocess=Preprocess.from_json(sec.get("preprocess")), outputs=sec.get("outputs", "auto"))


def verify_blackbox_key(key) -> None:
    """`key verify`: the black-box sections' sidecars read and checked as `query` and the gate read
    them (ranks, counts, label and group ranges, logo values), so a broken key fails here first."""
    bb = key.blackbox or {}
    if bb.get("triggers"):
        t = load_triggers(key)
        if t.images.size and not np.isfinite(np.asarray(t.images, np.float64)).all():
            raise AuditError("trigger images hold NaN or Inf values")
    if bb.get("logo"):
        lg = load_logo(key)
        if lg.images.size and not np.isfinite(np.asarray(lg.images, np.float64)).all():
            raise AuditError("logo key images hold NaN or Inf values")


# ---------------------------------------------------------------- queries
def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def as_probabilities(out: np.ndarray, outputs: str = "auto") -> np.ndarray:
    """Model outputs [N, C] -> probabilities. ``auto``: kept when rows are already
    non-negative and sum to 1 (within 1e-3), softmax otherwise."""
    out = np.asarray(out, np.float64).reshape(len(out), -1)
    if outputs == "probabilities":
        return out
    if outputs == "auto" and out.size and out.min() >= 0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return out
    return softmax(out)


def query(runner, images: np.ndarray, preprocess: Preprocess, *, batch_size: int = 64,
          attack: str | None = None, attack_seed: int = 0) -> np.ndarray:
    """Raw outputs [N, C] of ``runner`` for the key images (after an optional query attack)."""
    x = images
    if attack:
        from auditor.attacks.query import apply_attack

        pixels = preprocess.to_pixels(images)
        attacked = apply_attack(attack, pixels, preprocess.range_of_pixels(pixels), seed=attack_seed)
        x = preprocess.from_pixels(attacked)
    out = runner.infer_batches(preprocess.model_input(x), batch_size=batch_size)
    return np.asarray(out).reshape(len(images), -1)


# ---------------------------------------------------------------- trigger statistics
def clopper_pearson_upper(k: int, n: int, confidence: float = REFERENCE_CONFIDENCE) -> float:
    """One-sided upper confidence bound on a rate from k hits in n trials (exact)."""
    if n <= 0:
        raise AuditError("no reference queries to measure a null rate from")
    if k >= n:
        return 1.0
    tail = 1.0 - confidence
    lo, hi = k / n, 1.0
    for _ in range(100):  # P[Bin(n, u) <= k] decreases in u; find where it equals 1-confidence
        mid = 0.5 * (lo + hi)
        if 1.0 - stats.binom_tail(n, k + 1, mid) > tail:
            lo = mid
        else:
            hi = mid
    return hi


def null_rate_from_references(hits: list[int], n: int, names: list[str]) -> dict[str, Any]:
    """p0 from unmarked reference models: the 95 % one-sided Clopper-Pearson upper
    bound of their pooled trigger accuracy (conservative: a larger p0 only raises p)."""
    total, trials = int(sum(hits)), n * len(hits)
    return {"value": clopper_pearson_upper(total, trials), "observed": total / trials,
            "hits": total, "trials": trials, "confidence": REFERENCE_CONFIDENCE,
            "source": "reference models: " + ", ".join(names)}


def trigger_verdict(hits: int, n: int, p0: float, alpha: float = stats.DEFAULT_ALPHA) -> dict[str, Any]:
    """Exact binomial test of ``hits`` of ``n`` trigger labels against null rate p0."""
    p = stats.binom_tail(n, hits, p0)
    log10p = stats.log10_binom_tail(n, hits, p0)
    best = stats.binom_tail(n, n, p0)
    d = stats.decide(p, best, alpha)
    return {"hits": int(hits), "n": int(n), "trigger_accuracy": hits / n if n else 0.0,
            "null_rate": p0, "p_value": p, "log10_p": log10p, "best_possible_p": best,
            "verdict": d.verdict, "alpha": alpha, "reason": d.reason}


def evaluate_triggers(runner, triggers: TriggerSet, *, null_rate: dict[str, Any] | None = None,
                      batch_size: int = 64, attack: str | None = None, attack_seed: int = 0,
                      alpha: float = stats.DEFAULT_ALPHA) -> dict[str, Any]:
    """Query the trigger set and test its accuracy. ``null_rate`` (e.g. from
    ``null_rate_from_references``) wins over the key's recorded one, else 1/C."""
    out = query(runner, triggers.images, triggers.preprocess, batch_size=batch_size,
                attack=attack, attack_seed=attack_seed)
    if out.shape[1] != triggers.num_classes:
        raise AuditError(f"model gives {out.shape[1]} outputs, the trigger set expects {triggers.num_classes}")
    pred = out.argmax(axis=1)
    hits = int((pred == triggers.labels).sum())
    nr = null_rate or triggers.null_rate or {"value": 1.0 / triggers.num_classes, "source": "1/C"}
    res = trigger_verdict(hits, len(pred), float(nr["value"]), alpha)
    res["null_rate_source"] = nr
    res["predictions"] = pred.astype(int).tolist()
    return res


def trigger_hits(runner, triggers: TriggerSet, batch_size: int = 64) -> int:
    out = query(runner, triggers.images, triggers.preprocess, batch_size=batch_size)
    return int((out.argmax(axis=1) == triggers.labels).sum())


# ---------------------------------------------------------------- logo
def n_groups(shape, num_classes: int) -> int:
    return int(math.ceil(int(np.prod(shape)) / int(num_classes)))


def logo_targets(logo: np.ndarray, num_classes: int) -> np.ndarray:
    """Soft labels [G, C]: chunk_g / sum(chunk_g) of the row-major logo (uniform for an empty chunk)."""
    flat = np.asarray(logo, np.float64).reshape(-1)
    G = n_groups(logo.shape, num_classes)
    chunks = np.zeros(G * num_classes)
    chunks[:flat.size] = flat
    chunks = chunks.reshape(G, num_classes)
    s = chunks.sum(axis=1, keepdims=True)
    return np.where(s > 0, chunks / np.where(s > 0, s, 1.0), 1.0 / num_classes)


def layout_map(rows: np.ndarray, shape) -> np.ndarray:
    """[G, C] values -> the H x W map (chunks laid back row-major, padding dropped)."""
    h, w = int(shape[0]), int(shape[1])
    return np.asarray(rows, np.float64).reshape(-1)[:h * w].reshape(h, w)


def decode_logo(probs: np.ndarray, groups: np.ndarray, shape, num_classes: int,
                counts=DEFAULT_COUNTS) -> dict[int, np.ndarray]:
    """Summed probabilities of the first k key images of every group, laid out H x W,
    for each k in ``counts`` (a k larger than the smallest group is skipped)."""
    G = n_groups(shape, num_classes)
    per_group = [np.flatnonzero(groups == g) for g in range(G)]
    smallest = min(len(ix) for ix in per_group)
    maps = {}
    for k in counts:
        if k < 1 or k > smallest:
            continue
        rows = np.stack([probs[ix[:k]].sum(axis=0) for ix in per_group])
        maps[int(k)] = layout_map(rows, shape)
    return maps


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).reshape(-1)
    b = np.asarray(b, np.float64).reshape(-1)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else 0.0


def permutation_p(decoded: np.ndarray, target: np.ndarray, *, n_perm: int = DEFAULT_PERMUTATIONS,
                  seed: int = 0, stop_after: int = 10, chunk: int = 20_000) -> dict[str, Any]:
    """One-sided permutation p-value of Pearson r(decoded, target) (pixels of the
    target shuffled, seeded). Sequential (Besag & Clifford 1991): stops at the
    ``stop_after``-th permutation with r >= r_obs, p = h / L; otherwise
    p = (h + 1) / (n_perm + 1). The resolution limit is 1 / (n_perm + 1)."""
    d = np.asarray(decoded, np.float64).reshape(-1)
    t = np.asarray(target, np.float64).reshape(-1)
    r_obs = pearson(d, t)
    dc = d - d.mean()
    tc = t - t.mean()
    den = math.sqrt(float(dc @ dc) * float(tc @ tc))
    limit = 1.0 / (n_perm + 1)
    if den == 0:
        return {"r": 0.0, "p_value": 1.0, "n_perm": 0, "resolution_limit": limit, "seed": seed,
                "stopped_early": False}
    rng = np.random.default_rng(seed)
    done = exceed = 0
    while done < n_perm:
        m = min(chunk, n_perm - done)
        perms = rng.permuted(np.broadcast_to(tc, (m, tc.size)), axis=1)
        r = perms @ dc / den
        hit = np.flatnonzero(r >= r_obs - 1e-12)
        if exceed + hit.size >= stop_after:
            L = done + int(hit[stop_after - exceed - 1]) + 1
            return {"r": r_obs, "p_value": stop_after / L, "n_perm": L, "resolution_limit": limit,
                    "seed": seed, "stopped_early": True}
        exceed += hit.size
        done += m
    return {"r": r_obs, "p_value": (exceed + 1) / (n_perm + 1), "n_perm": n_perm,
            "resolution_limit": limit, "seed": seed, "stopped_early": False}


def verdict_permutations(alpha: float, n_perm: int) -> int:
    """Enough permutations for the resolution limit 1/(n+1) to fall below alpha."""
    return max(int(n_perm), int(math.ceil(1.0 / alpha)))


def logo_rank_test(decoded: np.ndarray, logo: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The verdict's test: are the decoded values larger on the logo's pixels (logo >= 0.5)?

    Pixel k of the row-major logo is output class k mod C of group k // C. An
    unmarked model that favours some classes brightens whole class columns
    whatever the logo, so pixels are not exchangeable under H0; the groups are
    (their key images are drawn alike), so values are compared within each class
    column: van Elteren's stratified rank sum, its permutation distribution
    computed exactly (``stats.stratified_rank_sum_tail``), so p is not capped by a
    Monte Carlo resolution. When the exact count would take too long (very large
    logos), the unstratified rank-sum test (exact or Bernstein bound) is used and
    the result says so."""
    d = np.asarray(decoded, np.float64).reshape(-1)
    on = np.asarray(logo, np.float64).reshape(-1) >= 0.5
    strata = np.arange(d.size) % int(num_classes)
    groups = int(math.ceil(d.size / int(num_classes)))
    work = sum((int(on[strata == c].sum()) + 1) * (2 * groups * groups + 1) * groups for c in range(int(num_classes)))
    pixel = stats.rank_sum_tail(d, on)
    if work <= 300_000_000:
        st = stats.stratified_rank_sum_tail(d, on, strata)
        return {**st, "method": "exact stratified rank-sum permutation test (within class columns)",
                "n": int(d.size), "n_on": int(on.sum()), "pixel_p": pixel["p_value"],
                "detail": st["detail"] + f"; {int(on.sum())} on-pixels of {d.size}, smallest possible "
                                         f"p = {st['best_possible_p']:.3g}"}
    return {**pixel, "method": ("exact" if pixel["method"] == "exact" else "Bernstein bound on the")
            + " rank-sum permutation test (pixels, not stratified: logo too large to count within class columns)",
            "pixel_p": pixel["p_value"]}


def evaluate_logo(runner, mark: LogoMark, *, counts=DEFAULT_COUNTS, n_perm: int = DEFAULT_PERMUTATIONS,
                  seed: int = 0, batch_size: int = 64, attack: str | None = None, attack_seed: int = 0,
                  alpha: float = stats.DEFAULT_ALPHA, verdict_perm: int | None = None) -> dict[str, Any]:
    """Decode the logo for each k in ``counts``; Pearson r and a Monte Carlo permutation p
    against the logo as embedded (the soft labels laid out 2-D; ``r_vs_logo`` against
    the raw logo), ``n_perm`` permutations each. The verdict, at the largest k, uses the
    exact permutation distribution of the rank sum of the decoded values over the
    logo's on-pixels (``logo_rank_test``; a Bernstein bound for logos too large to
    count exactly; compared within class columns), so it never sits at a Monte Carlo resolution; ``margin_log10``
    says how many decades below alpha it lies. ``verdict_perm`` (optional) reruns the
    Monte Carlo test of r at the largest k with that many permutations, for the record."""
    out = query(runner, mark.images, mark.preprocess, batch_size=batch_size, attack=attack,
                attack_seed=attack_seed)
    if out.shape[1] != mark.num_classes:
        raise AuditError(f"model gives {out.shape[1]} outputs, the logo key expects {mark.num_classes}")
    probs = as_probabilities(out, mark.outputs)
    target = layout_map(logo_targets(mark.logo, mark.num_classes), mark.logo.shape)
    maps = decode_logo(probs, mark.groups, mark.logo.shape, mark.num_classes, counts)
    if not maps:
        raise AuditError("no requested key-image count fits the smallest logo group")
    per_k = {}
    for k, m in maps.items():
        perm = permutation_p(m, target, n_perm=n_perm, seed=seed)
        per_k[k] = {"k": k, "r": perm["r"], "r_vs_logo": pearson(m, mark.logo), "p_value": perm["p_value"],
                    "n_perm": perm["n_perm"], "stopped_early": perm["stopped_early"],
                    "resolution_limit": perm["resolution_limit"],
                    "rank_p": logo_rank_test(m, mark.logo, mark.num_classes)["p_value"]}
    k_max = max(maps)
    n_mc = verdict_perm if verdict_perm is not None else n_perm
    top = permutation_p(maps[k_max], target, n_perm=n_mc, seed=seed)
    rank = logo_rank_test(maps[k_max], mark.logo, mark.num_classes)
    p = rank["p_value"]
    d = stats.decide(p, rank["best_possible_p"], alpha)
    margin = math.log10(alpha / p) if p > 0 else float("inf")
    method = rank["method"]
    return {"counts": sorted(maps), "per_k": [per_k[k] for k in sorted(per_k)], "k": k_max,
            "r": top["r"], "p_value": p, "p_method": method, "p_detail": rank["detail"],
            "margin_log10": margin, "n_on": rank["n_on"], "n_pixels": rank["n"], "pixel_rank_p": rank["pixel_p"],
            "permutation_p": top["p_value"], "n_perm": n_mc, "permutations_run": top["n_perm"],
            "stopped_early": top["stopped_early"], "permutation_seed": seed,
            "permutation_resolution": top["resolution_limit"],
            "resolution_limit": rank["best_possible_p"], "verdict": d.verdict, "alpha": alpha,
            "reason": d.reason + f" ({method})", "maps": maps, "target": target}


def logo_image(m: np.ndarray) -> np.ndarray:
    """Decoded map -> uint8 luminance, 0 = smallest value, 255 = largest (a flat map is black)."""
    m = np.asarray(m, np.float64)
    lo, hi = float(m.min()), float(m.max())
    if hi <= lo:
        return np.zeros(m.shape, np.uint8)
    return np.round((m - lo) / (hi - lo) * 255.0).astype(np.uint8)


def write_logo_pngs(maps: dict[int, np.ndarray], out_dir: str | os.PathLike, prefix: str = "logo",
                    upscale: int = 1) -> dict[int, dict[str, Any]]:
    """Write one PNG per k (``{prefix}_k{k}.png``, atomically); returns {k: {path, image}}
    where image is the uint8 array the PNG holds (before ``upscale``)."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for k, m in sorted(maps.items()):
        img = logo_image(m)
        pil = Image.fromarray(img, mode="L")
        if upscale > 1:
            pil = pil.resize((img.shape[1] * upscale, img.shape[0] * upscale), Image.NEAREST)
        path = out / f"{prefix}_k{k}.png"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        pil.save(tmp, format="PNG")
        os.replace(tmp, path)
        written[k] = {"path": str(path), "image": img}
    return written


# ---------------------------------------------------------------- key import
def _read_images(images: str | os.PathLike) -> np.ndarray:
    p = Path(images)
    if p.is_dir():
        from PIL import Image

        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".png")
        if not files:
            raise AuditError(f"no .png files in {p}")
        arrs = []
        for f in files:
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("L") if im.mode in ("L", "I", "I;16", "1", "P", "LA")
                                   else im.convert("RGB"))
            except OSError as e:
                raise AuditError(f"cannot read {f.name} as an image: {e}") from None
            arrs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        if len({a.shape for a in arrs}) != 1:
            raise AuditError(f"the PNGs in {p} differ in size or channels")
        return np.stack(arrs).astype(np.float32)
    if not p.is_file():
        raise AuditError(f"trigger images not found: {p}")
    try:
        arr = np.load(p, allow_pickle=False)
    except Exception as e:
        raise AuditError(f"cannot read {p.name} as .npy: {e}") from None
    if arr.dtype.kind not in "biuf":
        raise AuditError(f"{p.name} holds {arr.dtype}, expected numbers")
    if arr.ndim == 3:  # N x H x W: one channel
        arr = arr[:, None]
    if arr.ndim != 4:
        raise AuditError(f"{p.name} must be N x C x H x W (or N x H x W), got shape {list(arr.shape)}")
    return arr


def _read_labels(labels: str | os.PathLike) -> np.ndarray:
    p = Path(labels)
    if not p.is_file():
        raise AuditError(f"labels not found: {p}")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:
            raise AuditError(f"cannot read {p.name} as .npy: {e}") from None
    else:
        vals = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if not re.fullmatch(r"[+-]?\d+", s):
                raise AuditError(f"{p.name} line {i}: expected one integer label, got {s[:40]!r}")
            vals.append(int(s))
        arr = np.asarray(vals)
    arr = np.asarray(arr).reshape(-1)
    if arr.dtype.kind == "f" and not np.all(arr == np.round(arr)):
        raise AuditError(f"{p.name}: labels must be integers")
    return arr.astype(np.int64)


def import_trigger_key(images: str | os.PathLike, labels: str | os.PathLike, out_key_path: str | os.PathLike,
                       preprocess: dict[str, Any] | None = None, num_classes: int | None = None,
                       null_rate: float | None = None) -> dict[str, Any]:
    """Build a key file holding a trigger set made elsewhere.

    ``images``: an .npy array N x C x H x W (or N x H x W) or a folder of PNGs
    (sorted by file name; grey -> 1 channel, colour -> 3, values 0..255);
    ``labels``: .npy or a text file with one integer per line, in image order;
    ``preprocess``: the Preprocess fields (default: images fed as they are, or
    for PNGs ``{"stored": "pixels", "pixel_range": [0, 255]}``);
    ``num_classes``: default max(label) + 1 (state it when the set misses classes).
    Writes ``triggers.npy`` next to the key (both atomically) and returns the key document.
    """
    arr = _read_images(images)
    labs = _read_labels(labels)
    if len(labs) != len(arr):
        raise AuditError(f"{len(arr)} trigger images but {len(labs)} labels")
    if labs.size == 0:
        raise AuditError("the trigger set is empty")
    C = int(num_classes) if num_classes is not None else int(labs.max()) + 1
    if labs.min() < 0 or labs.max() >= C:
        raise AuditError(f"labels must lie in 0..{C - 1}")
    if preprocess is None and Path(images).is_dir():
        preprocess = {"stored": "pixels", "pixel_range": [0, 255]}
    pp = Preprocess.from_json(preprocess)
    out = Path(out_key_path)
    side = out.parent / "triggers.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = side.with_name(f".{side.name}.tmp{os.getpid()}.npy")
    np.save(tmp, np.ascontiguousarray(arr))
    sha = keys_mod.sha256_file(tmp)
    section: dict[str, Any] = {"images": {"path": side.name, "sha256": sha}, "labels": labs.tolist(),
                               "num_classes": C, "kind": "imported", "preprocess": pp.to_json(),
                               "outputs": "auto"}
    if null_rate is not None:
        section["null_rate"] = {"value": float(null_rate), "source": "stated at import"}
    key = keys_mod.Key(whitebox=[], blackbox={"triggers": section},
                       model={"imported_triggers": {"images": str(images), "labels": str(labels)}})
    try:
        doc = key.to_json()
        keys_mod.validate_document(doc)
        os.replace(tmp, side)
        keys_mod.write_json_atomic(out, doc)
    finally:
        if tmp.exists():
            tmp.unlink()
    return doc

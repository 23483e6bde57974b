"""Query-side attacks: the thief processes each input before the model sees it.

Every attack maps pixels [N, C, H, W] (float, within ``pixel_range``) to
pixels of the same shape and range, never in place. Specs are strings:

* ``jpeg:Q``          JPEG re-encoding at quality Q (1..95) with Pillow;
* ``noise:S[:SEED]``  Gaussian noise, sigma = S x (pixel range width), seeded, clipped;
* ``resize:F``        down-scale by F (0 < F < 1, bilinear) and back up to H x W;
* ``crop:F``          central crop keeping a fraction F of each side, scaled back to H x W;
* ``rotate:DEG``      rotation by DEG degrees about the centre (bilinear, empty corners = lowest pixel);
* ``shift:DX[,DY]``   translation by whole pixels (empty border = lowest pixel).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from auditor.errors import AuditError

ATTACKS = ("jpeg", "noise", "resize", "crop", "rotate", "shift")


@dataclass(frozen=True)
class QueryAttack:
    name: str
    params: dict


def parse_attack(spec: str) -> QueryAttack:
    """``jpeg:50`` -> QueryAttack("jpeg", {"quality": 50}); AuditError for bad specs."""
    name, _, arg = str(spec).partition(":")
    name = name.strip().lower()
    parts = [a for a in arg.replace(",", ":").split(":") if a != ""] if arg else []
    try:
        if name == "jpeg":
            q = int(parts[0]) if parts else 75
            if not 1 <= q <= 95:
                raise ValueError("quality must be in 1..95")
            return QueryAttack("jpeg", {"quality": q})
        if name == "noise":
            sigma = float(parts[0]) if parts else 0.05
            if sigma < 0:
                raise ValueError("sigma must be >= 0")
            seed = int(parts[1]) if len(parts) > 1 else None
            return QueryAttack("noise", {"sigma": sigma, "seed": seed})
        if name in ("resize", "crop"):
            f = float(parts[0]) if parts else (0.5 if name == "resize" else 0.9)
            if not 0 < f <= 1:
                raise ValueError("fraction must be in (0, 1]")
            return QueryAttack(name, {"fraction": f})
        if name == "rotate":
            return QueryAttack("rotate", {"degrees": float(parts[0]) if parts else 5.0})
        if name == "shift":
            dx = int(parts[0]) if parts else 1
            dy = int(parts[1]) if len(parts) > 1 else 0
            return QueryAttack("shift", {"dx": dx, "dy": dy})
    except (ValueError, IndexError) as e:
        raise AuditError(f"bad query attack {spec!r}: {e}") from None
    raise AuditError(f"unknown query attack {name!r} (expected one of {', '.join(ATTACKS)})")


def _to_u8(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.round((pixels - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _from_u8(u8: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return u8.astype(np.float64) / 255.0 * (hi - lo) + lo


def jpeg(pixels: np.ndarray, quality: int, pixel_range: tuple[float, float]) -> np.ndarray:
    """Each image encoded as an 8-bit JPEG (grey for 1 channel, RGB for 3) and decoded."""
    import io

    from PIL import Image

    lo, hi = pixel_range
    u8 = _to_u8(pixels, lo, hi)
    c = u8.shape[1]
    if c not in (1, 3):
        raise AuditError(f"JPEG needs 1 or 3 channels, the key images have {c}")
    out = np.empty_like(u8)
    for i, img in enumerate(u8):
        pil = Image.fromarray(img[0], "L") if c == 1 else Image.fromarray(img.transpose(1, 2, 0), "RGB")
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("L" if c == 1 else "RGB"))
        out[i] = dec[None] if c == 1 else dec.transpose(2, 0, 1)
    return _from_u8(out, lo, hi)


def gaussian_noise(pixels: np.ndarray, sigma: float, pixel_range: tuple[float, float], seed: int) -> np.ndarray:
    lo, hi = pixel_range
    rng = np.random.default_rng(seed)
    return np.clip(pixels + sigma * (hi - lo) * rng.standard_normal(pixels.shape), lo, hi)


def _per_plane(pixels: np.ndarray, fn) -> np.ndarray:
    """Apply a Pillow float-image ("F") transform to every H x W plane."""
    from PIL import Image

    out = np.empty(pixels.shape, np.float64)
    for i in range(pixels.shape[0]):
        for c in range(pixels.shape[1]):
            out[i, c] = np.asarray(fn(Image.fromarray(pixels[i, c].astype(np.float32), "F")), np.float64)
    return out


def resize(pixels: np.ndarray, fraction: float, pixel_range) -> np.ndarray:
    from PIL import Image

    h, w = pixels.shape[2:]
    sh, sw = max(1, round(h * fraction)), max(1, round(w * fraction))
    out = _per_plane(pixels, lambda im: im.resize((sw, sh), Image.BILINEAR).resize((w, h), Image.BILINEAR))
    return np.clip(out, *pixel_range)


def crop(pixels: np.ndarray, fraction: float, pixel_range) -> np.ndarray:
    from PIL import Image

    h, w = pixels.shape[2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    out = _per_plane(pixels, lambda im: im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR))
    return np.clip(out, *pixel_range)


def rotate(pixels: np.ndarray, degrees: float, pixel_range) -> np.ndarray:
    from PIL import Image

    lo = float(pixel_range[0])
    out = _per_plane(pixels, lambda im: im.rotate(degrees, resample=Image.BILINEAR, fillcolor=lo))
    return np.clip(out, *pixel_range)


def shift(pixels: np.ndarray, dx: int, dy: int, pixel_range) -> np.ndarray:
    """Move content dx pixels right and dy down; the uncovered border is the lowest pixel value."""
    h, w = pixels.shape[2:]
    out = np.full(pixels.shape, float(pixel_range[0]))
    src_y = slice(max(0, -dy), min(h, h - dy))
    dst_y = slice(max(0, dy), min(h, h + dy))
    src_x = slice(max(0, -dx), min(w, w - dx))
    dst_x = slice(max(0, dx), min(w, w + dx))
    if src_y.start < src_y.stop and src_x.start < src_x.stop:
        out[:, :, dst_y, dst_x] = pixels[:, :, src_y, src_x]
    return out


def apply_attack(spec: str | QueryAttack, pixels: np.ndarray, pixel_range: tuple[float, float],
                 seed: int = 0) -> np.ndarray:
    """A new pixel array: ``spec`` applied to every image. ``seed`` is used by noise
    unless the spec names its own."""
    a = parse_attack(spec) if isinstance(spec, str) else spec
    x = np.asarray(pixels, np.float64)
    if x.ndim != 4:
        raise AuditError(f"query attacks need N x C x H x W images, got shape {list(x.shape)}")
    lo, hi = float(pixel_range[0]), float(pixel_range[1])
    if not hi > lo:
        raise AuditError(f"pixel range [{lo}, {hi}] is empty")
    p = a.params
    if a.name == "jpeg":
        return jpeg(x, p["quality"], (lo, hi))
    if a.name == "noise":
        return gaussian_noise(x, p["sigma"], (lo, hi), p["seed"] if p["seed"] is not None else seed)
    if a.name == "resize":
        return resize(x, p["fraction"], (lo, hi))
    if a.name == "crop":
        return crop(x, p["fraction"], (lo, hi))
    if a.name == "rotate":
        return rotate(x, p["degrees"], (lo, hi))
    if a.name == "shift":
        return shift(x, p["dx"], p["dy"], (lo, hi))
    raise AuditError(f"unknown query attack {a.name!r}")  # pragma: no cover - parse_attack checks

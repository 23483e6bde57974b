"""Client keys of keyed models (``wmaudit-keyed/1``, schema ``auditor/schemas/keyed.schema.json``).

A key is a block permutation ``perm`` of the N = (H/B)(W/B) block positions
(raster order) and an L x L matrix ``M`` (L = C*B*B, a block read in
(channel, row, column) C order). Encryption (``auditor.keyed.cipher``):
encrypted block k = M @ plain block perm[k].

Generators (so another implementation can rebuild a key from its seeds):

* block permutation: ``numpy.random.default_rng(seed).permutation(N)``
* orthogonal variant: ``A = numpy.random.default_rng(seed).standard_normal((L, L))``,
  ``Q, R = numpy.linalg.qr(A)``, ``M = Q * sign(diag(R))`` (each column times the
  sign of R's diagonal: Haar-distributed, and unique given A)
* permutation variant: ``p = numpy.random.default_rng(seed).permutation(L)``,
  ``M[i, p[i]] = 1`` (encrypted value i = plain value p[i]; pixel shuffling)

``keygen`` draws the block permutation from ``seed`` and the matrix from
``seed + 1``. Keys made elsewhere may give explicit ``values`` instead; they are
checked (a permutation must be one, a matrix must be orthogonal to 1e-6).
The commitment is sha256 over the canonical JSON without the ``commitment``
field, as for ``wmaudit-key/1`` (``auditor.marks.keys.commitment_of``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import AuditError
from auditor.marks.keys import commitment_of, write_json_atomic

FORMAT = "wmaudit-keyed/1"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "keyed.schema.json"
VARIANTS = ("orthogonal", "permutation")
PERM_GENERATOR = "numpy.random.default_rng(seed).permutation(size)"
ORTHO_GENERATOR = ("numpy.linalg.qr(numpy.random.default_rng(seed).standard_normal((size, size))), "
                   "columns times sign(diag(R))")
ORTHO_TOL = 1e-6


def block_permutation(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(int(seed)).permutation(int(n))


def orthogonal_matrix(seed: int, size: int) -> np.ndarray:
    """Haar-random orthogonal matrix (float64), the documented generator."""
    a = np.random.default_rng(int(seed)).standard_normal((int(size), int(size)))
    q, r = np.linalg.qr(a)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]


def permutation_matrix(p: np.ndarray) -> np.ndarray:
    """M with M[i, p[i]] = 1: (M @ v)[i] = v[p[i]]."""
    m = np.zeros((len(p), len(p)))
    m[np.arange(len(p)), p] = 1.0
    return m


@dataclass
class KeyedKey:
    """One client key: image geometry, block size, block permutation and block matrix."""

    variant: str
    channels: int
    height: int
    width: int
    block: int
    perm: np.ndarray          # [N] int64
    matrix: np.ndarray        # [L, L] float64
    doc: dict[str, Any] = field(default_factory=dict)
    commitment: str = ""
    path: Path | None = None

    @property
    def n_blocks(self) -> int:
        return (self.height // self.block) * (self.width // self.block)

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.block, self.width // self.block

    @property
    def size(self) -> int:
        return self.channels * self.block * self.block

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else (self.doc.get("client") or "key")

    def describe(self) -> dict[str, Any]:
        """What a report may show: geometry, variant, generator seeds, commitment (never values)."""
        d = {"variant": self.variant, "image": [self.channels, self.height, self.width], "block": self.block,
             "blocks": self.n_blocks, "block_size_L": self.size, "commitment": self.commitment}
        if self.path is not None:
            d["file"] = self.path.name
        if self.doc.get("client"):
            d["client"] = self.doc["client"]
        return d


def _check_geometry(c: int, h: int, w: int, b: int) -> None:
    if b < 1 or c < 1 or h < 1 or w < 1:
        raise AuditError(f"key geometry must be positive, got channels {c}, size {h}x{w}, block {b}")
    if h % b or w % b:
        raise AuditError(f"image size {h}x{w} is not a multiple of the block size {b}")


def _check_permutation(p: np.ndarray, n: int, what: str) -> np.ndarray:
    p = np.asarray(p)
    if p.shape != (n,):
        raise AuditError(f"{what} has {p.size} entries, expected {n}")
    if not np.array_equal(np.sort(p), np.arange(n)):
        raise AuditError(f"{what} is not a permutation of 0..{n - 1}")
    return p.astype(np.int64)


def _check_orthogonal(m: np.ndarray, size: int) -> np.ndarray:
    if m.shape != (size, size):
        raise AuditError(f"block matrix is {'x'.join(map(str, m.shape))}, expected {size}x{size} (L = C*B*B)")
    if not np.all(np.isfinite(m)):
        raise AuditError("block matrix has non-finite values")
    err = float(np.abs(m.T @ m - np.eye(size)).max())
    if err > ORTHO_TOL:
        raise AuditError(f"block matrix is not orthogonal (max |M^T M - I| = {err:.3g} > {ORTHO_TOL:g})")
    return m


def parse(doc: dict[str, Any], verify_commitment: bool = True) -> KeyedKey:
    """A checked key from its JSON document (AuditError on anything wrong)."""
    import jsonschema

    try:
        jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    except jsonschema.ValidationError as e:
        loc = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise AuditError(f"invalid keyed key at {loc}: {e.message}") from None
    if verify_commitment and "commitment" in doc and doc["commitment"] != commitment_of(doc):
        raise AuditError("keyed key was modified after it was written (commitment mismatch)")
    im, b, variant = doc["image"], int(doc["block"]), doc["variant"]
    c, h, w = int(im["channels"]), int(im["height"]), int(im["width"])
    _check_geometry(c, h, w, b)
    n, size = (h // b) * (w // b), c * b * b
    bp = doc["block_permutation"]
    if bp["kind"] == "generator":
        if bp["size"] != n:
            raise AuditError(f"block permutation size {bp['size']} != number of blocks {n}")
        perm = block_permutation(bp["seed"], n)
    else:
        perm = _check_permutation(bp["values"], n, "block permutation")
    bt = doc["block_transform"]
    if bt["kind"] == "generator":
        if bt["size"] != size:
            raise AuditError(f"block transform size {bt['size']} != L = C*B*B = {size}")
        want = ORTHO_GENERATOR if variant == "orthogonal" else PERM_GENERATOR
        if bt["generator"] != want:
            raise AuditError(f"variant {variant!r} takes the generator {want!r}")
        matrix = (orthogonal_matrix(bt["seed"], size) if variant == "orthogonal"
                  else permutation_matrix(block_permutation(bt["seed"], size)))
    elif variant == "permutation":
        if any(isinstance(v, list) for v in bt["values"]):
            raise AuditError("permutation variant: block_transform values must be a pixel permutation (integers)")
        matrix = permutation_matrix(_check_permutation(bt["values"], size, "pixel permutation"))
    else:
        try:
            matrix = np.asarray(bt["values"], dtype=np.float64)
        except (TypeError, ValueError):
            raise AuditError("orthogonal variant: block_transform values must be an L x L matrix") from None
        matrix = _check_orthogonal(matrix, size)
    return KeyedKey(variant, c, h, w, b, perm, matrix, doc=doc,
                    commitment=doc.get("commitment") or commitment_of(doc))


def load(path: str | os.PathLike) -> KeyedKey:
    from auditor.marks.keys import read_json

    path = Path(path)
    if not path.exists():
        raise AuditError(f"key file not found: {path}")
    doc = read_json(path, "key file")   # a bounded regular file; NaN / Infinity refused
    if not isinstance(doc, dict):
        raise AuditError(f"key file {path} is not a JSON object")
    try:
        key = parse(doc)
    except AuditError as e:
        raise AuditError(f"{path.name}: {e}") from None
    key.path = path
    return key


def generate(*, image_size: int | tuple[int, int], channels: int, block: int, seed: int,
             variant: str = "orthogonal", client: str | None = None) -> dict[str, Any]:
    """A key document from a seed (block permutation: seed; matrix: seed + 1), with its commitment."""
    if variant not in VARIANTS:
        raise AuditError(f"unknown variant {variant!r} ({' or '.join(VARIANTS)})")
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    _check_geometry(int(channels), int(h), int(w), int(block))
    if seed < 0:
        raise AuditError("seed must be >= 0")
    n, size = (h // block) * (w // block), channels * block * block
    doc: dict[str, Any] = {"format": FORMAT, "variant": variant}
    if client:
        doc["client"] = client
    doc.update({
        "image": {"channels": int(channels), "height": int(h), "width": int(w)}, "block": int(block),
        "block_permutation": {"kind": "generator", "generator": PERM_GENERATOR, "seed": int(seed), "size": n},
        "block_transform": {"kind": "generator",
                            "generator": ORTHO_GENERATOR if variant == "orthogonal" else PERM_GENERATOR,
                            "seed": int(seed) + 1, "size": size},
    })
    doc["commitment"] = commitment_of(doc)
    parse(doc)
    return doc


def save(doc: dict[str, Any], path: str | os.PathLike) -> KeyedKey:
    """Check and write a key document atomically; returns the parsed key."""
    key = parse(doc)
    write_json_atomic(Path(path), doc)
    key.path = Path(path)
    return key


def from_arrays(perm: np.ndarray, matrix: np.ndarray, *, channels: int, height: int, width: int, block: int,
                variant: str = "orthogonal") -> KeyedKey:
    """A key given by explicit values (e.g. a key recovered by an attacker), checked."""
    if variant == "permutation":
        p = np.argmax(np.asarray(matrix), axis=1).tolist()
        bt = {"kind": "values", "values": [int(v) for v in p]}
    else:
        bt = {"kind": "values", "values": np.asarray(matrix, dtype=np.float64).tolist()}
    doc = {"format": FORMAT, "variant": variant,
           "image": {"channels": int(channels), "height": int(height), "width": int(width)}, "block": int(block),
           "block_permutation": {"kind": "values", "values": [int(v) for v in np.asarray(perm)]},
           "block_transform": bt}
    doc["commitment"] = commitment_of(doc)
    return parse(doc)

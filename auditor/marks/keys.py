"""The key file (``wmaudit-key/1``): what the owner must keep secret.

A key is JSON, validated against ``auditor/schemas/key.schema.json``. It holds
white-box entries (Uchida marks: target torch parameter, shape, reduction,
bits, projection X) and optionally a black-box section (trigger sets, logos).

Projection X (T x N, T = number of bits, N = length of the reduced weight
vector) is either
  * ``{"kind": "generator", "generator": "numpy.default_rng.standard_normal",
    "seed": S, "scale": c}``: X = c * numpy.random.default_rng(S).standard_normal((T, N))
    (float64, C order) -- any implementation can rebuild it from that line; or
  * ``{"kind": "npy", "path": "X.npy", "sha256": ...}``: a sidecar T x N array,
    its path relative to the key file's folder (paths leaving it are refused).

Reductions map the torch-layout weight (out-channels first, as torch stores
conv, linear and RNN weights) to the vector w that X multiplies:
  * ``mean``: average over the first (output) axis -> prod(shape[1:]) values
    (Uchida et al. 2017);
  * ``flatten``: every coefficient in C order -> prod(shape) values.

The commitment is sha256 over the canonical JSON of the key without its
``commitment`` field; sidecars enter through their sha256. Reports carry the
commitment, never the key.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import AuditError

FORMAT = "wmaudit-key/1"
GENERATOR = "numpy.default_rng.standard_normal"
REDUCTIONS = ("mean", "flatten")
SCHEMA_PATH = Path(__file__).parent.parent / "schemas" / "key.schema.json"


# ---------------------------------------------------------------- projection
def generate_projection(seed: int, n_bits: int, n_coeffs: int, scale: float = 1.0,
                        out: np.ndarray | None = None) -> np.ndarray:
    """X = scale * default_rng(seed).standard_normal((n_bits, n_coeffs)), float64. `out`: a
    float64 C-contiguous buffer of that shape to fill (the same values: the generator fills it in
    the same order), so that a caller projecting many keys reuses one block of memory."""
    shape = (int(n_bits), int(n_coeffs))
    rng = np.random.default_rng(int(seed))
    if out is None:
        X = rng.standard_normal(shape)
    else:
        if out.shape != shape or out.dtype != np.float64 or not out.flags.c_contiguous:
            raise ValueError(f"projection buffer {out.shape} {out.dtype}, expected {shape} float64 C-contiguous")
        X = rng.standard_normal(out=out)
    if scale != 1.0:        # (a scale of one would only copy the matrix)
        X *= scale
    return X


def reduce_weight(w: np.ndarray, reduce: str) -> np.ndarray:
    """Torch-layout weight -> the float64 vector the projection multiplies."""
    w = np.asarray(w, dtype=np.float64)
    if reduce == "mean":
        if w.ndim < 2:
            raise AuditError(f"reduction 'mean' needs a weight with >= 2 axes, got shape {list(w.shape)}")
        return w.mean(axis=0).reshape(-1)
    if reduce == "flatten":
        return w.reshape(-1)
    raise AuditError(f"unknown reduction {reduce!r} (expected one of {', '.join(REDUCTIONS)})")


def reduced_length(shape: tuple[int, ...] | list[int], reduce: str) -> int:
    shape = [int(s) for s in shape]
    if reduce == "mean":
        return int(np.prod(shape[1:]))
    return int(np.prod(shape))


def check_capacity(param: str, shape, reduce: str, n_bits: int) -> None:
    """Refuse a mark whose reduced weight has fewer coefficients than bits.

    Why: T projections of an N-vector with N < T are linearly dependent, so at
    most N bits can be set independently and the extracted bits are not T
    independent fair coins under the null (a depthwise conv [C, 1, 3, 3] with
    ``mean`` has 9 coefficients: 128 bits cannot be embedded, and the p-value
    would be meaningless)."""
    n = reduced_length(shape, reduce)
    if n < int(n_bits):
        raise AuditError(f"{param} {list(int(s) for s in shape)} with reduce={reduce} has {n} coefficients for "
                         f"{int(n_bits)} bits: more bits than coefficients cannot be independent "
                         f"(use reduce=flatten, a larger weight or at most {n} bits)")


# ---------------------------------------------------------------- data model
@dataclass
class WhiteboxMark:
    """One Uchida mark on one torch parameter."""

    id: str
    param: str
    shape: tuple[int, ...]
    reduce: str
    bits: np.ndarray  # uint8 0/1, length T
    projection: dict[str, Any]
    batchnorm: dict[str, Any] | None = None  # anchors for BN-folding recovery
    extra: dict[str, Any] = field(default_factory=dict)  # embedding info, kept verbatim
    _X: np.ndarray | None = field(default=None, repr=False)
    _base: Path | None = field(default=None, repr=False)

    @property
    def n_bits(self) -> int:
        return int(self.bits.size)

    @property
    def n_coeffs(self) -> int:
        return reduced_length(self.shape, self.reduce)

    def _generator_scale(self) -> float:
        p = self.projection
        if p.get("generator", GENERATOR) != GENERATOR:
            raise AuditError(f"unknown projection generator {p.get('generator')!r}")
        scale = p.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise AuditError(f"mark {self.id!r}: the projection's scale must be a finite number, got {scale!r}")
        return float(scale)

    def projection_into(self, buffer_for) -> np.ndarray:
        """X, without keeping it: a generated projection is written into `buffer_for((T, N))` (a
        float64 buffer the caller reuses for the next key of that shape: memory already mapped, no
        new allocation per key); a projection already generated or read from a sidecar is `matrix()`'s."""
        if self._X is not None or self.projection["kind"] != "generator":
            return self.matrix()
        return generate_projection(self.projection["seed"], self.n_bits, self.n_coeffs, self._generator_scale(),
                                   out=buffer_for((self.n_bits, self.n_coeffs)))

    def matrix(self) -> np.ndarray:
        """The T x N projection X (float64)."""
        if self._X is None:
            p = self.projection
            if p["kind"] == "generator":
                X = generate_projection(p["seed"], self.n_bits, self.n_coeffs, self._generator_scale())
                self._X = X            # finite by construction (a finite scale times normal deviates)
                return X
            else:
                path = safe_sidecar(self._base or Path("."), p["path"])
                X = _load_npy(path, p.get("sha256"))
                if X.dtype.kind not in "biuf":
                    raise AuditError(f"mark {self.id!r}: the projection sidecar holds {X.dtype}, not numbers")
                if X.ndim != 2:
                    raise AuditError(f"mark {self.id!r}: the projection sidecar is {X.ndim}-d (shape {list(X.shape)}), "
                                     f"expected a 2-d bits x coefficients matrix")
                if p.get("transposed"):
                    X = X.T
                X = np.asarray(X, dtype=np.float64)
            if X.dtype.kind not in "biuf" or not np.isfinite(X).all():
                raise AuditError(f"mark {self.id!r}: the projection sidecar must hold finite numbers")
            if X.shape != (self.n_bits, self.n_coeffs):
                raise AuditError(
                    f"mark {self.id!r}: projection is {X.shape[0]}x{X.shape[1]}, expected "
                    f"{self.n_bits}x{self.n_coeffs} (bits x reduced length of {list(self.shape)} "
                    f"with reduce={self.reduce})")
            self._X = X
        return self._X

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "param": self.param,
            "shape": [int(s) for s in self.shape],
            "reduce": self.reduce,
            "bits": "".join(str(int(b)) for b in self.bits),
            "projection": self.projection,
        }
        if self.batchnorm is not None:
            d["batchnorm"] = self.batchnorm
        d.update(self.extra)
        return d


@dataclass
class Key:
    whitebox: list[WhiteboxMark]
    blackbox: dict[str, Any] | None = None
    model: dict[str, Any] = field(default_factory=dict)
    commitment: str = ""
    path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "model": self.model,
                             "whitebox": [m.to_json() for m in self.whitebox]}
        if self.blackbox is not None:
            d["blackbox"] = self.blackbox
        d["commitment"] = commitment_of(d)
        return d


# ---------------------------------------------------------------- files
def commitment_of(doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "commitment"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def safe_sidecar(base: Path, rel: str) -> Path:
    """Resolve a sidecar path; refuse anything outside the key's folder."""
    if os.path.isabs(rel):
        raise AuditError(f"sidecar path {rel!r} is absolute; it must be relative to the key's folder")
    base = Path(base).resolve()
    if ".." in rel.replace("\\", "/").split("/"):
        raise AuditError(f"sidecar path {rel!r} leaves the key's folder")
    p = (base / rel).resolve()
    if base != p and base not in p.parents:
        raise AuditError(f"sidecar path {rel!r} leaves the key's folder")
    if (base / rel).is_symlink():
        raise AuditError(f"sidecar path {rel!r} is a symbolic link; refusing it")
    if not p.exists():
        raise AuditError(f"sidecar file {rel!r} not found next to the key")
    if not p.is_file():
        raise AuditError(f"sidecar {rel!r} is not a regular file")
    return p


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_npy(path: Path, sha: str | None) -> np.ndarray:
    """A sidecar array read once from a regular file of bounded size (the sha256 checked on the
    bytes that are parsed; numpy's own reader then never touches the file)."""
    import io

    from auditor.read.limits import Limits, read_model_bytes, limits

    try:
        raw = read_model_bytes(path, Limits(max_model_bytes=limits().max_model_bytes), expected="a .npy sidecar")
    except AuditError as e:
        raise AuditError(f"sidecar: {e}") from None
    if sha is not None and hashlib.sha256(raw).hexdigest() != sha:
        raise AuditError(f"sidecar {path.name} does not match the sha256 recorded in the key")
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # numpy raises several types for corrupt files
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise AuditError(f"cannot read {path.name} as .npy: {msg}") from None


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate_document(doc: Any, where: str = "key") -> None:
    import jsonschema

    try:
        jsonschema.validate(doc, _schema())
    except jsonschema.ValidationError as e:
        loc = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise AuditError(f"{where}: invalid key file at {loc}: {e.message}") from None


def parse_key(doc: dict[str, Any], base: Path, verify_commitment: bool = True) -> Key:
    validate_document(doc)
    if verify_commitment and "commitment" in doc and doc["commitment"] != commitment_of(doc):
        raise AuditError("key file was modified after it was written (commitment mismatch)")
    marks = []
    known = {"id", "param", "shape", "reduce", "bits", "projection", "batchnorm"}
    for i, e in enumerate(doc.get("whitebox", [])):
        bits = np.frombuffer(e["bits"].encode(), dtype=np.uint8) - ord("0")
        marks.append(WhiteboxMark(
            id=e.get("id", f"mark{i}"), param=e["param"], shape=tuple(int(s) for s in e["shape"]),
            reduce=e["reduce"], bits=bits.astype(np.uint8), projection=e["projection"],
            batchnorm=e.get("batchnorm"), extra={k: v for k, v in e.items() if k not in known},
            _base=base))
    _check_paths(doc.get("blackbox"), "blackbox")
    for m in marks:
        if m.reduce == "mean" and len(m.shape) < 2:
            raise AuditError(f"mark {m.id!r}: reduce 'mean' needs a weight with >= 2 axes")
        _check_numbers(m)
    return Key(whitebox=marks, blackbox=doc.get("blackbox"), model=doc.get("model", {}),
               commitment=doc.get("commitment") or commitment_of(doc), path=None)


MAX_KEY_BYTES = 256 << 20        # a key (bits and anchors as text) is far smaller
MAX_PROJECTION_VALUES = 1 << 26  # T x N of one mark: 512 MiB of float64


def _not_a_number(token: str):
    raise ValueError(f"{token} is not a JSON number")


def read_json(path: Path, what: str) -> Any:
    """A JSON document from a regular file of bounded size; NaN / Infinity (not JSON) refused."""
    from auditor.read.limits import Limits, read_model_bytes

    try:
        raw = read_model_bytes(path, Limits(max_model_bytes=MAX_KEY_BYTES), expected=f"a {what} (JSON)",
                               limit_name=f"the largest {what} read")
    except AuditError as e:
        raise AuditError(f"{what}: {e}") from None
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_not_a_number)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        msg = "nested too deep" if isinstance(e, RecursionError) else str(e)
        raise AuditError(f"{what} {path} is not valid JSON: {msg}") from None


def _check_numbers(m: "WhiteboxMark") -> None:
    """Limits the schema cannot state: projection size, a finite positive scale."""
    if m.n_coeffs <= 0 or any(d <= 0 for d in m.shape):
        raise AuditError(f"mark {m.id!r}: shape {list(m.shape)} has an empty or negative dimension")
    if m.n_bits > m.n_coeffs:
        raise AuditError(f"mark {m.id!r}: {m.n_bits} bits on {m.n_coeffs} coefficients; a projection cannot "
                         f"carry more independent bits than the weight has coefficients")
    if m.n_bits * m.n_coeffs > MAX_PROJECTION_VALUES:
        raise AuditError(f"mark {m.id!r}: projection of {m.n_bits} x {m.n_coeffs} values is over the limit of "
                         f"{MAX_PROJECTION_VALUES}")
    p = m.projection
    if isinstance(p, dict) and p.get("kind") == "generator":
        sc = p.get("scale", 1.0)
        if not isinstance(sc, (int, float)) or isinstance(sc, bool) or not np.isfinite(sc) or sc <= 0:
            raise AuditError(f"mark {m.id!r}: projection scale {sc!r} must be a finite positive number")


def _check_paths(node: Any, where: str) -> None:
    """Every sidecar path in a key section stays inside the key's folder (checked on the text,
    before anything is opened: a key must not point outside however it is used later)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "path":
                if not isinstance(v, str) or not v:
                    raise AuditError(f"key {where}.path must be a non-empty string")
                if os.path.isabs(v) or v.startswith(("/", "\\")) or ".." in v.replace("\\", "/").split("/"):
                    raise AuditError(f"sidecar path {v!r} at {where} leaves the key's folder")
            else:
                _check_paths(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_paths(v, f"{where}[{i}]")


def load_key(path: str | os.PathLike) -> Key:
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"key file not found: {path}")
    doc = read_json(path, "key file")
    key = parse_key(doc, path.parent)
    key.path = path
    return key


def write_json_atomic(path: Path, doc: Any) -> None:
    """Write JSON so that a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_key(key: Key, path: str | os.PathLike) -> dict[str, Any]:
    doc = key.to_json()
    validate_document(doc)
    write_json_atomic(Path(path), doc)
    return doc


def make_mark(param: str, shape, reduce: str, bits, *, seed: int | None = None,
              matrix_path: str | None = None, matrix_sha256: str | None = None,
              scale: float = 1.0, id: str | None = None, batchnorm=None, extra=None) -> WhiteboxMark:
    """Build a white-box mark from either a generator seed or a sidecar matrix."""
    if reduce not in REDUCTIONS:
        raise AuditError(f"unknown reduction {reduce!r} (expected one of {', '.join(REDUCTIONS)})")
    bits = np.asarray(bits).astype(np.uint8).reshape(-1)
    if bits.size == 0 or not np.isin(bits, (0, 1)).all():
        raise AuditError("bits must be a non-empty array of 0/1")
    if (seed is None) == (matrix_path is None):
        raise AuditError("give exactly one of a generator seed or a projection matrix")
    check_capacity(param, shape, reduce, bits.size)
    if seed is not None:
        proj = {"kind": "generator", "generator": GENERATOR, "seed": int(seed), "scale": float(scale)}
    else:
        proj = {"kind": "npy", "path": matrix_path, "sha256": matrix_sha256}
    return WhiteboxMark(id=id or param, param=param, shape=tuple(int(s) for s in shape), reduce=reduce,
                        bits=bits, projection=proj, batchnorm=batchnorm, extra=dict(extra or {}))


def load_keys(paths, folder: str | os.PathLike | None = None) -> list[Key]:
    """Keys from files (``--key``) and every wmaudit key file in ``folder`` (``--keys``; other
    JSON files there are skipped); AuditError when none is given."""
    keys = [load_key(p) for p in paths]
    if folder:
        d = Path(folder)
        if not d.is_dir():
            raise AuditError(f"--keys: not a folder: {folder}")
        for p in sorted(d.glob("*.json")):
            try:
                fmt = json.loads(p.read_text()).get("format")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue  # not a key file
            if fmt == "wmaudit-key/1":
                keys.append(load_key(p))
    if not keys:
        raise AuditError("give at least one --key or --keys DIR")
    return keys

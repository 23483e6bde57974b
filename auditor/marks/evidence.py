"""What kind of evidence a white-box verdict is, and which null it may use.

Committed keys. A key is *committed* when its projection X and its bits are
both derived from an owner statement, so that nobody can choose them after
seeing a model. The statement (scheme ``wmaudit-commit/1``) is

    {"scheme": "wmaudit-commit/1", "owner": OWNER, "nonce": NONCE, "date": "YYYY-MM-DD",
     "mark": {"param": ..., "shape": [...], "reduce": ..., "n_bits": T}}

and its commitment is ``"sha256:" + sha256(canonical JSON of the statement)``
(keys sorted, no spaces, ASCII). From it:

    seed      = int.from_bytes(sha256(b"wmaudit-commit/1\\0" + OWNER + b"\\0" + NONCE)[:8], "big")
    X         = numpy.random.default_rng(seed).standard_normal((T, N))   (the key's generator line)
    bits_seed = int.from_bytes(sha256(b"wmaudit-bits/1\\0" + OWNER + b"\\0" + NONCE)[:8], "big")
    bits      = numpy.random.default_rng(bits_seed).integers(0, 2, T)

(OWNER and NONCE UTF-8). A key whose X comes from a raw matrix, whose seed or
bits do not follow from a statement, or that has no statement, is
*uncommitted*: anyone can fit X or bits to a given model afterwards (the
ambiguity attack: choose X with sign(X w) = b). Forging a committed key means
trying statements until one matches: each try is a fresh random key, so
reaching a p-value p takes about 1/p tries. The date is the owner's claim;
that the statement existed before a model was published is shown outside
this tool (e.g. a timestamp of its commitment).

The fair-coin null. P[match] = 1/2 per bit holds when X's rows are
sign-symmetric and independent (Gaussian from the documented generator: by
construction), or when the bits were drawn at random. A raw X is checked:
rows dense (no sparse / one-hot rows as in yu4u's ``direct`` and ``diff``
keys), entry signs and row sums balanced, no repeated rows, and the bits
balanced. A key failing a check gets an empirical null instead: its match
count on many unrelated weight vectors (other layers of the suspect file,
the files of a null corpus), p = (1 + #{null >= observed}) / (1 + n), whose
resolution 1/(1 + n) is stated; with fewer than ``MIN_NULL`` vectors the
verdict is refused (insufficient evidence) with the reason.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import AuditError
from auditor.marks import stats
from auditor.marks.keys import GENERATOR, WhiteboxMark, make_mark, reduced_length

SCHEME = "wmaudit-commit/1"
BITS_SCHEME = "wmaudit-bits/1"
COMMITTED = "committed"
UNCOMMITTED = "uncommitted"

CHECK_LEVEL = 1e-3        # two-sided level of each assumption check
DENSE_ROW = 32            # a row with fewer nonzero entries than min(N, 32) is sparse
DUPLICATE_COS = 0.99      # rows with |cos| above this count as repeated
MIN_NULL = 99             # fewest unrelated vectors for an empirical p (resolution 0.01)
PER_TENSOR = 64           # most windows taken from one unrelated tensor
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# ---------------------------------------------------------------- derivations
def _hash_seed(scheme: str, owner: str, nonce: str) -> int:
    h = hashlib.sha256(scheme.encode() + b"\0" + owner.encode("utf-8") + b"\0" + nonce.encode("utf-8"))
    return int.from_bytes(h.digest()[:8], "big")


def commit_seed(owner: str, nonce: str) -> int:
    """Projection seed: first 8 bytes of sha256("wmaudit-commit/1\\0" + owner + "\\0" + nonce), big-endian."""
    return _hash_seed(SCHEME, owner, nonce)


def derive_bits(owner: str, nonce: str, n_bits: int) -> np.ndarray:
    """Bits of a committed key: default_rng(bits_seed).integers(0, 2, T), uint8."""
    return np.random.default_rng(_hash_seed(BITS_SCHEME, owner, nonce)).integers(0, 2, int(n_bits)).astype(np.uint8)


def make_statement(owner: str, nonce: str, date: str, *, param: str, shape, reduce: str, n_bits: int) -> dict[str, Any]:
    if not owner or not nonce:
        raise AuditError("a committed key needs a non-empty --owner and --nonce")
    import datetime

    try:
        ok = bool(_DATE.match(date or "")) and datetime.date.fromisoformat(date) is not None
    except ValueError:
        ok = False
    if not ok:
        raise AuditError(f"--date must be a calendar date YYYY-MM-DD, got {date!r}")
    return {"scheme": SCHEME, "owner": owner, "nonce": nonce, "date": date,
            "mark": {"param": param, "shape": [int(s) for s in shape], "reduce": reduce, "n_bits": int(n_bits)}}


def statement_commitment(statement: dict[str, Any]) -> str:
    body = {k: v for k, v in statement.items() if k != "commitment"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def committed_mark(owner: str, nonce: str, date: str, *, param: str, shape, reduce: str, n_bits: int,
                   id: str | None = None) -> WhiteboxMark:
    """A white-box mark whose X and bits both derive from the owner statement."""
    if int(n_bits) < 1:
        raise AuditError("--bits-count must be >= 1")
    st = make_statement(owner, nonce, date, param=param, shape=shape, reduce=reduce, n_bits=n_bits)
    st["commitment"] = statement_commitment(st)
    return make_mark(param, shape, reduce, derive_bits(owner, nonce, n_bits), seed=commit_seed(owner, nonce),
                     id=id, extra={"statement": st})


def statement_problems(mark: WhiteboxMark) -> list[str]:
    """Why the mark is not derived from its statement (empty when it is)."""
    st = mark.extra.get("statement")
    if not isinstance(st, dict):
        return ["the key holds no owner statement"]
    out = []
    if st.get("scheme") != SCHEME:
        return [f"statement scheme {st.get('scheme')!r} is not {SCHEME}"]
    owner, nonce = str(st.get("owner", "")), str(st.get("nonce", ""))
    if st.get("commitment") != statement_commitment(st):
        out.append("the statement's commitment does not match its contents")
    if not _DATE.match(str(st.get("date", ""))):
        out.append("the statement has no YYYY-MM-DD date")
    want = {"param": mark.param, "shape": [int(s) for s in mark.shape], "reduce": mark.reduce, "n_bits": mark.n_bits}
    if st.get("mark") != want:
        out.append("the statement names another parameter, shape, reduction or bit count than the mark")
    p = mark.projection
    if p.get("kind") != "generator" or p.get("generator", GENERATOR) != GENERATOR:
        out.append("the projection is not the documented generator")
    elif int(p.get("seed", -1)) != commit_seed(owner, nonce):
        out.append("the projection seed is not derived from the statement's owner and nonce")
    if not np.array_equal(mark.bits, derive_bits(owner, nonce, mark.n_bits)):
        out.append("the bits are not derived from the statement's owner and nonce")
    return out


def classify_mark(mark: WhiteboxMark) -> dict[str, Any]:
    """{kind: committed|uncommitted, sentence, reasons, statement commitment and date when committed}."""
    problems = statement_problems(mark)
    st = mark.extra.get("statement") if isinstance(mark.extra.get("statement"), dict) else None
    if not problems:
        return {"kind": COMMITTED, "statement": st["commitment"], "date": st["date"], "reasons": [],
                "sentence": (f"committed: X and bits derive from owner statement {st['commitment'][:19]}… "
                             f"dated {st['date']} (the date is the owner's claim); nobody chose them after "
                             f"seeing this model, and forging such a key takes about 1/p statements")}
    if mark.projection.get("kind") == "npy":
        why = "its projection was imported as a raw matrix"
    elif st is None:
        why = "its generator seed is not derived from an owner statement"
    else:
        why = problems[0]
    return {"kind": UNCOMMITTED, "reasons": problems,
            "sentence": (f"uncommitted: {why}, so nothing shows the key was fixed before this model "
                         f"existed; X or bits could have been fitted to the model (sign(X w) = b), "
                         f"and the p-value is not evidence of ownership")}


def key_evidence(key) -> dict[str, Any]:
    """Evidence kind of a whole key: committed only when every mark in it is."""
    marks = {m.id: classify_mark(m) for m in key.whitebox}
    parts = [f"white-box mark {i}: {c['kind']}" for i, c in marks.items()]
    kinds = [c["kind"] for c in marks.values()]
    if key.blackbox:
        for sec in sorted(key.blackbox):
            kinds.append(UNCOMMITTED)
            parts.append(f"black-box {sec}: uncommitted (key images and labels are chosen by the owner "
                         f"and not derived from a statement)")
    kind = COMMITTED if kinds and all(k == COMMITTED for k in kinds) else UNCOMMITTED
    if kind == COMMITTED:
        sentence = "committed evidence: every mark of the key derives from an owner statement"
    elif any(k == COMMITTED for k in kinds):
        sentence = "uncommitted evidence for part of the key (" + "; ".join(parts) + ")"
    else:
        sentence = ("uncommitted evidence: the key was not derived from an owner statement, so it could "
                    "have been fitted to the model after the fact")
    return {"kind": kind, "sentence": sentence, "marks": marks}


# ---------------------------------------------------------------- null checks
def null_checks(mark: WhiteboxMark) -> dict[str, Any]:
    """Does the fair-coin null hold for this key? Checks on X's rows, the bits and row independence."""
    T = mark.n_bits
    ones = int(mark.bits.sum())
    bal_p = stats.two_sided_binom_half(T, ones)
    bits = {"ones": ones, "n_bits": T, "p_value": bal_p, "passed": bal_p >= CHECK_LEVEL,
            "test": "two-sided exact binomial test of the number of ones against T/2"}
    if mark.projection.get("kind") == "generator":
        rows = {"passed": True, "by_construction": True,
                "detail": "X from the documented Gaussian generator: rows sign-symmetric by construction"}
        indep = {"passed": True, "by_construction": True, "detail": "rows drawn independently"}
        ok = True
        reason = ("fair coin: X is Gaussian from the documented generator, so for any weight w fixed "
                  "without X, sign(x_i . w) is a fair coin for every bit, whatever the bits")
        bits["needed"] = False
    else:
        X = mark.matrix()
        rows = _row_checks(X)
        indep = _independence(X)
        bits["needed"] = True
        ok = rows["passed"] and indep["passed"] and bits["passed"]
        failed = [n for n, c in (("rows", rows), ("independence", indep), ("bit_balance", bits)) if not c["passed"]]
        reason = ("fair coin: imported X passed the checks (dense, sign-symmetric, independent rows, "
                  "balanced bits)" if ok else
                  "fair coin not justified (" + ", ".join(failed) + " check failed): empirical null")
    return {"fair_coin": ok, "reason": reason, "level": CHECK_LEVEL,
            "checks": {"rows": rows, "bit_balance": bits, "independence": indep}}


def _row_checks(X: np.ndarray) -> dict[str, Any]:
    T, N = X.shape
    nnz = (X != 0).sum(axis=1)
    need = min(N, DENSE_ROW)
    sparse = int((nnz < need).sum())
    pos, neg = int((X > 0).sum()), int((X < 0).sum())
    entry_p = stats.two_sided_binom_half(pos + neg, pos)
    s = X.sum(axis=1)
    rs_pos, rs_neg = int((s > 0).sum()), int((s < 0).sum())
    rowsum_p = stats.two_sided_binom_half(rs_pos + rs_neg, rs_pos)
    passed = sparse == 0 and entry_p >= CHECK_LEVEL and rowsum_p >= CHECK_LEVEL
    return {"passed": passed, "by_construction": False, "sparse_rows": sparse,
            "min_nonzeros_per_row": int(nnz.min()), "dense_needs": need,
            "positive_entries": pos, "negative_entries": neg, "entry_sign_p": entry_p,
            "positive_row_sums": rs_pos, "negative_row_sums": rs_neg, "row_sum_sign_p": rowsum_p,
            "detail": (f"{sparse} of {T} rows have fewer than {need} nonzero entries; entry signs "
                       f"{pos}+/{neg}- (p = {entry_p:.3g}); row sums {rs_pos}+/{rs_neg}- (p = {rowsum_p:.3g})")}


def _independence(X: np.ndarray) -> dict[str, Any]:
    norms = np.linalg.norm(X, axis=1)
    zero = int((norms == 0).sum())
    U = X / np.where(norms > 0, norms, 1.0)[:, None]
    G = np.abs(U @ U.T)
    np.fill_diagonal(G, 0.0)
    dup = int((np.triu(G) > DUPLICATE_COS).sum())
    return {"passed": dup == 0 and zero == 0, "by_construction": False, "duplicate_rows": dup,
            "zero_rows": zero, "max_abs_cos": float(G.max()) if G.size else 0.0,
            "detail": f"{dup} pairs of rows with |cos| > {DUPLICATE_COS}, {zero} all-zero rows"}


# ---------------------------------------------------------------- empirical null
def default_null_corpus() -> list[Path]:
    """The third-party ONNX files under $WMAUDIT_DATA/thirdparty (docs/thirdparty.md), when present."""
    root = Path(os.environ.get("WMAUDIT_DATA", Path(__file__).resolve().parents[2] / "build" / "data"))
    folder = root / "thirdparty"
    return sorted(folder.glob("*.onnx")) if folder.is_dir() else []


def expand_corpus(paths) -> list[Path]:
    out: list[Path] = []
    for p in paths or []:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(p.rglob("*.onnx")))
        elif p.is_file():
            out.append(p)
        else:
            raise AuditError(f"null corpus path not found: {p}")
    return out


def _windows(vec: np.ndarray, n: int) -> list[np.ndarray]:
    """Non-overlapping length-n windows, at most PER_TENSOR of them, evenly spread (deterministic)."""
    k = vec.size // n
    if k == 0:
        return []
    starts = np.arange(k) * n
    if k > PER_TENSOR:
        starts = starts[np.linspace(0, k - 1, PER_TENSOR).round().astype(int)]
    return [vec[s:s + n] for s in starts]


def _tensor_windows(store, n: int, reduce: str) -> list[tuple[str, list[np.ndarray]]]:
    """(sha256 of the float32 torch-layout tensor, its windows) for every weight of rank >= 2."""
    from auditor.marks.keys import reduce_weight
    from auditor.read.layout import torch_views

    out = []
    names = set()
    for v in torch_views(store):
        if v.weight.name in names or len(v.shape) < 2:
            continue
        names.add(v.weight.name)
        if reduced_length(v.shape, reduce) < n:
            continue
        a = np.ascontiguousarray(v.array(), dtype=np.float32)
        h = hashlib.sha256(a.tobytes()).hexdigest()
        if not np.isfinite(a).all() or float(a.std()) == 0.0:
            out.append((h, []))
            continue
        out.append((h, [w for w in _windows(reduce_weight(a, reduce), n) if float(w.std()) > 0]))
    return out


@functools.lru_cache(maxsize=64)
def _file_windows(path: str, mtime_ns: int, size: int, n: int, reduce: str):
    """Windows of a corpus file, read once per process (robustness grids re-extract many times)."""
    from auditor.read.weights import WeightStore

    return _tensor_windows(WeightStore.open(path), n, reduce)


def null_vectors(sources, mark: WhiteboxMark, exclude: set[str]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Unrelated weight vectors of the key's length N (reduced as the key says), as an N x n matrix.

    ``sources``: (label, WeightStore or path) pairs. Every weight of rank >= 2 (one
    torch view per weight), minus the tensors in ``exclude`` (sha256 of their float32
    torch-layout bytes: the candidates the key was scored on); identical tensors are
    used once."""
    N = mark.n_coeffs
    seen = set(exclude)
    cols: list[np.ndarray] = []
    out = []
    for label, src in sources:
        if isinstance(src, (str, Path)):
            st = os.stat(src)
            tensors = _file_windows(str(Path(src).resolve()), st.st_mtime_ns, st.st_size, N, mark.reduce)
        else:
            tensors = _tensor_windows(src, N, mark.reduce)
        used = 0
        for h, wins in tensors:
            if h in seen:
                continue
            seen.add(h)
            cols.extend(wins)
            used += len(wins)
        out.append({"source": label, "vectors": used})
    M = np.stack(cols, axis=1) if cols else np.zeros((N, 0))
    return M, out


def empirical_null(mark: WhiteboxMark, matches: int, stores, exclude: set[str]) -> dict[str, Any]:
    """p = (1 + #{null matches >= observed}) / (1 + n) over unrelated weight vectors
    (``stores``: (label, WeightStore or path) pairs; ``exclude``: hashes of the scored candidates)."""
    M, sources = null_vectors(stores, mark, exclude)
    n = M.shape[1]
    out: dict[str, Any] = {"n": int(n), "sources": sources, "min_n": MIN_NULL,
                           "statistic": "matching bits of sign(X v) against the key's bits",
                           "vectors": (f"unrelated weights of rank >= 2 (other layers of the suspect file and "
                                       f"the null corpus), reduced by '{mark.reduce}', cut into non-overlapping "
                                       f"windows of N = {mark.n_coeffs} values (at most {PER_TENSOR} per tensor)")}
    if n == 0:
        out.update(exceed=0, p_value=1.0, resolution=1.0, refused=True,
                   reason=f"no unrelated weight vector of {mark.n_coeffs} values to build a null from")
        return out
    Y = mark.matrix() @ M.astype(np.float64)
    k = ((Y > 0).astype(np.uint8) == mark.bits[:, None]).sum(axis=0)
    exceed = int((k >= matches).sum())
    out.update(exceed=exceed, p_value=(1 + exceed) / (1 + n), resolution=1.0 / (1 + n),
               null_matches_mean=float(k.mean()), null_matches_sd=float(k.std()), null_matches_max=int(k.max()),
               refused=n < MIN_NULL,
               reason=(f"only {n} unrelated vectors of {mark.n_coeffs} values (< {MIN_NULL}): no empirical p"
                       if n < MIN_NULL else ""))
    return out


# ---------------------------------------------------------------- false-positive check
def committed_false_positives(paths, n_keys: int, *, first_key: int = 0, n_bits: int = 256,
                              max_coeffs: int = 16384, alpha: float = stats.DEFAULT_ALPHA,
                              owner: str = "wmaudit false-positive check") -> dict[str, Any]:
    """Random committed keys against files that carry none of them: how often is a mark "detected"?

    Key i is the statement (``owner``, nonce ``key-<i>``, date 2026-01-01); on each file it
    targets one weight of rank >= 2 (one torch view per weight, reduced length <= ``max_coeffs``)
    and a reduction, both chosen by ``default_rng(commit_seed)``; X and bits are the key's
    derived ones. Each file's weights are read once; each key's projection is one matrix
    product. Scored with ``auditor.marks.score.score`` (fair coin, m = 1: the statement
    names the weight). Returns counts of detections and of p <= 0.01 / 0.05 (a calibration
    check: under a valid null at most about 1 % / 5 % of pairs)."""
    from auditor.marks.score import score
    from auditor.read.layout import torch_views
    from auditor.read.weights import WeightStore

    files = []
    pairs = det = le01 = le05 = 0
    min_p = 1.0
    for path in paths:
        store = WeightStore.open(path)
        views, names = [], set()
        for v in torch_views(store):
            if v.weight.name in names or len(v.shape) < 2:
                continue
            names.add(v.weight.name)
            views.append(v)
        cache: dict[tuple[str, str], np.ndarray] = {}
        f_det = f_pairs = 0
        f_min = 1.0
        for i in range(first_key, first_key + n_keys):
            nonce = f"key-{i}"
            rng = np.random.default_rng(commit_seed(owner, nonce))
            reduce = ("mean", "flatten")[int(rng.integers(0, 2))]
            # a key never has more bits than coefficients (keys.make_mark refuses it)
            ok = [v for v in views if n_bits <= reduced_length(v.shape, reduce) <= max_coeffs
                  and (reduce == "flatten" or len(v.shape) >= 2)]
            if not ok:
                continue
            v = ok[int(rng.integers(0, len(ok)))]
            ck = (v.weight.name, reduce)
            if ck not in cache:
                from auditor.marks.keys import reduce_weight

                cache[ck] = reduce_weight(v.array(), reduce)
            mk = committed_mark(owner, nonce, "2026-01-01", param=v.weight.name, shape=v.shape, reduce=reduce,
                                n_bits=n_bits)
            s = score(mk, mk.matrix() @ cache[ck], alpha, 1)
            p = s["p_value"]
            f_pairs += 1
            f_det += s["verdict"] == stats.DETECTED
            f_min = min(f_min, p)
            le01 += p <= 0.01
            le05 += p <= 0.05
        files.append({"file": Path(path).name, "pairs": f_pairs, "detections": f_det, "min_p": f_min,
                      "weights": len(views)})
        pairs += f_pairs
        det += f_det
        min_p = min(min_p, f_min)
    return {"keys": n_keys, "first_key": first_key, "n_bits": n_bits, "max_coeffs": max_coeffs, "alpha": alpha,
            "owner": owner, "pairs": pairs, "detections": det, "min_p": min_p,
            "p_le_0.01": le01, "p_le_0.05": le05, "files": files}

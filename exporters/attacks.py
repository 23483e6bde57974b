"""Torch-side attacks: fine-tuning on clean data, and quantization-aware training.

Both return a new model (the input is deep-copied, never trained in place);
the result is exported to ONNX and audited from there like any other file.

* ``fine_tune``: N seeded epochs of plain cross-entropy on clean data (no
  watermark loss): the classic removal attempt by a thief with some data.
* ``qat``: quantization-aware training with weight fake-quantization.
  Every Conv2d / Linear weight is re-parametrised as
  ``torch.fake_quantize_per_channel_affine(w, s, 0, axis=0, -127, 127)`` with
  ``s = max|w| / 127`` per output channel (symmetric int8, the grid
  onnxruntime's per-channel QDQ uses), gradients by the straight-through
  estimator; the network trains N epochs on clean data through that grid.
  Afterwards the parametrisation is removed keeping the fake-quantized
  values, so the weights exported to ONNX lie on the int8 grid; the deployed
  int8 model is then made by onnxruntime static quantization of that float
  export (``wmaudit attack --quantize static-qdq-per-channel``).

  Why not ``torch.ao.quantization`` prepare_qat/convert: the converted
  quantized torch modules do not export through torch 2.13's ONNX exporter,
  and onnxruntime's quantizer is the deployment path this project audits.
  Activations are not fake-quantized during training (the int8 activation
  ranges come from onnxruntime's calibration afterwards); the weight grid is
  what matters for a white-box mark.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, lr: float,
           batch: int) -> nn.Module:
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(int(epochs)):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i: i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 1, seed: int = 0,
              lr: float = 1e-3, batch: int = 64) -> nn.Module:
    """A copy of ``model`` fine-tuned on clean (x, y) for ``epochs`` seeded epochs."""
    torch.manual_seed(int(seed))
    return _train(copy.deepcopy(model), x, y, epochs, seed, lr, batch)


class FakeQuantInt8(nn.Module):
    """Symmetric per-output-channel int8 fake quantization of a weight (straight-through gradient)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-12)
        scale = (amax / 127.0).float()
        zero = torch.zeros(w.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


def quantizable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def qat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 1, seed: int = 0,
        lr: float = 5e-4, batch: int = 64) -> nn.Module:
    """A copy of ``model`` trained ``epochs`` seeded epochs with int8 weight fake-quantization;
    its weights end on the per-channel int8 grid (see the module docstring)."""
    torch.manual_seed(int(seed))
    m = copy.deepcopy(model)
    mods = quantizable_modules(m)
    for _, mod in mods:
        parametrize.register_parametrization(mod, "weight", FakeQuantInt8())
    _train(m, x, y, epochs, seed, lr, batch)
    for _, mod in mods:
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return m


def on_int8_grid(w: torch.Tensor) -> bool:
    """True when every output channel of w is an integer multiple of its max|w|/127 (to float precision)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-12)
    q = w.detach().reshape(w.shape[0], -1) / (amax / 127.0)[:, None]
    return bool(torch.allclose(q, q.round(), atol=1e-3))

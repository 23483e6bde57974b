"""Architectures users ship, in miniature: a residual CNN, a MobileNetV2-style net,
a small ViT and a small BERT-style encoder, with the exports a user would make.

Each model names the parameters a white-box mark targets (``MARK_TARGETS``);
they are small enough to train in seconds on one core.

* ``ResNetS``      32x32 single-channel input (Fashion-MNIST padded by 2), stem
  conv 1->16, layer1 = one basic block 16->16, layer2 = basic blocks 16->32
  (stride 2, 1x1 downsample) and 32->32, global average pool, fc 32->10. Every
  conv is followed by BatchNorm (no conv bias; torchvision's ``zero_init_residual``). Target ``layer2.1.conv2.weight``
  [32, 32, 3, 3] (a late conv, as in the ResNet-18 report: ``mean`` -> 288 values).
* ``MobileNetS``   28x28: stem conv 1->16 stride 2, two inverted-residual blocks
  (pointwise expand x4 + BN + ReLU6, depthwise 3x3 + BN + ReLU6, pointwise
  project + BN), pool, fc. Target: the pointwise projection
  ``blocks.1.project.weight`` [32, 96, 1, 1]. A depthwise conv [C, 1, 3, 3] under
  ``mean`` reduces to 9 values: no key of more than 9 bits fits it (refused).
* ``ViTS``         28x28: 4x4 patches (conv, 49 tokens of 32), learned positions,
  two pre-norm blocks (fused ``qkv`` Linear 32->96, 4 heads; MLP 32->64->32),
  mean-pooled tokens, head 32->10. Targets ``blocks.0.attn.qkv.weight`` [96, 32]
  (an attention projection) and ``blocks.1.mlp.fc1.weight`` [64, 32].
* ``BertS``        two inputs ``input_ids`` [B, T] int64 and ``attention_mask``
  [B, T] int64 (1 = token, 0 = padding): word + position embeddings, LayerNorm,
  one encoder layer (split ``query`` / ``key`` / ``value`` Linear 32->32, 4 heads,
  masked softmax; FFN 32->64->32), masked mean pool, head to the vocabulary
  (next character after the window). Targets ``encoder.0.attention.query.weight``
  [32, 32] and the word-embedding table ``embeddings.word.weight`` [V, 32]
  (read by Gather in ONNX, torch layout [V, D]).

Exports: ``export_default`` is ``torch.onnx.export(..., dynamo=True)`` with torch's
defaults (``optimize=True``: BatchNorm folded into the convs, Linear weights on
3-D inputs transposed and renamed ``val_*``, no manifest) except a dynamic batch
axis; ``export_kept`` keeps BatchNorm (``exporters.export``'s onnxscript pass list
minus the BatchNorm fusions).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

MARK_TARGETS = {
    "ResNetS": ("layer2.1.conv2.weight",),
    "MobileNetS": ("blocks.1.project.weight",),
    "ViTS": ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight"),
    "BertS": ("encoder.0.attention.query.weight", "embeddings.word.weight"),
}
DEPTHWISE_EXAMPLE = "blocks.1.depthwise.weight"


# ------------------------------------------------------------------ ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetS(nn.Module):
    """``zero_init_residual`` as in torchvision's ResNet: each block's last BN starts at
    gamma = 0, so after training its per-channel scales spread widely and change sign,
    which is what makes BatchNorm folding destroy a ``mean`` mark on the conv before it."""

    def __init__(self, n_classes: int = 10, zero_init_residual: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.fc = nn.Linear(32, n_classes)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(F.max_pool2d(x, 2)))
        return self.fc(x.mean(dim=(2, 3)))


# ------------------------------------------------------------------ MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int = 4, stride: int = 1):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(mid)
        self.depthwise = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn_depthwise = nn.BatchNorm2d(mid)
        self.project = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn_project = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self.bn_expand(self.expand(x)))
        y = F.relu6(self.bn_depthwise(self.depthwise(y)))
        y = self.bn_project(self.project(y))
        return x + y if self.residual else y


class MobileNetS(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 2, 1, bias=False)
        self.bn_stem = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(InvertedResidual(16, 24, 4, 2), InvertedResidual(24, 32, 4, 1))
        self.fc = nn.Linear(32, n_classes)

    def forward(self, x):
        x = F.relu6(self.bn_stem(self.stem(x)))
        return self.fc(self.blocks(x).mean(dim=(2, 3)))


# ------------------------------------------------------------------ ViT
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTS(nn.Module):
    def __init__(self, n_classes: int = 10, dim: int = 32, depth: int = 2, heads: int = 4, patch: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (28 // patch) ** 2, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


# ------------------------------------------------------------------ BERT
class Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, max_len: int):
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        return self.norm(self.word(ids) + self.position(pos))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        s = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        s = s + (1.0 - mask[:, None, None, :].to(s.dtype)) * -1e4
        return self.output((torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.attention = SelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = Mlp(dim, hidden)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x, mask):
        x = self.norm1(x + self.attention(x, mask))
        return self.norm2(x + self.ffn(x))


class BertS(nn.Module):
    def __init__(self, vocab: int, dim: int = 32, heads: int = 4, max_len: int = 32, layers: int = 1):
        super().__init__()
        self.embeddings = Embeddings(vocab, dim, max_len)
        self.encoder = nn.ModuleList([EncoderLayer(dim, heads, 2 * dim) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask):
        x = self.embeddings(input_ids)
        for layer in self.encoder:
            x = layer(x, attention_mask)
        m = attention_mask.to(x.dtype).unsqueeze(-1)
        return self.head((x * m).sum(1) / m.sum(1).clamp(min=1.0))


# ------------------------------------------------------------------ exports
def _dynamic_batch(n_inputs: int):
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in range(n_inputs))


def export_default(model: nn.Module, example: Sequence[torch.Tensor], path: str | Path,
                   input_names: Sequence[str] = ("input",)) -> Path:
    """torch.onnx.export(dynamo=True) with torch's default optimize=True (BatchNorm folded,
    transposed Linear weights renamed); the batch axis dynamic; one self-contained file."""
    path = Path(path)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, tuple(example), dynamo=True, input_names=list(input_names),
                                 output_names=["output"], dynamic_shapes=_dynamic_batch(len(example)),
                                 verbose=False)
        prog.save(path, external_data=False)
    return path


def export_kept(model: nn.Module, example: Sequence[torch.Tensor], path: str | Path,
                input_names: Sequence[str] = ("input",)) -> Path:
    """dynamo export with BatchNorm kept (``exporters.export``'s pass list minus the BN fusions)."""
    from exporters.export import _keep_batchnorm_optimize

    path = Path(path)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, tuple(example), dynamo=True, optimize=False, opset_version=18,
                                 input_names=list(input_names), output_names=["output"],
                                 dynamic_shapes=_dynamic_batch(len(example)), verbose=False)
        _keep_batchnorm_optimize(prog.model)
        prog.save(path, external_data=False)
    return path

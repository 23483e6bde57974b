"""The blocks real networks are made of, in miniature, each with the width of one hidden
axis as a constructor argument (so an obfuscated copy with more channels is the same class).

Input: Fashion-MNIST downsampled to 16x16 (one channel), 10 classes.

* ``BasicNet``       stem conv 1->16 + BN + ReLU, max-pool to 8x8, one ResNet basic block
  (conv1 3x3 16->h + BN + ReLU, conv2 3x3 h->16 + BN, identity skip, ReLU), average pool, fc.
  Mark target ``block.conv2.weight`` [16, h, 3, 3]: its input axis is conv1's outputs.
* ``BottleneckNet``  stem 1->32, a bottleneck block as torchvision defines it (conv1 1x1
  32->h1, conv2 3x3 h1->h2, conv3 1x1 h2->32, BN after each, ReLU, identity skip). Target
  ``block.conv2.weight`` [h2, h1, 3, 3] (inputs: conv1's outputs; outputs read by conv3).
* ``InvertedNet``    stem 1->16 + ReLU6, a MobileNetV2 inverted residual (expand 1x1 16->h,
  depthwise 3x3, project 1x1 h->16; BN after each; ReLU6 after the first two; identity skip).
  Target ``block.project.weight`` [16, h, 1, 1] (inputs: the expansion's channels through the
  depthwise conv).
* ``MlpNet``         4x4 patches -> 16 tokens of 32, learned positions, a pre-norm transformer
  MLP (LayerNorm, fc1 32->h, GELU, fc2 h->32, residual), LayerNorm, mean over tokens, head.
  Target ``mlp.fc2.weight`` [32, h] (inputs: fc1's outputs through the GELU).
* ``AttnNet``        the same tokens through one pre-norm self-attention (separate q / k Linear
  32->32, 4 heads of 8; value Linear 32->4*head_dim, head_dim 16; output projection 4*16->32),
  residual. Target ``attn.out.weight`` [32, 64] (inputs: the value projection's outputs, per head).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicNet(nn.Module):
    def __init__(self, h: int = 16, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.block = nn.Module()
        self.block.conv1 = nn.Conv2d(16, h, 3, 1, 1, bias=False)
        self.block.bn1 = nn.BatchNorm2d(h)
        self.block.conv2 = nn.Conv2d(h, 16, 3, 1, 1, bias=False)
        self.block.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem_bn(self.stem(x))), 2)
        b = self.block
        y = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
        return self.fc(F.relu(x + y).mean(dim=(2, 3)))


class BottleneckNet(nn.Module):
    def __init__(self, h1: int = 16, h2: int = 16, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(32)
        self.block = nn.Module()
        self.block.conv1 = nn.Conv2d(32, h1, 1, bias=False)
        self.block.bn1 = nn.BatchNorm2d(h1)
        self.block.conv2 = nn.Conv2d(h1, h2, 3, 1, 1, bias=False)
        self.block.bn2 = nn.BatchNorm2d(h2)
        self.block.conv3 = nn.Conv2d(h2, 32, 1, bias=False)
        self.block.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem_bn(self.stem(x))), 2)
        b = self.block
        y = F.relu(b.bn1(b.conv1(x)))
        y = F.relu(b.bn2(b.conv2(y)))
        y = b.bn3(b.conv3(y))
        return self.fc(F.relu(x + y).mean(dim=(2, 3)))


class InvertedNet(nn.Module):
    def __init__(self, h: int = 96, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.block = nn.Module()
        self.block.expand = nn.Conv2d(16, h, 1, bias=False)
        self.block.bn_expand = nn.BatchNorm2d(h)
        self.block.depthwise = nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False)
        self.block.bn_depthwise = nn.BatchNorm2d(h)
        self.block.project = nn.Conv2d(h, 16, 1, bias=False)
        self.block.bn_project = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu6(self.stem_bn(self.stem(x))), 2)
        b = self.block
        y = F.relu6(b.bn_expand(b.expand(x)))
        y = F.relu6(b.bn_depthwise(b.depthwise(y)))
        y = b.bn_project(b.project(y))
        return self.fc((x + y).mean(dim=(2, 3)))


class _Tokens(nn.Module):
    def __init__(self, dim: int = 32, patch: int = 4, size: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2, dim))

    def forward(self, x):
        return self.patch(x).flatten(2).transpose(1, 2) + self.pos


class MlpNet(nn.Module):
    def __init__(self, h: int = 64, dim: int = 32, n_classes: int = 10):
        super().__init__()
        self.tokens = _Tokens(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, h)
        self.mlp.fc2 = nn.Linear(h, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        t = self.tokens(x)
        t = t + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm1(t))))
        return self.head(self.norm(t).mean(1))


class AttnNet(nn.Module):
    def __init__(self, head_dim: int = 16, heads: int = 4, dim: int = 32, n_classes: int = 10):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.tokens = _Tokens(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.q = nn.Linear(dim, 32)
        self.attn.k = nn.Linear(dim, 32)
        self.attn.v = nn.Linear(dim, heads * head_dim)
        self.attn.out = nn.Linear(heads * head_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        t = self.tokens(x)
        B, T, _ = t.shape
        a = self.attn
        u = self.norm1(t)
        q = a.q(u).reshape(B, T, self.heads, -1).transpose(1, 2)
        k = a.k(u).reshape(B, T, self.heads, -1).transpose(1, 2)
        v = a.v(u).reshape(B, T, self.heads, self.head_dim).transpose(1, 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1)
        o = (w @ v).transpose(1, 2).reshape(B, T, self.heads * self.head_dim)
        t = t + a.out(o)
        return self.head(self.norm(t).mean(1))


class InvertedSENet(InvertedNet):
    """``InvertedNet`` with a MobileNetV3 squeeze-excitation gate after the depthwise conv
    (average pool, 1x1 conv h->8 + ReLU, 1x1 conv 8->h, HardSigmoid, times the channels)."""

    def __init__(self, h: int = 96, n_classes: int = 10):
        super().__init__(h, n_classes)
        self.block.se_reduce = nn.Conv2d(h, 8, 1)
        self.block.se_expand = nn.Conv2d(8, h, 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu6(self.stem_bn(self.stem(x))), 2)
        b = self.block
        y = F.relu6(b.bn_expand(b.expand(x)))
        y = F.relu6(b.bn_depthwise(b.depthwise(y)))
        s = F.hardsigmoid(b.se_expand(F.relu(b.se_reduce(y.mean(dim=(2, 3), keepdim=True)))))
        y = b.bn_project(b.project(y * s))
        return self.fc((x + y).mean(dim=(2, 3)))

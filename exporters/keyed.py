"""Keyed models of source document 003 on the torch side: a small ViT, block-wise
image encryption and the model transformation, export of plain and keyed models.

* ``TinyViT``: patch size 4 on 28x28 Fashion-MNIST (7x7 = 49 patches), a class
  token, learned position embedding [1, 50, D], pre-norm transformer blocks,
  head on the class token. ``patch="conv"`` embeds patches with a Conv2d of
  kernel = stride = 4; ``patch="linear"`` patchifies with reshape/permute in
  (row, column, channel) order (einops ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``)
  and a Linear -- the two layouts an ONNX file can show.
* ``encrypt_images``: torch version of ``auditor.keyed.cipher.encrypt``.
* ``encrypt_model``: W' = W M^T on the patch embedding seen as [D, L]
  ((channel, row, column) order), position rows 1..N permuted with the block
  permutation (class token row 0 kept). For an encrypted block x' = M x,
  W' x' = W M^T M x = W x, and the token at position k (plain block perm[k])
  gets the plain position row perm[k]; the token sequence is a permutation of
  the plain one, to which attention and the class-token head are invariant.
* ``SmallConvNet``: a CNN without a patch embedding, for the contrast of the
  benchmark (a plain-trained CNN cannot absorb the key).

Keys are the auditor's own files (``auditor.keyed.keys``: generator + seed).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from auditor.keyed.keys import KeyedKey


class Block(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, image: int = 28, channels: int = 1, patch: int = 4, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp: int = 128, n_classes: int = 10, patch_kind: str = "conv"):
        super().__init__()
        if patch_kind not in ("conv", "linear"):
            raise ValueError("patch_kind must be 'conv' or 'linear'")
        self.image, self.channels, self.patch, self.patch_kind = image, channels, patch, patch_kind
        n = (image // patch) ** 2
        if patch_kind == "conv":
            self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        else:
            self.patch_embed = nn.Linear(channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_kind == "conv":
            return self.patch_embed(x).flatten(2).transpose(1, 2)
        b, c, hh, ww = x.shape
        p = self.patch
        t = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        return self.patch_embed(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])

    def patch_weight_dl(self) -> torch.Tensor:
        """The patch-embedding weight as [D, L], L in (channel, row, column) order."""
        w = self.patch_embed.weight
        if self.patch_kind == "conv":
            return w.reshape(w.shape[0], -1)
        d, p, c = w.shape[0], self.patch, self.channels
        return w.reshape(d, p, p, c).permute(0, 3, 1, 2).reshape(d, -1)

    def set_patch_weight_dl(self, w_dl: torch.Tensor) -> None:
        d, p, c = w_dl.shape[0], self.patch, self.channels
        with torch.no_grad():
            if self.patch_kind == "conv":
                self.patch_embed.weight.copy_(w_dl.reshape(d, c, p, p))
            else:
                self.patch_embed.weight.copy_(w_dl.reshape(d, c, p, p).permute(0, 2, 3, 1).reshape(d, -1))


def as_linear_patch(model: TinyViT) -> TinyViT:
    """The same function with a reshape/permute patchify + Linear patch embedding."""
    out = TinyViT(model.image, model.channels, model.patch, model.pos_embed.shape[-1], len(model.blocks),
                  model.blocks[0].heads, model.blocks[0].fc1.out_features, model.head.out_features, "linear")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("patch_embed.")}
    out.load_state_dict(state, strict=False)
    out.set_patch_weight_dl(model.patch_weight_dl().detach())
    with torch.no_grad():
        out.patch_embed.bias.copy_(model.patch_embed.bias)
    return out.eval()


def encrypt_images(x: torch.Tensor, key: KeyedKey) -> torch.Tensor:
    """Block-wise encryption of model inputs [n, C, H, W] with the key (torch, float64 inside)."""
    n, c, h, w = x.shape
    b = key.block
    gh, gw = h // b, w // b
    blocks = x.double().reshape(n, c, gh, b, gw, b).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * b * b)
    blocks = blocks[:, torch.from_numpy(key.perm)] @ torch.from_numpy(key.matrix).T
    out = blocks.reshape(n, gh, gw, c, b, b).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
    return out.to(x.dtype)


def encrypt_model(model: TinyViT, key: KeyedKey) -> TinyViT:
    """A keyed copy of ``model`` (no retraining): W' = W M^T, pos rows 1.. permuted by perm."""
    if key.block != model.patch:
        raise ValueError(f"key block {key.block} != patch size {model.patch}")
    keyed = copy.deepcopy(model).eval()
    m = torch.from_numpy(key.matrix)
    keyed.set_patch_weight_dl((model.patch_weight_dl().detach().double() @ m.T).float())
    with torch.no_grad():
        pos = model.pos_embed.detach()
        keyed.pos_embed.copy_(torch.cat([pos[:, :1], pos[:, 1:][:, torch.from_numpy(key.perm)]], dim=1))
    return keyed


class SmallConvNet(nn.Module):
    """conv(1->32) pool conv(32->64) pool fc(3136->128->10): no patch embedding to absorb a key."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def logits(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def train_and_issue(out, *, clients: int = 3, variant: str = "orthogonal", first_seed: int = 100,
                    train_examples: int = 10000, epochs: int = 3, seed: int = 0, dim: int = 64,
                    depth: int = 2) -> dict:
    """Owner side in one call: train a TinyViT on Fashion-MNIST, export plain.onnx, issue one key
    per client (seeds first_seed + 10 i) and export each client's keyed model (torch transformation),
    checked against the plain file with onnxruntime on encrypted test images."""
    import json
    from pathlib import Path

    import onnx

    from auditor.keyed import keys
    from auditor.keyed import model as km

    from . import data, export, train

    out = Path(out)
    (out / "keys").mkdir(parents=True, exist_ok=True)
    train.seeded(seed, 1)
    x, y = data.fashion("train", n=train_examples, seed=seed)
    xt, yt = data.fashion("test", n=1000, seed=seed)
    model = TinyViT(dim=dim, depth=depth)
    metrics = train.train_classifier(model, x, y, epochs=epochs, batch=64, lr=2e-3, seed=seed, test=(xt, yt))
    export.export_onnx(model, xt[:2], out / "plain.onnx", dynamic_axes={0: "batch"})
    plain = onnx.load(str(out / "plain.onnx"))
    issued = []
    for i in range(clients):
        name = f"client-{i}"
        key = keys.save(keys.generate(image_size=model.image, channels=model.channels, block=model.patch,
                                      seed=first_seed + 10 * i, variant=variant, client=name),
                        out / "keys" / f"{name}.json")
        path = out / f"{name}.onnx"
        export.export_onnx(encrypt_model(model, key), xt[:2], path, dynamic_axes={0: "batch"})
        par = km.parity(plain, onnx.load(str(path)), key, xt.numpy())
        if not par["holds"]:
            raise export.ExportError(f"{path}: keyed model does not match the plain model ({par})")
        issued.append({"client": name, "onnx": path.name, "key": f"keys/{name}.json",
                       "commitment": key.commitment, "parity": par})
    info = {"metrics": metrics, "train_examples": train_examples, "epochs": epochs, "seed": seed,
            "model": {"patch": model.patch, "dim": dim, "depth": depth}, "clients": issued}
    (out / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m exporters.keyed",
                                 description="Train a TinyViT, export it and one keyed model per client.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--variant", choices=("orthogonal", "permutation"), default="orthogonal")
    ap.add_argument("--first-seed", type=int, default=100)
    ap.add_argument("--train-examples", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    info = train_and_issue(a.out, clients=a.clients, variant=a.variant, first_seed=a.first_seed,
                           train_examples=a.train_examples, epochs=a.epochs, seed=a.seed)
    print(f"{a.out}: plain.onnx (test accuracy {info['metrics']['test_accuracy']:.4f}) and "
          f"{len(info['clients'])} keyed models; keys in {a.out}/keys")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

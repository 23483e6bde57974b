"""Perceptual hashes from a CNN's intermediate layer (source document 004), torch side.

Data (offline, from installed wheels): natural photographs of scikit-image
(``skimage.data``) and scikit-learn (``load_sample_images``), in grayscale.
*Signal* = seeded edits of one photograph (``astronaut``); *Noise* = edits of
other photographs and *similar images*: other portraits (the 100 LFW face
crops shipped in scikit-image; 60 for training, 40 held out). Edits (Pillow): random crop (80-100 % of each side),
rotation (+-25 deg), scale (0.8-1.25), shift (+-10 %), JPEG (quality 30-95).
Photographs are split: Noise training uses some, the held-out Noise test uses
photographs never seen in training; faces are split the same way.

Model: a VGG-style CNN (three blocks of two 3x3 convs + max pooling) whose
last pooling layer has 32 x 4 x 4 = 512 nodes, as the document's 512 pooling
nodes. No pretrained weights can be downloaded, so it is first trained on real
data (Fashion-MNIST, padded / resized to the image size), then fine-tuned to
tell Signal from Noise (class-balanced cross-entropy). With ``separate=True``
a contrastive term around the Signal centre is added (the authors' open
problem, overlapping clusters): Signal features pulled to their batch centre,
Noise features pushed beyond a margin, distances in units of the batch's RMS
feature spread.

Hashes on the 512 pooling nodes: PCA (2 components, fitted on the training
Signal + Noise features) and a VAE with a 2-D latent (the encoder's mean);
centroid = mean latent of the training Signal edits; R = the 95th percentile
(numpy ``higher``) of the distances of *held-out* Signal edits (another seed).
Exports: ``model.onnx`` (the fine-tuned classifier; the pooling layer is an
internal tensor named in ``manifest.json``), ``features.onnx`` (the CNN up to
that layer), ``pca.onnx`` (one Gemm), ``vae_encoder.onnx``; hash files in the
auditor's ``wmaudit-phash/1`` format.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SIGNAL_PHOTO = "astronaut"
NOISE_TRAIN_PHOTOS = ("camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "brick", "grass",
                      "hubble_deep_field", "immunohistochemistry", "china")
NOISE_HELDOUT_PHOTOS = ("clock", "cell", "text", "gravel", "retina", "flower", "colorwheel")
N_FACES_TRAIN = 60  # of the 100 LFW face crops: the first 60 for training, the last 40 held out


# ------------------------------------------------------------------ photographs and edits
def photographs(max_side: int = 256) -> dict[str, np.ndarray]:
    """Grayscale uint8 photographs by name (scikit-image and scikit-learn, no download),
    shrunk so that the shorter side is at most ``max_side`` (edits work at 2 x 32 or 2 x 64)."""
    import skimage.data as skd
    from skimage.color import rgb2gray
    from sklearn.datasets import load_sample_images

    out = {}
    for name in (SIGNAL_PHOTO, *NOISE_TRAIN_PHOTOS, *NOISE_HELDOUT_PHOTOS):
        if name in ("china", "flower"):
            continue
        a = getattr(skd, name)()
        if a.ndim == 3:
            a = rgb2gray(a[..., :3])
        out[name] = _u8(a)
    s = load_sample_images()
    for fn, img in zip(s.filenames, s.images):
        out[Path(fn).stem] = _u8(rgb2gray(img))
    return {k: _shrink(v, max_side) for k, v in out.items()}


def _shrink(a: np.ndarray, max_side: int) -> np.ndarray:
    from PIL import Image

    h, w = a.shape
    f = max_side / min(h, w)
    if f >= 1:
        return a
    return np.asarray(Image.fromarray(a).resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS))


def faces() -> np.ndarray:
    """The 100 LFW face crops of scikit-image (25 x 25, uint8): portraits similar to the Signal's.
    (``lfw_subset`` holds 100 faces followed by 100 non-face patches; only the faces are used.)"""
    import skimage.data as skd

    return _u8(skd.lfw_subset()[:100])


def _u8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    if a.max() <= 1.0 + 1e-9:
        a = a * 255.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def edit(img_u8: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """One seeded edit (crop, rotation, scale, shift, JPEG) of a grayscale photo -> [size, size] float32 in [0, 1]."""
    from PIL import Image

    im = Image.fromarray(img_u8, mode="L")
    w, h = im.size
    side = min(w, h)
    # square crop of 80-100 % of the shorter side, around the centre
    c = int(side * rng.uniform(0.8, 1.0))
    x0 = int((w - c) / 2 + rng.uniform(-0.5, 0.5) * (side - c))
    y0 = int((h - c) / 2 + rng.uniform(-0.5, 0.5) * (side - c))
    x0, y0 = min(max(x0, 0), w - c), min(max(y0, 0), h - c)
    work = 2 * size
    im = im.crop((x0, y0, x0 + c, y0 + c)).resize((work, work), Image.BILINEAR)
    angle = math.radians(rng.uniform(-25.0, 25.0))
    scale = rng.uniform(0.8, 1.25)
    dx, dy = rng.uniform(-0.1, 0.1, 2) * work
    # PIL's affine maps output (x, y) to input coordinates: inverse of scale*rotate about the centre, then shift
    ca, sa = math.cos(angle) / scale, math.sin(angle) / scale
    cx = cy = work / 2
    a, b = ca, sa
    d, e = -sa, ca
    cc = cx - a * (cx + dx) - b * (cy + dy)
    f = cy - d * (cx + dx) - e * (cy + dy)
    im = im.transform((work, work), Image.AFFINE, (a, b, cc, d, e, f), resample=Image.BILINEAR,
                      fillcolor=int(np.asarray(im).mean()))
    im = im.resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(rng.integers(30, 96)))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L"), dtype=np.float32) / 255.0


def edits(img_u8: np.ndarray, n: int, seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([edit(img_u8, rng, size) for _ in range(n)])[:, None]


def edits_of_many(photos: list[np.ndarray], n: int, seed: int, size: int) -> np.ndarray:
    """n edits spread round-robin over ``photos``."""
    rng = np.random.default_rng(seed)
    return np.stack([edit(photos[i % len(photos)], rng, size) for i in range(n)])[:, None]


@dataclass
class ImageSets:
    """All sets as float32 [N, 1, S, S] in [0, 1]."""

    signal_train: np.ndarray
    signal_heldout: np.ndarray   # chooses R
    signal_test: np.ndarray      # unseen edits (TPR)
    noise_train: np.ndarray      # edits of training photos + training faces
    noise_test_seen: np.ndarray  # new edits of the training photos
    noise_test_unseen: np.ndarray  # edits of photographs never used in training
    similar_test: np.ndarray     # held-out faces (portraits like the Signal)

    def noise_test(self) -> np.ndarray:
        return np.concatenate([self.noise_test_seen, self.noise_test_unseen, self.similar_test])


def image_sets(size: int = 32, n_signal: int = 100, n_noise: int = 200, n_test: int = 100, seed: int = 0) -> ImageSets:
    """The document's sets: 100 Signal edits, 200 Noise (2/3 photo edits, 1/3 faces), seeded."""
    photos = photographs()
    fc = faces()
    sig = photos[SIGNAL_PHOTO]
    train_photos = [photos[n] for n in NOISE_TRAIN_PHOTOS]
    unseen_photos = [photos[n] for n in NOISE_HELDOUT_PHOTOS]
    n_face = n_noise // 3
    face_train = [f for f in fc[:N_FACES_TRAIN]]
    face_test = [f for f in fc[N_FACES_TRAIN:]]
    noise_train = np.concatenate([edits_of_many(train_photos, n_noise - n_face, seed + 11, size),
                                  edits_of_many(face_train, n_face, seed + 12, size)])
    return ImageSets(
        signal_train=edits(sig, n_signal, seed + 1, size),
        signal_heldout=edits(sig, n_signal, seed + 2, size),
        signal_test=edits(sig, n_test * 2, seed + 3, size),
        noise_train=noise_train,
        noise_test_seen=edits_of_many(train_photos, n_test, seed + 21, size),
        noise_test_unseen=edits_of_many(unseen_photos, n_test, seed + 22, size),
        similar_test=edits_of_many(face_test, n_test, seed + 23, size))


# ------------------------------------------------------------------ the CNN
class HashCNN(nn.Module):
    """VGG-style: 3 blocks of (conv3x3-ReLU) x 2 + max pool; the last pool has 32 x 4 x 4 = 512 nodes."""

    def __init__(self, size: int = 32, classes: int = 10, width: int = 8):
        super().__init__()
        w = width
        if size % 16 or size < 32:
            raise ValueError(f"image size must be a multiple of 16 and >= 32, got {size}")
        layers: list[tuple[str, nn.Module]] = []
        for i, (cin, cout) in enumerate([(1, w), (w, 2 * w), (2 * w, 4 * w)], start=1):
            layers += [(f"conv{i}a", nn.Conv2d(cin, cout, 3, padding=1)), (f"relu{i}a", nn.ReLU()),
                       (f"conv{i}b", nn.Conv2d(cout, cout, 3, padding=1)), (f"relu{i}b", nn.ReLU()),
                       (f"pool{i}", nn.MaxPool2d(2 if i < 3 else size // 16))]  # last: 4 x 4
        self.features = nn.Sequential(OrderedDict(layers))
        self.flatten = nn.Flatten()
        self.head = nn.Linear(4 * w * 16, classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooling layer's nodes, flattened: [N, 512]."""
        return self.flatten(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class FeatureNet(nn.Module):
    """The CNN up to the pooling layer (what features.onnx holds)."""

    def __init__(self, cnn: HashCNN):
        super().__init__()
        self.cnn = cnn

    def forward(self, x):
        return self.cnn.embed(x)


def fashion_inputs(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST train images in [0, 1] at ``size`` x ``size`` (padded when 32, else resized)."""
    from auditor.data import datasets

    images, labels = datasets.fashion_mnist("train")
    idx = np.sort(np.random.default_rng(seed).choice(len(labels), size=n, replace=False))
    x = torch.from_numpy(images[idx].astype(np.float32)[:, None] / 255.0)
    if size == 32:
        x = F.pad(x, (2, 2, 2, 2))
    elif size != 28:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(labels[idx].astype(np.int64))


def pretrain(size: int = 32, steps: int = 150, seed: int = 0, batch: int = 64, n: int = 6000) -> tuple[HashCNN, float]:
    """Train on Fashion-MNIST (10 classes); returns the model and its accuracy on the last 1,000 of the n images."""
    torch.manual_seed(seed)
    model = HashCNN(size)
    x, y = fashion_inputs(n, size, seed)
    xt, yt = x[-1000:], y[-1000:]
    x, y = x[:-1000], y[:-1000]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return model, acc


SEPARATION_WEIGHT = 0.1  # 0.3 and 1.0 separated as well but cost Signal/Noise classification accuracy


def separation_loss(f: torch.Tensor, is_signal: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Contrastive loss around the Signal centre: Signal pulled in, Noise pushed beyond ``margin``
    (distances in units of the batch's RMS spread, so the loss cannot shrink by rescaling)."""
    scale = (f - f.mean(0)).pow(2).sum(1).mean().sqrt().detach() + 1e-6
    c = f[is_signal].mean(0)
    d = (f - c).norm(dim=1) / scale
    return d[is_signal].pow(2).mean() + F.relu(margin - d[~is_signal]).pow(2).mean()


def finetune(model: HashCNN, signal: np.ndarray, noise: np.ndarray, *, steps: int = 120, seed: int = 0,
             separate: bool = False, weight: float = SEPARATION_WEIGHT, lr: float = 1e-3,
             new_head: bool = True) -> HashCNN:
    """Replace the head by Signal / Noise (class 1 / 0) and fine-tune everything (batches of
    16 Signal + 32 Noise). ``new_head=False`` continues training a fine-tuned model."""
    torch.manual_seed(seed)
    if new_head:
        model.head = nn.Linear(model.head.in_features, 2)
    xs, xn = torch.from_numpy(signal), torch.from_numpy(noise)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(xs), (16,), generator=g)
        j = torch.randint(0, len(xn), (32,), generator=g)
        x = torch.cat([xs[i], xn[j]])
        y = torch.cat([torch.ones(16, dtype=torch.long), torch.zeros(32, dtype=torch.long)])
        f = model.embed(x)
        loss = F.cross_entropy(model.head(f), y, weight=torch.tensor([1.0, 2.0]))
        if separate:
            loss = loss + weight * separation_loss(f, y == 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def embed_np(model: HashCNN, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.embed(torch.from_numpy(x)).numpy().astype(np.float64)


# ------------------------------------------------------------------ PCA and VAE hashes
def fit_pca(f: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components [k, D]) by SVD, signs fixed (largest coefficient positive)."""
    mean = f.mean(0)
    _, _, vt = np.linalg.svd(f - mean, full_matrices=False)
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    return mean, comps * signs[:, None]


class PCAGemm(nn.Module):
    """z = f @ components.T - mean @ components.T, exported as one Gemm."""

    def __init__(self, mean: np.ndarray, comps: np.ndarray):
        super().__init__()
        self.lin = nn.Linear(comps.shape[1], comps.shape[0])
        with torch.no_grad():
            self.lin.weight.copy_(torch.from_numpy(comps.astype(np.float32)))
            self.lin.bias.copy_(torch.from_numpy(-(mean @ comps.T).astype(np.float32)))

    def forward(self, f):
        return self.lin(f)


class VAE(nn.Module):
    """Features standardised (stored constants), MLP encoder to a 2-D Gaussian latent, MLP decoder."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, d: int = 512, hidden: int = 64, latent: int = 2):
        super().__init__()
        self.register_buffer("mu_f", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("sd_f", torch.from_numpy(std.astype(np.float32)))
        self.enc = nn.Sequential(nn.Linear(d, hidden), nn.ReLU())
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def standardise(self, f):
        return (f - self.mu_f) / self.sd_f

    def encode(self, f):
        h = self.enc(self.standardise(f))
        return self.mu(h), self.logvar(h)


class VAEEncoder(nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, f):
        return self.vae.encode(f)[0]


def train_vae(f: np.ndarray, steps: int = 400, seed: int = 0, beta: float = 1.0) -> VAE:
    torch.manual_seed(seed)
    mean, std = f.mean(0), f.std(0) + 1e-3
    vae = VAE(mean, std, d=f.shape[1])
    x = torch.from_numpy(f.astype(np.float32))
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        xb = vae.standardise(x[idx])
        mu, logvar = vae.encode(x[idx])
        z = mu + torch.randn(mu.shape, generator=g) * (0.5 * logvar).exp()
        rec = vae.dec(z)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
        loss = (rec - xb).pow(2).sum(1).mean() + beta * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    return vae


def vae_latents(vae: VAE, f: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return vae.encode(torch.from_numpy(f.astype(np.float32)))[0].numpy().astype(np.float64)


def radius_rule(z_train: np.ndarray, z_heldout: np.ndarray, q: float = 0.95) -> tuple[np.ndarray, float]:
    """centroid = mean of the training Signal latents; R = q-quantile ('higher') of held-out distances."""
    c = z_train.mean(0)
    return c, float(np.quantile(np.linalg.norm(z_heldout - c, axis=1), q, method="higher"))


def auc(pos_d: np.ndarray, neg_d: np.ndarray) -> float:
    from auditor.phash.hashing import auc as _auc

    return _auc(-pos_d, -neg_d)


def evaluate(z: dict[str, np.ndarray], c: np.ndarray, r: float) -> dict[str, Any]:
    """TPR on unseen Signal edits, FPR per Noise group, AUC and overlap at radius r."""
    d = {k: np.linalg.norm(v - c, axis=1) / r for k, v in z.items()}
    noise = np.concatenate([d["noise_test_seen"], d["noise_test_unseen"], d["similar_test"]])
    # overlap: share of Noise latents closer to the centroid than the farthest 5 % of unseen Signal edits
    return {"tpr_unseen_signal_edits": float(np.mean(d["signal_test"] <= 1)),
            "fpr_noise_seen_photos": float(np.mean(d["noise_test_seen"] <= 1)),
            "fpr_noise_unseen_photos": float(np.mean(d["noise_test_unseen"] <= 1)),
            "fpr_similar_images": float(np.mean(d["similar_test"] <= 1)),
            "fpr_all_noise": float(np.mean(noise <= 1)),
            "auc": auc(d["signal_test"], noise),
            "auc_vs_similar": auc(d["signal_test"], d["similar_test"]),
            "overlap_noise_within_signal_q95": float(np.mean(noise <= np.quantile(d["signal_test"], 0.95))),
            "median_distance_r": {k: float(np.median(v)) for k, v in d.items()}}


# ------------------------------------------------------------------ export
def _export(module: nn.Module, sample: torch.Tensor, path: Path, input_name: str, output_name: str,
            atol: float = 1e-4) -> float:
    import onnxruntime as ort

    module.eval()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.onnx.export(module, (sample[:1],), str(tmp), dynamo=False, opset_version=17,
                      input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(None, {input_name: sample.numpy()})[0]
    with torch.no_grad():
        want = module(sample).numpy()
    diff = float(np.abs(got - want).max())
    if diff > atol:
        tmp.unlink()
        raise RuntimeError(f"{path.name}: ONNX output differs from torch by {diff:.3g} > {atol}")
    os.replace(tmp, path)
    return diff


def export_classifier(model: HashCNN, sample: np.ndarray, path: Path) -> float:
    """The classifier alone (same input / output names as the owner's model.onnx)."""
    return _export(model, torch.from_numpy(sample), path, "input", "logits")


def layer_tensor(path: Path) -> str:
    """Name of the pooling layer's flattened output in an exported classifier (the Flatten's output)."""
    import onnx

    m = onnx.load(str(path))
    flat = [n for n in m.graph.node if n.op_type == "Flatten"]
    if len(flat) != 1:
        raise RuntimeError(f"{path.name}: expected one Flatten node, found {len(flat)}")
    return flat[0].output[0]


def write_hash(folder: Path, name: str, model_file: str, layer: str | None, reduce: dict, centroid: np.ndarray,
               r: float, n_train: int, n_held: int, build: dict) -> Path:
    from auditor.phash.features import input_info
    from auditor.phash.hashfile import PerceptualHash, save_hash
    from auditor.results import file_sha256
    import onnx

    m = onnx.load(str(folder / model_file))
    inp, shape = input_info(m)
    h = PerceptualHash(model_sha256=file_sha256(folder / model_file), input_name=inp, input_shape=shape,
                       layer=layer, reduce=reduce, centroid=centroid, radius=r,
                       radius_rule={"kind": "quantile-of-heldout-signal", "q": 0.95, "n_centroid": n_train,
                                    "n_heldout": n_held, "split": "held-out Signal edits (another seed)", "seed": 0},
                       feature_dim=512, build=build)
    return save_hash(h, folder / name)


def save_npy(folder: Path, name: str, a: np.ndarray) -> None:
    tmp = folder / f".{name}.tmp{os.getpid()}.npy"
    np.save(tmp, np.ascontiguousarray(a, dtype=np.float32))
    os.replace(tmp, folder / name)


def build_all(out: Path, *, size: int = 32, pretrain_steps: int = 150, finetune_steps: int = 120,
              vae_steps: int = 400, seed: int = 0, separate: bool = False, sets: ImageSets | None = None,
              pretrained: HashCNN | None = None, write_sets: bool = True) -> dict[str, Any]:
    """Train, hash, export everything into ``out``; returns the measurements (also in ``metrics.json``)."""
    import copy

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    sets = sets or image_sets(size, seed=seed)
    if pretrained is None:
        base, pre_acc = pretrain(size, pretrain_steps, seed)
    else:
        base, pre_acc = copy.deepcopy(pretrained), None
    model = finetune(base, sets.signal_train, sets.noise_train, steps=finetune_steps, seed=seed, separate=separate)
    names = ("signal_train", "signal_heldout", "signal_test", "noise_train", "noise_test_seen",
             "noise_test_unseen", "similar_test")
    f = {k: embed_np(model, getattr(sets, k)) for k in names}
    with torch.no_grad():
        acc_sig = float((model(torch.from_numpy(sets.signal_test)).argmax(1) == 1).float().mean())
        acc_noise = float((model(torch.from_numpy(sets.noise_test())).argmax(1) == 0).float().mean())
    # PCA on training Signal + Noise features
    mean, comps = fit_pca(np.concatenate([f["signal_train"], f["noise_train"]]), 2)
    zp = {k: (v - mean) @ comps.T for k, v in f.items()}
    cp, rp = radius_rule(zp["signal_train"], zp["signal_heldout"])
    vae = train_vae(np.concatenate([f["signal_train"], f["noise_train"]]), vae_steps, seed)
    zv = {k: vae_latents(vae, v) for k, v in f.items()}
    cv, rv = radius_rule(zv["signal_train"], zv["signal_heldout"])
    # no reduction: the 512 nodes themselves
    cn, rn = radius_rule(f["signal_train"], f["signal_heldout"])
    metrics = {"size": size, "seed": seed, "separate": separate, "pretrain_accuracy": pre_acc,
               "classifier": {"signal_test_accuracy": acc_sig, "noise_test_accuracy": acc_noise},
               "pca": evaluate(zp, cp, rp), "vae": evaluate(zv, cv, rv), "none": evaluate(f, cn, rn),
               "radius": {"pca": rp, "vae": rv, "none": rn}}
    # exports
    sample = torch.from_numpy(np.concatenate([sets.signal_test[:8], sets.noise_test()[:8]]))
    fs = torch.from_numpy(f["signal_test"][:16].astype(np.float32))
    diffs = {"model.onnx": _export(model, sample, out / "model.onnx", "input", "logits"),
             "features.onnx": _export(FeatureNet(model), sample, out / "features.onnx", "input", "features"),
             "pca.onnx": _export(PCAGemm(mean, comps), fs, out / "pca.onnx", "features", "z"),
             "vae_encoder.onnx": _export(VAEEncoder(vae), fs, out / "vae_encoder.onnx", "features", "z")}
    layer = layer_tensor(out / "model.onnx")
    from auditor.results import file_sha256

    n_tr, n_he = len(sets.signal_train), len(sets.signal_heldout)
    write_hash(out, "hash_vae.json", "model.onnx", layer,
               {"kind": "encoder", "path": "vae_encoder.onnx", "sha256": file_sha256(out / "vae_encoder.onnx"),
                "input": "features", "output": "z"}, cv, rv, n_tr, n_he, {"torch_metrics": metrics["vae"]})
    write_hash(out, "hash_pca.json", "model.onnx", layer,
               {"kind": "pca", "k": 2, "mean": mean.tolist(), "components": comps.tolist(),
                "fitted_on": "training Signal and Noise features"}, cp, rp, n_tr, n_he,
               {"torch_metrics": metrics["pca"]})
    if write_sets:
        for k in names:
            save_npy(out, f"{k}.npy", getattr(sets, k))
        # torch latents of the unseen Signal edits and the Noise test set, for ONNX-vs-torch checks
        np.savez(out / "torch_latents.npz", **{f"{kind}_{k}": z[k] for kind, z in (("pca", zp), ("vae", zv), ("none", f))
                                              for k in ("signal_test", "noise_test_unseen")})
    manifest = {"format": "wmaudit-manifest/1", "onnx": "model.onnx", "layer": layer,
                "exporter": {"dynamo": False, "opset": 17, "torch": torch.__version__},
                "validation": {"max_abs_diff": diffs, "atol": 1e-4},
                "data": {"signal_photo": SIGNAL_PHOTO, "noise_train_photos": list(NOISE_TRAIN_PHOTOS),
                         "noise_heldout_photos": list(NOISE_HELDOUT_PHOTOS), "similar": "skimage.data.lfw_subset",
                         "size": size}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m exporters.phash --out DIR [--size 32] [--separate] [--seed 0]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m exporters.phash", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=32, help="image side (a multiple of 16, >= 32)")
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--finetune-steps", type=int, default=120)
    ap.add_argument("--separate", action="store_true", help="add the contrastive separating term")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    m = build_all(Path(a.out), size=a.size, pretrain_steps=a.pretrain_steps, finetune_steps=a.finetune_steps,
                  seed=a.seed, separate=a.separate)
    for kind in ("pca", "vae", "none"):
        e = m[kind]
        print(f"{kind:4s}: TPR {e['tpr_unseen_signal_edits']:.3f}  FPR noise {e['fpr_all_noise']:.3f}  "
              f"similar {e['fpr_similar_images']:.3f}  AUC {e['auc']:.4f}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
